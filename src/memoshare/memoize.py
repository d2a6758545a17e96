"""The decorator :func:`memoize`: :class:`MemoizeOptions`, :class:`MemoizedFunction`.

A call walks down the layers: the key (:class:`~memoshare.keys.KeyBuilder`), one lookup through
the :class:`~memoshare.client.CacheClient`, and on a miss the function, run by one caller at a
time (:func:`~memoshare.stampede.compute_once`) or, for stochastic functions, folded into running
moments with one atomic update.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import inspect
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar, overload

import cloudpickle

from .backends import Backend, make_backend
from .client import MISSING, NOT_STORED, CacheClient
from .keys import DEFAULT_NAMESPACE, KeyBuilder, check_namespace, function_part
from .moments import Moments
from .options import check_bool, check_int, check_real, check_seconds
from .shared_stats import track as track_shared_stats
from .stampede import COMPUTE, StoreLease, compute_once, protocol
from .storage import MAX_UPDATE_ATTEMPTS

__all__ = ["BoundMemoizedFunction", "MemoizeOptions", "MemoizedFunction", "memoize"]

P = ParamSpec("P")
R = TypeVar("R")

_OWNER = "memoize()"

#: Deprecated alias of :data:`memoshare.storage.MAX_UPDATE_ATTEMPTS` (running moments are
#: updated by ``EntryStore.update``).
MAX_CAS_ATTEMPTS = MAX_UPDATE_ATTEMPTS


@dataclass(frozen=True)
class MemoizeOptions:
    """How a function is memoized: every option of :func:`memoize`, checked when it is built.

    Args:
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
        ignore_args: names left out of the key (e.g. ``["job_id"]``; ``["self"]`` for methods
            whose result does not depend on the instance), whether passed by position, by name
            or through ``**kwargs``.
        signature: bytes or text used as the function part of the key instead of its code.
        version: a version string used with the function's name instead of its code, so that
            editing the code keeps the old entries until you bump the version.
        strict: raise store errors (and unpicklable results) instead of warning and going on
            uncached.
        stampede: on a miss, let one caller compute while the others wait for its result
            (default: on for deterministic functions).
        lease_timeout: seconds after which a computing caller's claim expires unless renewed
            (default 5). A live caller renews it every third of that while it computes, so
            it bounds how long a crashed or hung worker blocks the others, not how long the
            function may run.
        wait_timeout: the longest a waiter waits for a computing caller that is alive before
            computing itself (default ``None``: no limit). A caller that dies stops holding
            its claim after ``lease_timeout``; then exactly one waiter takes over.
        shared_stats: also add this process's counts to totals kept in the store, readable
            from any process with :func:`memoshare.stats` or ``memoshare stats`` (default on;
            flushed every few seconds and at exit, never on the call path).

    Raises:
        TypeError, ValueError: an option of the wrong type or out of range (infinite and NaN
            durations included), or options that contradict each other.
    """

    namespace: str = DEFAULT_NAMESPACE
    time_threshold: float = 0.0
    allow_repeated_evaluations: bool = False
    rtol_stderr: float = 0.1
    min_repetitions: int = 3
    ignore_args: tuple[str, ...] = ()
    signature: bytes | str | None = None
    version: Any = None
    strict: bool = False
    stampede: bool | None = None
    lease_timeout: float = 5.0
    wait_timeout: float | None = None
    shared_stats: bool = True

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        check_namespace(self.namespace)
        fix(
            "time_threshold",
            check_seconds(_OWNER, "time_threshold", self.time_threshold, zero=True),
        )
        check_bool(_OWNER, "allow_repeated_evaluations", self.allow_repeated_evaluations)
        fix(
            "rtol_stderr",
            check_real(_OWNER, "rtol_stderr", self.rtol_stderr, minimum=0.0, inclusive=True),
        )
        fix(
            "min_repetitions", check_int(_OWNER, "min_repetitions", self.min_repetitions, minimum=0)
        )
        fix("ignore_args", _names(self.ignore_args))
        if isinstance(self.signature, bytearray | memoryview):
            fix("signature", bytes(self.signature))  # keyed like the same bytes
        elif self.signature is not None and not isinstance(self.signature, bytes | str):
            raise TypeError(f"{_OWNER}: signature must be bytes or str, got {self.signature!r}")
        if self.signature is not None and self.version is not None:
            raise ValueError("pass signature= or version=, not both: each pins the function part")
        check_bool(_OWNER, "strict", self.strict)
        check_bool(_OWNER, "shared_stats", self.shared_stats)
        fix("lease_timeout", check_seconds(_OWNER, "lease_timeout", self.lease_timeout))
        if self.wait_timeout is not None:
            fix("wait_timeout", check_seconds(_OWNER, "wait_timeout", self.wait_timeout, zero=True))
        if self.stampede is None:
            fix("stampede", not self.allow_repeated_evaluations)
        elif check_bool(_OWNER, "stampede", self.stampede) and self.allow_repeated_evaluations:
            raise ValueError(
                "stampede=True needs a deterministic function: with allow_repeated_evaluations "
                "every worker's evaluation is wanted"
            )

    @classmethod
    def from_keywords(cls, options: dict[str, Any]) -> MemoizeOptions:
        """Build from keyword arguments, naming the valid ones if one is unknown."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"{_OWNER} got unknown option(s) {unknown}; the options are {sorted(known)}"
            )
        return cls(**options)


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(MemoizeOptions))


