"""The write buffer of a cache (:class:`WriteBuffer`), the thread that flushes idle buffers
(:class:`BufferFlusher`), and the lease of stampede protection that is released once its sample
is in the store, or dropped (:class:`BufferedLease`)."""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from .. import _process
from ..client import CacheClient
from ..errors import BackendError, BackendRefused
from ..stampede import StoreLease
from ..storage import EntryStore
from .bookkeeping import KnownIndices, Sizes

logger = logging.getLogger("memoshare")

#: A failed flush keeps its samples for the next one, up to this many times the buffer size.
PENDING_FACTOR = 4
#: Times the store may refuse a sample (it answers, but is full, say) before it is dropped.
REFUSED_TRIES = 3
#: Pauses between the attempts of a flush that may block (explicit, close, exit).
RETRY_PAUSES = (0.1, 0.5, 1.0)
#: Seconds between two looks of the flusher thread (due buffers, samples asked for).
_FLUSH_TICK = 0.02


# -- the write buffer ------------------------------------------------------------------------------
@dataclass
class Pending:
    """A sample waiting in the buffer."""

    payload: bytes
    index: int | None
    since: float
    token: bytes | None = None  # of the stampede lease, released once the sample is written
    refusals: int = 0  # writes the store refused


class WriteBuffer:
    """Samples waiting to be written together in one ``set_many``.

    Holds no reference to its owner, so that the exit and garbage-collection finalizers that
    flush it do not keep the owner alive. The stampede leases of its samples (see
    :class:`BufferedLease`) are released by the flush that writes or drops them.
    """

    def __init__(
        self,
        client: CacheClient,
        leases: StoreLease,
        sizes: Sizes,
        known: KnownIndices | None,
        capacity: int,
        flush_interval: float | None,
        count_key: str | None,
    ) -> None:
        self.client = client
        self.leases = leases
        self.sizes = sizes
        self.known = known
        self.capacity = capacity
        self.max_pending = max(PENDING_FACTOR * capacity, 16)
        self.flush_interval = flush_interval
        self.count_key = count_key  # a counter of written samples, for stores without keys()
        self.reset()

    def reset(self) -> None:
        """Start empty, with fresh locks."""
        self.pending: dict[str, Pending] = {}
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
            entry = Pending(payload, index, time.monotonic())
            if old is not None:
                self.pending_bytes -= len(old.payload)
                entry.token, old.token = old.token, None  # one owner releases the lease
            self.pending[key] = entry
            self.pending_bytes += len(payload)
            self.peak_bytes = max(self.peak_bytes, self.pending_bytes)
            self.puts += 1
            full = len(self.pending) >= self._flush_at
        if self.flush_interval is not None:
            flusher.watch(self)
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

    def hold(self, key: str, token: bytes) -> bool:
        """Keep the lease of ``key`` (our ``token``) until its sample is written or dropped;
        ``False`` if the sample is not waiting here. While we hold it, the flusher thread
        watches for another process asking for the sample (see :meth:`wanted`)."""
        with self._lock:
            entry = self.pending.get(key)
            if entry is None or entry.token is not None:
                return False
            entry.token = token
        flusher.watch(self)
        return True

    def wanted(self) -> bool:
        """Whether another process waits for a sample whose lease this buffer holds (it left
        a :data:`~memoshare.stampede.WANTED_SUFFIX` flag): then the buffer is written now, so
        that it waits no longer than the write takes."""
        # Only samples that have waited a while: most are written with their batch, and the
        # look costs a round trip.
        old = time.monotonic() - WANTED_AFTER
        with self._lock:
            leased = [
                key
                for key, entry in self.pending.items()
                if entry.token is not None and entry.since <= old
            ]
        if not leased:
            return False
        flags = [key + WANTED_SUFFIX for key in leased]
        try:
            asked = self.client.present(flags)
            if asked:
                self.client.backend.delete_many(list(asked))
        except BackendError as exc:
            logger.debug("memoshare: %s: checking for waiters failed: %s", self.client.name, exc)
            return False
        return bool(asked)

    def release(self, tokens: dict[str, bytes]) -> None:
        """Release the leases of these samples (key: our token); a store error only delays
        it (the leases expire by themselves)."""
        try:
            self.leases.release_many(tokens)
        except BackendError as exc:
            logger.debug("memoshare: %s: releasing leases failed: %s", self.client.name, exc)

    @staticmethod
    def _take_leases(entries: Iterable[tuple[str, Pending]]) -> dict[str, bytes]:
        """The leases held by ``entries``, which then hold none (call with the lock held)."""
        tokens = {}
        for key, entry in entries:
            if entry.token is not None:
                tokens[key] = entry.token
                entry.token = None
        return tokens

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
                    self.client.write_many({k: e.payload for k, e in batch.items()})
                except BackendError as exc:
                    error = exc
                    if isinstance(exc, BackendRefused):
                        for entry in batch.values():
                            entry.refusals += 1
                    continue
                self._written(batch)
                return True
            self._drop(batch)
            self.client.failed(error, "write")  # after _drop: it raises in strict mode
            return False

    def _written(self, batch: dict[str, Pending]) -> None:
        with self._lock:
            for key, entry in batch.items():
                if self.pending.get(key) is entry:
                    del self.pending[key]
                    self.pending_bytes -= len(entry.payload)
            leases = self._take_leases(batch.items())
            self._flush_at = self.capacity
        self.sizes.add(len(batch), sum(len(e.payload) for e in batch.values()))
        if self.known is not None:
            for entry in batch.values():
                if entry.index is not None:
                    self.known.add(entry.index)
        # The samples are stored now: a waiter finds them before it looks at the lease, so
        # the leases are only let go (no longer renewed; they expire within lease_timeout),
        # not deleted: that saved two round trips and a delete per sample (memcached) per flush.
        self.leases.forget_many(leases)
        if self.count_key is not None:
            try:
                self.client.backend.incr(self.count_key, len(batch))
            except BackendError as exc:
                logger.debug("memoshare: %s: counting writes failed: %s", self.client.name, exc)

    def _drop(self, batch: dict[str, Pending]) -> None:
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
        self.sizes.add_dropped(dropped)
        now = time.monotonic()
        if now - self._last_drop_warning >= 30.0:
            self._last_drop_warning = now
            logger.warning(
                "memoshare: %s: the store does not take writes; %d samples dropped from the "
                "write buffer so far (it keeps %d); they are recomputed when asked for",
                self.client.name,
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
            logger.warning("memoshare: %s: final flush failed: %s", self.client.name, exc)
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
            self.client.name,
            len(self.pending),
        )


