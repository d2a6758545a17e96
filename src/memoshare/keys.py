"""Keys of calls: ``<namespace>:<blake2b hex>`` of the function part and the bound arguments.

The function part (:func:`function_part`) is a digest of the function's code (see
:mod:`memoshare.digest`), or of a pinned ``signature=`` or ``version=``. :class:`KeyBuilder`
binds each call's arguments to the signature, leaves out ``ignore_args`` and feeds the rest to
a copy of a hasher seeded with the function part. Calls with only plain scalars take a fast path
(one ``update`` per argument, and a per-process memo of whole keys).
"""

from __future__ import annotations

import hashlib
import inspect
import re
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from . import _process
from .digest import (
    DIGEST_SIZE,
    NAN_BYTES,
    CanonicalEncoder,
    digest_and_pending,
    f64,
    function_digest,
    identity,
    u64,
    value_digest,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "KeyBuilder",
    "check_namespace",
    "function_digest",
    "function_part",
    "value_digest",
]

DEFAULT_NAMESPACE = "memoshare"

# Taking a digest again is rare (once per function) and may recurse into another memoized
# function's: one reentrant lock for all, made anew in a forked child (a parent's thread may
# have held it at the fork).
_digest_lock = threading.RLock()


def _new_digest_lock() -> None:
    global _digest_lock
    _digest_lock = threading.RLock()


_process.after_fork_child(_new_digest_lock, _process.Order.LOCKS)
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-/@+=]{1,100}")


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if it can prefix a key in every backend, else raise ``ValueError``."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {type(namespace).__qualname__}")
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: use 1 to 100 characters among letters, digits "
            "and _ . - / @ + = (no whitespace, control characters or colons: the colon "
            "separates the namespace from the digest)"
        )
    return namespace


def function_part(
    fn: Any,
    target: Any,
    *,
    signature: bytes | str | None,
    version: str | None,
    stochastic: bool,
) -> tuple[bytes, bool]:
    """The function part of every key of ``fn``, and whether to take it again at the first
    call (the code names something not defined yet: a helper below it, its own class).

    Args:
        fn: the callable as the user gave it (named by ``version=``).
        target: what is called (for a bound method or a callable object: the plain function).
        signature: bytes or text pinning the function part instead of the code.
        version: a version string used with the function's name instead of the code.
        stochastic: whether entries hold running moments (a different stored format).
    """
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    pending = False
    if signature is not None:
        h.update(b"signature:" + (signature.encode() if isinstance(signature, str) else signature))
    elif version is not None:
        # The version is encoded like an argument: 1 and "1" are different versions.
        h.update(b"version:" + identity(fn) + b":" + value_digest(version))
    else:
        code_digest, pending = digest_and_pending(target)
        h.update(b"code:" + code_digest)
    # The stored format differs between the two modes: never read one as the other.
    h.update(b"moments" if stochastic else b"value")
    return h.digest(), pending


