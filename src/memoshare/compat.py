"""pyDVL's spelling: ``@memcached(client_config=..., time_threshold=0.3, ...)`` and
``MemcachedConfig``, so that pyDVL code runs on memoshare with its imports changed."""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from .backends.memcached import MemcachedBackend, MemcachedClientConfig
from .memoize import MemoizedFunction, MemoizeOptions

__all__ = ["MemcachedConfig", "memcached"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class MemcachedConfig:
    """pyDVL 0.7's ``MemcachedConfig``: the arguments of :func:`memcached` as one object.

    ``memcached(**dataclasses.asdict(config))`` works (``asdict`` turns ``client_config``
    into a dict, which :func:`memcached` takes too), as pyDVL's ``Utility`` does.
    """

    client_config: MemcachedClientConfig = field(default_factory=MemcachedClientConfig)
    time_threshold: float = 0.3
    allow_repeated_evaluations: bool = False
    rtol_stderr: float = 0.1
    min_repetitions: int = 3
    ignore_args: Iterable[str] | None = None


def memcached(
    client_config: MemcachedClientConfig | Mapping[str, Any] | None = None,
    time_threshold: float = 0.3,
    allow_repeated_evaluations: bool = False,
    rtol_stderr: float = 0.1,
    min_repetitions: int = 3,
    ignore_args: Iterable[str] | None = None,
    **options: Any,
) -> Callable[..., MemoizedFunction[Any, Any]]:
    """pyDVL's ``@memcached`` decorator, on memoshare.

    Same arguments and defaults as ``pydvl.utils.caching.memcached``: the store is memcached
    as configured by ``client_config`` (default ``localhost:11211``), and results of calls
    faster than ``time_threshold=0.3`` seconds are not stored. Further keyword arguments are
    those of :func:`~memoshare.memoize` (see :class:`~memoshare.MemoizeOptions`), plus
    ``backend_options=`` for :class:`~memoshare.MemcachedBackend` (``max_item_size``,
    ``retry_interval``, ...). The returned decorator also takes pyDVL's ``signature=``::

        cached = memcached(client_config=config)(fun, signature=b"my-utility-v2")

    Like pyDVL, the decorator connects to the server when it decorates and raises the
    connection error (``ConnectionRefusedError`` or another ``OSError``) if the server cannot
    be reached. Outages later on are survived: calls go on uncached, counted in ``errors`` or
    ``timeouts``, and use the cache again once the server answers. (:func:`~memoshare.memoize`
    connects at the first call instead, and never raises for an outage.)
    """
    backend_options = options.pop("backend_options", {})
    settings = dict(
        time_threshold=time_threshold,
        allow_repeated_evaluations=allow_repeated_evaluations,
        rtol_stderr=rtol_stderr,
        min_repetitions=min_repetitions,
        ignore_args=ignore_args,
        **options,
    )
    if isinstance(ignore_args, str):  # pyDVL tests names with `in`: a single name works there
        settings["ignore_args"] = [ignore_args]
    MemoizeOptions.from_keywords(settings)  # wrong options fail at decoration
    config = MemcachedClientConfig() if client_config is None else client_config
    backend = MemcachedBackend.from_config(config, **backend_options)

    def decorate(fun: Callable[P, R], signature: bytes | None = None) -> MemoizedFunction[P, R]:
        backend.check()  # fail fast, as pyDVL does when it wraps a function
        own = settings
        instance_arg = _instance_parameter(fun)
        if signature is not None and instance_arg is not None:
            # pyDVL keys a bound method by its signature and arguments, never the instance:
            # its Utility passes a signature that already covers model, data and scorer.
            # Digesting the instance at every call would cost as much as its data.
            own = {**settings, "ignore_args": [*(settings["ignore_args"] or ()), instance_arg]}
        return MemoizedFunction(fun, backend=backend, signature=signature, **own)

    return decorate


def _instance_parameter(fun: Any) -> str | None:
    """The name of the instance's parameter of a bound method or callable object, if any."""
    if isinstance(fun, types.MethodType):
        function = fun.__func__
    elif not isinstance(fun, types.FunctionType | functools.partial | type) and isinstance(
        type(fun).__call__, types.FunctionType
    ):
        function = type(fun).__call__
    else:
        return None
    try:
        return next(iter(inspect.signature(function).parameters), None)
    except (TypeError, ValueError):
        return None
