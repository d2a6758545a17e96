"""Cache keys: equal calls give equal keys (in every process), different ones never share."""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

from memoshare import DiskBackend, MemoryBackend, memoize, value_digest
from memoshare.keys import KeyBuilder, function_digest


def memo(fn, **options):
    return memoize(MemoryBackend(), **options)(fn)


def key(fn, *args, **kwargs):
    """The store key of ``fn(*args, **kwargs)`` under default options."""
    return memo(fn).cache_key(*args, **kwargs)


def compile_fn(source: str, name: str = "f", **globals_):
    """A fresh function from ``source``, in a module named ``keysample`` (so that two compiles
    of the same text are the same function as far as keys are concerned)."""
    namespace = {"__name__": "keysample", **globals_}
    exec(textwrap.dedent(source), namespace)
    return namespace[name]


def identity(x):
    return x


# -- arguments ---------------------------------------------------------------------------------
def test_positional_keyword_and_default_share_a_key():
    def f(x, y=2):
        return x + y

    m = memo(f)
    k = m.cache_key(1)
    assert m.cache_key(x=1) == k
    assert m.cache_key(1, 2) == k
    assert m.cache_key(1, y=2) == k
    assert m.cache_key(y=2, x=1) == k
    assert m.cache_key(1, 3) != k
    assert m.cache_key(2) != k


def test_keyword_only_and_var_args_share_a_key():
    def f(x, *args, y=2, **kwargs):
        return x

    m = memo(f)
    assert m.cache_key(1) == m.cache_key(x=1) == m.cache_key(1, y=2)
    assert m.cache_key(1, 5) != m.cache_key(1)
    assert m.cache_key(1, z=5) != m.cache_key(1)
    assert m.cache_key(1, z=5, w=6) == m.cache_key(1, w=6, z=5)


def test_fast_path_and_bind_path_agree():
    def f(x, y=2.5, z="s"):
        return x

    builder = KeyBuilder(f, "ns", [], b"digest")
    calls = [((1,), {}), ((1, 2.5), {}), ((), {"x": 1}), ((1,), {"z": "s"}), ((-0.0, None), {})]
    fast = [builder.key(a, k) for a, k in calls]
    builder._simple = False  # force inspect.Signature.bind for the same calls
    assert [builder.key(a, k) for a, k in calls] == fast
    assert fast[0] == fast[1] == fast[2] == fast[3] != fast[4]


def test_ignore_args_by_position_or_keyword():
    def f(x, job_id, *, seed=0):
        return x

    m = memo(f, ignore_args=["job_id", "seed"])
    k = m.cache_key(1, 5)
    assert m.cache_key(1, job_id=6) == k
    assert m.cache_key(x=1, job_id=7, seed=3) == k
    assert m.cache_key(2, 5) != k
    assert memo(f).cache_key(1, 5) != memo(f).cache_key(1, 6)  # control: not ignored


def test_ignore_args_name_that_can_never_arrive_warns_once_at_decoration():
    # pyDVL code ignores job_id on functions that may not take it: accepted, with a warning.
    def f(x, job_id):
        return x

    with pytest.warns(UserWarning, match="jobid") as caught:
        memo = memoize(MemoryBackend(), ignore_args=["jobid"])(f)
    assert len(caught) == 1
    assert memo.cache_key(1, 2) != memo.cache_key(1, 3)  # job_id is still part of the key


def test_ignore_args_names_arriving_through_kwargs_are_left_out():
    def utility(indices, *args, **kwargs):
        return sum(indices)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a **kwargs function can receive any name: no warning
        memo = memoize(MemoryBackend(), ignore_args=["job_id", "run_id"])(utility)
    base = memo.cache_key([1, 2])
    assert memo.cache_key([1, 2], job_id=3) == base
    assert memo.cache_key([1, 2], job_id=4, run_id=7) == base
    assert memo.cache_key([1, 2], job_id=4, other=1) != base  # other names still count
    assert memo.cache_key([1, 2], 5, job_id=4) != base  # and so do positional extras
    assert memo([1, 2], job_id=1) == memo([1, 2], job_id=2) == 3
    assert (memo.stats.misses, memo.stats.hits) == (1, 1)


def test_ignore_args_plain_string_is_a_type_error():
    def f(x, job_id):
        return x

    with pytest.raises(TypeError, match="list"):
        memoize(MemoryBackend(), ignore_args="job_id")(f)


