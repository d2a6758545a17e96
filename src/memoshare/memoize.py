"""The decorators: :func:`memoize` and its pyDVL-compatible spelling :func:`memcached`."""

from __future__ import annotations

import functools
import importlib
import logging
import random
import time
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar, overload

import cloudpickle

from . import serialization, storage
from .backends import Backend, BackendError, make_backend
from .backends.memcached import MemcachedBackend, MemcachedClientConfig
from .counters import CacheStats
from .health import StoreHealth
from .keys import (
    DEFAULT_NAMESPACE,
    KeyBuilder,
    check_namespace,
    digest_and_pending,
    identity,
    value_digest,
)
from .moments import Moments
from .shared_stats import track as track_shared_stats
from .stampede import compute_once
from .storage import is_manifest

__all__ = ["MemoizedFunction", "memcached", "memoize"]

logger = logging.getLogger("memoshare")

P = ParamSpec("P")
R = TypeVar("R")

#: How many times a moments update is retried when other writers keep winning the CAS race.
MAX_CAS_ATTEMPTS = 100


class MemoizedFunction(Generic[P, R]):
    """A function whose results are shared through a store. Made by :func:`memoize`.

    Calling it returns what the function returns. Besides, it has:

    * ``stats``: a :class:`~memoshare.CacheStats` of this process's calls;
    * :meth:`cache_key`, :meth:`invalidate`: the key of a call, and removing its entry;
    * ``backend``, ``namespace``, ``__wrapped__``: what it was built from.

    It pickles (for joblib, multiprocessing, Ray): the receiving process opens its own
    connection on first use and starts with fresh ``stats``.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        backend: Backend | str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        time_threshold: float = 0.0,
        allow_repeated_evaluations: bool = False,
        rtol_stderr: float = 0.1,
        min_repetitions: int = 3,
        ignore_args: Iterable[str] | None = None,
        signature: bytes | str | None = None,
        version: str | None = None,
        strict: bool = False,
        stampede: bool | None = None,
        lease_timeout: float = 60.0,
        wait_timeout: float | None = None,
        shared_stats: bool = True,
        _fn_digest: bytes | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"memoize() needs a callable, got {type(fn).__qualname__}")
        if time_threshold < 0:
            raise ValueError(f"time_threshold must be >= 0 seconds, got {time_threshold!r}")
        if rtol_stderr < 0:
            raise ValueError(f"rtol_stderr must be >= 0, got {rtol_stderr!r}")
        if min_repetitions < 1:
            raise ValueError(f"min_repetitions must be >= 1, got {min_repetitions!r}")
        if lease_timeout <= 0:
            raise ValueError(f"lease_timeout must be > 0 seconds, got {lease_timeout!r}")
        if isinstance(ignore_args, str):
            raise TypeError(f"ignore_args takes a list of names, e.g. [{ignore_args!r}]")
        if signature is not None and version is not None:
            raise ValueError("pass signature= or version=, not both: each pins the function part")
        if stampede and allow_repeated_evaluations:
            raise ValueError(
                "stampede=True needs a deterministic function: with allow_repeated_evaluations "
                "every worker's evaluation is wanted"
            )
        self.backend = make_backend(backend)
        self.namespace = check_namespace(namespace)
        self.time_threshold = time_threshold
        self.allow_repeated_evaluations = allow_repeated_evaluations
        self.rtol_stderr = rtol_stderr
        self.min_repetitions = min_repetitions
        self.strict = strict
        self.stampede = (not allow_repeated_evaluations) if stampede is None else stampede
        self.lease_timeout = lease_timeout
        self.wait_timeout = lease_timeout if wait_timeout is None else wait_timeout
        self._signature = signature
        self._version = version
        self._ignore_args = list(ignore_args or ())

        # A bound method or a callable object: key the instance like a first argument, so that
        # ignore_args=["self"] can leave it out.
        target: Any = fn
        self._self: Any = _NO_SELF
        if isinstance(fn, types.MethodType):
            target, self._self = fn.__func__, fn.__self__
        elif not isinstance(
            fn, types.FunctionType | functools.partial | type | types.BuiltinFunctionType
        ) and isinstance(type(fn).__call__, types.FunctionType):
            target, self._self = type(fn).__call__, fn  # a callable object written in Python
        self._target = target

        pending = False
        if _fn_digest is None:
            _fn_digest, pending = self._compute_digest(fn, target)
        self._digest = _fn_digest
        self._keys = KeyBuilder(target, namespace, self._ignore_args, _fn_digest)
        # Bound once: the hit path looks up fewer attributes. If the function names something
        # not defined yet, the first call takes the digest again (see _digest_again).
        self._key = self._key_after_new_digest if pending else self._keys.key
        self._get = self.backend.get
        self.stats = CacheStats()
        self._warned_unpicklable = False
        self._warned_corrupt = False
        # updated=(): copying fn.__dict__ would overwrite this object's own attributes (a
        # memoized function's stats and backend, a callable object's fields).
        functools.update_wrapper(self, fn, updated=())  # type: ignore[arg-type]
        if "__qualname__" not in self.__dict__:  # a functools.partial or a callable object
            inner = fn.func if isinstance(fn, functools.partial) else fn
            self.__qualname__ = getattr(inner, "__qualname__", type(inner).__qualname__)
        self._fn = fn
        self._health = StoreHealth(
            self.__qualname__, self.stats, strict, getattr(self.backend, "server_for", None)
        )
        self.shared_stats = shared_stats
        self._stats_entry = track_shared_stats(self) if shared_stats else None

    def _compute_digest(self, fn: Any, target: Any) -> tuple[bytes, bool]:
        """The function part of every key, and whether to take it again on first call."""
        import hashlib

        h = hashlib.blake2b(digest_size=32)
        pending = False
        if self._signature is not None:
            sig = self._signature
            h.update(b"signature:" + (sig.encode() if isinstance(sig, str) else bytes(sig)))
        elif self._version is not None:
            # The version is encoded like an argument: 1 and "1" are different versions.
            h.update(b"version:" + identity(fn) + b":" + value_digest(self._version))
        else:
            code_digest, pending = digest_and_pending(target)
            h.update(b"code:" + code_digest)
        # The stored format differs between the two modes: never read one as the other.
        h.update(b"moments" if self.allow_repeated_evaluations else b"value")
        return h.digest(), pending

    @property
    def _memoshare_digest(self) -> bytes:
        """The function part of every key (final once the function has been called)."""
        if self._key == self._key_after_new_digest:
            self._digest_again()
        return self._digest

    def _digest_again(self) -> None:
        # At decoration the function named a global not bound yet (a helper defined below
        # it) or is a method whose class did not exist yet: both are there by the first call.
        # Taken once; whatever is still missing then is left out, as for any unbound name.
        self._digest, _ = self._compute_digest(self._fn, self._target)
        self._keys = KeyBuilder(self._target, self.namespace, self._ignore_args, self._digest)
        self._key = self._keys.key
        if self._stats_entry is not None:
            self._stats_entry.fn_id = self._digest.hex()[:16]

    def _key_after_new_digest(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        self._digest_again()
        return self._key(args, kwargs)

    # -- calling -------------------------------------------------------------------------------
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._self is not _NO_SELF:
            args = (self._self, *args)  # type: ignore[assignment]
        key = self._key(args, kwargs)
        if self.allow_repeated_evaluations:
            return self._call_stochastic(key, args, kwargs)
        # The hit path, kept flat (each Python call layer costs measurably against a ~25 us
        # memcached round trip): one get, a header check, one unpickle, one counter.
        try:
            data = self._get(key)
        except BackendError as exc:
            self._health.failed(exc, "read")
        else:
            if self._health.failing:
                self._health.ok(key)
            if data is not None:
                if is_manifest(data):
                    found, value = self._lookup_chunks(key, data)
                else:
                    found, value = self._decode(key, data)
                if found:
                    next(self.stats._hits)  # CacheStats.count("hits"), inlined
                    return value  # type: ignore[no-any-return]
        if self.stampede and not self._health.failing:
            return self._compute_once(key, args, kwargs)
        return self._compute_and_store(key, args, kwargs)

    def _lookup(self, key: str) -> tuple[bool, Any]:
        try:
            payload = storage.read_entry(self.backend, key)
        except BackendError as exc:
            self._health.failed(exc, "read")
            return False, None
        if self._health.failing:
            self._health.ok(key)
        if payload is None:
            return False, None
        return self._decode(key, payload)

    def _lookup_chunks(self, key: str, manifest: bytes) -> tuple[bool, Any]:
        try:
            payload = storage.read_chunks(self.backend, key, manifest)
        except BackendError as exc:
            self._health.failed(exc, "read")
            return False, None
        return (False, None) if payload is None else self._decode(key, payload)

    def _decode(self, key: str, payload: bytes) -> tuple[bool, Any]:
        try:
            return True, serialization.loads(payload)
        except serialization.CorruptEntry as exc:
            # Once per function at WARNING (the recomputed value replaces the entry; a miss
            # path reads it a second time), then at DEBUG.
            level = logging.DEBUG if self._warned_corrupt else logging.WARNING
            self._warned_corrupt = True
            logger.log(
                level,
                "memoshare: unreadable entry %s for %s (%s): recomputing",
                key,
                self.__qualname__,
                exc,
            )
            return False, None

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, float]:
        # Counted first: a call whose function raises was a miss too (hits + misses == calls).
        self.stats.count("misses")
        start = time.perf_counter()
        value = self._target(*args, **kwargs)
        return value, time.perf_counter() - start

    def _compute_and_store(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        value, elapsed = self._run(args, kwargs)
        if elapsed >= self.time_threshold:
            self._store(key, value)
        return value  # type: ignore[no-any-return]

    def _store(self, key: str, value: Any) -> bool:
        payload = self._serialize(value)
        if payload is None:
            return False
        try:
            storage.write_entry(self.backend, key, payload)
        except BackendError as exc:
            self._health.failed(exc, "write")
            return False
        if self._health.failing:
            self._health.write_ok(key)
        self.stats.count("sets")
        return True

    def _serialize(self, value: Any) -> bytes | None:
        try:
            return serialization.dumps(value)
        except serialization.UnpicklableValue as exc:
            if self.strict:
                raise
            if not self._warned_unpicklable:
                self._warned_unpicklable = True
                warnings.warn(
                    f"{self.__qualname__} returned a value that cannot be pickled, so it is "
                    f"not cached: {exc}",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return None

    # -- stampede protection -------------------------------------------------------------------
    def _compute_once(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        stored = False

        def compute() -> Any:
            nonlocal stored
            value, elapsed = self._run(args, kwargs)
            stored = elapsed >= self.time_threshold and self._store(key, value)
            return value

        hit, value = compute_once(
            self.backend,
            key,
            lookup=lambda: self._lookup(key),
            compute=compute,
            on_error=self._health.failed,
            lease_timeout=self.lease_timeout,
            wait_timeout=self.wait_timeout,
            stored=lambda: stored,
        )
        if hit:
            self.stats.count("hits")
        return value  # type: ignore[no-any-return]

    # -- running moments -----------------------------------------------------------------------
    def _call_stochastic(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        found, record = self._lookup(key)
        if (
            found
            and isinstance(record, Moments)
            and record.converged(self.rtol_stderr, self.min_repetitions)
        ):
            self.stats.count("hits")
            return record.mean  # type: ignore[no-any-return]
        value, _ = self._run(args, kwargs)
        updated = self._add_observation(key, value)
        return value if updated is None else updated.mean  # type: ignore[no-any-return]

    def _add_observation(self, key: str, value: Any) -> Moments | None:
        """Fold ``value`` into the stored moments atomically (CAS, retried with back-off)."""
        for attempt in range(MAX_CAS_ATTEMPTS):
            try:
                payload, token = storage.read_entry_for_update(self.backend, key)
                current = None
                if payload is not None:
                    try:
                        current = serialization.loads(payload)
                    except serialization.CorruptEntry:
                        current = None
                if not isinstance(current, Moments):
                    current = None
                updated = Moments.first(value) if current is None else current.add(value)
                new_payload = self._serialize(updated)
                if new_payload is None:
                    return None
                if payload is None and token is None:  # absent (a token: chunks were lost)
                    stored = storage.add_entry(self.backend, key, new_payload)
                elif current is None:  # unreadable: overwrite, a corrupt record is worthless
                    storage.write_entry(self.backend, key, new_payload)
                    stored = True
                else:
                    stored = storage.replace_entry(self.backend, key, new_payload, token)
            except BackendError as exc:
                self._health.failed(exc, "update")
                return None
            if stored:
                self.stats.count("sets")
                return updated
            time.sleep(min(0.001 * 2**attempt, 0.05) * random.random())
        self.stats.count("errors")
        logger.warning(
            "memoshare: %s lost %d update races in a row on %s; value not recorded",
            self.__qualname__,
            MAX_CAS_ATTEMPTS,
            key,
        )
        return None

    # -- helpers -------------------------------------------------------------------------------
    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The store key of the call ``self(*args, **kwargs)`` (nothing is computed)."""
        if self._self is not _NO_SELF:
            args = (self._self, *args)  # type: ignore[assignment]
        return self._key(args, kwargs)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove the entry of the call ``self(*args, **kwargs)``; return whether it existed."""
        return storage.delete_entry(self.backend, self.cache_key(*args, **kwargs))

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # Decorating a method in a class body: bind like a function does.
        if instance is None:
            return self
        return BoundMemoizedFunction(self, instance)

    def __repr__(self) -> str:
        return f"<memoized {self.__qualname__} on {self.backend!r}>"

    # -- pickling ------------------------------------------------------------------------------
    def __reduce__(self) -> Any:
        module = getattr(self, "__module__", None)
        if module and module != "__main__" and _is_global(self, module):
            # Like a function: by reference, so the receiver uses its own module-level object.
            return _import_global, (module, self.__qualname__)
        return _rebuild, (cloudpickle.dumps(self._fn), self._options())

    def _options(self) -> dict[str, Any]:
        return dict(
            backend=self.backend,
            namespace=self.namespace,
            time_threshold=self.time_threshold,
            allow_repeated_evaluations=self.allow_repeated_evaluations,
            rtol_stderr=self.rtol_stderr,
            min_repetitions=self.min_repetitions,
            ignore_args=self._ignore_args,
            signature=self._signature,
            version=self._version,
            strict=self.strict,
            stampede=self.stampede,
            lease_timeout=self.lease_timeout,
            wait_timeout=self.wait_timeout,
            shared_stats=self.shared_stats,
            _fn_digest=self._memoshare_digest,
        )


class BoundMemoizedFunction:
    """A :class:`MemoizedFunction` defined in a class body, bound to one instance.

    Calls, :meth:`cache_key` and :meth:`invalidate` pass the instance as ``self``; every other
    attribute (``stats``, ``backend``, ...) is the underlying function's, shared by all
    instances.
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, function: MemoizedFunction[..., Any], instance: Any) -> None:
        self.__func__ = function
        self.__self__ = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        """The store key of this call (see :meth:`MemoizedFunction.cache_key`)."""
        return self.__func__.cache_key(self.__self__, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Remove this call's entry (see :meth:`MemoizedFunction.invalidate`)."""
        return self.__func__.invalidate(self.__self__, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__func__, name)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoundMemoizedFunction)
            and other.__func__ is self.__func__
            and other.__self__ is self.__self__
        )

    def __hash__(self) -> int:
        return hash((id(self.__func__), id(self.__self__)))

    def __reduce__(self) -> Any:
        return getattr, (self.__self__, self.__func__.__name__)

    def __repr__(self) -> str:
        return f"<bound memoized {self.__func__.__qualname__} of {self.__self__!r}>"


