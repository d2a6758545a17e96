"""The cache of one named dataset: :class:`CacheOptions`, :class:`SampleCache` (keys, lookups,
stampede-protected computation, the manifest, evictions, on a
:class:`~memoshare.client.CacheClient`), and :class:`CacheFront`, what :class:`CachedDataset` and
:class:`CacheLoader` share."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import _process, serialization
from ..backends import Backend, make_backend
from ..client import MISSING, NOT_STORED, CacheClient
from ..counters import CacheStats
from ..errors import BackendError, CorruptEntry
from ..keys import DEFAULT_NAMESPACE, check_namespace, value_digest
from ..options import check_bool, check_int, check_seconds
from ..stampede import StoreLease, compute_once
from .bookkeeping import KnownIndices, Sizes, human_bytes
from .buffer import RETRY_PAUSES, BufferedLease, WriteBuffer
from .codec import dumps_sample

logger = logging.getLogger("memoshare")

#: Version of the key layout and manifest; part of every dataset id.
LAYOUT = "memoshare.datasets/1"
#: Seconds between two reads of the store's eviction counter.
EVICTION_CHECK_INTERVAL = 5.0
#: Seconds a process ended by SIGTERM waits for its write buffers to be written.
SIGTERM_FLUSH_SECONDS = 5.0
#: Indices per ``get_many`` when checking which samples are stored.
SCAN_BATCH = 512

_live_caches: weakref.WeakSet[SampleCache] = weakref.WeakSet()


def _flush_all() -> None:
    for cache in list(_live_caches):
        cache.buffer.final_flush()


def _flush_all_on_sigterm() -> None:
    # The main thread may have been stopped inside a flush (holding its lock): flush from
    # another thread, and give up after SIGTERM_FLUSH_SECONDS (the leases then expire).
    flushing = threading.Thread(target=_flush_all, name="memoshare-sigterm-flush", daemon=True)
    flushing.start()
    flushing.join(SIGTERM_FLUSH_SECONDS)


def _after_fork_in_child() -> None:
    for cache in list(_live_caches):
        cache.after_fork()


_process.at_exit(_flush_all, _process.Order.CACHES)
_process.on_sigterm(_flush_all_on_sigterm, _process.Order.CACHES)
_process.after_fork_child(_after_fork_in_child, _process.Order.CACHES)


@dataclass(frozen=True)
class CacheOptions:
    """How the samples of one dataset are cached: the options of :class:`CachedDataset` and
    :class:`CacheLoader`, checked when they are built.

    Args:
        dataset_name: the name entries are stored under; the same name (and version) reuses
            them, which is how jobs share a cache.
        version: a fingerprint of the data and its preprocessing (any plain value); change it
            when they change, so that stale samples are never served.
        namespace: prefix of every key (as for :func:`memoshare.memoize`).
        writer_buffer_size: new samples are written in batches of this many, in one round trip.
        stampede: on a miss, let one process compute while the others wait for its sample.
        lease_timeout: seconds after which a computing process's claim expires unless renewed
            (default 5). A live process renews it while it computes a sample and while the
            sample waits in its write buffer, so it bounds how long a crashed or hung worker
            blocks the others, not how long a sample may take.
        wait_timeout: longest a process waits for another live process's sample (default
            ``None``: no limit; a dead process's claim expires after ``lease_timeout``, and
            then exactly one waiter takes over).
        flush_interval: seconds after which buffered samples are written even if the buffer
            is not full (``None``: only when full, on flush, close and exit).
        strict: raise store errors instead of warning and going on uncached.
        log_every: log a line with the samples and bytes cached every this many writes
            (``None`` or 0: never).
    """

    dataset_name: str = ""
    version: Any = None
    namespace: str = DEFAULT_NAMESPACE
    writer_buffer_size: int = 1
    stampede: bool = True
    lease_timeout: float = 5.0
    wait_timeout: float | None = None
    flush_interval: float | None = 1.0
    strict: bool = False
    log_every: int | None = 1000

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        owner = "dataset cache"
        if not isinstance(self.dataset_name, str):
            raise TypeError(
                f"dataset_name must be a str, got {type(self.dataset_name).__qualname__}"
            )
        check_namespace(self.namespace)
        fix(
            "writer_buffer_size",
            check_int(owner, "writer_buffer_size", self.writer_buffer_size, minimum=1),
        )
        check_bool(owner, "stampede", self.stampede)
        check_bool(owner, "strict", self.strict)
        fix("lease_timeout", check_seconds(owner, "lease_timeout", self.lease_timeout))
        if self.wait_timeout is not None:
            fix("wait_timeout", check_seconds(owner, "wait_timeout", self.wait_timeout, zero=True))
        if self.flush_interval is not None:
            fix("flush_interval", check_seconds(owner, "flush_interval", self.flush_interval))
        if self.log_every is not None:
            fix("log_every", check_int(owner, "log_every", self.log_every, minimum=0))
        try:
            value_digest(self.version)
        except (TypeError, RecursionError) as exc:
            raise TypeError(
                f"version must be a plain value (str, number, tuple, dict, ...): {exc}"
            ) from exc

    @classmethod
    def split(cls, kind: str, keywords: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``keywords`` as (cache options, backend options); Bagua's server options are
        refused with a message saying what to do instead."""
        refuse_server_options(kind, keywords)
        names = {f.name for f in dataclasses.fields(cls)}
        options = {k: v for k, v in keywords.items() if k in names}
        return options, {k: v for k, v in keywords.items() if k not in names}


