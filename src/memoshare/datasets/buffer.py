"""The write buffer of a cache, its background flusher, and the lease relay of stampede
protection (a lease is released once its sample is in the store, or dropped)."""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import storage
from ..backends import Backend, BackendError, BackendRefused
from ..stampede import LEASE_SUFFIX

if TYPE_CHECKING:
    from ..health import StoreHealth
    from .bookkeeping import _Known, _Sizes

logger = logging.getLogger("memoshare")

#: A failed flush keeps its samples for the next one, up to this many times the buffer size.
PENDING_FACTOR = 4
#: Times the store may refuse a sample (it answers, but is full, say) before it is dropped.
REFUSED_TRIES = 3
#: Pauses between the attempts of a flush that may block (explicit, close, exit).
RETRY_PAUSES = (0.1, 0.5, 1.0)
_FLUSH_TICK = 0.1


# -- the write buffer ------------------------------------------------------------------------------
@dataclass
class _Pending:
    payload: bytes
    index: int | None
    since: float
    token: bytes | None = None  # of the stampede lease, released once the sample is written
    refusals: int = 0  # writes the store refused


class _WriteBuffer:
    """Samples waiting to be written together in one ``set_many``.

    Holds no reference to its owner, so that the exit and garbage-collection finalizers that
    flush it do not keep the owner alive.
    """

    def __init__(
        self,
        backend: Backend,
        health: StoreHealth,
        sizes: _Sizes,
        known: _Known | None,
        capacity: int,
        flush_interval: float | None,
        count_key: str | None,
    ) -> None:
        self.backend = backend
        self.health = health
        self.sizes = sizes
        self.known = known
        self.capacity = capacity
        self.max_pending = max(PENDING_FACTOR * capacity, 16)
        self.flush_interval = flush_interval
        self.count_key = count_key  # a counter of written samples, for stores without keys()
        self.reset()

    def reset(self) -> None:
        """Start empty, with fresh locks."""
        self.pending: dict[str, _Pending] = {}
        # Payloads a forked child found in its parent's buffer: served here, written (and
        # their leases released) by the parent.
        self.inherited: dict[str, bytes] = {}
        self.pending_bytes = 0
        self.peak_bytes = 0
        self.puts = 0
        # Samples waiting when a flush is due: the buffer size, more while failed ones wait
        # to be retried with the next batch (a full buffer must not retry at every put).
        self._flush_at = self.capacity
        self._gave_up_after = -1  # ``puts`` when a final flush last failed
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._last_drop_warning = -math.inf

    def after_fork(self) -> None:
        """In a forked child: keep the parent's waiting samples readable, never write them."""
        inherited = {key: entry.payload for key, entry in self.pending.items()}
        inherited.update(self.inherited)
        self.reset()
        self.inherited = inherited

    def discard(self) -> None:
        """Forget every waiting sample and release its lease."""
        with self._lock:
            leases = self._take_leases(self.pending.items())
            self.pending = {}
            self.pending_bytes = 0
            self.inherited = {}
            self._flush_at = self.capacity
        self.release(leases)

    def get(self, key: str) -> bytes | None:
        # dict.get is atomic under the GIL: the read path takes no lock.
        entry = self.pending.get(key)
        if entry is not None:
            return entry.payload
        return self.inherited.get(key) if self.inherited else None

    def put(self, key: str, payload: bytes, index: int | None, flush: bool = True) -> None:
        with self._lock:
            old = self.pending.pop(key, None)
            entry = _Pending(payload, index, time.monotonic())
            if old is not None:
                self.pending_bytes -= len(old.payload)
                entry.token, old.token = old.token, None  # one owner releases the lease
            self.pending[key] = entry
            self.pending_bytes += len(payload)
            self.peak_bytes = max(self.peak_bytes, self.pending_bytes)
            self.puts += 1
            full = len(self.pending) >= self._flush_at
        if self.flush_interval is not None:
            _flusher.watch(self)
        if flush and full:
            self.flush()

    def flush_if_full(self) -> None:
        if len(self.pending) >= self._flush_at:
            self.flush()

    def due(self, now: float) -> bool:
        with self._lock:
            oldest = next(iter(self.pending.values()), None)
        return (
            oldest is not None
            and self.flush_interval is not None
            and now - oldest.since >= self.flush_interval
        )

    def hold_lease(self, lease: str, token: bytes) -> bool:
        """Keep the lease (our ``token``) until its sample is written or dropped; ``False`` if
        the sample is not waiting here."""
        key = lease[: -len(LEASE_SUFFIX)]
        with self._lock:
            entry = self.pending.get(key)
            if entry is None or entry.token is not None:
                return False
            entry.token = token
            return True

    def release(self, leases: dict[str, bytes]) -> None:
        """Delete those of ``leases`` (key: our token) that still hold our token, in two round
        trips. A lease that expired (a slow write) may be another process's now: deleting
        it would let a third one compute the sample too (as in :mod:`memoshare.stampede`)."""
        if not leases:
            return
        try:
            current = self.backend.get_many(list(leases))
            ours = [lease for lease, token in leases.items() if current.get(lease) == token]
            if ours:
                self.backend.delete_many(ours)
        except BackendError as exc:  # the leases expire by themselves
            logger.debug("memoshare: %s: releasing leases failed: %s", self.health.name, exc)

    @staticmethod
    def _take_leases(entries: Iterable[tuple[str, _Pending]]) -> dict[str, bytes]:
        """The leases held by ``entries``, which then hold none (call with the lock held)."""
        leases = {}
        for key, entry in entries:
            if entry.token is not None:
                leases[key + LEASE_SUFFIX] = entry.token
                entry.token = None
        return leases

    def flush(self, attempts: int = 1) -> bool:
        """Write every waiting sample in one round trip; return whether all were written.

        A failed write is retried ``attempts - 1`` times here, after a pause; its samples then
        stay and are retried with the next flush (that of the next ``capacity`` samples, of
        ``flush_interval``, of close or exit). They are dropped, counted in ``dropped``,
        reported and their leases released only once the store refused them
        :data:`REFUSED_TRIES` times (it answers but is full, say: retrying forever would only
        hold back the samples after them), or past ``max_pending`` (the oldest go) while the
        store is down. The failure is counted (stats ``errors``/``timeouts``) and reported, one
        warning per outage; with ``strict`` it is raised, once the buffer is bounded.
        """
        with self._flush_lock:
            with self._lock:
                batch = dict(self.pending)
            if not batch:
                return True
            for attempt in range(attempts):
                if attempt:
                    time.sleep(RETRY_PAUSES[min(attempt, len(RETRY_PAUSES)) - 1])
                try:
                    storage.write_entries(self.backend, {k: e.payload for k, e in batch.items()})
                except BackendError as exc:
                    error = exc
                    if isinstance(exc, BackendRefused):
                        for entry in batch.values():
                            entry.refusals += 1
                    continue
                self.health.write_ok()
                self._written(batch)
                return True
            self._drop(batch)
            self.health.failed(error, "write")  # after _drop: it raises in strict mode
            return False

    def _written(self, batch: dict[str, _Pending]) -> None:
        with self._lock:
            for key, entry in batch.items():
                if self.pending.get(key) is entry:
                    del self.pending[key]
                    self.pending_bytes -= len(entry.payload)
            leases = self._take_leases(batch.items())
            self._flush_at = self.capacity
        self.health.stats.count("sets", len(batch))
        self.sizes.add(len(batch), sum(len(e.payload) for e in batch.values()))
        if self.known is not None:
            for entry in batch.values():
                if entry.index is not None:
                    self.known.add(entry.index)
        self.release(leases)
        if self.count_key is not None:
            try:
                self.backend.incr(self.count_key, len(batch))
            except BackendError as exc:
                logger.debug("memoshare: %s: counting writes failed: %s", self.health.name, exc)

    def _drop(self, batch: dict[str, _Pending]) -> None:
        """After a failed write: drop the samples refused :data:`REFUSED_TRIES` times, then
        the oldest past ``max_pending``; count, report, and release their leases (nobody
        writes them now: other processes must not wait ``lease_timeout`` for them)."""
        with self._lock:
            dropped = []
            for key, entry in batch.items():
                if entry.refusals >= REFUSED_TRIES and self.pending.get(key) is entry:
                    dropped.append((key, self.pending.pop(key)))
            while len(self.pending) > self.max_pending:
                key = next(iter(self.pending))
                dropped.append((key, self.pending.pop(key)))
            self.pending_bytes -= sum(len(entry.payload) for _, entry in dropped)
            leases = self._take_leases(dropped)
            # The samples kept are retried with the next batch, not at every put; at the bound,
            # every put flushes, so that the buffer never holds more than max_pending.
            self._flush_at = min(len(self.pending) + self.capacity, self.max_pending)
        self.release(leases)
        self._report_dropped(len(dropped))

    def _report_dropped(self, dropped: int) -> None:
        if not dropped:
            return
        with self.sizes._lock:  # the flusher thread and the caller's thread both get here
            self.sizes.dropped += dropped
        now = time.monotonic()
        if now - self._last_drop_warning >= 30.0:
            self._last_drop_warning = now
            logger.warning(
                "memoshare: %s: the store does not take writes; %d samples dropped from the "
                "write buffer so far (it keeps %d); they are recomputed when asked for",
                self.health.name,
                self.sizes.dropped,
                self.max_pending,
            )

    def final_flush(self) -> None:
        """Flush with retries (close, exit); report what could not be written."""
        if self.puts == self._gave_up_after:
            return  # atexit and the exit finalizer both call this: retry only if news came
        try:
            written = self.flush(attempts=len(RETRY_PAUSES) + 1)
        except BackendError as exc:  # strict mode: nobody left to raise to at exit
            logger.warning("memoshare: %s: final flush failed: %s", self.health.name, exc)
            written = False
        if written or not self.pending:
            return
        self._gave_up_after = self.puts
        # The samples stay served from here, but nobody will write them: release their leases,
        # or other processes would wait lease_timeout for them.
        with self._lock:
            leases = self._take_leases(self.pending.items())
        self.release(leases)
        logger.warning(
            "memoshare: %s: %d samples could not be written (store unavailable); they will be "
            "recomputed when asked for",
            self.health.name,
            len(self.pending),
        )


