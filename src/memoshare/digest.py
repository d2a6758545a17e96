"""Digests: the canonical encoding of values and the digest of what a function computes.

They recurse into each other (a function's globals are values; a value may be a function), so
they live together; :mod:`memoshare.keys` builds the keys of calls from them. Two rules make a
key trustworthy:

* **Equal calls, equal keys, everywhere.** Arguments are encoded by a canonical, type-tagged
  walk, not by ``pickle`` (whose output for a ``set`` of strings changes from one process to the
  next, as string hashing is randomized). Sets and dict items are ordered by the digests of
  their elements; numpy arrays are fed to the hash from their memory, without a copy.
* **Different functions, different keys.** The function part covers the bytecode and constants
  (through nested code objects), defaults, closure values and the globals the code names, so
  editing any of them starts a fresh set of entries.

Edge cases, by design: ``1``, ``1.0`` and ``True`` are different keys (types are part of the
key, like ``functools.lru_cache(typed=True)``); ``-0.0`` and ``0.0`` are different keys (their
bits differ and a function may tell them apart); every NaN is the same key (so ``f(nan)`` can be
a hit although ``nan != nan``); dicts equal as dicts give one key whatever their insertion order;
a ``list`` and a ``tuple`` with the same items are different keys.
"""

from __future__ import annotations

import collections
import copyreg
import dis
import functools
import hashlib
import math
import struct
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = [
    "DIGEST_SIZE",
    "NAN_BYTES",
    "CanonicalEncoder",
    "digest_and_pending",
    "f64",
    "function_digest",
    "identity",
    "u64",
    "value_digest",
]

DIGEST_SIZE = 32

#: The fixed-width encodings every key uses (the scalar fast path of memoshare.keys too).
u64 = struct.Struct("<Q").pack
f64 = struct.Struct("<d").pack
NAN_BYTES = f64(math.nan)