def _names(ignore_args: Any) -> tuple[str, ...]:
    if ignore_args is None:
        return ()
    if isinstance(ignore_args, str):
        raise TypeError(f"ignore_args takes a list of names, e.g. [{ignore_args!r}]")
    names = tuple(ignore_args)
    wrong = [n for n in names if not isinstance(n, str)]
    if wrong:
        raise TypeError(f"ignore_args takes parameter names (str), got {wrong!r}")
    return names


class MemoizedFunction(Generic[P, R]):
    """A function whose results are shared through a store. Made by :func:`memoize`.

    Calling it returns what the function returns. Besides, it has:

    * ``stats``: a :class:`~memoshare.CacheStats` of this process's calls;
    * :meth:`cache_key`, :meth:`invalidate`: the key of a call, and removing its entry;
    * ``backend``, ``namespace``, ``options`` (a :class:`MemoizeOptions`), ``__wrapped__``:
      what it was built from.

    It pickles (for joblib, multiprocessing, Ray): the receiving process opens its own
    connection on first use and starts with fresh ``stats``.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        backend: Backend | str | None = None,
        _fn_digest: bytes | None = None,
        _runtime: float | None = None,
        **options: Any,
    ) -> None:
        # @memoize() over @staticmethod in a class body: memoize the function, and do not
        # bind it to instances (see __get__), as the staticmethod would not.
        self._static = isinstance(fn, staticmethod)
        if self._static:
            fn = fn.__func__
        if not callable(fn):
            raise TypeError(f"memoize() needs a callable, got {type(fn).__qualname__}")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"cannot memoize {getattr(fn, '__qualname__', fn)}: it is a generator function, "
                "whose values are produced lazily and consumed once. Memoize a function that "
                "returns them, e.g. list(...) of the generator."
            )
        self.options = opts = MemoizeOptions.from_keywords(options)
        self.backend = make_backend(backend)
        self.namespace = opts.namespace

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
        self._fn = fn
        self._target = target

        # updated=(): copying fn.__dict__ would overwrite this object's own attributes (a
        # memoized function's stats and backend, a callable object's fields).
        functools.update_wrapper(self, fn, updated=())  # type: ignore[arg-type]
        if "__qualname__" not in self.__dict__:  # a functools.partial or a callable object
            inner = fn.func if isinstance(fn, functools.partial) else fn
            self.__qualname__ = getattr(inner, "__qualname__", type(inner).__qualname__)

        self._client = CacheClient(self.backend, self.__qualname__, strict=opts.strict)
        self.stats = self._client.stats
        self._lookup = self._client.lookup  # bound once: the hit path
        self._lease = StoreLease(self._client.entries, opts.lease_timeout)
        # A running estimate of the function's run time (None until it ran): with a
        # time_threshold, calls expected to be faster than it are not stored, so a miss
        # skips the lease (there is nothing to wait for) and costs one lookup.
        self._runtime = _runtime
        # Nothing below holds this object (no cycle): a function is freed as soon as its
        # last reference goes, and its shared counts are flushed then.
        keys = self._keys = KeyBuilder(
            target,
            opts.namespace,
            opts.ignore_args,
            _fn_digest
            if _fn_digest is not None
            else functools.partial(
                function_part,
                fn,
                target,
                signature=opts.signature,
                version=opts.version,
                stochastic=opts.allow_repeated_evaluations,
            ),
            warn_unbindable=_fn_digest is None,  # a rebuilt copy was warned about already
        )
        if opts.shared_stats:
            track_shared_stats(
                self,
                self.stats,
                self.backend,
                opts.namespace,
                self.__qualname__,
                lambda: keys.current_digest,
            )

    @property
    def _memoshare_digest(self) -> bytes:
        """The function part of every key (final once the function has been called); read by
        :mod:`memoshare.digest` when a memoized function is an argument or a global."""
        return self._keys.fn_digest

    # -- calling -------------------------------------------------------------------------------
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._self is not _NO_SELF:
            args = (self._self, *args)  # type: ignore[assignment]
        key = self._keys.key(args, kwargs)
        if self.options.allow_repeated_evaluations:
            return self._call_stochastic(key, args, kwargs)
        value = self._lookup(key)
        if value is not MISSING and value is not NOT_STORED:
            self.stats.hit()
            return value  # type: ignore[no-any-return]
        if self._protected(value):
            return self._compute_once(key, args, kwargs)
        return self._compute_and_store(key, args, kwargs)[0]  # type: ignore[no-any-return]

    def _protected(self, looked_up: Any) -> bool:
        """Whether a miss takes the lease (one caller computes while the others wait). Not
        where the last caller left the "not stored" mark (nobody computes for us), nor when
        the call will most likely be faster than ``time_threshold`` (nothing will be stored
        to wait for), nor while the store fails."""
        runtime = self._runtime
        return (
            looked_up is MISSING
            and bool(self.options.stampede)
            and not self._client.health.failing
            and not (runtime is not None and runtime < self.options.time_threshold)
        )

    def _observed(self, elapsed: float) -> None:
        """Fold a run time into the running estimate ``_protected`` reads."""
        runtime = self._runtime
        self._runtime = elapsed if runtime is None else 0.8 * runtime + 0.2 * elapsed

    def _keep(self, key: str, value: Any, elapsed: float) -> bool:
        """Store ``value`` unless its call was faster than ``time_threshold``."""
        return elapsed >= self.options.time_threshold and self._client.store(key, value)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, float]:
        # Counted first: a call whose function raises was a miss too (hits + misses == calls).
        self.stats.count("misses")
        start = time.perf_counter()
        value = self._target(*args, **kwargs)
        elapsed = time.perf_counter() - start
        if inspect.iscoroutine(value):
            value.close()
            raise TypeError(
                f"{self.__qualname__} is a coroutine function: memoize it with memoize(), "
                "which returns an async function to await (or await its acall())"
            )
        self._observed(elapsed)
        return value, elapsed

    def _compute_and_store(
        self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, bool]:
        """Run the function; store the result unless it was faster than ``time_threshold``."""
        value, elapsed = self._run(args, kwargs)
        return value, self._keep(key, value, elapsed)

    def _compute_once(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        hit, value = compute_once(
            self._lease,
            key,
            lookup=lambda: self._lookup(key),
            compute=lambda: self._compute_and_store(key, args, kwargs),
            on_error=self._client.failed,
            wait_timeout=self.options.wait_timeout,
        )
        if hit:
            self.stats.hit()
        return value  # type: ignore[no-any-return]

    # -- running moments -----------------------------------------------------------------------
    def _call_stochastic(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        converged = self._converged_mean(key)
        if converged is not MISSING:
            return converged  # type: ignore[no-any-return]
        value, _ = self._run(args, kwargs)
        return self._fold(key, value)  # type: ignore[no-any-return]

    def _converged_mean(self, key: str) -> Any:
        """The stored mean if it has converged (a hit), else :data:`MISSING`."""
        opts = self.options
        record = self._lookup(key)
        if isinstance(record, Moments) and record.converged(opts.rtol_stderr, opts.min_repetitions):
            self.stats.hit()
            return record.mean
        return MISSING

    def _fold(self, key: str, value: Any) -> Any:
        """Add ``value`` to the stored moments; the running mean (``value`` if that failed)."""

        def add(current: Any) -> Moments:
            # Anything but a record (absent, unreadable) starts afresh.
            return current.add(value) if isinstance(current, Moments) else Moments.first(value)

        updated = self._client.update(key, add)
        return value if updated is MISSING else updated.mean

    # -- coroutine functions -------------------------------------------------------------------
    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """The call of a memoized ``async def`` function (what the function returned by
        :func:`memoize` awaits). Waiting for another caller's result does not block the
        event loop; the store's own operations are short blocking calls."""
        if self._self is not _NO_SELF:
            args = (self._self, *args)
        key = self._keys.key(args, kwargs)
        opts = self.options
        if opts.allow_repeated_evaluations:
            converged = self._converged_mean(key)
            if converged is not MISSING:
                return converged
            return self._fold(key, (await self._arun(args, kwargs))[0])
        value = self._lookup(key)
        if value is not MISSING and value is not NOT_STORED:
            self.stats.hit()
            return value
        if not self._protected(value):
            return (await self._acompute_and_store(key, args, kwargs))[0]
        steps = protocol(
            self._lease,
            key,
            lookup=lambda: self._lookup(key),
            on_error=self._client.failed,
            wait_timeout=opts.wait_timeout,
        )
        try:
            request = next(steps)
            while True:
                if request is COMPUTE:
                    try:
                        reply = await self._acompute_and_store(key, args, kwargs)
                    except BaseException as exc:
                        request = steps.throw(exc)  # releases the lease, and raises exc
                        continue
                else:
                    await asyncio.sleep(request)  # waiting yields to the event loop
                    reply = None
                request = steps.send(reply)
        except StopIteration as done:
            hit, value = done.value
        if hit:
            self.stats.hit()
        return value

    async def _arun(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, float]:
        self.stats.count("misses")  # first: hits + misses == calls, even if it raises
        start = time.perf_counter()
        value = await self._target(*args, **kwargs)
        elapsed = time.perf_counter() - start
        self._observed(elapsed)
        return value, elapsed

    async def _acompute_and_store(
        self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, bool]:
        value, elapsed = await self._arun(args, kwargs)
        return value, self._keep(key, value, elapsed)

    # -- helpers -------------------------------------------------------------------------------
    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The store key of the call ``self(*args, **kwargs)`` (nothing is computed)."""
        if self._self is not _NO_SELF:
            args = (self._self, *args)  # type: ignore[assignment]
        return self._keys.key(args, kwargs)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove the entry of the call ``self(*args, **kwargs)``; return whether it existed."""
        return self._client.delete(self.cache_key(*args, **kwargs))

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # Decorating a method in a class body: bind like a function does.
        if instance is None or self._static:
            return self
        return BoundMemoizedFunction(self, instance)

    def __getattr__(self, name: str) -> Any:
        # The options, readable as attributes too (f.time_threshold, f.lease_timeout, ...).
        options = self.__dict__.get("options")
        if options is not None and name in _OPTION_NAMES:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<memoized {self.__qualname__} on {self.backend!r}>"

    # -- pickling ------------------------------------------------------------------------------
    def __reduce__(self) -> Any:
        module = getattr(self, "__module__", None)
        if module and module != "__main__" and _is_global(self, module):
            # Like a function: by reference, so the receiver uses its own module-level object.
            return _import_global, (module, self.__qualname__)
        options = {name: getattr(self.options, name) for name in _OPTION_NAMES}
        state = dict(
            backend=self.backend,
            _fn_digest=self._memoshare_digest,
            _runtime=self._runtime,
            **options,
        )
        return _rebuild, (cloudpickle.dumps(self._fn), state)


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
        return _import_global(module, obj.__qualname__) is obj
    except (ImportError, AttributeError):
        return False