def test_dicts_and_sets_are_canonical():
    words = [f"w{i}" for i in range(200)]
    forward, backward = set(words), set(reversed(words))
    assert key(identity, forward) == key(identity, backward)
    assert key(identity, frozenset(words)) == key(identity, frozenset(reversed(words)))
    d1 = {w: i for i, w in enumerate(words)}
    d2 = {w: d1[w] for w in reversed(words)}
    assert list(d1) != list(d2)
    assert key(identity, d1) == key(identity, d2)
    nested1 = {"a": {1, 2, 3}, "b": [frozenset({"x", "y"}), {"k": 1, "j": 2}]}
    nested2 = {"b": [frozenset({"y", "x"}), {"j": 2, "k": 1}], "a": {3, 2, 1}}
    assert key(identity, nested1) == key(identity, nested2)
    # ... and still tell different contents and types apart
    assert key(identity, {"a": 1}) != key(identity, {"a": 2})
    assert key(identity, {"a": 1}) != key(identity, {"b": 1})
    assert key(identity, {1, 2}) != key(identity, frozenset({1, 2}))
    assert key(identity, {1, 2}) != key(identity, {1, 2, 3})
    assert key(identity, {"a": 1}) != key(identity, [("a", 1)])


_CROSS_PROCESS = """
import numpy as np
from memoshare import MemoryBackend, memoize, value_digest

def f(x):
    return x

m = memoize(MemoryBackend())(f)
words = frozenset(f"item{i}" for i in range(64))
arr = np.arange(24, dtype=np.float32).reshape(4, 6)
print(m.cache_key(words), m.cache_key(arr), value_digest(words).hex(), value_digest(arr).hex())
print(",".join(list(words)[:8]))
"""


def test_keys_equal_across_processes_with_different_hash_seeds():
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", _CROSS_PROCESS],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        outputs.append(result.stdout.splitlines())
    (keys1, order1), (keys2, order2) = outputs
    assert order1 != order2  # the two processes really iterate the set differently
    assert keys1 == keys2
    words = frozenset(f"item{i}" for i in range(64))
    arr = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert keys1.split()[2:] == [value_digest(words).hex(), value_digest(arr).hex()]


# -- numpy -------------------------------------------------------------------------------------
def test_numpy_arrays():
    a = np.arange(12, dtype=np.int64)
    assert key(identity, a) == key(identity, a.copy())
    assert key(identity, a) != key(identity, a + 1)
    zeros = np.zeros(6, dtype=np.int64)
    assert key(identity, zeros) != key(identity, np.zeros(6, dtype=np.float64))  # same bytes
    assert key(identity, zeros) != key(identity, zeros.view(np.uint64))
    assert key(identity, zeros) != key(identity, zeros.reshape(2, 3))
    assert key(identity, zeros.reshape(2, 3)) != key(identity, zeros.reshape(3, 2))
    assert key(identity, np.zeros(0)) != key(identity, np.zeros((0, 3)))


def test_numpy_non_contiguous_arrays_equal_their_contiguous_copies():
    a = np.arange(40, dtype=np.float64)
    strided = a[::2]
    assert not strided.flags.c_contiguous
    assert key(identity, strided) == key(identity, np.ascontiguousarray(strided))
    assert key(identity, a[::-1]) == key(identity, a[::-1].copy())
    m = a.reshape(5, 8)
    assert key(identity, m.T) == key(identity, np.ascontiguousarray(m.T))
    assert key(identity, np.asfortranarray(m)) == key(identity, m)
    assert key(identity, m.T) != key(identity, m)


def test_numpy_object_arrays():
    a = np.array([1, "a", None, (2, 3)], dtype=object)
    b = np.array([1, "a", None, (2, 3)], dtype=object)
    assert key(identity, a) == key(identity, b)
    assert key(identity, a) != key(identity, np.array([1, "a", None, (2, 4)], dtype=object))
    sets1 = np.empty(2, dtype=object)
    sets1[:] = [{"x", "y"}, {"z"}]
    sets2 = np.empty(2, dtype=object)
    sets2[:] = [{"y", "x"}, {"z"}]
    assert key(identity, sets1) == key(identity, sets2)