# -- binding arguments ---------------------------------------------------------------------------
_SIMPLE = inspect.Parameter.POSITIONAL_OR_KEYWORD
_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD
_MEMOABLE = frozenset({int, str, bytes, bool, type(None)})
_MEMO_SIZE = 4096
_EMPTY = inspect.Parameter.empty
_ANY_ARGUMENTS = inspect.Signature(
    [
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)

FunctionPart = Callable[[], tuple[bytes, bool]]


class KeyBuilder:
    """Builds the key of each call of one function.

    Args:
        fn: the function whose calls are keyed (for a method, the plain function: ``self`` is
            then an argument like any other).
        namespace: prefix of every key (see :func:`check_namespace`).
        ignore_args: names left out of the key, whether passed by position, by name, or
            through ``**kwargs``. A name that no call can bind (no such parameter and no
            ``**kwargs``) is accepted with a warning: pyDVL code ignores ``job_id`` on
            functions that may not take it.
        fn_digest: the function part: final bytes, or a callable returning ``(digest,
            pending)`` (see :func:`function_part`), called now and, if pending, once more
            at the first key.
        warn_unbindable: warn about names in ``ignore_args`` that no call can bind (off
            where the same function is rebuilt, say from a pickle: warned once already).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        namespace: str,
        ignore_args: Iterable[str],
        fn_digest: bytes | FunctionPart,
        *,
        warn_unbindable: bool = True,
    ) -> None:
        self.namespace = check_namespace(namespace)
        try:
            self.signature = inspect.signature(fn)
        except (TypeError, ValueError):  # C callables may have none: take any arguments
            self.signature = _ANY_ARGUMENTS
        params = list(self.signature.parameters.values())
        names = [p.name for p in params]
        self.qualname = getattr(fn, "__qualname__", repr(fn))
        ignored = frozenset(ignore_args)
        self._var_keyword = next((p.name for p in params if p.kind is _VAR_KEYWORD), None)
        unbindable = ignored - set(names)
        if unbindable and self._var_keyword is None and warn_unbindable:
            warnings.warn(
                f"ignore_args names {sorted(unbindable)}, which {self.qualname}"
                f"{self.signature} can never receive (no such parameter, no **kwargs): "
                "they are ignored",
                UserWarning,
                stacklevel=4,
            )
        self.ignored = ignored
        # Ignored names that can only arrive through **kwargs: a call passing one of them
        # takes the general path, which removes it from the **kwargs dict.
        self._ignored_extra = unbindable if self._var_keyword is not None else frozenset()
        self._prefix = namespace + ":"
        self._pending_part: FunctionPart | None = None
        if isinstance(fn_digest, bytes):
            self._set_digest(fn_digest)
        else:
            digest, pending = fn_digest()
            self._set_digest(digest)
            self._pending_part = fn_digest if pending else None
        # Fast path: only plain positional-or-keyword parameters, called positionally.
        self._simple = all(p.kind is _SIMPLE for p in params)
        self._n_params = len(params)
        self._n_required = sum(p.default is inspect.Parameter.empty for p in params)
        self._defaults = tuple(p.default for p in params)
        self._names = tuple(names)
        self._keyword_names = [frozenset(names[i:]) for i in range(len(names) + 1)]
        self._name_tags = {name: _name_tag(name) for name in names}
        self._positional_tags = tuple(
            None if name in self.ignored else self._name_tags[name] for name in names
        )

    def _set_digest(self, digest: bytes) -> None:
        self._fn_digest = digest
        self._base = hashlib.blake2b(digest, digest_size=DIGEST_SIZE)
        self._memo: dict[tuple[Any, ...], str] = {}

    @property
    def pending(self) -> bool:
        """Whether the function part is taken again at the next key."""
        return self._pending_part is not None

    @property
    def current_digest(self) -> bytes:
        """The function part as known now, without taking it again if :attr:`pending`."""
        return self._fn_digest

    @property
    def fn_digest(self) -> bytes:
        """The function part (final once a key was built, or after reading this)."""
        if self._pending_part is not None:
            self._take_digest_again()
        return self._fn_digest

    def _take_digest_again(self) -> None:
        # At decoration the function named a global not bound yet (a helper defined below
        # it) or is a method whose class did not exist yet: both are there by the first call.
        # Taken once; whatever is still missing then is left out, as for any unbound name.
        # Threads making their first calls at once wait here: none may key a call with the
        # provisional digest (it leaves the helper's code out).
        with _digest_lock:
            part = self._pending_part
            if part is None:
                return  # another thread took it
            self._set_digest(part()[0])
            self._pending_part = None  # only now: the digest above is final

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by parameter name, defaults applied."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def _simple_values(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """Values in parameter order for plain signatures, or None to use ``bind``."""
        n = len(args)
        if not kwargs:
            if self._n_required <= n <= self._n_params:
                return args + self._defaults[n:]
            return None
        if n > self._n_params or not kwargs.keys() <= self._keyword_names[n]:
            return None  # unknown or duplicated names: let bind() raise its TypeError
        values = args + tuple(
            kwargs.get(name, default)
            for name, default in zip(self._names[n:], self._defaults[n:], strict=True)
        )
        if any(v is _EMPTY for v in values):  # not `in`: it would compare arrays with ==
            return None  # a required argument is missing
        return values

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The store key of the call ``fn(*args, **kwargs)``."""
        if self._pending_part is not None:
            self._take_digest_again()
        if not kwargs:
            # Calls with only ints, strs, bytes, bools and None are memoized per process: for
            # those types equality is exactly key equality (no -0.0/0.0 or 1/1.0/True
            # conflation, as the types are part of the memo key), and it saves the hashing.
            try:
                memo_key: tuple[Any, ...] | None = (args, tuple(map(type, args)))
                key = self._memo.get(memo_key)  # type: ignore[arg-type]
            except Exception:  # unhashable (lists, arrays) or odd arguments: no memo
                memo_key = key = None
            if key is not None:
                return key
            key = self._key(args, kwargs)
            if memo_key is not None and _MEMOABLE.issuperset(memo_key[1]):
                if len(self._memo) >= _MEMO_SIZE:
                    self._memo.clear()
                self._memo[memo_key] = key
            return key
        return self._key(args, kwargs)

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        h = self._base.copy()
        n = len(args)
        if not kwargs and self._simple and self._n_required <= n <= self._n_params:
            values: tuple[Any, ...] | None = args + self._defaults[n:]  # _simple_values, inlined
        else:
            values = self._simple_values(args, kwargs) if self._simple else None
        if values is not None:
            scalars = _SCALARS
            for tag, value in zip(self._positional_tags, values, strict=True):
                if tag is not None:
                    scalar = scalars.get(type(value))  # _feed's first step, without its call
                    if scalar is not None:
                        h.update(tag + scalar(value))
                    else:
                        self._feed(h, tag, value)
        else:
            for name, value in self.bind(args, kwargs).items():
                if name in self.ignored:
                    continue
                if name == self._var_keyword and self._ignored_extra:
                    value = {k: v for k, v in value.items() if k not in self._ignored_extra}
                self._feed(h, self._name_tags[name], value)
        return self._prefix + h.hexdigest()

    def _feed(self, h: Any, tag: bytes, value: Any) -> None:
        scalar = _SCALARS.get(type(value))
        if scalar is not None:
            h.update(tag + scalar(value))
            return
        h.update(tag)
        try:
            CanonicalEncoder(h).value(value)
        except (TypeError, RecursionError) as exc:
            name = tag[len(b"arg") + 8 :].decode()
            raise TypeError(
                f"cannot build a cache key for {self.qualname}(): argument {name!r} "
                f"({type(value).__qualname__}) cannot be hashed: {exc}. Pass it through "
                "ignore_args if it does not change the result."
            ) from exc


def _name_tag(name: str) -> bytes:
    data = name.encode()
    return b"arg" + u64(len(data)) + data


def _tagged(tag: bytes, data: bytes) -> bytes:
    return tag + u64(len(data)) + data


# One-update encodings of the commonest argument types; they equal what CanonicalEncoder feeds.
def _int_scalar(x: int) -> bytes:
    n = x.bit_length() // 8 + 1
    return b"int" + u64(n) + x.to_bytes(n, "little", signed=True)


_FLOAT_PREFIX = b"float" + u64(8)  # a float is always 8 bytes: one concatenation per call

_SCALARS: dict[type, Callable[[Any], bytes]] = {
    int: _int_scalar,
    float: lambda x: _FLOAT_PREFIX + (NAN_BYTES if x != x else f64(x)),
    str: lambda x: _tagged(b"str", x.encode("utf-8", "surrogatepass")),
    bytes: lambda x: _tagged(b"bytes", x),
    bool: lambda x: _tagged(b"bool", b"\x01" if x else b"\x00"),
    type(None): lambda x: _tagged(b"none", b""),
}
