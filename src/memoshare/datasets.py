"""Caching the samples of a dataset: :class:`CachedDataset` and :class:`CacheLoader`.

A cached dataset is a memoized ``__getitem__``: the sample at index ``i`` of the dataset named
``dataset_name`` is computed once and then served from the store to every epoch, every
DataLoader worker and (with memcached or Redis) every node. It runs on every
:mod:`memoshare.backends` store and uses the core's pieces: :mod:`memoshare.storage` for
(chunked) entries, :mod:`memoshare.serialization` for the bytes, and
:func:`memoshare.stampede.compute_once` so that one caller computes a missing sample while the
others wait for it.

Keys. Every key of a dataset starts with ``<namespace>:ds:<id>:`` where ``<id>`` is 16 hex digits
of a blake2b digest of the canonical encoding of ``(dataset_name, version)``. Then comes
``i<index>`` for a sample of a :class:`CachedDataset`, ``k<32 hex>`` (digest of the key) for an
entry of a :class:`CacheLoader`, or ``manifest``. Names are never pasted into keys, so
``("a", "b_2")`` and ``("a_b", "2")`` are different entries, and a name may hold any character.

Writes. New samples wait in a bounded write buffer (``writer_buffer_size``) and are written in
one ``set_many``. The buffer is flushed when it is full, when its oldest sample is older than
``flush_interval``, on :meth:`flush` / close / context-manager exit, at interpreter exit and when
a ``multiprocessing`` child (a DataLoader worker) exits. A sample waiting in the buffer is served
from it, and its stampede lease is held until the sample is in the store, so a process waiting
for it never computes it again.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing.util
import operator
import os
import pickle
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import serialization, storage
from .backends import Backend, BackendError, BackendRefused, BackendTimeout, make_backend
from .counters import CacheStats
from .keys import DEFAULT_NAMESPACE, check_namespace, value_digest
from .stampede import LEASE_SUFFIX, compute_once

__all__ = ["CacheLoader", "CachedDataset", "IncompleteCacheError", "Preload"]

logger = logging.getLogger("memoshare")

#: Version of the key layout and manifest; part of every dataset id.
LAYOUT = "memoshare.datasets/1"
#: A failed flush keeps its samples for the next one, up to this many times the buffer size.
PENDING_FACTOR = 4
#: Pauses between the attempts of a flush that may block (explicit, close, exit).
RETRY_PAUSES = (0.1, 0.5, 1.0)
#: Seconds between two reads of the store's eviction counter.
EVICTION_CHECK_INTERVAL = 5.0
#: Indices per ``get_many`` when checking which samples are stored.
SCAN_BATCH = 512
_FLUSH_TICK = 0.1


class IncompleteCacheError(LookupError):
    """A cache opened without its dataset lacks samples (never stored, or evicted since)."""


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


#: Marks a miss: ``None`` and other falsy samples are values like any other.
_MISSING: Any = _Missing()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns


# -- sample codec ----------------------------------------------------------------------------------
# Arrays are what samples are made of, and the generic pickling of them is slow: torch pickles
# every tensor storage through torch.save (~150 us to load a 12 KiB tensor, ten times the network
# transfer) and numpy rebuilds a dtype object per array (~6 us). Plain numeric arrays and CPU
# tensors in a sample (also inside tuples, lists and dicts) are stored as their bytes plus dtype
# and shape instead, and rebuilt with np.frombuffer / torch.from_numpy (~3.5 us). Anything else
# (tensors needing grad, strided views, bfloat16, subclasses, structured dtypes) keeps its own
# pickling. Stored entries name the two rebuild functions below: keep their names.
_NUMERIC_KINDS = frozenset("biufc")  # bool, int, uint, float, complex
_TENSOR_DTYPES = frozenset(
    {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
    | {"complex64", "complex128"}
)


def _rebuild_array(buffer: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    array = np.ndarray(shape, dtype, buffer)  # one object, no reshape: ~0.7 us less
    # From an in-band ``bytes`` (a read-only source array): come back writable, as pickle does.
    return array if array.flags.writeable else array.copy()


def _rebuild_tensor(buffer: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    import torch

    return torch.from_numpy(_rebuild_array(buffer, dtype, shape))


class _PlainArray:
    __slots__ = ("array", "rebuild")

    def __init__(self, array: Any, rebuild: Callable[..., Any]) -> None:
        self.array = array
        self.rebuild = rebuild

    def __reduce__(self) -> tuple[Any, ...]:
        array = self.array
        return self.rebuild, (pickle.PickleBuffer(array), array.dtype.str, array.shape)


def _is_plain_array(value: Any) -> bool:
    dtype = value.dtype
    return dtype.kind in _NUMERIC_KINDS and dtype.fields is None and value.flags.c_contiguous


def _is_plain_tensor(value: Any, torch: Any) -> bool:
    return (
        value.layout == torch.strided
        and value.device.type == "cpu"
        and not value.requires_grad
        and str(value.dtype)[len("torch.") :] in _TENSOR_DTYPES
        and value.is_contiguous()
        and not value.is_conj()
        and not value.is_neg()
        and not any(getattr(value, "names", None) or ())  # older torch: named tensors
    )


def _encode(value: Any, torch: Any) -> Any:
    """``value`` with its plain arrays wrapped for fast pickling (new containers if any)."""
    kind = type(value)
    if kind is np.ndarray:
        return _PlainArray(value, _rebuild_array) if _is_plain_array(value) else value
    if torch is not None and kind is torch.Tensor:
        if _is_plain_tensor(value, torch):
            return _PlainArray(value.numpy(), _rebuild_tensor)
        return value
    if kind is dict:
        items = {k: _encode(v, torch) for k, v in value.items()}
        changed = any(items[k] is not v for k, v in value.items())
        return items if changed else value
    if kind is list or isinstance(value, tuple):
        encoded = [_encode(v, torch) for v in value]
        if all(e is v for e, v in zip(encoded, value, strict=True)):
            return value
        if kind is list:
            return encoded
        return kind(*encoded) if hasattr(kind, "_fields") else kind(encoded)  # namedtuple
    return value


def _dumps_sample(value: Any) -> bytes:
    # Without torch imported, a sample holds no tensor.
    return serialization.dumps(_encode(value, sys.modules.get("torch")))


def _count(stats: CacheStats, name: str, n: int) -> None:
    for _ in range(n):
        stats.count(name)


# -- health of the store ---------------------------------------------------------------------------
class _Health:
    """Counts store failures and warns once per outage, as the decorator does."""

    def __init__(self, name: str, stats: CacheStats, strict: bool) -> None:
        self.name = name
        self.stats = stats
        self.strict = strict
        self.failing = False
        self.warned_refused = False

    def failed(self, exc: BackendError, what: str) -> None:
        self.stats.count("timeouts" if isinstance(exc, BackendTimeout) else "errors")
        if self.strict:
            raise exc
        if isinstance(exc, BackendRefused):  # the store is up: no outage, just these values
            if not self.warned_refused:
                self.warned_refused = True
                logger.warning(
                    "memoshare: %s: the store refused to %s samples (%s)", self.name, what, exc
                )
            return
        if not self.failing:
            self.failing = True
            logger.warning(
                "memoshare: %s cannot %s its cache (%s); samples go on uncached until the "
                "store answers again",
                self.name,
                what,
                exc,
            )

    def ok(self) -> None:
        if self.failing:
            self.failing = False
            self.stats.count("reconnects")
            logger.warning("memoshare: %s reaches its cache again", self.name)


class _Sizes:
    """Samples and bytes this process wrote, with a log line every ``log_every`` samples."""

    def __init__(self, name: str, log_every: int | None) -> None:
        self.name = name
        self.log_every = log_every
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.bytes = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def add(self, samples: int, nbytes: int) -> None:
        with self._lock:
            before = self.samples
            self.samples += samples
            self.bytes += nbytes
            after, total = self.samples, self.bytes
        every = self.log_every
        if every and after // every > before // every:
            logger.info(
                "memoshare: %s: %d samples cached (%s) by this process",
                self.name,
                after,
                _human(total),
            )

    @property
    def mean(self) -> float:
        return self.bytes / self.samples if self.samples else 0.0


class _Known:
    """One bit per index: the samples this process saw in the store (to notice evictions)."""

    def __init__(self, length: int) -> None:
        self.bits = bytearray((length + 7) // 8)

    def add(self, index: int) -> None:
        self.bits[index >> 3] |= 1 << (index & 7)

    def __contains__(self, index: int) -> bool:
        return bool(self.bits[index >> 3] & (1 << (index & 7)))


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
        health: _Health,
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
        _count(self.health.stats, "sets", len(batch))
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
_live_caches: weakref.WeakSet[_SampleCache] = weakref.WeakSet()


def _flush_all_at_exit() -> None:
    for cache in list(_live_caches):
        cache.buffer.final_flush()


def _after_fork_in_child() -> None:
    _flusher.after_fork_in_child()
    for cache in list(_live_caches):
        cache._after_fork()


atexit.register(_flush_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the cache of one dataset ----------------------------------------------------------------------
class _SampleCache:
    """Keys, lookups, stampede-protected computation and writes of one named dataset."""

    def __init__(
        self,
        *,
        backend: Backend | str | None,
        backend_options: dict[str, Any],
        dataset_name: str,
        version: Any,
        namespace: str,
        writer_buffer_size: int,
        stampede: bool,
        lease_timeout: float,
        wait_timeout: float | None,
        flush_interval: float | None,
        strict: bool,
        log_every: int | None,
        length: int | None,
        label: str,
    ) -> None:
        if not isinstance(dataset_name, str):
            raise TypeError(f"dataset_name must be a str, got {type(dataset_name).__qualname__}")
        if isinstance(writer_buffer_size, bool) or not isinstance(writer_buffer_size, int):
            raise TypeError(f"writer_buffer_size must be an int, got {writer_buffer_size!r}")
        if writer_buffer_size < 1:
            raise ValueError(f"writer_buffer_size must be >= 1, got {writer_buffer_size}")
        if lease_timeout <= 0:
            raise ValueError(f"lease_timeout must be > 0 seconds, got {lease_timeout!r}")
        if flush_interval is not None and flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0 seconds or None, got {flush_interval!r}")
        if log_every is not None and log_every < 0:
            raise ValueError(f"log_every must be >= 0 or None, got {log_every!r}")
        self.namespace = check_namespace(namespace)
        self.dataset_name = dataset_name
        self.version = version
        try:
            digest = value_digest((LAYOUT, dataset_name, version), digest_size=8).hex()
        except (TypeError, RecursionError) as exc:
            raise TypeError(
                f"version must be a plain value (str, number, tuple, dict, ...): {exc}"
            ) from exc
        self.prefix = f"{namespace}:ds:{digest}:"
        self.owns_backend = not isinstance(backend, Backend) and (
            backend is not None or bool(backend_options)
        )
        self.backend = make_backend(backend, **backend_options)
        self.writer_buffer_size = writer_buffer_size
        self.stampede = stampede
        self.lease_timeout = lease_timeout
        self.wait_timeout = lease_timeout if wait_timeout is None else wait_timeout
        self.flush_interval = flush_interval
        self.strict = strict
        self.log_every = log_every
        self.length = length
        self.label = label
        self.eviction_baseline = self._read_evictions()
        self._start()

    # -- runtime state (rebuilt after unpickling) ----------------------------------------------
    def _start(self) -> None:
        self.stats = CacheStats()
        self.health = _Health(self.label, self.stats, self.strict)
        self.sizes = _Sizes(self.label, self.log_every)
        self.known = _Known(self.length) if self.length is not None else None
        can_list = type(self.backend).keys is not Backend.keys
        count_key = None if can_list or self.length is not None else self.prefix + "count"
        self.buffer = _WriteBuffer(
            self.backend,
            self.health,
            self.sizes,
            self.known,
            self.writer_buffer_size,
            self.flush_interval,
            count_key,
        )
        self.relay = _LeaseRelay(self.backend, self.buffer)
        self._warned_evictions = False
        self._warned_unpicklable = False
        self._next_eviction_check = 0.0
        _live_caches.add(self)
        self._register_finalizer()
        multiprocessing.util.register_after_fork(self, _SampleCache._after_multiprocessing_fork)

    def _register_finalizer(self) -> None:
        # Runs when this object is collected, at interpreter exit, and when a multiprocessing
        # child (a DataLoader worker) exits, where atexit handlers do not run.
        self._finalizer = multiprocessing.util.Finalize(
            self, self.buffer.final_flush, exitpriority=10
        )

    def _after_fork(self) -> None:
        # The parent still owns (and will write) what was waiting in the buffer; until then
        # this child serves those samples from its copy instead of waiting for their leases.
        self.buffer.after_fork()
        self.stats.reset()
        self.sizes.reset()

    def _after_multiprocessing_fork(self) -> None:
        # multiprocessing clears its finalizer registry in a new child: register again.
        self._register_finalizer()

    def __getstate__(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in (
                "namespace", "dataset_name", "version", "prefix", "owns_backend", "backend",
                "writer_buffer_size", "stampede", "lease_timeout", "wait_timeout",
                "flush_interval", "strict", "log_every", "length", "label", "eviction_baseline",
            )
        }  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start()

    # -- keys ----------------------------------------------------------------------------------
    def loader_key(self, key: Any) -> str:
        try:
            return f"{self.prefix}k{value_digest(key, digest_size=16).hex()}"
        except (TypeError, RecursionError) as exc:
            raise TypeError(
                f"cannot key {type(key).__qualname__} {key!r:.60}: use a str, number, tuple "
                f"or other plain value ({exc})"
            ) from exc

    @property
    def manifest_key(self) -> str:
        return self.prefix + "manifest"

    # -- reads ---------------------------------------------------------------------------------
    def find(self, key: str) -> Any:
        """The cached value of ``key`` (buffer, then store) or ``_MISSING``; counts nothing."""
        payload = self.buffer.get(key)
        if payload is None:
            try:
                payload = storage.read_entry(self.backend, key)
            except BackendError as exc:
                self.health.failed(exc, "read")
                return _MISSING
            if self.health.failing:
                self.health.ok()
            if payload is None:
                return _MISSING
        return self._decode(key, payload)

    def _decode(self, key: str, payload: bytes) -> Any:
        try:
            return serialization.loads(payload)
        except serialization.CorruptEntry as exc:
            logger.warning("memoshare: %s: unreadable entry %s (%s): recomputing", self.label,
                           key, exc)  # fmt: skip
            return _MISSING

    def lookup(self, key: str, index: int | None) -> Any:
        """Like :meth:`find`, counting a hit or noticing an evicted sample."""
        value = self.find(key)
        if value is _MISSING:
            if index is not None and self.known is not None and index in self.known:
                self.check_evictions(suspect=True)
            return _MISSING
        self.stats.count("hits")
        if index is not None and self.known is not None:
            self.known.add(index)
        return value

    def lookup_many(self, keys: list[str], indices: list[int]) -> dict[str, Any]:
        """The cached values among ``keys``: the buffer, then one ``get_many`` round trip."""
        found: dict[str, Any] = {}
        wanted = keys
        if self.buffer.pending or self.buffer.inherited:
            for key in keys:
                payload = self.buffer.get(key)
                if payload is not None:
                    found[key] = self._decode(key, payload)
            wanted = [k for k in keys if k not in found]
        if wanted:
            try:
                payloads = storage.read_entries(self.backend, dict.fromkeys(wanted))
            except BackendError as exc:
                self.health.failed(exc, "read")
                payloads = {}
            else:
                if self.health.failing:
                    self.health.ok()
            # Release each payload once decoded: the next sample's buffer then reuses its
            # memory instead of growing the heap (measured: a third of the decoding time).
            loads = serialization.loads
            while payloads:
                key, payload = payloads.popitem()
                try:
                    found[key] = loads(payload)
                except serialization.CorruptEntry:
                    found[key] = self._decode(key, payload)  # logs it; a miss
                del payload
        # This loop runs once per sample of every cached batch: kept free of calls.
        hits = 0
        bits = self.known.bits if self.known is not None else None
        for key, index in zip(keys, indices, strict=True):
            if found.get(key, _MISSING) is _MISSING:
                found.pop(key, None)  # an unreadable entry
                if bits is not None and bits[index >> 3] & (1 << (index & 7)):
                    self.check_evictions(suspect=True)  # a sample seen stored has vanished
                continue
            hits += 1
            if bits is not None:
                bits[index >> 3] |= 1 << (index & 7)
        _count(self.stats, "hits", hits)
        return found

    def present(self, key: str) -> bool:
        """Whether ``key`` is stored or waiting to be (no value is decoded)."""
        if self.buffer.get(key) is not None:
            return True
        try:
            return self.backend.get(key) is not None
        except BackendError as exc:
            self.health.failed(exc, "read")
            return False

    def stored_among(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are in the store: one ``get_many`` per :data:`SCAN_BATCH` keys."""
        stored: set[str] = set()
        for start in range(0, len(keys), SCAN_BATCH):
            stored.update(self.backend.get_many(keys[start : start + SCAN_BATCH]))
        return stored

    def listed(self, tag: str) -> list[str] | None:
        """Keys of this dataset starting with ``tag`` (``None`` if the store cannot list)."""
        if type(self.backend).keys is Backend.keys:
            return None
        # Chunks ("key~nonce~n") and leases ("key~lease") are not entries.
        return [k for k in self.backend.keys(self.prefix + tag) if "~" not in k]

    # -- computing -----------------------------------------------------------------------------
    def obtain(
        self,
        key: str,
        index: int | None,
        compute: Callable[[], Any],
        flush: bool = True,
    ) -> Any:
        """Compute a missing sample (once among all waiting callers), buffer and return it."""
        if not self.stampede or self.health.failing:
            return self._compute(key, index, compute, flush)

        def find_pair() -> tuple[bool, Any]:
            value = self.find(key)
            return value is not _MISSING, value

        hit, value = compute_once(
            self.relay,  # type: ignore[arg-type]  # add/get/delete are all compute_once uses
            key,
            lookup=find_pair,
            compute=lambda: self._compute(key, index, compute, flush),
            on_error=self.health.failed,
            lease_timeout=self.lease_timeout,
            wait_timeout=self.wait_timeout,
        )
        if hit:
            self.stats.count("hits")
        return value

    def ensure_stored(self, key: str, index: int | None, compute: Callable[[], Any]) -> bool:
        """Compute and buffer ``key`` unless stored (for preloading); whether it computed."""
        if self.present(key):
            return False
        computed = False

        def compute_and_count() -> None:
            nonlocal computed
            computed = True
            self._compute(key, index, compute, flush=True)

        if not self.stampede or self.health.failing:
            compute_and_count()
            return True
        compute_once(
            self.relay,  # type: ignore[arg-type]
            key,
            lookup=lambda: (self.present(key), None),
            compute=compute_and_count,
            on_error=self.health.failed,
            lease_timeout=self.lease_timeout,
            wait_timeout=self.wait_timeout,
        )
        return computed

    def _compute(self, key: str, index: int | None, compute: Callable[[], Any], flush: bool) -> Any:
        value = compute()
        self.stats.count("misses")
        self.check_evictions()
        payload = self._serialize(value)
        if payload is not None:
            self.buffer.put(key, payload, index, flush=flush)
        return value

    def _serialize(self, value: Any) -> bytes | None:
        try:
            return _dumps_sample(value)
        except serialization.UnpicklableValue as exc:
            if self.strict:
                raise
            if not self._warned_unpicklable:
                self._warned_unpicklable = True
                logger.warning("memoshare: %s: a sample cannot be pickled, so it is not cached: "
                               "%s", self.label, exc)  # fmt: skip
            return None

    # -- evictions -----------------------------------------------------------------------------
    def _read_evictions(self) -> int | None:
        try:
            value = self.backend.info().get("evictions")
        except BackendError:
            return None
        return None if value is None else int(value)

    def check_evictions(self, suspect: bool = False) -> None:
        """Warn once if the store evicted entries: it is then smaller than the dataset.

        The counter is read at most every :data:`EVICTION_CHECK_INTERVAL` seconds, at once when
        a sample this process had seen stored is missing (``suspect``).
        """
        if self._warned_evictions:
            return
        now = time.monotonic()
        if not suspect and now < self._next_eviction_check:
            return
        self._next_eviction_check = now + EVICTION_CHECK_INTERVAL
        evictions = self._read_evictions()
        baseline = self.eviction_baseline or 0
        evicted = evictions is not None and evictions > baseline
        if not (evicted or suspect):
            return
        self._warned_evictions = True
        needed = ""
        if self.length and self.sizes.samples:
            needed = f" (this dataset needs about {_human(self.sizes.mean * self.length)})"
        logger.warning(
            "memoshare: %s: the store evicts entries%s: the cache is smaller than the "
            "dataset%s, so evicted samples are recomputed. Give the store more memory "
            "(memcached -m, Redis maxmemory, DiskBackend size_limit).",
            self.label,
            f" ({evictions - baseline} since this cache was opened)" if evicted else "",
            needed,
        )

    # -- life cycle ----------------------------------------------------------------------------
    def write_manifest(self, length: int) -> None:
        """Record the dataset's length once; refuse a dataset of another length."""
        record = {
            "layout": LAYOUT,
            "name": self.dataset_name,
            "version": repr(self.version),
            "length": length,
            "created": time.time(),
        }
        try:
            if self.backend.add(self.manifest_key, serialization.dumps(record)):
                return
            existing = self.read_manifest()
        except BackendError as exc:
            self.health.failed(exc, "record the manifest of")
            return
        if existing is not None and existing.get("length") != length:
            raise ValueError(
                f"the cache {self.dataset_name!r} (version {self.version!r}) holds a dataset of "
                f"{existing.get('length')} samples, this one has {length}: pass a new version= "
                "(or another dataset_name) when the data or its preprocessing changes, or "
                "clear() the old cache"
            )

    def read_manifest(self) -> dict[str, Any] | None:
        raw = self.backend.get(self.manifest_key)
        if raw is None:
            return None
        try:
            record = serialization.loads(raw)
        except serialization.CorruptEntry:
            return None
        return record if isinstance(record, dict) else None

    def close(self) -> None:
        self.buffer.final_flush()
        if self.owns_backend:
            self.backend.close()