def test_structured_and_scalar_numpy_values():
    dt = np.dtype([("a", "<i4"), ("b", "<f8")])
    s = np.zeros(3, dtype=dt)
    assert key(identity, s) == key(identity, s.copy())
    assert key(identity, s) != key(identity, np.zeros(3, dtype=[("a", "<i4"), ("c", "<f8")]))
    assert key(identity, np.float32(1.5)) == key(identity, np.float32(1.5))
    assert key(identity, np.float32(1.5)) != key(identity, np.float64(1.5))


# -- scalars -----------------------------------------------------------------------------------
def test_float_edge_cases():
    assert key(identity, -0.0) != key(identity, 0.0)
    assert key(identity, (-0.0,)) != key(identity, (0.0,))
    quiet_nan_with_payload = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0]
    nans = [math.nan, -math.nan, float("nan"), np.nan, math.inf - math.inf, quiet_nan_with_payload]
    assert len({key(identity, n) for n in nans}) == 1
    assert len({key(identity, [n]) for n in nans}) == 1
    assert key(identity, math.nan) != key(identity, math.inf)
    assert key(identity, complex(math.nan, 1)) == key(identity, complex(-math.nan, 1))


def test_types_are_part_of_the_key():
    assert len({key(identity, v) for v in (1, 1.0, True)}) == 3
    assert len({key(identity, v) for v in (0, 0.0, False, None, "", b"")}) == 6
    assert len({key(identity, [v]) for v in (1, 1.0, True)}) == 3
    assert key(identity, [1, 2]) != key(identity, (1, 2))
    assert key(identity, "1") != key(identity, 1)
    assert key(identity, b"ab") != key(identity, bytearray(b"ab"))
    assert key(identity, ((1, 2), 3)) != key(identity, (1, (2, 3)))  # nesting is encoded
    assert key(identity, ["ab", "c"]) != key(identity, ["a", "bc"])  # lengths are encoded
    assert key(identity, 2**70) != key(identity, 2**70 + 1)
    assert key(identity, -1) != key(identity, 255)


# -- the function part -------------------------------------------------------------------------
def _differ(src1: str, src2: str, *args, **kwargs) -> bool:
    """Whether two versions of ``f`` give different keys for the same call; also checks that
    compiling the same text twice gives one key (so a difference is due to the edit)."""
    same = key(compile_fn(src1), *args, **kwargs) == key(compile_fn(src1), *args, **kwargs)
    assert same
    return key(compile_fn(src1), *args, **kwargs) != key(compile_fn(src2), *args, **kwargs)


def test_function_edits_change_the_key():
    base = "def f(x):\n    return x + 1\n"
    assert _differ(base, "def f(x):\n    return x - 1\n", 3)  # bytecode
    assert _differ(base, "def f(x):\n    return x + 2\n", 3)  # a constant
    assert _differ(
        "def f(x):\n    def g(y):\n        return y + 1\n    return g(x)\n",
        "def f(x):\n    def g(y):\n        return y + 2\n    return g(x)\n",
        3,
    )
    assert _differ(
        "def f(x):\n    return (lambda y: y * 2)(x)\n",
        "def f(x):\n    return (lambda y: y * 3)(x)\n",
        3,
    )
    assert _differ(
        "def f(x):\n    return [i + 1 for i in range(x)]\n",
        "def f(x):\n    return [i + 2 for i in range(x)]\n",
        3,
    )
    assert _differ(
        "def f(x):\n    return {'a': 1.0}\n",
        "def f(x):\n    return {'a': 1}\n",  # 1.0 == 1, but not the same constant
        3,
    )
    # defaults and keyword-only defaults, with the argument passed explicitly
    assert _differ("def f(x, y=1):\n    return x\n", "def f(x, y=2):\n    return x\n", 3, 5)
    assert _differ("def f(x, *, y=1):\n    return x\n", "def f(x, *, y=2):\n    return x\n", 3, y=5)
    # a global constant, and a helper function of the same module
    assert key(compile_fn("def f(x):\n    return x + K\n", K=1), 3) != key(
        compile_fn("def f(x):\n    return x + K\n", K=2), 3
    )
    helper1 = "def helper(x):\n    return x + 1\n\ndef f(x):\n    return helper(x)\n"
    helper2 = "def helper(x):\n    return x + 2\n\ndef f(x):\n    return helper(x)\n"
    assert _differ(helper1, helper2, 3)


