"""CacheLoader: a cache of values by key, computed once by a load function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends import Backend
from ..keys import DEFAULT_NAMESPACE
from .buffer import RETRY_PAUSES
from .cache import _MISSING, _CacheFront, _refuse_server_options, _SampleCache


# -- CacheLoader -----------------------------------------------------------------------------------
class CacheLoader(_CacheFront):
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

    def __repr__(self) -> str:
        return f"CacheLoader({self.dataset_name!r}, backend={self.backend!r})"