def _refuse_server_options(kind: str, options: Mapping[str, Any]) -> None:
    wrong = sorted(k for k in options if k in {"capacity_per_node", "cluster_mode", "hosts"})
    if wrong:
        raise TypeError(
            f"{kind} does not spawn servers ({', '.join(wrong)} are Bagua options): start "
            "memcached or redis-server yourself and pass backend=MemcachedBackend(...) or "
            "backend='redis', host=..., port=..."
        )


# -- CachedDataset ---------------------------------------------------------------------------------
def _check_map_style(dataset: Any) -> int:
    cls = type(dataset)
    if any(
        c.__name__ == "IterableDataset" and c.__module__.startswith("torch.utils.data")
        for c in cls.__mro__
    ):
        raise TypeError(
            f"CachedDataset wraps map-style datasets (__len__ and __getitem__); "
            f"{cls.__qualname__} is an IterableDataset, which has no index to key samples by"
        )
    if isinstance(dataset, Mapping):
        raise TypeError(
            f"CachedDataset wraps datasets indexed 0..len-1; a {cls.__qualname__} is keyed by "
            "arbitrary keys: use CacheLoader(...).get(key, load_fn) instead"
        )
    if not hasattr(cls, "__getitem__") or not hasattr(cls, "__len__"):
        raise TypeError(
            f"CachedDataset wraps map-style datasets, which define __len__ and __getitem__; "
            f"{cls.__qualname__} lacks {'__getitem__' if hasattr(cls, '__len__') else '__len__'}"
        )
    try:
        length = len(dataset)
    except TypeError as exc:
        raise TypeError(f"len() of the dataset failed: {exc}") from exc
    return operator.index(length)