#: Suffix of the flag a process waiting for a buffered sample leaves for the lease's holder.
WANTED_SUFFIX = "~wanted"
#: Seconds a sample waits in the buffer before the flusher thread looks for such flags.
WANTED_AFTER = 0.05


class BufferedLease(StoreLease):
    """A :class:`~memoshare.stampede.StoreLease` whose sample waits in a write buffer.

    The holder of a computed sample keeps the lease until the flush that writes (or drops)
    the sample releases it: a process waiting for the sample finds it stored when the lease
    ends, instead of computing it again. That release checks our token for a whole batch at
    once, so no round trip is spent per computed sample.
    """

    __slots__ = ("buffer", "_asked")

    def __init__(self, entries: EntryStore, timeout: float, buffer: WriteBuffer) -> None:
        # No "not stored" mark: a sample key holding one would look stored to the checks of
        # completeness (they test presence, not values).
        super().__init__(entries, timeout, mark=False)
        self.buffer = buffer
        self._asked: dict[str, float] = {}  # key -> until when our flag stands

    def release(self, key: str, token: bytes, stored: bool) -> None:
        if stored and self.buffer.hold(key, token):
            return
        super().release(key, token, stored)

    def holder(self, key: str) -> bytes | None:
        holder = super().holder(key)
        now = time.monotonic()
        if holder is not None and self._asked.get(key, 0.0) <= now:
            # The sample may wait in the holder's write buffer: ask for it to be written now
            # (the holder's flusher thread looks for this flag every few milliseconds). Once
            # per wait, not at every poll: a flag stands for the lease's timeout.
            self.backend.set(key + WANTED_SUFFIX, b"1", self.timeout)
            if len(self._asked) > 1024:
                self._asked = {k: t for k, t in self._asked.items() if t > now}
            self._asked[key] = now + self.timeout / 2
        return holder


class BufferFlusher:
    """One daemon thread per process writing buffers whose oldest sample waited too long, or
    whose leased samples another process asks for.

    Without it a sample could wait in an idle process's buffer (the parent of DataLoader
    workers, say, or a persistent worker between epochs) while another process waits for its
    lease, which the live holder keeps renewing.
    """

    def __init__(self) -> None:
        self._buffers: weakref.WeakSet[WriteBuffer] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def watch(self, buffer: WriteBuffer) -> None:
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
                    if buffer.due(now) or buffer.wanted():
                        buffer.flush()
                except Exception as exc:  # strict mode, or a bug: never kill the thread
                    logger.debug("memoshare: background flush failed: %s", exc)

    def after_fork_in_child(self) -> None:
        self._thread = None
        self._lock = threading.Lock()


flusher = BufferFlusher()
_process.after_fork_child(flusher.after_fork_in_child, _process.Order.CACHES)