class _LeaseRelay:
    """The store as :func:`compute_once` sees it, for the leases it takes.

    A lease whose sample waits in the write buffer is released by the flush that writes (or
    drops) the sample, not when the computation ends. Every release checks that the lease
    still holds our token, so :func:`compute_once`'s own check (reading its lease back before
    deleting it) is answered here, without a round trip per computed sample.
    """

    __slots__ = ("backend", "buffer", "tokens")

    def __init__(self, backend: Backend, buffer: _WriteBuffer) -> None:
        self.backend = backend
        self.buffer = buffer
        # (thread, lease) -> our token, from add() to delete() in one compute_once call.
        self.tokens: dict[tuple[int, str], bytes] = {}

    def add(self, key: str, value: bytes, expire: float | None = None) -> bool:
        added = self.backend.add(key, value, expire)
        if added:
            self.tokens[threading.get_ident(), key] = value
        return added

    def get(self, key: str) -> bytes | None:
        token = self.tokens.get((threading.get_ident(), key))
        return token if token is not None else self.backend.get(key)

    def delete(self, key: str) -> bool:
        token = self.tokens.pop((threading.get_ident(), key), None)
        if token is None:
            return self.backend.delete(key)
        if not self.buffer.hold_lease(key, token):
            self.buffer.release({key: token})
        return True


class _Flusher:
    """One daemon thread per process writing buffers whose oldest sample waited too long.

    Without it a sample could wait in an idle process's buffer (the parent of DataLoader
    workers, say) while another process waits for its lease.
    """

    def __init__(self) -> None:
        self._buffers: weakref.WeakSet[_WriteBuffer] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def watch(self, buffer: _WriteBuffer) -> None:
        if buffer not in self._buffers:
            with self._lock:
                self._buffers.add(buffer)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="memoshare-dataset-flush", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(_FLUSH_TICK)
            now = time.monotonic()
            for buffer in list(self._buffers):
                try:
                    if buffer.due(now):
                        buffer.flush()
                except Exception as exc:  # strict mode, or a bug: never kill the thread
                    logger.debug("memoshare: background flush failed: %s", exc)

    def after_fork_in_child(self) -> None:
        self._thread = None
        self._lock = threading.Lock()


_flusher = _Flusher()
