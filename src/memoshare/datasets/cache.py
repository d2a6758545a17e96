"""The cache of one named dataset: keys, lookups, stampede-protected computation, the manifest,
evictions; and the registry of live caches, flushed at exit and reset in a forked child."""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from .. import serialization, storage
from ..backends import Backend, BackendError, make_backend
from ..counters import CacheStats
from ..health import StoreHealth
from ..keys import check_namespace, value_digest
from ..stampede import compute_once
from .bookkeeping import _human, _Known, _Sizes
from .buffer import RETRY_PAUSES, _flusher, _LeaseRelay, _WriteBuffer
from .codec import _dumps_sample

logger = logging.getLogger("memoshare")

#: Version of the key layout and manifest; part of every dataset id.
LAYOUT = "memoshare.datasets/1"
#: Seconds between two reads of the store's eviction counter.
EVICTION_CHECK_INTERVAL = 5.0
#: Indices per ``get_many`` when checking which samples are stored.
SCAN_BATCH = 512


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


#: Marks a miss: ``None`` and other falsy samples are values like any other.
_MISSING: Any = _Missing()


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
        self.health = StoreHealth(self.label, self.stats, self.strict)
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
        self.relay.tokens.clear()  # the parent's threads' leases; thread ids get reused
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
        self.stats.count("hits", hits)
        return found

    def present(self, key: str) -> bool:
        """Whether ``key`` is stored or waiting to be (no value is decoded)."""
        if self.buffer.get(key) is not None:
            return True
        try:
            return bool(self.backend.exists_many([key]))
        except BackendError as exc:
            self.health.failed(exc, "read")
            return False

    def stored_among(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are in the store, :data:`SCAN_BATCH` keys per round trip (values
        are not downloaded where the store can tell without them)."""
        stored: set[str] = set()
        for start in range(0, len(keys), SCAN_BATCH):
            stored.update(self.backend.exists_many(keys[start : start + SCAN_BATCH]))
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
        if self.eviction_baseline is None:
            # The count was unknown when the cache opened: start from now, so evictions the
            # server made before this cache existed are not blamed on it.
            self.eviction_baseline = evictions
            evictions = None
        baseline = self.eviction_baseline or 0
        evicted = evictions is not None and evictions > baseline
        if not (evicted or suspect):
            return
        self._warned_evictions = True
        try:
            # One warning for all the processes of a job (each DataLoader worker sees it).
            first = self.backend.add(self.prefix + "~evictions-warned", b"1", expire=3600)
        except BackendError:
            first = True
        needed = ""
        if self.length and self.sizes.samples:
            needed = f" (this dataset needs about {_human(self.sizes.mean * self.length)})"
        logger.log(
            logging.WARNING if first else logging.INFO,
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


class _CacheFront:
    """What CachedDataset and CacheLoader share: both are a front for one :class:`_SampleCache`
    (its name, store, counts and write buffer)."""

    _cache: _SampleCache

    @property
    def dataset_name(self) -> str:
        """The name the entries are stored under."""
        return self._cache.dataset_name

    @property
    def backend(self) -> Backend:
        """The store."""
        return self._cache.backend

    @property
    def stats(self) -> CacheStats:
        """This process's counts: hits, misses (values computed), sets (written), errors, ..."""
        return self._cache.stats

    @property
    def samples_cached(self) -> int:
        """Values this process wrote to the store."""
        return self._cache.sizes.samples

    @property
    def bytes_stored(self) -> int:
        """Bytes of the values this process wrote (serialized, before chunking)."""
        return self._cache.sizes.bytes

    @property
    def samples_dropped(self) -> int:
        """Values dropped from the write buffer: refused by the store ``REFUSED_TRIES``
        times, or past its bound while the store was down."""
        return self._cache.sizes.dropped

    @property
    def pending(self) -> int:
        """Values waiting in this process's write buffer."""
        return len(self._cache.buffer.pending)

    def flush(self) -> None:
        """Write the buffered values now (retrying; raises only with ``strict=True``)."""
        self._cache.buffer.flush(attempts=len(RETRY_PAUSES) + 1)

    def close(self) -> None:
        """Write the buffered values (and close a backend this object built)."""
        self._cache.close()

    def __enter__(self) -> Any:
        """Use as a context manager: :meth:`close` on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """:meth:`close`."""
        self.close()
