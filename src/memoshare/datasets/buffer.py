"""The write buffer of a cache, its background flusher, and the lease relay of stampede
protection (a lease is released once its sample is in the store)."""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
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
#: Pauses between the attempts of a flush that may block (explicit, close, exit).
RETRY_PAUSES = (0.1, 0.5, 1.0)
_FLUSH_TICK = 0.1


# -- the write buffer ------------------------------------------------------------------------------
@dataclass
class _Pending:
    payload: bytes
    index: int | None
    since: float
    lease: str | None = None  # released once the sample is in the store


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
        """Forget every waiting sample (their leases expire by themselves)."""
        with self._lock:
            self.pending = {}
            self.pending_bytes = 0
            self.inherited = {}

    def get(self, key: str) -> bytes | None:
        # dict.get is atomic under the GIL: the read path takes no lock.
        entry = self.pending.get(key)
        if entry is not None:
            return entry.payload
        return self.inherited.get(key) if self.inherited else None

    def put(self, key: str, payload: bytes, index: int | None, flush: bool = True) -> None:
        with self._lock:
            old = self.pending.pop(key, None)
            entry = _Pending(payload, index, time.monotonic(), old.lease if old else None)
            if old is not None:
                self.pending_bytes -= len(old.payload)
            self.pending[key] = entry
            self.pending_bytes += len(payload)
            self.peak_bytes = max(self.peak_bytes, self.pending_bytes)
            self.puts += 1
            full = len(self.pending) >= self.capacity
        if self.flush_interval is not None:
            _flusher.watch(self)
        if flush and full:
            self.flush()

    def flush_if_full(self) -> None:
        if len(self.pending) >= self.capacity:
            self.flush()

    def due(self, now: float) -> bool:
        with self._lock:
            oldest = next(iter(self.pending.values()), None)
        return (
            oldest is not None
            and self.flush_interval is not None
            and now - oldest.since >= self.flush_interval
        )

    def hold_lease(self, lease: str) -> bool:
        """Keep ``lease`` until its sample is written; ``False`` if it is not waiting here."""
        key = lease[: -len(LEASE_SUFFIX)]
        with self._lock:
            entry = self.pending.get(key)
            if entry is None or entry.lease is not None:
                return False
            entry.lease = lease
            return True

    def flush(self, attempts: int = 1) -> bool:
        """Write every waiting sample in one round trip; return whether all were written.

        A failed write is counted (stats ``errors``/``timeouts``), reported (one warning per
        outage) and retried ``attempts - 1`` times here; the samples then stay for the next
        flush, up to a bound past which the oldest are dropped and counted in ``dropped``. A
        batch the store refused (it is up, but out of memory, say) is dropped after its tries,
        counted and reported: retrying it forever would only block the samples after it.
        """
        with self._flush_lock:
            with self._lock:
                batch = dict(self.pending)
            if not batch:
                return True
            refused = False
            for attempt in range(attempts):
                try:
                    storage.write_entries(self.backend, {k: e.payload for k, e in batch.items()})
                except BackendError as exc:
                    self.health.failed(exc, "write")
                    refused = isinstance(exc, BackendRefused)
                    if attempt + 1 < attempts:
                        time.sleep(RETRY_PAUSES[min(attempt, len(RETRY_PAUSES) - 1)])
                    continue
                self.health.ok()
                self._written(batch)
                return True
            if refused:
                self._drop(batch)
            else:
                self._bound()
            return False

    def _written(self, batch: dict[str, _Pending]) -> None:
        leases = []
        with self._lock:
            for key, entry in batch.items():
                if self.pending.get(key) is entry:
                    del self.pending[key]
                    self.pending_bytes -= len(entry.payload)
                if entry.lease is not None:
                    leases.append(entry.lease)
                    entry.lease = None
        self.health.stats.count("sets", len(batch))
        self.sizes.add(len(batch), sum(len(e.payload) for e in batch.values()))
        if self.known is not None:
            for entry in batch.values():
                if entry.index is not None:
                    self.known.add(entry.index)
        try:
            if leases:
                self.backend.delete_many(leases)
            if self.count_key is not None:
                self.backend.incr(self.count_key, len(batch))
        except BackendError as exc:  # the leases expire by themselves
            logger.debug("memoshare: %s: releasing leases failed: %s", self.health.name, exc)

    def _bound(self) -> None:
        """Keep at most ``max_pending`` samples while the store is down; count what goes."""
        dropped = 0
        with self._lock:
            while len(self.pending) > self.max_pending:
                key = next(iter(self.pending))
                self.pending_bytes -= len(self.pending.pop(key).payload)
                dropped += 1
        self._report_dropped(dropped)

    def _drop(self, batch: dict[str, _Pending]) -> None:
        """Forget the samples of a refused batch (those not replaced since)."""
        dropped = 0
        with self._lock:
            for key, entry in batch.items():
                if self.pending.get(key) is entry:
                    del self.pending[key]
                    self.pending_bytes -= len(entry.payload)
                    dropped += 1
        self._report_dropped(dropped)

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
            if not self.flush(attempts=len(RETRY_PAUSES) + 1) and self.pending:
                self._gave_up_after = self.puts
                logger.warning(
                    "memoshare: %s: %d samples could not be written (store unavailable); they "
                    "will be recomputed when asked for",
                    self.health.name,
                    len(self.pending),
                )
        except BackendError as exc:  # strict mode: nobody left to raise to at exit
            logger.warning("memoshare: %s: final flush failed: %s", self.health.name, exc)


class _LeaseRelay:
    """The store as :func:`compute_once` sees it: a lease whose sample still waits in the write
    buffer is released by the flush that writes the sample, not when the computation ends."""

    __slots__ = ("backend", "buffer")

    def __init__(self, backend: Backend, buffer: _WriteBuffer) -> None:
        self.backend = backend
        self.buffer = buffer

    def add(self, key: str, value: bytes, expire: float | None = None) -> bool:
        return self.backend.add(key, value, expire)

    def get(self, key: str) -> bytes | None:
        return self.backend.get(key)

    def delete(self, key: str) -> bool:
        return self.buffer.hold_lease(key) or self.backend.delete(key)


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