class CachedDataset:
    """A map-style dataset whose samples are computed once and then served from a store.

    Wraps any dataset with ``__len__`` and ``__getitem__`` (a PyTorch ``Dataset``, a list, ...).
    ``cached[i]`` returns ``dataset[i]``: the first time from the dataset, afterwards from the
    store, in this process and in every process (DataLoader workers, other jobs, other nodes with
    a network store) that opens a cache of the same ``dataset_name`` and ``version``.

    Args:
        dataset: the map-style dataset to cache. Its samples may be anything picklable
            (tuples of tensors or arrays, dicts, ``None``); they come back equal.
        backend: where samples live: a :class:`~memoshare.backends.Backend`, a name
            (``"memory"``, ``"disk"``, ``"memcached"``, ``"redis"``) built with
            ``backend_options``, or ``None`` for the embedded disk store.
        dataset_name: the name samples are stored under (required). Caches of different names
            share one store without meeting; the same name (and version) reuses the samples,
            which is how jobs share a cache. Defaults to the dataset's ``name`` attribute if it
            has a str one.
        writer_buffer_size: new samples are written in batches of this many, in one round trip.
        preload: start :meth:`preload` with its defaults at once.
        version: a fingerprint of the dataset and its preprocessing (any plain value); change
            it when they change, so that stale samples are never served.
        namespace: prefix of every key (as for :func:`memoshare.memoize`).
        stampede: on a miss, let one process compute while the others wait for its sample.
        lease_timeout: seconds after which a computing process's claim expires (a crashed
            worker blocks the others no longer than that); above the time one sample takes
            plus ``flush_interval``.
        wait_timeout: longest a process waits for another one's sample (default
            ``lease_timeout``).
        flush_interval: seconds after which buffered samples are written even if the buffer
            is not full (``None``: only when full, on flush, close and exit).
        strict: raise store errors instead of warning and going on uncached.
        log_every: log a line with the samples and bytes cached every this many writes.
        **backend_options: arguments of the backend named by ``backend``.

    Use :meth:`flush` or ``with CachedDataset(...) as ds:`` to write buffered samples at a
    point of your choosing; they are also written at exit, including a DataLoader worker's.
    """

    def __init__(
        self,
        dataset: Any,
        backend: Backend | str | None = None,
        dataset_name: str | None = None,
        writer_buffer_size: int = 1,
        preload: bool = False,
        *,
        version: Any = None,
        namespace: str = DEFAULT_NAMESPACE,
        stampede: bool = True,
        lease_timeout: float = 30.0,
        wait_timeout: float | None = None,
        flush_interval: float | None = 1.0,
        strict: bool = False,
        log_every: int | None = 1000,
        **backend_options: Any,
    ) -> None:
        _refuse_server_options("CachedDataset", backend_options)
        length = _check_map_style(dataset)
        if dataset_name is None:
            dataset_name = getattr(dataset, "name", None)
            if not isinstance(dataset_name, str):
                raise TypeError(
                    "CachedDataset needs dataset_name=...: samples are stored under it, and "
                    "every job using the same name (and version) shares them"
                )
        cache = _SampleCache(
            backend=backend,
            backend_options=backend_options,
            dataset_name=dataset_name,
            version=version,
            namespace=namespace,
            writer_buffer_size=writer_buffer_size,
            stampede=stampede,
            lease_timeout=lease_timeout,
            wait_timeout=wait_timeout,
            flush_interval=flush_interval,
            strict=strict,
            log_every=log_every,
            length=length,
            label=f"dataset {dataset_name!r}",
        )
        cache.write_manifest(length)
        self._setup(dataset, cache)
        if preload:
            self.preload()

    def _setup(self, dataset: Any, cache: _SampleCache) -> None:
        self.dataset = dataset
        self._cache = cache
        self._length = cache.length or 0
        self._prefix = cache.prefix + "i"
        self._preload: Preload | None = None

    @classmethod
    def from_cache(
        cls,
        dataset_name: str,
        backend: Backend | str | None = None,
        *,
        version: Any = None,
        namespace: str = DEFAULT_NAMESPACE,
        verify: bool = True,
        strict: bool = False,
        **backend_options: Any,
    ) -> CachedDataset:
        """Open a complete cache without the original dataset (nor importing its code).

        Args:
            dataset_name, version, namespace: as given when the cache was filled.
            backend, backend_options: the store holding it.
            verify: check that every sample is stored (one listing, or one ``get_many`` per
                :data:`SCAN_BATCH` samples on memcached) and raise if any is missing. Without
                it only the manifest is read, and a missing sample raises when asked for.

        Raises:
            IncompleteCacheError: there is no such cache, or it lacks samples.
        """
        cache = _SampleCache(
            backend=backend,
            backend_options=backend_options,
            dataset_name=dataset_name,
            version=version,
            namespace=namespace,
            writer_buffer_size=1,
            stampede=False,
            lease_timeout=1.0,
            wait_timeout=None,
            flush_interval=None,
            strict=strict,
            log_every=None,
            length=None,
            label=f"dataset {dataset_name!r}",
        )
        manifest = cache.read_manifest()
        if manifest is None:
            raise IncompleteCacheError(
                f"no cache of dataset {dataset_name!r} (version {version!r}, namespace "
                f"{namespace!r}) in {cache.backend!r}: fill it first with CachedDataset(dataset, "
                "dataset_name=...) and preload()"
            )
        cache.length = int(manifest["length"])
        cache.known = cache.buffer.known = _Known(cache.length)
        self = cls.__new__(cls)
        self._setup(None, cache)
        if verify:
            missing = self.missing_indices()
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
                raise IncompleteCacheError(
                    f"the cache of dataset {dataset_name!r} holds {len(self) - len(missing)} of "
                    f"{len(self)} samples (missing: {shown}): complete it with the original "
                    "dataset, e.g. CachedDataset(dataset, ...).preload().wait()"
                )
        return self

    # -- the dataset protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of samples (of the wrapped dataset, or recorded in the cache)."""
        return self._length

    def _index(self, index: Any) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"CachedDataset indices are integers, got {type(index).__qualname__}"
            ) from None
        n = self._length
        if i < 0:
            i += n  # like a list
        if not 0 <= i < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} samples")
        return i

    def key(self, index: int) -> str:
        """The store key of sample ``index``."""
        return f"{self._prefix}{self._index(index)}"

    def __getitem__(self, index: int) -> Any:
        """Sample ``index`` (negative counts from the end): from the cache, else computed."""
        i = self._index(index)
        key = f"{self._prefix}{i}"
        value = self._cache.lookup(key, i)
        if value is _MISSING:
            value = self._cache.obtain(key, i, self._loader(i))
        return value

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The samples at ``indices``: cached ones in one ``get_many``, the others computed.

        PyTorch's DataLoader calls this with each batch's indices when it exists. Computed
        samples are written together once the batch is done.
        """
        n = self._length
        # Plain in-range ints (what samplers give) skip the general index check.
        idx = [i if type(i) is int and 0 <= i < n else self._index(i) for i in indices]
        prefix = self._prefix
        keys = [f"{prefix}{i}" for i in idx]
        found = self._cache.lookup_many(keys, idx)
        if len(found) < len(set(keys)):
            for key, i in zip(keys, idx, strict=True):
                if key not in found:
                    found[key] = self._cache.obtain(key, i, self._loader(i), flush=False)
            self._cache.buffer.flush_if_full()
        return [found[k] for k in keys]

    def __iter__(self) -> Iterator[Any]:
        """Every sample in order, read 64 at a time with :meth:`__getitems__`."""
        for start in range(0, self._length, 64):
            yield from self.__getitems__(range(start, min(start + 64, self._length)))

    def _loader(self, index: int) -> Callable[[], Any]:
        dataset = self.dataset
        if dataset is None:

            def unavailable() -> Any:
                raise IncompleteCacheError(
                    f"sample {index} of dataset {self.dataset_name!r} is not in the cache (never "
                    "stored, or evicted) and this CachedDataset was opened with from_cache(), "
                    "without the original dataset"
                )

            return unavailable
        return lambda: dataset[index]

    # -- preloading ----------------------------------------------------------------------------
    def preload(
        self,
        order: Iterable[int] | None = None,
        *,
        workers: int = 4,
        max_bytes: int = 256 << 20,
        progress: bool = True,
    ) -> Preload:
        """Fill the cache in background threads while training goes on.

        Samples already stored are skipped (so an interrupted preload resumes), the others are
        computed by ``workers`` threads in the order the training loop will ask for them, and
        a sample the loop asks for while a thread computes it is computed once (the loop waits
        for it).

        Args:
            order: the indices in the order they will be asked for: a sequence, or a sampler
                (iterated once; a PyTorch sampler's generator and the global RNG are restored,
                so a sampler with a seeded ``generator`` then yields the same order to the
                DataLoader). Default ``0..len-1``.
            workers: threads computing samples (reading files and most preprocessing release
                the GIL).
            max_bytes: most bytes of computed samples held in memory, waiting to be written
                or being computed (estimated from the mean size so far).
            progress: show a tqdm progress bar (without tqdm: a log line every 10%).

        Returns:
            a :class:`Preload` to :meth:`~Preload.wait` for or :meth:`~Preload.cancel`.
        """
        if self.dataset is None:
            raise TypeError("a cache opened with from_cache() has no dataset to preload from")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes!r}")
        if self._preload is not None and not self._preload.done:
            raise RuntimeError("a preload of this dataset is running: wait() or cancel() it")
        indices = [self._index(i) for i in _order(order, self._length)]
        self._preload = Preload(self, indices, workers, max_bytes, progress)
        return self._preload

    # -- inspection ----------------------------------------------------------------------------
    def missing_indices(self) -> list[int]:
        """Indices whose sample is not in the store (nor waiting in this process's buffer)."""
        cache = self._cache
        listed = cache.listed("i")
        if listed is not None:
            stored = {int(k[len(self._prefix) :]) for k in listed}
            return [
                i
                for i in range(self._length)
                if i not in stored and cache.buffer.get(f"{self._prefix}{i}") is None
            ]
        keys = [f"{self._prefix}{i}" for i in range(self._length)]
        stored_keys = cache.stored_among(keys)
        return [
            i for i, k in enumerate(keys) if k not in stored_keys and cache.buffer.get(k) is None
        ]

    def num_cached(self) -> int:
        """How many samples are stored or waiting to be written."""
        return self._length - len(self.missing_indices())

    def is_complete(self) -> bool:
        """Whether every sample is cached (then :meth:`from_cache` can serve it alone)."""
        return not self.missing_indices()

    @property
    def dataset_name(self) -> str:
        """The name the samples are stored under."""
        return self._cache.dataset_name

    @property
    def version(self) -> Any:
        """The fingerprint given as ``version=``."""
        return self._cache.version

    @property
    def backend(self) -> Backend:
        """The store."""
        return self._cache.backend

    @property
    def stats(self) -> CacheStats:
        """This process's counts: hits, misses (samples computed), sets (written), errors, ..."""
        return self._cache.stats

    @property
    def samples_cached(self) -> int:
        """Samples this process wrote to the store."""
        return self._cache.sizes.samples

    @property
    def bytes_stored(self) -> int:
        """Bytes of the samples this process wrote (serialized, before chunking)."""
        return self._cache.sizes.bytes

    @property
    def samples_dropped(self) -> int:
        """Samples dropped from the write buffer while the store did not take writes."""
        return self._cache.sizes.dropped

    @property
    def pending(self) -> int:
        """Samples waiting in this process's write buffer."""
        return len(self._cache.buffer.pending)

    # -- life cycle ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the buffered samples now (retrying; raises only with ``strict=True``)."""
        self._cache.buffer.flush(attempts=len(RETRY_PAUSES) + 1)

    def clear(self) -> int:
        """Remove this dataset's entries (samples, chunks, manifest) from the store and this
        process's buffer; return how many keys were removed."""
        cache = self._cache
        cache.buffer.discard()
        if type(cache.backend).keys is Backend.keys:  # memcached: chunks are left to its LRU
            listed = [f"{self._prefix}{i}" for i in range(self._length)]
        else:  # every key of the dataset, chunks and leases included
            listed = cache.backend.keys(cache.prefix)
        removed = 0
        for start in range(0, len(listed), SCAN_BATCH):
            removed += cache.backend.delete_many(listed[start : start + SCAN_BATCH])
        return removed + cache.backend.delete(cache.manifest_key)

    def close(self) -> None:
        """Stop a running preload and write the buffered samples."""
        if self._preload is not None:
            self._preload.cancel()
        self._cache.close()

    def __enter__(self) -> CachedDataset:
        """Use as a context manager: :meth:`close` on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop a running preload and write the buffered samples."""
        self.close()

    # -- pickling ------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The store's connections, the buffer and a preload stay here; the receiving process
        # (a spawned DataLoader worker) opens its own connections.
        return {"dataset": self.dataset, "cache": self._cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["dataset"], state["cache"])

    def __getattr__(self, name: str) -> Any:
        # Attributes of the wrapped dataset (classes, targets, ...) stay reachable.
        if name.startswith("_"):
            raise AttributeError(name)
        dataset = self.__dict__.get("dataset")
        if dataset is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(dataset, name)

    def __repr__(self) -> str:
        return (
            f"CachedDataset({self.dataset_name!r}, {self._length} samples, "
            f"version={self.version!r}, backend={self.backend!r})"
        )


def _flatten(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        if isinstance(item, list | tuple):  # a batch sampler yields lists of indices
            yield from item
        else:
            yield item


@contextmanager
def _rng_untouched(sampler: Any) -> Iterator[None]:
    """Iterate a sampler without changing what it (or torch's global RNG) yields next."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    saved_global = torch.get_rng_state()
    generator = getattr(sampler, "generator", None)
    saved = generator.get_state() if isinstance(generator, torch.Generator) else None
    try:
        yield
    finally:
        torch.set_rng_state(saved_global)
        if saved is not None:
            generator.set_state(saved)


def _order(order: Iterable[int] | None, length: int) -> Iterable[Any]:
    if order is None:
        return range(length)
    if isinstance(order, range | list | tuple):
        return order
    with _rng_untouched(order):
        return list(_flatten(iter(order)))


# -- Preload ---------------------------------------------------------------------------------------
class _LogProgress:
    """A stand-in for tqdm: a log line every 10%."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self._next = total, desc, 0, 0.1

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n / self.total >= self._next:
            logger.info("memoshare: %s: %d/%d", self.desc, self.n, self.total)
            while self._next <= self.n / self.total:
                self._next += 0.1

    def close(self) -> None:
        pass


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        logger.info("memoshare: tqdm is not installed (pip install 'memoshare[progress]'): "
                    "logging the progress of %s instead", desc)  # fmt: skip
        return _LogProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)


class Preload:
    """A background fill of a :class:`CachedDataset`, made by :meth:`CachedDataset.preload`.

    Attributes:
        total: indices to preload.
        already_cached: of those, found stored when the preload reached them.
        computed: samples this preload computed.
        error: the exception that stopped it, if any (re-raised by :meth:`wait`).
    """

    def __init__(
        self,
        dataset: CachedDataset,
        order: list[int],
        workers: int,
        max_bytes: int,
        progress: bool,
    ) -> None:
        self._dataset = dataset
        self._order = order
        self.workers = workers
        self.max_bytes = max_bytes
        self.total = len(order)
        self.already_cached = 0
        self.computed = 0
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._progress = progress
        self._pid = os.getpid()  # a forked child inherits this object but not its threads
        self._thread = threading.Thread(
            target=self._run, name=f"memoshare-preload-{dataset.dataset_name}", daemon=True
        )
        self._thread.start()

    @property
    def done(self) -> bool:
        """Whether the preload finished (completely, cancelled or stopped by an error).

        In a forked child (a DataLoader worker) the preload runs in the parent only: there it
        counts as done.
        """
        return self._done.is_set() or os.getpid() != self._pid

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the preload is done; return ``False`` if ``timeout`` passed first.

        Raises the exception that stopped the preload (the dataset's own, say), if any.
        """
        if os.getpid() != self._pid:
            return True  # the preload's threads live in the parent process
        finished = self._done.wait(timeout)
        if finished and self.error is not None:
            raise self.error
        return finished

    def cancel(self, wait: bool = True) -> None:
        """Stop starting samples; with ``wait``, return once the running ones are written."""
        if os.getpid() != self._pid:
            return  # the preload's threads live in the parent process
        self._cancel.set()
        if wait and threading.current_thread() is not self._thread:
            self._done.wait()

    def __repr__(self) -> str:
        state = "done" if self.done else "cancelling" if self.cancelled else "running"
        return (
            f"<Preload of {self._dataset.dataset_name!r}: {state}, {self.computed} computed, "
            f"{self.already_cached} already cached of {self.total}>"
        )

    # -- the coordinating thread ---------------------------------------------------------------
    def _run(self) -> None:
        cache = self._dataset._cache
        bar = _progress_bar(self._progress, self.total, f"preload {self._dataset.dataset_name}")
        running: set[Future[bool]] = set()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="memoshare-preload") as pool:
                for start in range(0, self.total, SCAN_BATCH):
                    if self._stopping(cache):
                        break
                    chunk = self._order[start : start + SCAN_BATCH]
                    todo = self._not_stored(cache, chunk)
                    self.already_cached += len(chunk) - len(todo)
                    bar.update(len(chunk) - len(todo))
                    for index in todo:
                        self._make_room(cache, running, bar)
                        if self._stopping(cache):
                            break
                        running.add(pool.submit(self._load_one, index))
                while running:
                    self._reap(running, bar)
            cache.buffer.flush(attempts=len(RETRY_PAUSES) + 1)
        except BaseException as exc:  # reported through wait(); the thread must not die silently
            self.error = exc
            logger.warning("memoshare: preload of %r stopped: %r", self._dataset.dataset_name,
                           exc)  # fmt: skip
        finally:
            self._cancel.set()  # stops queued tasks if we left early
            bar.close()
            self._done.set()

    def _stopping(self, cache: _SampleCache) -> bool:
        if self._cancel.is_set():
            return True
        if cache.health.failing:
            logger.warning("memoshare: preload of %r stopped: the store is unavailable",
                           self._dataset.dataset_name)  # fmt: skip
            self._cancel.set()
            return True
        return False

    def _not_stored(self, cache: _SampleCache, chunk: list[int]) -> list[int]:
        prefix = self._dataset._prefix
        keys = {f"{prefix}{i}": i for i in dict.fromkeys(chunk)}
        try:
            stored = cache.stored_among(list(keys))
        except BackendError as exc:
            cache.health.failed(exc, "read")
            return []
        return [i for k, i in keys.items() if k not in stored and cache.buffer.get(k) is None]

    def _make_room(self, cache: _SampleCache, running: set[Future[bool]], bar: Any) -> None:
        """Wait until another task may start: fewer than ``workers`` run, and the bytes held
        plus one more sample fit in ``max_bytes`` (one task always may run)."""
        while running:
            mean = _mean_sample(cache)
            held = cache.buffer.pending_bytes + len(running) * mean
            if len(running) < self.workers and held + mean <= self.max_bytes:
                return
            # Writing frees what waits in the buffer; if the store refuses, wait for a task.
            if held + mean > self.max_bytes and cache.buffer.pending and cache.buffer.flush():
                continue
            self._reap(running, bar)
        if cache.buffer.pending_bytes + _mean_sample(cache) > self.max_bytes:
            cache.buffer.flush()

    def _reap(self, running: set[Future[bool]], bar: Any) -> None:
        done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
        for future in done:
            running.discard(future)
            if future.result():  # re-raises the dataset's exception: stops the preload
                self.computed += 1
            else:
                self.already_cached += 1
            bar.update(1)

    def _load_one(self, index: int) -> bool:
        if self._cancel.is_set():
            return False
        dataset = self._dataset
        return dataset._cache.ensure_stored(
            f"{dataset._prefix}{index}", index, lambda: dataset.dataset[index]
        )


def _mean_sample(cache: _SampleCache) -> float:
    """Mean bytes of a sample: of those written, else of those waiting, else 0."""
    if cache.sizes.samples:
        return cache.sizes.mean
    buffer = cache.buffer
    return buffer.pending_bytes / len(buffer.pending) if buffer.pending else 0.0


# -- CacheLoader -----------------------------------------------------------------------------------
class CacheLoader:
    """A cache of values by key: ``get(key, load_fn)`` returns the cached value of ``key`` or
    computes ``load_fn(key)`` once and caches it.

    For a dataset with random augmentation: cache the deterministic part (decoding, resizing)
    with ``loader.get(index, self.decode)`` in ``__getitem__`` and augment the returned value.

    Args:
        backend: the store (see :class:`CachedDataset`); ``None``: the embedded disk store.
        dataset_name: loaders of the same name share (and reuse) entries; different names
            never meet.
        writer_buffer_size: new values are written in batches of this many.
        version: a fingerprint of what ``load_fn`` computes; a new one starts a fresh cache.
        namespace: prefix of every key.
        stampede: on a miss, let one process compute while the others wait for its value.
        lease_timeout: seconds after which a computing process's claim expires.
        wait_timeout: longest a process waits for another one's value.
        flush_interval: seconds after which buffered values are written anyway.
        strict: raise store errors instead of warning and going on uncached.
        log_every: log a line every this many values written.
        **backend_options: arguments of the backend named by ``backend``.

    Keys may be any plain value (int, str, tuple, ...) and are typed: ``1`` and ``"1"`` are
    different entries.
    """

    def __init__(
        self,
        backend: Backend | str | None = None,
        dataset_name: str = "",
        writer_buffer_size: int = 1,
        *,
        version: Any = None,
        namespace: str = DEFAULT_NAMESPACE,
        stampede: bool = True,
        lease_timeout: float = 30.0,
        wait_timeout: float | None = None,
        flush_interval: float | None = 1.0,
        strict: bool = False,
        log_every: int | None = 1000,
        **backend_options: Any,
    ) -> None:
        _refuse_server_options("CacheLoader", backend_options)
        self._cache = _SampleCache(
            backend=backend,
            backend_options=backend_options,
            dataset_name=dataset_name,
            version=version,
            namespace=namespace,
            writer_buffer_size=writer_buffer_size,
            stampede=stampede,
            lease_timeout=lease_timeout,
            wait_timeout=wait_timeout,
            flush_interval=flush_interval,
            strict=strict,
            log_every=log_every,
            length=None,
            label=f"cache loader {dataset_name!r}",
        )

    def get(self, key: Any, load_fn: Callable[[Any], Any]) -> Any:
        """The cached value of ``key``, or ``load_fn(key)`` computed (once), cached, returned."""
        cache = self._cache
        skey = cache.loader_key(key)
        value = cache.lookup(skey, None)
        if value is _MISSING:
            value = cache.obtain(skey, None, lambda: load_fn(key))
        return value

    def key(self, key: Any) -> str:
        """The store key of ``key``."""
        return self._cache.loader_key(key)

    def num_keys(self) -> int:
        """How many entries this loader's name holds (buffered ones are written first).

        Exact on stores that list keys (memory, disk, Redis); on memcached, the number of
        entries written under this name, evicted ones included.
        """
        cache = self._cache
        cache.buffer.flush(attempts=len(RETRY_PAUSES) + 1)
        listed = cache.listed("k")
        if listed is not None:
            return len(listed)
        raw = cache.backend.get(cache.prefix + "count")
        return int(raw) if raw else 0

    @property
    def dataset_name(self) -> str:
        """The name entries are stored under."""
        return self._cache.dataset_name

    @property
    def backend(self) -> Backend:
        """The store."""
        return self._cache.backend

    @property
    def stats(self) -> CacheStats:
        """This process's counts (hits, misses, sets, errors, timeouts, reconnects)."""
        return self._cache.stats

    @property
    def samples_cached(self) -> int:
        """Values this process wrote to the store."""
        return self._cache.sizes.samples

    @property
    def bytes_stored(self) -> int:
        """Bytes of the values this process wrote (serialized)."""
        return self._cache.sizes.bytes

    @property
    def pending(self) -> int:
        """Values waiting in this process's write buffer."""
        return len(self._cache.buffer.pending)

    def flush(self) -> None:
        """Write the buffered values now."""
        self._cache.buffer.flush(attempts=len(RETRY_PAUSES) + 1)

    def close(self) -> None:
        """Write the buffered values (and close a backend this loader built)."""
        self._cache.close()

    def __enter__(self) -> CacheLoader:
        """Use as a context manager: :meth:`close` on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Write the buffered values."""
        self.close()

    def __repr__(self) -> str:
        return f"CacheLoader({self.dataset_name!r}, backend={self.backend!r})"