def _name(obj: Any) -> str:
    """``module.qualname`` of a function or class, the same in every process.

    multiprocessing's "spawn" workers import the main script as ``__mp_main__``: it is the
    same code as ``__main__``, so it gets the same name (and the same keys).
    """
    return f"{_module(obj)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _is_tensor(obj: Any) -> bool:
    """Whether ``obj`` is a torch tensor (torch is not imported for that: without it loaded,
    nothing is a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _memo_digest(obj: Any) -> bytes | None:
    """The function part of a memoized function (None for anything else, its class included)."""
    obj = getattr(obj, "__memoized__", obj)  # the async function memoize() returns
    digest = getattr(obj, "_memoshare_digest", None)
    return digest if isinstance(digest, bytes) else None


def _bound_to_instance(fn: Any) -> bool:
    """Whether a builtin function is a method bound to an object (``d.get``, ``[].append``)."""
    owner = getattr(fn, "__self__", None)
    return owner is not None and not isinstance(owner, types.ModuleType | type)


def _module(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    return "__main__" if module == "__mp_main__" else module


class CanonicalEncoder:
    """A canonical encoder feeding a blake2b object."""

    __slots__ = ("h", "_stack", "pending")

    def __init__(self, h: Any) -> None:
        self.h = h
        self._stack: list[int] = []  # ids of the containers being encoded, for cycles
        # The function part named something not defined yet (a helper below the function, the
        # class a method is defined in): the digest must be taken again once it exists.
        self.pending = False

    def tag(self, tag: bytes, data: bytes | memoryview = b"") -> None:
        if len(data) < 4096:
            self.h.update(tag + u64(len(data)) + data)
        else:  # large buffers (arrays) are fed in place, never copied
            self.h.update(tag + u64(len(data)))
            self.h.update(data)

    def text(self, tag: bytes, s: str) -> None:
        self.tag(tag, s.encode("utf-8", "surrogatepass"))

    # -- values --------------------------------------------------------------------------------
    def value(self, obj: Any) -> None:
        encode = _EXACT.get(type(obj))
        if encode is not None:
            encode(self, obj)
            return
        if isinstance(obj, np.generic):
            self.tag(b"npscalar")  # np.float64(2) and np.array(2.0) are different arguments
            self.array(np.asarray(obj))
        elif isinstance(obj, types.FunctionType | functools.partial | types.MethodType):
            self.tag(b"fn", function_digest(obj))
        elif isinstance(obj, type):
            self.text(b"cls", _name(obj))
        elif isinstance(obj, types.ModuleType):
            self.text(b"mod", obj.__name__)
        elif isinstance(obj, types.BuiltinFunctionType):
            self.text(b"bif", _name(obj))
            if _bound_to_instance(obj):  # d1.get and d2.get are different functions
                self.value(obj.__self__)
        elif (memo := _memo_digest(obj)) is not None:
            self.tag(b"memo", memo)
        elif _is_tensor(obj):
            self.tensor(obj)
        else:
            self.reduced(obj)

    def container(self, tag: bytes, obj: Any, items: Iterable[Any]) -> None:
        if id(obj) in self._stack:
            self.tag(b"cycle", u64(len(self._stack) - self._stack.index(id(obj))))
            return
        self._stack.append(id(obj))
        try:
            self.tag(tag, u64(len(obj)))
            for item in items:
                self.value(item)
        finally:
            self._stack.pop()

    def unordered(self, tag: bytes, obj: Any, items: Iterable[Any]) -> None:
        """Feed items in an order that does not depend on hashing or insertion order."""
        digests = []
        for item in items:
            sub = CanonicalEncoder(hashlib.blake2b(digest_size=16))
            sub._stack = self._stack
            sub.value(item)
            digests.append(sub.h.digest())
        digests.sort()
        self.tag(tag, b"".join(digests))

    def dict(self, obj: dict[Any, Any]) -> None:
        if id(obj) in self._stack:
            self.tag(b"cycle", b"")
            return
        self._stack.append(id(obj))
        try:
            self.unordered(b"dict", obj, obj.items())
        finally:
            self._stack.pop()

    def array(self, arr: np.ndarray) -> None:
        if arr.dtype.hasobject:
            self.tag(b"oarr", repr(arr.shape).encode())
            items = arr.ravel(order="C").tolist()  # a list even for a 0-d array
            self.container(b"oitems", items, items)
            return
        shape = arr.shape  # before ascontiguousarray, which makes a 0-d array 1-d
        arr = np.ascontiguousarray(arr)
        dtype = arr.dtype
        spec = dtype.str if dtype.fields is None else repr(dtype.descr)
        self.text(b"arr", f"{spec}{shape}")
        data = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")
        self.tag(b"data", data)

    def tensor(self, t: Any) -> None:
        """A torch tensor like a numpy array: its type, dtype, shape, layout, device type and
        gradient flag, then its elements' bytes in C order (a sparse COO tensor: its coalesced
        indices and values). torch pickles a tensor with its storage's identity, which differs
        in every process: equal tensors would never share an entry."""
        import torch  # imported already: t is a tensor

        meta = (
            f"{_name(type(t))}:{t.dtype}:{tuple(t.shape)}:{t.layout}:{t.device.type}:"
            f"{t.requires_grad}"
        )
        self.text(b"tensor", meta)
        try:
            t = t.detach()
            if t.layout == torch.sparse_coo:
                t = t.coalesce()
                self.tensor(t.indices())
                self.tensor(t.values())
                return
            if t.layout != torch.strided:
                raise TypeError(f"{t.layout} tensors have no canonical encoding here")
            t = t.resolve_conj().resolve_neg().cpu()
            flat = t.clone(memory_format=torch.contiguous_format).reshape(-1)
            data = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
        except TypeError:
            raise
        except Exception as exc:  # meta, nested, quantized tensors: no bytes to read
            raise TypeError(f"{meta} cannot be keyed: {exc}") from exc
        self.tag(b"data", memoryview(data))

    def reduced(self, obj: Any) -> None:
        """Encode any other object through the parts ``pickle`` would rebuild it from."""
        try:
            # As pickle does: a reducer registered with copyreg (numpy ufuncs, re.Pattern, ...)
            # comes first.
            reducer = copyreg.dispatch_table.get(type(obj))
            reduced = reducer(obj) if reducer is not None else obj.__reduce_ex__(5)
        except Exception as exc:
            raise TypeError(f"{type(obj).__qualname__} object cannot be pickled: {exc}") from exc
        if isinstance(reduced, str):  # a global, pickled by reference
            self.text(b"global", f"{_module(obj)}.{reduced}")
            return
        if id(obj) in self._stack:
            self.tag(b"cycle", b"")
            return
        self._stack.append(id(obj))
        try:
            self.text(b"obj", _name(type(obj)))
            parts = list(reduced) + [None] * (6 - len(reduced))
            rebuild, args, state, list_items, dict_items = parts[:5]
            # The reconstructor is library code (copyreg.__newobj__, numpy's _reconstruct, ...):
            # named as pickle names it, not digested (which costs ~20 us per argument).
            self.text(b"rebuild", _name(rebuild))
            if _bound_to_instance(rebuild):
                self.value(rebuild.__self__)
            self.value(args)
            self.value(state)
            self.value(None if list_items is None else list(list_items))
            if dict_items is None:
                self.tag(b"none")
            elif isinstance(obj, collections.OrderedDict):
                # In order: OrderedDicts that differ only in order are different values.
                self.value(list(dict_items))
            else:  # a dict subclass (defaultdict, ...): equal as dicts, one key
                items = list(dict_items)
                self.unordered(b"ditems", items, items)
        finally:
            self._stack.pop()


def _int(hasher: CanonicalEncoder, x: int) -> None:
    hasher.tag(b"int", x.to_bytes(x.bit_length() // 8 + 1, "little", signed=True))


def _float(hasher: CanonicalEncoder, x: float) -> None:
    hasher.tag(b"float", NAN_BYTES if x != x else f64(x))


def _complex(hasher: CanonicalEncoder, x: complex) -> None:
    hasher.h.update(b"complex")
    _float(hasher, x.real)
    _float(hasher, x.imag)


_EXACT: dict[type, Callable[[CanonicalEncoder, Any], None]] = {
    type(None): lambda h, x: h.tag(b"none"),
    bool: lambda h, x: h.tag(b"bool", b"\x01" if x else b"\x00"),
    int: _int,
    float: _float,
    complex: _complex,
    str: lambda h, x: h.text(b"str", x),
    bytes: lambda h, x: h.tag(b"bytes", x),
    bytearray: lambda h, x: h.tag(b"bytearray", x),
    memoryview: lambda h, x: h.tag(f"memoryview{x.format}{x.shape}".encode(), x.tobytes()),
    tuple: lambda h, x: h.container(b"tuple", x, x),
    list: lambda h, x: h.container(b"list", x, x),
    dict: CanonicalEncoder.dict,
    set: lambda h, x: h.unordered(b"set", x, x),
    frozenset: lambda h, x: h.unordered(b"frozenset", x, x),
    range: lambda h, x: h.text(b"range", repr(x)),
    slice: lambda h, x: h.container(b"slice", (x.start, x.stop, x.step), (x.start, x.stop, x.step)),
    type(Ellipsis): lambda h, x: h.tag(b"ellipsis"),
    np.ndarray: CanonicalEncoder.array,  # subclasses (masked arrays, ...) go through __reduce_ex__
}


def value_digest(value: Any, digest_size: int = DIGEST_SIZE) -> bytes:
    """The canonical digest of one value (equal in every process for equal values)."""
    hasher = CanonicalEncoder(hashlib.blake2b(digest_size=digest_size))
    hasher.value(value)
    return hasher.h.digest()


# -- the function part ---------------------------------------------------------------------------
def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _global_loads(code: types.CodeType) -> set[str]:
    """Names the code reads as globals (co_names also holds attribute names)."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_loads(const)
    return names