def test_closures_never_share():
    def make(c):
        def f(x):
            return x + c

        return f

    assert key(make(1), 3) != key(make(2), 3)
    assert key(make(1), 3) == key(make(1), 3)
    assert key(make([1, 2]), 3) != key(make([1, 3]), 3)
    assert key(make(np.arange(3)), 3) != key(make(np.arange(4)), 3)
    assert key(make(make(1)), 3) != key(make(make(2)), 3)  # a closed-over function


def test_same_bytecode_different_globals(tmp_path, monkeypatch):
    keys = {}
    for name, imported in (("sin", "sin"), ("cos", "cos"), ("sin_again", "sin")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "keys_sample_mod.py").write_text(
            f"from math import {imported} as g\n\n\ndef f(x):\n    return g(x)\n"
        )
        monkeypatch.syspath_prepend(str(folder))
        importlib.invalidate_caches()
        module = importlib.import_module("keys_sample_mod")
        assert module.__file__.startswith(str(folder))
        keys[name] = key(module.f, 0.5)
        sys.path.remove(str(folder))
        del sys.modules["keys_sample_mod"]
    assert keys["sin"] != keys["cos"]  # same module name, qualname and bytecode
    assert keys["sin"] == keys["sin_again"]


def test_partials():
    def f(a, b, c=0):
        return a + b + c

    assert key(functools.partial(f, 1), 2) != key(functools.partial(f, 2), 2)
    assert key(functools.partial(f, 1), 2) == key(functools.partial(f, 1), 2)
    assert key(functools.partial(f, 1, c=1), 2) != key(functools.partial(f, 1, c=2), 2)


class Scale:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return self.factor * x

    def apply(self, x):
        return self.factor * x


class Shift(Scale):
    def __call__(self, x):
        return self.factor + x


def test_callable_objects():
    assert key(Scale(2), 3) == key(Scale(2), 3)
    assert key(Scale(2), 3) != key(Scale(3), 3)
    assert key(Scale(2), 3) != key(Shift(2), 3)
    assert memo(Scale(2), ignore_args=["self"]).cache_key(3) == memo(
        Scale(3), ignore_args=["self"]
    ).cache_key(3)
    assert memo(Scale(2))(3) == 6


def test_methods_key_self_unless_ignored():
    assert key(Scale(2).apply, 3) == key(Scale(2).apply, 3)
    assert key(Scale(2).apply, 3) != key(Scale(5).apply, 3)
    ignored = [memo(Scale(f).apply, ignore_args=["self"]).cache_key(3) for f in (2, 5)]
    assert ignored[0] == ignored[1]
    assert ignored[0] != key(Scale(2).apply, 3)


def test_signature_and_version_pin_the_function_part():
    f1 = compile_fn("def f(x):\n    return x + 1\n")
    f2 = compile_fn("def f(x):\n    return x * 100\n")
    assert key(f1, 3) != key(f2, 3)
    assert memo(f1, version="1").cache_key(3) == memo(f2, version="1").cache_key(3)
    assert memo(f1, version="1").cache_key(3) != memo(f1, version="2").cache_key(3)
    assert memo(f1, version="1").cache_key(3) != memo(f1, version="1").cache_key(4)
    g = compile_fn("def g(x):\n    return x + 1\n", name="g")
    assert memo(f1, version="1").cache_key(3) != memo(g, version="1").cache_key(3)
    assert memo(f1, signature=b"sig").cache_key(3) == memo(f2, signature=b"sig").cache_key(3)
    assert memo(f1, signature=b"sig").cache_key(3) != memo(f1, signature=b"other").cache_key(3)
    assert memo(f1, signature=b"sig").cache_key(3) != key(f1, 3)
    with pytest.raises(ValueError, match="not both"):
        memoize(MemoryBackend(), signature=b"sig", version="1")(f1)


def test_namespace_is_the_prefix():
    assert key(identity, 1).startswith("memoshare:")
    k1 = memo(identity, namespace="proj-1").cache_key(1)
    k2 = memo(identity, namespace="proj-2").cache_key(1)
    assert k1.startswith("proj-1:") and k2.startswith("proj-2:")
    assert k1 != k2
    long_ok = memo(identity, namespace="n" * 100).cache_key(1)
    assert long_ok.startswith("n" * 100 + ":")


