"""pyDVL's spelling: ``@memcached(client_config=..., time_threshold=0.3, ...)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

from .backends.memcached import MemcachedBackend, MemcachedClientConfig
from .memoize import MemoizedFunction, MemoizeOptions

__all__ = ["memcached"]

P = ParamSpec("P")
R = TypeVar("R")


def memcached(
    client_config: MemcachedClientConfig | None = None,
    time_threshold: float = 0.3,
    allow_repeated_evaluations: bool = False,
    rtol_stderr: float = 0.1,
    min_repetitions: int = 3,
    ignore_args: Iterable[str] | None = None,
    **options: Any,
) -> Callable[..., MemoizedFunction[Any, Any]]:
    """pyDVL's ``@memcached`` decorator, on memoshare.

    Same arguments and defaults as ``pydvl.utils.caching.memcached``: the store is memcached
    as configured by ``client_config`` (default ``localhost:11211``) and results of calls
    faster than ``time_threshold=0.3`` seconds are not stored. Further keyword arguments are
    those of :func:`~memoshare.memoize` (:class:`~memoshare.MemoizeOptions`). The returned
    decorator also takes pyDVL's ``signature=``::

        cached = memcached(client_config=config)(fun, signature=b"my-utility-v2")
    """
    settings = dict(
        time_threshold=time_threshold,
        allow_repeated_evaluations=allow_repeated_evaluations,
        rtol_stderr=rtol_stderr,
        min_repetitions=min_repetitions,
        ignore_args=ignore_args,
        **options,
    )
    MemoizeOptions.from_keywords(settings)  # wrong options fail at decoration
    backend = MemcachedBackend.from_config(client_config or MemcachedClientConfig())

    def decorate(fun: Callable[P, R], signature: bytes | None = None) -> MemoizedFunction[P, R]:
        return MemoizedFunction(fun, backend=backend, signature=signature, **settings)

    return decorate