def _import_global(module: str, qualname: str) -> Any:
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _rebuild(fn_bytes: bytes, state: dict[str, Any]) -> MemoizedFunction[Any, Any]:
    return MemoizedFunction(cloudpickle.loads(fn_bytes), **state)


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
    Options are checked at decoration: a wrong one raises ``TypeError``/``ValueError`` there,
    never at call time. A network store is connected to at the first call.

    Args:
        backend: a :class:`~memoshare.backends.Backend`, a backend name (``"memory"``,
            ``"disk"``, ``"memcached"``, ``"redis"``), or ``None`` for the embedded default.
        **options: see :class:`MemoizeOptions` (``namespace``, ``time_threshold``,
            ``allow_repeated_evaluations``, ``rtol_stderr``, ``min_repetitions``,
            ``ignore_args``, ``signature``, ``version``, ``strict``, ``stampede``,
            ``lease_timeout``, ``wait_timeout``, ``shared_stats``).

    Returns:
        a :class:`MemoizedFunction` (or a decorator making one).
    """
    if isinstance(backend, type) and issubclass(backend, Backend):
        make_backend(backend)  # raises: the class given instead of an instance
    if callable(backend) and not isinstance(backend, Backend):
        return _front(MemoizedFunction(backend, **options))

    def decorate(fn: Callable[P, R]) -> MemoizedFunction[P, R]:
        return _front(MemoizedFunction(fn, backend=backend, **options))  # type: ignore[return-value]

    return decorate


def _front(memoized: MemoizedFunction[P, R]) -> Any:
    """What the user gets: the memoized function, or for an ``async def`` function an async
    function awaiting it (so that ``inspect.iscoroutinefunction`` and frameworks that check it
    see a coroutine function), with the same ``stats``, ``cache_key``, ``invalidate``,
    ``backend``, ``namespace`` and ``options``."""
    if not inspect.iscoroutinefunction(memoized._target):
        return memoized

    @functools.wraps(memoized._fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        return await memoized.acall(*args, **kwargs)

    for name in ("stats", "cache_key", "invalidate", "backend", "namespace", "options"):
        setattr(call, name, getattr(memoized, name))
    call.__memoized__ = memoized  # type: ignore[attr-defined]
    # Over @staticmethod in a class body: stay unbound, as the staticmethod would.
    return staticmethod(call) if memoized._static else call


def __getattr__(name: str) -> Any:
    # ``memoshare.memoize.memcached`` was importable before the pyDVL spelling moved to
    # memoshare.compat; compat imports this module, so the name is resolved on demand.
    if name == "memcached":
        from .compat import memcached

        return memcached
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