@pytest.mark.parametrize(
    "namespace", ["", "has space", "tab\there", "new\nline", "nul\x00", "é", "n" * 101, "\x7f"]
)
def test_invalid_namespace_fails_at_decoration(namespace):
    with pytest.raises(ValueError, match="namespace"):
        memoize(MemoryBackend(), namespace=namespace)(identity)


@pytest.mark.parametrize(
    "make_value",
    [
        lambda: (i for i in range(3)),
        threading.Lock,
        lambda: [1, {"inner": threading.Lock()}],
    ],
    ids=["generator", "lock", "nested-lock"],
)
def test_unhashable_argument_names_the_argument(make_value):
    calls = []

    def f(x, data=None, *, flag=False):
        calls.append(x)
        return x

    m = memo(f)
    with pytest.raises(TypeError, match="'data'"):
        m(1, make_value())
    with pytest.raises(TypeError, match="'data'"):
        m.cache_key(1, data=make_value(), flag=True)  # the bind() path
    assert calls == []
    m_ignoring = memo(f, ignore_args=["data"])
    assert m_ignoring(1, make_value()) == 1


def test_memoized_keys_equal_computed_keys_and_keep_types_apart():
    from memoshare.keys import KeyBuilder, function_digest

    def f(x, y=None):
        return x

    builder = KeyBuilder(f, "ns", [], function_digest(f))
    fresh = KeyBuilder(f, "ns", [], function_digest(f))
    values = [1, True, 1.0, 0.0, -0.0, "1", b"1", None, 2**80, (1, 2), frozenset({"a"})]
    for _ in range(2):  # the second round is served from the per-process memo
        keys = [builder.key((v,), {}) for v in values]
        assert keys == [fresh._key((v,), {}) for v in values]
    assert len(set(keys)) == len(values)  # 1, True and 1.0 never share a key, nor 0.0 and -0.0


def test_keyword_arguments_holding_arrays():
    import numpy as np

    from memoshare.keys import KeyBuilder, function_digest

    def f(a, b=1):
        return a

    builder = KeyBuilder(f, "ns", [], function_digest(f))
    assert builder.key((), {"a": np.arange(3)}) == builder.key((np.arange(3),), {"b": 1})
    assert builder.key((), {"a": np.arange(3)}) != builder.key((), {"a": np.arange(4)})


def test_ordered_dicts_in_other_orders_are_different_arguments():
    import collections

    from memoshare import value_digest

    a = collections.OrderedDict(x=1, y=2)
    b = collections.OrderedDict(y=2, x=1)
    assert value_digest(a) != value_digest(b)
    assert value_digest({"x": 1, "y": 2}) == value_digest({"y": 2, "x": 1})  # plain dicts


def test_bound_builtin_methods_include_their_instance():
    from memoshare import value_digest

    d1, d2 = {"a": 1}, {"a": 2}
    assert value_digest(d1.get) != value_digest(d2.get)
    assert value_digest(len) == value_digest(len)


def test_memoryview_keeps_format_and_shape():
    from memoshare import value_digest

    raw = bytes(range(8))
    assert value_digest(memoryview(raw)) != value_digest(raw)
    assert value_digest(memoryview(raw).cast("H")) != value_digest(memoryview(raw))


def test_zero_dimensional_object_array():
    from memoshare import value_digest

    assert value_digest(np.array({"a": 1}, dtype=object)) != value_digest(
        np.array({"a": 2}, dtype=object)
    )


