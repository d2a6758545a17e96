"""memoshare: shared memoization for experiments and training jobs.

The result of an expensive call is computed once and then served to every process (and, with
memcached or Redis, every machine) that makes the same call::

    from memoshare import memoize

    @memoize()                      # embedded default: a local disk store, no server
    def heavy(x, y=2):
        ...

    heavy(1); heavy(x=1)            # the second call is a hit
    heavy.stats                     # CacheStats(sets=1, misses=1, hits=1, ...)
"""

from .backends import (
    Backend,
    DiskBackend,
    MemcachedBackend,
    MemcachedClientConfig,
    MemoryBackend,
    default_backend,
    make_backend,
)
from .compat import MemcachedConfig, memcached
from .counters import CacheStats, StatsSnapshot
from .datasets import CachedDataset, CacheLoader
from .errors import (
    BackendError,
    BackendRefused,
    BackendTimeout,
    BackendUnavailable,
    ContendedUpdate,
    CorruptEntry,
    IncompleteCacheError,
    MemoshareError,
    UnpicklableValue,
)
from .keys import function_digest, value_digest
from .memoize import MemoizedFunction, MemoizeOptions, memoize
from .moments import Moments
from .shared_stats import FunctionStats, flush_stats, stats

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "BackendRefused",
    "BackendTimeout",
    "BackendUnavailable",
    "CacheLoader",
    "CacheStats",
    "CachedDataset",
    "ContendedUpdate",
    "CorruptEntry",
    "DiskBackend",
    "FunctionStats",
    "IncompleteCacheError",
    "MemcachedBackend",
    "MemcachedClientConfig",
    "MemcachedConfig",
    "MemoizeOptions",
    "MemoizedFunction",
    "MemoryBackend",
    "MemoshareError",
    "Moments",
    "StatsSnapshot",
    "UnpicklableValue",
    "__version__",
    "default_backend",
    "flush_stats",
    "function_digest",
    "make_backend",
    "memcached",
    "memoize",
    "stats",
    "value_digest",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy optional imports
    if name == "RedisBackend":
        from .backends.redis import RedisBackend

        return RedisBackend
    raise AttributeError(f"module 'memoshare' has no attribute {name!r}")