def _feed_code(hasher: CanonicalEncoder, code: types.CodeType) -> None:
    hasher.tag(b"code", code.co_code)
    hasher.tag(b"exc", getattr(code, "co_exceptiontable", b""))
    hasher.value(
        (
            code.co_argcount,
            code.co_posonlyargcount,
            code.co_kwonlyargcount,
            code.co_flags,
            code.co_names,
            code.co_varnames,
            code.co_freevars,
            code.co_cellvars,
        )
    )
    hasher.tag(b"consts", u64(len(code.co_consts)))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(hasher, const)
        else:
            hasher.value(const)


def _feed_global(hasher: CanonicalEncoder, value: Any, module: str, seen: set[int]) -> None:
    """Encode a global or closure value the code refers to: what it *is*, as cheaply as that
    can be told."""
    if isinstance(value, types.ModuleType):
        hasher.text(b"mod", value.__name__)
    elif (memo := _memo_digest(value)) is not None:
        hasher.tag(b"memo", memo)
    elif isinstance(value, types.FunctionType):
        if value.__module__ == module and id(value) not in seen:
            # A helper of the same module: its code is part of what the function computes.
            _feed_function(hasher, value, seen)
        else:
            hasher.text(b"gfn", _name(value))
    elif isinstance(value, type) and value.__module__ == module and id(value) not in seen:
        # A class of the same module: its methods are part of what the function computes.
        hasher.text(b"gcls", _name(value))
        _feed_methods(hasher, value, seen)
    elif isinstance(value, type | types.BuiltinFunctionType):
        hasher.text(b"gref", _name(value))
        if _bound_to_instance(value):
            _feed_global(hasher, value.__self__, module, seen)
    else:
        try:
            sub = CanonicalEncoder(hashlib.blake2b(digest_size=16))
            sub.value(value)
            hasher.tag(b"gval", sub.h.digest())
        except (TypeError, RecursionError):
            # It holds something that cannot be encoded (a lock, a socket): its type and the
            # attributes that can be, so that make(Model(1)) and make(Model(2)) still differ.
            hasher.text(b"gtype", _name(type(value)))
            _feed_attributes(hasher, value, depth=3)