def test_editing_a_same_module_class_changes_the_function_part(tmp_path):
    import importlib.util

    def load(source, name):
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("helper_mod", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    template = (
        "class Scaler:\n"
        "    def apply(self, x):\n"
        "        return x * {factor}\n"
        "def f(x):\n"
        "    return Scaler().apply(x)\n"
    )
    one = load(template.format(factor=2), "v1")
    two = load(template.format(factor=3), "v2")
    same = load(template.format(factor=2), "v3")
    assert function_digest(one.f) != function_digest(two.f)
    assert function_digest(one.f) == function_digest(same.f)


def test_c_callables_can_be_memoized(memory_backend):
    sine = memoize(memory_backend, shared_stats=False)(np.sin)
    assert sine(0.5) == np.sin(0.5) and sine(0.5) == np.sin(0.5)
    assert sine.stats.hits == 1
    assert sine.cache_key(0.5) != memoize(memory_backend, shared_stats=False)(np.cos).cache_key(0.5)


def test_version_is_typed_and_equal_in_spawned_workers():
    def f(x):
        return x

    f.__module__ = "__main__"  # a function of the main script...
    one = memoize("memory", version=1, shared_stats=False)(f)
    text = memoize("memory", version="1", shared_stats=False)(f)
    assert one.cache_key(3) != text.cache_key(3)
    f.__module__ = "__mp_main__"  # how a spawn worker sees the main script's function
    spawned = memoize("memory", version=1, shared_stats=False)(f)
    assert spawned.cache_key(3) == one.cache_key(3)


def test_recursive_memoized_function_keeps_its_keys_when_redefined(memory_backend):
    namespace: dict = {"memoize": memoize, "backend": memory_backend}
    source = (
        "@memoize(backend, shared_stats=False)\n"
        "def fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    )
    keys = []
    for _ in range(3):  # like re-running a notebook cell
        exec(source, namespace)
        keys.append(namespace["fib"].cache_key(10))
    assert keys[0] == keys[1] == keys[2]
    assert namespace["fib"](20) == 6765


# -- review findings: calls that must never share an entry ---------------------------------------
def test_zero_dimensional_arrays_and_scalars_are_not_one_element_arrays(memory_backend):
    @memoize(memory_backend)
    def ndim(x):
        return np.ndim(x), type(x).__name__

    assert ndim(np.float64(2.0)) == (0, "float64")
    assert ndim(np.array(2.0)) == (0, "ndarray")
    assert ndim(np.array([2.0])) == (1, "ndarray")
    assert ndim.stats.misses == 3


def test_closures_over_objects_holding_a_lock_still_differ(memory_backend):
    class Model:
        def __init__(self, k):
            self.k = k
            self.lock = threading.Lock()  # makes the object impossible to pickle

    def make(model):
        @memoize(memory_backend)
        def predict(x):
            return x * model.k

        return predict

    assert make(Model(1))(5) == 5
    assert make(Model(2))(5) == 10


def test_copyreg_reduced_objects_are_encoded_like_pickle_does():
    import re

    sin = compile_fn("from numpy import sin as op\ndef f(x):\n    return op(x)")
    cos = compile_fn("from numpy import cos as op\ndef f(x):\n    return op(x)")
    assert function_digest(sin) != function_digest(cos)
    a = compile_fn("def f(s):\n    return PAT.match(s)", PAT=re.compile("a+"))
    b = compile_fn("def f(s):\n    return PAT.match(s)", PAT=re.compile("b+"))
    assert function_digest(a) != function_digest(b)

    def apply(x, op=np.add):  # a ufunc as a default and as an argument
        return op(x, x)

    assert key(apply, 1) == key(apply, 1, np.add) != key(apply, 1, np.multiply)
    assert key(identity, re.compile("a+")) != key(identity, re.compile("b+"))


def test_c_wrappers_are_keyed_by_the_function_they_wrap(memory_backend):
    def f1(x):
        return x + 1

    def f2(x):
        return x * 100

    assert memoize(memory_backend)(functools.lru_cache(f1))(3) == 4
    assert memoize(memory_backend)(functools.lru_cache(f2))(3) == 300
    assert memoize(memory_backend)(staticmethod(f1))(3) == 4
    assert memoize(memory_backend)(staticmethod(f2))(3) == 300


def test_version_of_a_partial_includes_its_function_and_arguments(memory_backend):
    def f(a, x):
        return a + x

    def g(a, x):
        return a * x

    def pinned(fn):
        return memoize(memory_backend, version="1")(fn)

    assert pinned(functools.partial(f, 1))(5) == 6
    assert pinned(functools.partial(g, 10))(5) == 50
    assert pinned(functools.partial(f, 2))(5) == 7
    assert pinned(functools.partial(f, 1))(5) == 6 and len(memory_backend.keys()) == 3


def test_a_helper_defined_below_the_function_is_part_of_its_key(memory_backend):
    source = """
        @memoize(backend)
        def f(x):
            return helper(x)

        def helper(x):
            return x + {inc}
    """
    for inc in (1, 2, 3):
        f = compile_fn(source.format(inc=inc), memoize=memoize, backend=memory_backend)
        assert f(10) == 10 + inc  # each edit of the helper is a new entry
        assert f(10) == 10 + inc and f.stats.hits == 1


def test_methods_reached_through_self_are_part_of_the_key(memory_backend):
    source = """
        class Model:
            def __init__(self, k):
                self.k = k

            @memoize(backend)
            def score(self, x):
                return self._transform(x) * self.k

            def _transform(self, x):
                return x + {inc}
    """
    for inc in (1, 2):
        model = compile_fn(source.format(inc=inc), "Model", memoize=memoize, backend=memory_backend)
        assert model(1).score(10) == 10 + inc
        assert model(1).score(10) == 10 + inc and model.score.stats.hits == 1


def test_dict_subclasses_are_canonical_like_dicts():
    from collections import Counter, defaultdict

    a, b = defaultdict(list), defaultdict(list)
    a["x"], a["y"] = [1], [2]
    b["y"], b["x"] = [2], [1]
    assert value_digest(a) == value_digest(b) != value_digest(dict(a))
    assert value_digest(Counter("abc")) == value_digest(Counter("cba"))


def test_a_memoized_class_is_keyed_by_its_code():
    source = """
        class Point:
            def __init__(self, x):
                self.x = x * {scale}
    """
    one = compile_fn(source.format(scale=1), "Point")
    two = compile_fn(source.format(scale=2), "Point")
    assert function_digest(one) != function_digest(two)
    assert function_digest(one) == function_digest(compile_fn(source.format(scale=1), "Point"))


# -- argument types common in ML, in fresh processes ----------------------------------------------
_DIGESTS_OF_ML_VALUES = """
import json, sys
sys.path.insert(0, {tests!r})
import ml_values
from memoshare import value_digest
print(json.dumps({{name: value_digest(v).hex() for name, v in ml_values.make().items()}}))
"""


def test_common_ml_argument_types_have_one_digest_in_every_process() -> None:
    """Two fresh interpreters with different string hashing must key every value alike; a
    type whose pickle differs per process (torch tensors) is encoded canonically."""
    for module in ("torch", "pandas", "scipy", "sklearn"):
        pytest.importorskip(module)
    tests = os.path.dirname(os.path.abspath(__file__))
    code = _DIGESTS_OF_ML_VALUES.format(tests=tests)
    runs = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout))
    differing = sorted(name for name in runs[0] if runs[0][name] != runs[1][name])
    assert differing == []
    assert len(set(runs[0].values())) == len(runs[0])  # and different values, different keys