class _NoSelf:
    def __repr__(self) -> str:
        return "<no self>"


_NO_SELF = _NoSelf()


def _is_global(obj: Any, module: str) -> bool:
    try:
        found: Any = importlib.import_module(module)
        for part in obj.__qualname__.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return False
    return found is obj


def _import_global(module: str, qualname: str) -> Any:
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _rebuild(fn_bytes: bytes, options: dict[str, Any]) -> MemoizedFunction[Any, Any]:
    return MemoizedFunction(cloudpickle.loads(fn_bytes), **options)


@overload
def memoize(backend: Callable[P, R]) -> MemoizedFunction[P, R]: ...
@overload
def memoize(
    backend: Backend | str | None = None, **options: Any
) -> Callable[[Callable[P, R]], MemoizedFunction[P, R]]: ...


def memoize(backend: Any = None, **options: Any) -> Any:
    """Memoize a function in a store shared by processes (and machines).

    Use as ``@memoize()`` (the embedded default: a local disk store, no server needed),
    ``@memoize(MemcachedBackend(("127.0.0.1", 11211)))``, or ``@memoize`` without parentheses.

    Args:
        backend: a :class:`~memoshare.backends.Backend`, a backend name (``"memory"``,
            ``"disk"``, ``"memcached"``, ``"redis"``), or ``None`` for the embedded default.
        namespace: prefix of the keys (default ``"memoshare"``). Entries of different
            namespaces never meet; clearing or counting works per namespace.
        time_threshold: results of calls faster than this many seconds are not stored
            (default 0: store everything).
        allow_repeated_evaluations: for stochastic functions: keep re-evaluating and store the
            running mean, variance and count until the standard error of the mean is at most
            ``rtol_stderr * |mean|`` and at least ``min_repetitions`` values were seen; then
            serve the mean. Calls return the running mean.
        rtol_stderr: relative tolerance of the stopping rule (default 0.1).
        min_repetitions: fewest evaluations before the mean is served (default 3).
        ignore_args: parameter names left out of the key (e.g. ``["job_id"]``; ``["self"]``
            for methods whose result does not depend on the instance).
        signature: bytes or text used as the function part of the key instead of its code.
        version: a version string used with the function's name instead of its code, so that
            editing the code keeps the old entries until you bump the version.
        strict: raise store errors (and unpicklable results) instead of warning and going on
            uncached.
        stampede: on a miss, let one caller compute while the others wait for its result
            (default: on for deterministic functions).
        lease_timeout: seconds after which a computing caller's claim expires, so that a
            crashed worker does not block the others (default 60). Set it above the
            function's running time, or waiters will compute too.
        wait_timeout: the longest a waiter waits before computing itself (default:
            ``lease_timeout``).
        shared_stats: also add this process's counts to totals kept in the store, readable
            from any process with :func:`memoshare.stats` or ``memoshare stats`` (default on;
            flushed every few seconds and at exit, never on the call path).

    Returns:
        a :class:`MemoizedFunction` (or a decorator making one).
    """
    if callable(backend) and not isinstance(backend, Backend):
        return MemoizedFunction(backend, **options)

    def decorate(fn: Callable[P, R]) -> MemoizedFunction[P, R]:
        return MemoizedFunction(fn, backend=backend, **options)

    return decorate


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
    those of :func:`memoize`. The returned decorator also takes pyDVL's ``signature=``::

        cached = memcached(client_config=config)(fun, signature=b"my-utility-v2")
    """
    config = client_config or MemcachedClientConfig()
    backend = MemcachedBackend.from_config(config)

    def decorate(fun: Callable[P, R], signature: bytes | None = None) -> MemoizedFunction[P, R]:
        return MemoizedFunction(
            fun,
            backend=backend,
            time_threshold=time_threshold,
            allow_repeated_evaluations=allow_repeated_evaluations,
            rtol_stderr=rtol_stderr,
            min_repetitions=min_repetitions,
            ignore_args=ignore_args,
            signature=signature,
            **options,
        )

    return decorate