def _feed_methods(hasher: CanonicalEncoder, cls: type, seen: set[int]) -> None:
    """The code of the methods a class defines (not those it inherits)."""
    seen.add(id(cls))
    for attr, member in sorted(vars(cls).items()):
        member = getattr(member, "__func__", member)  # staticmethod, classmethod
        # Memoized methods are keyed by their own digest, not fed here (an async one is a
        # plain function whose closure holds it: feeding it would recurse into this digest).
        if (
            isinstance(member, types.FunctionType)
            and id(member) not in seen
            and not hasattr(member, "__memoized__")
        ):
            hasher.text(b"member", attr)
            _feed_function(hasher, member, seen)


def _feed_attributes(hasher: CanonicalEncoder, obj: Any, depth: int) -> None:
    """Encode the attributes of ``obj`` that can be encoded, and the type of the others."""
    try:
        attributes = sorted(vars(obj).items())
    except TypeError:  # no __dict__
        return
    for name, value in attributes:
        sub = CanonicalEncoder(hashlib.blake2b(digest_size=16))
        try:
            sub.value(value)
        except (TypeError, RecursionError):
            hasher.text(b"attrtype", f"{name}:{_name(type(value))}")
            if depth > 1:
                _feed_attributes(hasher, value, depth - 1)
        else:
            hasher.text(b"attr", name)
            hasher.tag(b"val", sub.h.digest())


_ABSENT = object()


def _feed_function(hasher: CanonicalEncoder, fn: types.FunctionType, seen: set[int]) -> None:
    seen.add(id(fn))
    hasher.text(b"qualname", _name(fn))
    _feed_code(hasher, fn.__code__)
    hasher.value(fn.__defaults__)
    hasher.value(fn.__kwdefaults__)
    cells = fn.__closure__ or ()
    hasher.tag(b"closure", u64(len(cells)))
    for name, cell in zip(fn.__code__.co_freevars, cells, strict=True):
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell (a name assigned later in the enclosing scope)
            hasher.text(b"empty", name)
            continue
        if isinstance(content, types.FunctionType):
            if id(content) in seen:
                hasher.text(b"recursive", content.__qualname__)
            else:
                _feed_function(hasher, content, seen)
        else:
            _feed_global(hasher, content, fn.__module__, seen)
    globals_ = fn.__globals__
    builtins_ = globals_.get("__builtins__")
    builtin_names = builtins_ if isinstance(builtins_, dict) else vars(builtins_ or object)
    unbound = _global_loads(fn.__code__) - globals_.keys() - builtin_names.keys() - {fn.__name__}
    if unbound:
        hasher.pending = True  # a helper defined below the function, say
    for name in sorted(_code_names(fn.__code__)):
        value = globals_.get(name, _ABSENT)
        if name == fn.__name__ and (value is _ABSENT or value is fn or _name(value) == _name(fn)):
            # A recursive function calling itself. While it is being decorated its name is not
            # bound yet (or still bound to the previous version, when a notebook cell runs
            # again): either way it is this function, whatever the global holds right now.
            hasher.text(b"self", name)
        elif value is not _ABSENT:
            hasher.text(b"global", name)
            _feed_global(hasher, value, fn.__module__, seen)
        # else: a builtin (the same in every process of one Python version), an attribute name
        # (co_names holds those too) or a global not bound yet (see `pending` above)


