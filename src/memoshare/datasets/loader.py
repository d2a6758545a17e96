"""CacheLoader: a cache of values by key, computed once by a load function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends import Backend
from ..client import MISSING
from .buffer import RETRY_PAUSES
from .cache import CacheFront, CacheOptions, SampleCache


class CacheLoader(CacheFront):
    """A cache of values by key: ``get(key, load_fn)`` returns the cached value of ``key`` or
    computes ``load_fn(key)`` once and caches it.

    For a dataset with random augmentation: cache the deterministic part (decoding, resizing)
    with ``loader.get(index, self.decode)`` in ``__getitem__`` and augment the returned value.

    Args:
        backend: the store (see :class:`CachedDataset`); ``None``: the embedded disk store.
        dataset_name: loaders of the same name share (and reuse) entries; different names
            never meet.
        writer_buffer_size: new values are written in batches of this many.
        **options: the options of :class:`~memoshare.datasets.CacheOptions` (``version``,
            ``namespace``, ``stampede``, ``lease_timeout``, ``wait_timeout``,
            ``flush_interval``, ``strict``, ``log_every``); any other keyword is an argument
            of the backend named by ``backend``.

    Keys may be any plain value (int, str, tuple, ...) and are typed: ``1`` and ``"1"`` are
    different entries.
    """

    def __init__(
        self,
        backend: Backend | str | None = None,
        dataset_name: str = "",
        writer_buffer_size: int = 1,
        **options: Any,
    ) -> None:
        cache_options, backend_options = CacheOptions.split("CacheLoader", options)
        self._cache = SampleCache(
            backend,
            CacheOptions(
                dataset_name=dataset_name, writer_buffer_size=writer_buffer_size, **cache_options
            ),
            length=None,
            label=f"cache loader {dataset_name!r}",
            backend_options=backend_options,
        )

    def get(self, key: Any, load_fn: Callable[[Any], Any]) -> Any:
        """The cached value of ``key``, or ``load_fn(key)`` computed (once), cached, returned."""
        cache = self._cache
        skey = cache.loader_key(key)
        value = cache.lookup(skey, None)
        if value is MISSING:
            value = cache.obtain(skey, None, lambda: load_fn(key))[1]
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