def _tensor_total(t):  # type: ignore[no-untyped-def]
    return float(t.sum())


def test_equal_tensors_share_entries_across_processes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    from joblib import Parallel, delayed

    store = DiskBackend(tmp_path / "store")
    total = memoize(store, namespace="tensors", shared_stats=False)(_tensor_total)
    tensors = [torch.full((4,), float(k % 5)) for k in range(40)]  # 5 distinct values
    with Parallel(n_jobs=2, backend="loky") as parallel:
        results = parallel(delayed(total)(t) for t in tensors)
    assert results == [4.0 * (k % 5) for k in range(40)]
    entries = [k for k in store.keys("tensors:") if "~" not in k]
    assert len(entries) == 5  # one per distinct tensor, whichever process computed it
    assert total.cache_key(torch.zeros(2)) != total.cache_key(torch.zeros(2, dtype=torch.int64))
    assert total.cache_key(torch.zeros(2)) != total.cache_key(np.zeros(2))
    assert total.cache_key(torch.zeros(2)) != total.cache_key(torch.zeros(1, 2))


def test_tensor_keys_cover_layout_gradient_and_odd_strides() -> None:
    torch = pytest.importorskip("torch")
    grid = torch.arange(12.0).reshape(4, 3)
    # a one-element view with a stride of 3 keys like the same value laid out plainly
    assert value_digest(grid[0:1, 0]) == value_digest(torch.tensor([0.0]))
    assert value_digest(grid[:, 1]) == value_digest(torch.tensor([1.0, 4.0, 7.0, 10.0]))
    dense = torch.eye(3)
    assert value_digest(dense) != value_digest(dense.to_sparse())  # another layout
    assert value_digest(torch.ones(2, requires_grad=True)) != value_digest(torch.ones(2))
    huge = torch.sparse_coo_tensor([[0], [0]], [1.0], (20000, 20000))
    assert value_digest(huge) != value_digest(
        torch.sparse_coo_tensor([[1], [0]], [1.0], (20000, 20000))
    )
    with pytest.raises(TypeError, match="cannot be keyed"):
        value_digest(torch.empty(2, device="meta"))