def _feed_owner(hasher: CanonicalEncoder, fn: types.FunctionType, seen: set[int]) -> None:
    """For a method, the class it is defined in: its other methods (``self.helper()``) are
    part of what it computes. Not bound yet while the class body runs: pending then."""
    path = fn.__qualname__.split(".")[:-1]
    if not path or "<locals>" in path:
        return  # a module-level function, or a class inside a function: not reachable
    owner: Any = fn.__globals__.get(path[0], _ABSENT)
    for part in path[1:]:
        owner = getattr(owner, part, _ABSENT)
    if isinstance(owner, type):
        hasher.tag(b"owner")
        _feed_global(hasher, owner, fn.__module__, seen)
    else:
        hasher.pending = True


def function_digest(fn: Callable[..., Any], digest_size: int = DIGEST_SIZE) -> bytes:
    """Digest of what ``fn`` computes: code, constants, defaults, closure, referenced globals.

    Handles plain functions, lambdas, ``functools.partial`` (the function and its frozen
    arguments), bound methods (the function and the instance's state) and callable objects
    (the class's ``__call__`` and the instance's state). Computed once per decoration.
    """
    return digest_and_pending(fn, digest_size)[0]


def digest_and_pending(
    fn: Callable[..., Any], digest_size: int = DIGEST_SIZE
) -> tuple[bytes, bool]:
    """:func:`function_digest`, and whether to take it again on the first call (the function
    names something not defined yet)."""
    hasher = CanonicalEncoder(hashlib.blake2b(digest_size=digest_size))
    hasher.text(b"python", "{}.{}".format(*sys.version_info[:2]))
    _feed_callable(hasher, fn, set())
    return hasher.h.digest(), hasher.pending


def _feed_callable(hasher: CanonicalEncoder, fn: Any, seen: set[int]) -> None:
    if (memo := _memo_digest(fn)) is not None:
        hasher.tag(b"memo", memo)
    elif isinstance(fn, functools.partial):
        hasher.tag(b"partial")
        _feed_callable(hasher, fn.func, seen)
        hasher.value(fn.args)
        hasher.value(fn.keywords)
    elif isinstance(fn, types.MethodType):
        hasher.tag(b"method")
        _feed_callable(hasher, fn.__func__, seen)
        hasher.value(fn.__self__)
    elif isinstance(fn, types.FunctionType):
        _feed_function(hasher, fn, seen)
        _feed_owner(hasher, fn, seen)
    elif isinstance(fn, types.BuiltinFunctionType | type):
        hasher.text(b"builtin", _name(fn))
        if _bound_to_instance(fn):
            hasher.value(fn.__self__)
        if isinstance(fn, type):  # a class called for its instances: its methods' code
            _feed_methods(hasher, fn, seen)
    elif callable(fn) and isinstance(type(fn).__call__, types.FunctionType):
        hasher.tag(b"callable")
        _feed_callable(hasher, type(fn).__call__, seen)
        hasher.value(fn)
    elif callable(fn) and _wrapped(fn) is not None:
        # A wrapper implemented in C around Python code: lru_cache, staticmethod, numba.
        hasher.text(b"wrapper", _name(type(fn)))
        _feed_callable(hasher, _wrapped(fn), seen)
    elif callable(fn):
        # Implemented in C (a numpy ufunc, a Cython function, ...): no code to read, so its
        # type, module and name identify it (like a builtin), plus its state where it pickles.
        hasher.text(b"ccallable", f"{_name(type(fn))}:{_name(fn)}:{getattr(fn, '__name__', '')}")
        state = CanonicalEncoder(hashlib.blake2b(digest_size=16))
        try:
            state.value(fn)
        except TypeError:
            return  # no state to read: the name is all there is
        hasher.tag(b"state", state.h.digest())
    else:
        raise TypeError(f"cannot memoize {fn!r}: it is not callable")


def _wrapped(fn: Any) -> Any:
    for attr in ("__wrapped__", "__func__", "py_func"):
        inner = getattr(fn, attr, None)
        if callable(inner) and inner is not fn:
            return inner
    return None


def identity(fn: Callable[..., Any]) -> bytes:
    """What names ``fn`` when its code is not digested (``version=``): module and qualified
    name, and for a ``functools.partial`` its function and frozen arguments."""
    if isinstance(fn, functools.partial):
        return b"partial:" + identity(fn.func) + value_digest((fn.args, fn.keywords))
    inner = fn.__func__ if isinstance(fn, types.MethodType) else fn
    return _name(inner).encode()
