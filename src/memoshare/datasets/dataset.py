"""CachedDataset: a map-style dataset whose samples are computed once and served from a store."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from ..backends import Backend
from ..client import MISSING
from ..errors import IncompleteCacheError
from ..keys import DEFAULT_NAMESPACE
from ..options import check_int
from .cache import SCAN_BATCH, CacheFront, CacheOptions, SampleCache
from .preload import Preload, indices_in_order


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


class CachedDataset(CacheFront):
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
        **options: the options of :class:`~memoshare.datasets.CacheOptions` (``version``,
            ``namespace``, ``stampede``, ``lease_timeout``, ``wait_timeout``,
            ``flush_interval``, ``strict``, ``log_every``), checked here; any other keyword
            is an argument of the backend named by ``backend``.

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
        **options: Any,
    ) -> None:
        length = _check_map_style(dataset)
        if dataset_name is None:
            dataset_name = getattr(dataset, "name", None)
            if not isinstance(dataset_name, str):
                raise TypeError(
                    "CachedDataset needs dataset_name=...: samples are stored under it, and "
                    "every job using the same name (and version) shares them"
                )
        cache_options, backend_options = CacheOptions.split("CachedDataset", options)
        cache = SampleCache(
            backend,
            CacheOptions(
                dataset_name=dataset_name, writer_buffer_size=writer_buffer_size, **cache_options
            ),
            length=length,
            label=f"dataset {dataset_name!r}",
            backend_options=backend_options,
        )
        cache.write_manifest(length)
        self._setup(dataset, cache)
        if preload:
            self.preload()

    def _setup(self, dataset: Any, cache: SampleCache) -> None:
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
        cache = SampleCache(
            backend,
            CacheOptions(
                dataset_name=dataset_name,
                version=version,
                namespace=namespace,
                stampede=False,
                flush_interval=None,
                strict=strict,
                log_every=None,
            ),
            length=None,
            label=f"dataset {dataset_name!r}",
            backend_options=backend_options,
        )
        manifest = cache.read_manifest()
        if manifest is None:
            raise IncompleteCacheError(
                f"no cache of dataset {dataset_name!r} (version {version!r}, namespace "
                f"{namespace!r}) in {cache.backend!r}: fill it first with CachedDataset(dataset, "
                "dataset_name=...) and preload()"
            )
        cache.set_length(int(manifest["length"]))
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
        if value is MISSING:
            value = self._cache.obtain(key, i, self._loader(i))[1]
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
        distinct = len(set(keys))
        if len(found) < distinct:
            missing = {key: i for key, i in zip(keys, idx, strict=True) if key not in found}
            while missing:
                key, i = next(iter(missing.items()))
                del missing[key]
                hit, found[key] = self._cache.obtain(key, i, self._loader(i), flush=False)
                if hit and missing:
                    # Another process wrote it (a buffer flushed when asked for): the rest
                    # of the batch is likely there too, one round trip away.
                    found.update(self._cache.lookup_many(list(missing), list(missing.values())))
                    missing = {k: j for k, j in missing.items() if k not in found}
            self._cache.buffer.flush_if_full()
        if distinct == len(keys):
            return [found[k] for k in keys]
        # An index asked for twice (a sampler with replacement) gets two independent samples,
        # as the plain dataset gives: an in-place transform must not apply twice to one object.
        samples, seen = [], set()
        for key in keys:
            sample = found[key]
            if key in seen:
                sample = copy.deepcopy(sample)
            seen.add(key)
            samples.append(sample)
        return samples

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
        check_int("preload()", "workers", workers, minimum=1)
        check_int("preload()", "max_bytes", max_bytes, minimum=1)
        if self._preload is not None and not self._preload.done:
            raise RuntimeError("a preload of this dataset is running: wait() or cancel() it")
        indices = [self._index(i) for i in indices_in_order(order, self._length)]
        prefix, dataset = self._prefix, self.dataset
        self._preload = Preload(
            self._cache,
            indices,
            key_of=lambda i: f"{prefix}{i}",
            load=lambda i: dataset[i],
            workers=workers,
            max_bytes=max_bytes,
            progress=progress,
        )
        return self._preload

    # -- inspection ----------------------------------------------------------------------------
    def missing_indices(self) -> list[int]:
        """Indices whose sample is not in the store (nor waiting in this process's buffer)."""
        self._keep_manifest()  # what is_complete() promises, from_cache() must find
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
    def version(self) -> Any:
        """The fingerprint given as ``version=``."""
        return self._cache.version

    # -- life cycle ----------------------------------------------------------------------------
    def clear(self) -> int:
        """Remove this dataset's samples (and chunks) from the store and from this process's
        buffer; return how many keys were removed.

        A cache opened with its dataset keeps its manifest (written again at once), so a
        refill is a complete cache that :meth:`from_cache` opens, and a dataset of another
        length is still refused under the same name and version. One opened with
        :meth:`from_cache` removes the manifest too: the cache is gone.
        """
        cache = self._cache
        cache.buffer.discard()
        cache.forget_seen()  # or the misses to come would look like evictions
        if not cache.backend.can_list_keys:  # memcached: chunks are left to its LRU
            samples = [f"{self._prefix}{i}" for i in range(self._length)]
            listed = [f"{key}{suffix}" for key in samples for suffix in ("", "~lease", "~wanted")]
        else:  # every key of the dataset, chunks and leases included
            listed = cache.backend.keys(cache.prefix)
        removed = 0
        for start in range(0, len(listed), SCAN_BATCH):
            removed += cache.backend.delete_many(listed[start : start + SCAN_BATCH])
        removed += cache.backend.delete(cache.manifest_key)
        self._keep_manifest()
        return removed

    def _keep_manifest(self) -> None:
        """Write the manifest back if it is gone (cleared, evicted) and the dataset is here."""
        if self.dataset is not None:
            self._cache.write_manifest(self._length)

    def flush(self) -> None:
        """Write the buffered samples now (retrying; raises only with ``strict=True``)."""
        super().flush()
        self._keep_manifest()

    def close(self) -> None:
        """Stop a running preload and write the buffered samples."""
        if self._preload is not None:
            self._preload.cancel()
        self._keep_manifest()
        self._cache.close()

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