class SampleCache:
    """Keys, lookups, stampede-protected computation and writes of one named dataset.

    Args:
        backend: the store, as for :func:`memoshare.memoize` (a name is built with
            ``backend_options``, and then closed with this cache).
        options: the :class:`CacheOptions`.
        length: the number of samples (``None`` for a :class:`CacheLoader`, or until a
            cache opened without its dataset reads it from the manifest).
        label: what the cache is called in messages.
    """

    def __init__(
        self,
        backend: Backend | str | None,
        options: CacheOptions,
        *,
        length: int | None,
        label: str,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.options = options
        digest = value_digest((LAYOUT, options.dataset_name, options.version), digest_size=8)
        self.prefix = f"{options.namespace}:ds:{digest.hex()}:"
        self.owns_backend = not isinstance(backend, Backend) and (
            backend is not None or bool(backend_options)
        )
        self.backend = make_backend(backend, **(backend_options or {}))
        self.length = length
        self.label = label
        self.eviction_baseline = self._read_evictions()
        self._start()

    # -- runtime state (rebuilt after unpickling) ----------------------------------------------
    def _start(self) -> None:
        options = self.options
        self.client = CacheClient(
            self.backend, self.label, strict=options.strict, dumps=dumps_sample
        )
        self.stats = self.client.stats
        self.sizes = Sizes(self.label, options.log_every)
        self.known = KnownIndices(self.length) if self.length is not None else None
        counted = not self.backend.can_list_keys and self.length is None
        self.buffer = WriteBuffer(
            self.client,
            StoreLease(self.client.entries, options.lease_timeout),
            self.sizes,
            self.known,
            options.writer_buffer_size,
            options.flush_interval,
            self.prefix + "count" if counted else None,
        )
        self.lease = BufferedLease(self.client.entries, options.lease_timeout, self.buffer)
        self._warned_evictions = False
        self._next_eviction_check = 0.0
        _live_caches.add(self)
        _process.arm_sigterm()  # a DataLoader worker ended by SIGTERM writes its buffer first
        # Flushed when collected too; at exit the process hook flushes every live cache.
        weakref.finalize(self, self.buffer.final_flush).atexit = False

    def after_fork(self) -> None:
        """In a forked child: the parent still owns (and will write) what was waiting in the
        buffer; until then this child serves those samples from its copy instead of waiting
        for their leases."""
        self.buffer.after_fork()
        self.stats.reset()
        self.sizes.reset()

    def set_length(self, length: int) -> None:
        """Learn the number of samples (from the manifest of a cache opened without them)."""
        self.length = length
        self.known = self.buffer.known = KnownIndices(length)

    def forget_seen(self) -> None:
        """Forget which samples were seen stored (after clear(): misses are not evictions)."""
        if self.length is not None:
            self.known = self.buffer.known = KnownIndices(self.length)

    def __getstate__(self) -> dict[str, Any]:
        names = ("options", "prefix", "owns_backend", "backend", "length", "label")
        return {name: getattr(self, name) for name in (*names, "eviction_baseline")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start()

    # -- keys ----------------------------------------------------------------------------------
    @property
    def dataset_name(self) -> str:
        return self.options.dataset_name

    @property
    def version(self) -> Any:
        return self.options.version

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
        """The cached value of ``key`` (buffer, then store) or ``MISSING``; counts nothing."""
        payload = self.buffer.get(key)
        if payload is None:
            return self.client.lookup(key)
        return self.client.decode(key, payload)

    def lookup(self, key: str, index: int | None) -> Any:
        """Like :meth:`find`, counting a hit or noticing an evicted sample."""
        value = self.find(key)
        if value is NOT_STORED:  # marked by a caller that could not store it
            return MISSING
        if value is MISSING:
            if index is not None and self.known is not None and index in self.known:
                self.check_evictions(suspect=True)
            return MISSING
        self.stats.hit()
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
                    found[key] = self.client.decode(key, payload)
            wanted = [k for k in keys if k not in found]
        if wanted:
            found.update(self.client.lookup_many(list(dict.fromkeys(wanted))))
        # This loop runs once per sample of every cached batch: kept free of calls.
        hits = 0
        bits = self.known.bits if self.known is not None else None
        for key, index in zip(keys, indices, strict=True):
            if found.get(key, MISSING) is MISSING:
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
            return bool(self.client.present([key]))
        except BackendError as exc:
            self.client.failed(exc, "read")
            return False

    def stored_among(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are in the store, :data:`SCAN_BATCH` keys per round trip (values
        are not downloaded where the store can tell without them)."""
        stored: set[str] = set()
        for start in range(0, len(keys), SCAN_BATCH):
            stored.update(self.client.present(keys[start : start + SCAN_BATCH]))
        return stored

    def listed(self, tag: str) -> list[str] | None:
        """Keys of this dataset starting with ``tag`` (``None`` if the store cannot list)."""
        if not self.backend.can_list_keys:
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
    ) -> tuple[bool, Any]:
        """Compute a missing sample (once among all waiting callers) and buffer it:
        ``(hit, value)``, where ``hit`` says another process stored it meanwhile."""
        if not self.options.stampede or self.client.health.failing:
            return False, self._compute(key, index, compute, flush)[0]
        hit, value = compute_once(
            self.lease,
            key,
            lookup=lambda: self.find(key),
            compute=lambda: self._compute(key, index, compute, flush),
            on_error=self.client.failed,
            wait_timeout=self.options.wait_timeout,
        )
        if hit:
            self.stats.hit()
        return hit, value

    def ensure_stored(self, key: str, index: int | None, compute: Callable[[], Any]) -> bool:
        """Compute and buffer ``key`` unless stored (for preloading); whether it computed."""
        if self.present(key):
            return False
        if not self.options.stampede or self.client.health.failing:
            self._compute(key, index, compute, flush=True)
            return True
        hit, _ = compute_once(
            self.lease,
            key,
            lookup=lambda: self.find(key),
            compute=lambda: self._compute(key, index, compute, flush=True),
            on_error=self.client.failed,
            wait_timeout=self.options.wait_timeout,
        )
        return not hit

    def _compute(
        self, key: str, index: int | None, compute: Callable[[], Any], flush: bool
    ) -> tuple[Any, bool]:
        """Compute a sample and buffer it: ``(value, whether it is buffered)``."""
        value = compute()
        self.stats.count("misses")
        self.check_evictions()
        payload = self.client.encode(value)
        if payload is not None:
            self.buffer.put(key, payload, index, flush=flush)
        return value, payload is not None

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
            needed = f" (this dataset needs about {human_bytes(self.sizes.mean * self.length)})"
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
            "name": self.options.dataset_name,
            "version": repr(self.options.version),
            "length": length,
            "created": time.time(),
        }
        try:
            if self.client.entries.add(self.manifest_key, serialization.dumps(record)):
                return
            existing = self.read_manifest()
        except BackendError as exc:
            self.client.failed(exc, "record the manifest of")
            return
        if existing is not None and existing.get("length") != length:
            raise ValueError(
                f"the cache {self.dataset_name!r} (version {self.version!r}) holds a dataset of "
                f"{existing.get('length')} samples, this one has {length}: pass a new version= "
                "(or another dataset_name) when the data or its preprocessing changes, or "
                "clear() the old cache"
            )

    def read_manifest(self) -> dict[str, Any] | None:
        raw = self.client.entries.read(self.manifest_key)
        if raw is None:
            return None
        try:
            record = serialization.loads(raw)
        except CorruptEntry:
            return None
        return record if isinstance(record, dict) else None

    def close(self) -> None:
        self.buffer.final_flush()
        if self.owns_backend:
            self.backend.close()


def refuse_server_options(kind: str, options: Mapping[str, Any]) -> None:
    wrong = sorted(k for k in options if k in {"capacity_per_node", "cluster_mode", "hosts"})
    if wrong:
        raise TypeError(
            f"{kind} does not spawn servers ({', '.join(wrong)} are Bagua options): start "
            "memcached or redis-server yourself and pass backend=MemcachedBackend(...) or "
            "backend='redis', host=..., port=..."
        )


class CacheFront:
    """What CachedDataset and CacheLoader share: both are a front for one :class:`SampleCache`
    (its name, store, counts and write buffer)."""

    _cache: SampleCache

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
