"""The sample codec: plain arrays and tensors stored as their raw bytes, dtype and shape."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import serialization

# -- sample codec ----------------------------------------------------------------------------------
# Arrays are what samples are made of, and the generic pickling of them is slow: torch pickles
# every tensor storage through torch.save (~150 us to load a 12 KiB tensor, ten times the network
# transfer) and numpy rebuilds a dtype object per array (~6 us). Plain numeric arrays and CPU
# tensors in a sample (also inside tuples, lists and dicts) are stored as their bytes plus dtype
# and shape instead, and rebuilt with np.frombuffer / torch.from_numpy (~3.5 us). Anything else
# (tensors needing grad, strided views, bfloat16, subclasses, structured dtypes) keeps its own
# pickling. Stored entries name the two rebuild functions below: keep their names.
_NUMERIC_KINDS = frozenset("biufc")  # bool, int, uint, float, complex
_TENSOR_DTYPES = frozenset(
    {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
    | {"complex64", "complex128"}
)


def rebuild_array(buffer: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    array = np.ndarray(shape, dtype, buffer)  # one object, no reshape: ~0.7 us less
    # From an in-band ``bytes`` (a read-only source array): come back writable, as pickle does.
    return array if array.flags.writeable else array.copy()


def rebuild_tensor(buffer: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    import torch

    return torch.from_numpy(rebuild_array(buffer, dtype, shape))


class _PlainArray:
    __slots__ = ("array", "rebuild")

    def __init__(self, array: Any, rebuild: Callable[..., Any]) -> None:
        self.array = array
        self.rebuild = rebuild

    def __reduce__(self) -> tuple[Any, ...]:
        array = self.array
        return self.rebuild, (pickle.PickleBuffer(array), array.dtype.str, array.shape)


def _is_plain_array(value: Any) -> bool:
    dtype = value.dtype
    return dtype.kind in _NUMERIC_KINDS and dtype.fields is None and value.flags.c_contiguous


def _is_plain_tensor(value: Any, torch: Any) -> bool:
    return (
        value.layout == torch.strided
        and value.device.type == "cpu"
        and not value.requires_grad
        and str(value.dtype)[len("torch.") :] in _TENSOR_DTYPES
        and value.is_contiguous()
        and not value.is_conj()
        and not value.is_neg()
        and not any(getattr(value, "names", None) or ())  # older torch: named tensors
    )


def _encode(value: Any, torch: Any) -> Any:
    """``value`` with its plain arrays wrapped for fast pickling (new containers if any)."""
    kind = type(value)
    if kind is np.ndarray:
        return _PlainArray(value, rebuild_array) if _is_plain_array(value) else value
    if torch is not None and kind is torch.Tensor:
        if _is_plain_tensor(value, torch):
            return _PlainArray(value.numpy(), rebuild_tensor)
        return value
    if kind is dict:
        items = {k: _encode(v, torch) for k, v in value.items()}
        changed = any(items[k] is not v for k, v in value.items())
        return items if changed else value
    if kind is list or isinstance(value, tuple):
        encoded = [_encode(v, torch) for v in value]
        if all(e is v for e, v in zip(encoded, value, strict=True)):
            return value
        if kind is list:
            return encoded
        return kind(*encoded) if hasattr(kind, "_fields") else kind(encoded)  # namedtuple
    return value


def dumps_sample(value: Any) -> bytes:
    # Without torch imported, a sample holds no tensor.
    return serialization.dumps(_encode(value, sys.modules.get("torch")))


# Entries written before ``memoshare.datasets`` became a package name the rebuild functions as
# ``memoshare.datasets._rebuild_array`` / ``_rebuild_tensor``. Pickle them under that name still
# (the package binds both there), so that entries stay byte-identical and readable by every
# version sharing a store.
for _function, _stored_name in (
    (rebuild_array, "_rebuild_array"),
    (rebuild_tensor, "_rebuild_tensor"),
):
    _function.__module__ = "memoshare.datasets"
    _function.__name__ = _function.__qualname__ = _stored_name
