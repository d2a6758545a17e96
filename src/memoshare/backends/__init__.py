"""Stores behind one interface: :class:`Backend`.

=====================  ==========================================  ==========================
backend                shared by                                   needs
=====================  ==========================================  ==========================
:class:`MemoryBackend`   the threads of one process                  nothing
:class:`DiskBackend`     the processes of one machine (default)      nothing (LMDB file)
:class:`MemcachedBackend`  every machine that reaches the servers   memcached server(s)
:class:`RedisBackend`    every machine that reaches the server      Redis, ``pip install redis``
=====================  ==========================================  ==========================
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .. import _process
from .base import (
    MAX_KEY_LENGTH,
    Backend,
    BackendError,
    BackendRefused,
    BackendTimeout,
    BackendUnavailable,
)
from .disk import DiskBackend, default_cache_dir
from .memcached import MemcachedBackend, MemcachedClientConfig
from .memory import MemoryBackend

if TYPE_CHECKING:
    from .redis import RedisBackend

__all__ = [
    "MAX_KEY_LENGTH",
    "Backend",
    "BackendError",
    "BackendRefused",
    "BackendTimeout",
    "BackendUnavailable",
    "DiskBackend",
    "MemcachedBackend",
    "MemcachedClientConfig",
    "MemoryBackend",
    "RedisBackend",
    "default_backend",
    "default_cache_dir",
    "make_backend",
]

_default: DiskBackend | None = None
_default_lock = threading.Lock()


def _new_default_lock() -> None:
    global _default_lock
    _default_lock = threading.Lock()  # another thread may have held it at the fork


_process.after_fork_child(_new_default_lock, _process.Order.LOCKS)


def default_backend() -> DiskBackend:
    """The process-wide embedded default: a :class:`DiskBackend` at :func:`default_cache_dir`."""
    global _default
    with _default_lock:
        if _default is None:
            _default = DiskBackend()
        return _default


_NAMES = {"memory": MemoryBackend, "disk": DiskBackend, "memcached": MemcachedBackend}


def make_backend(backend: Backend | str | None = None, **options: Any) -> Backend:
    """Turn a user's ``backend=`` argument into a :class:`Backend`.

    ``None`` is the embedded default (:func:`default_backend`, or a :class:`DiskBackend` built
    from ``options``); a :class:`Backend` is used as is; a name (``"memory"``, ``"disk"``,
    ``"memcached"``, ``"redis"``) builds that backend with ``options`` as its arguments.
    """
    if isinstance(backend, type) and issubclass(backend, Backend):
        raise TypeError(
            f"backend={backend.__name__} is the class: pass an instance, "
            f"e.g. {backend.__name__}(), or a name such as 'memory'"
        )
    if isinstance(backend, Backend):
        if options:
            raise TypeError(
                f"backend options {sorted(options)} given with a ready {type(backend).__name__}: "
                "pass them to its constructor instead"
            )
        return backend
    if backend is None:
        return DiskBackend(**options) if options else default_backend()
    if backend == "redis":
        from .redis import RedisBackend

        return RedisBackend(**options)
    if isinstance(backend, str) and backend in _NAMES:
        return _NAMES[backend](**options)
    raise ValueError(
        f"unknown backend {backend!r}: use a Backend instance or one of "
        f"{sorted([*_NAMES, 'redis'])}"
    )


def __getattr__(name: str) -> Any:
    if name == "RedisBackend":  # redis-py is optional: import it only when asked for
        from .redis import RedisBackend

        return RedisBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
