"""The decorator's behaviour on every store: counting, thresholds, moments, pickling."""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import threading
import time
import warnings

import cloudpickle
import numpy as np
import pytest

from memoshare import (
    DiskBackend,
    MemcachedBackend,
    MemcachedClientConfig,
    MemoizedFunction,
    MemoryBackend,
    Moments,
    UnpicklableValue,
    memcached,
    memoize,
)
from memoshare.serialization import dumps, loads
from memoshare.storage import EntryStore

# A module-level memoized function, pickled by reference. Its store must be the same in a
# spawned child, which imports this module afresh: the directory travels in the environment.
if "MEMOSHARE_TEST_SHARED_DIR" not in os.environ:
    os.environ["MEMOSHARE_TEST_SHARED_DIR"] = tempfile.mkdtemp(prefix="memoshare-test-")
    atexit.register(shutil.rmtree, os.environ["MEMOSHARE_TEST_SHARED_DIR"], ignore_errors=True)
_SHARED_DIR = os.environ["MEMOSHARE_TEST_SHARED_DIR"]


@memoize(DiskBackend(_SHARED_DIR))
def module_square(x):
    return x * x


def stored_moments(fn: MemoizedFunction, *args) -> Moments:
    payload = EntryStore(fn.backend).read(fn.cache_key(*args))
    assert payload is not None
    record = loads(payload)
    assert isinstance(record, Moments)
    return record


# -- counting ----------------------------------------------------------------------------------
def test_hits_misses_sets(any_backend):
    calls = []

    @memoize(any_backend)
    def f(x, y=2):
        calls.append(x)
        return [x * y]

    assert f(3) == [6]
    assert f(3) == [6]
    assert f(x=3, y=2) == [6]
    assert f(4) == [8]
    assert f(3, 3) == [9]
    assert calls == [3, 4, 3]
    s = f.stats
    assert (s.hits, s.misses, s.sets, s.errors, s.timeouts) == (2, 3, 3, 0, 0)
    assert s.hits + s.misses == 5 == s.calls
    assert s.hit_rate == pytest.approx(2 / 5)


def test_returned_values_are_copies(any_backend):
    @memoize(any_backend)
    def f(x):
        return {"items": [x]}

    first = f(1)
    first["items"].append("mutated")
    second = f(1)
    assert second == {"items": [1]}
    second["items"].append("again")
    assert f(1) == {"items": [1]}


def test_stats_snapshot_and_reset(memory_backend):
    @memoize(memory_backend)
    def f(x):
        return x

    assert f.stats.hit_rate == 0.0
    f(1)
    f(1)
    snap = f.stats.snapshot()
    f(1)
    assert (snap.hits, snap.misses, snap.sets) == (1, 1, 1)  # frozen
    assert (f.stats.snapshot() - snap).hits == 1
    assert f.stats.hits == 2 and f.stats.hit_rate == pytest.approx(2 / 3)
    f.stats.reset()
    assert f.stats.snapshot().asdict() == dict.fromkeys(snap.asdict(), 0)
    assert f.stats.hit_rate == 0.0
    f(1)
    assert (f.stats.hits, f.stats.misses) == (1, 0)


def test_time_threshold(any_backend):
    calls = []

    @memoize(any_backend, time_threshold=0.05)
    def f(x):
        calls.append(x)
        if x == "slow":
            time.sleep(0.06)
        return x

    assert f("fast") == "fast"
    assert f("fast") == "fast"  # faster than the threshold: not stored, a miss again
    assert f("slow") == "slow"
    assert f("slow") == "slow"
    assert calls == ["fast", "fast", "slow"]
    assert (f.stats.hits, f.stats.misses, f.stats.sets) == (1, 3, 1)


def test_invalidate_and_cache_key(any_backend):
    calls = []

    @memoize(any_backend)
    def f(x):
        calls.append(x)
        return x + 1

    key = f.cache_key(1)
    assert calls == []  # cache_key computes nothing
    assert any_backend.get(key) is None
    f(1)
    assert loads(EntryStore(any_backend).read(key)) == 2
    assert f.invalidate(1) is True
    assert any_backend.get(key) is None
    assert f.invalidate(1) is False
    assert f.invalidate(99) is False
    f(1)
    assert calls == [1, 1]


def test_exceptions_are_not_cached(any_backend):
    calls = []

    @memoize(any_backend)
    def f(x):
        calls.append(x)
        if len(calls) == 1:
            raise ValueError("first call fails")
        return x

    with pytest.raises(ValueError):
        f(1)
    assert f(1) == 1  # not blocked by a leftover lease, not a cached failure
    assert f(1) == 1
    assert calls == [1, 1]


def test_memoize_without_parentheses_uses_the_default_store():
    calls = []

    @memoize
    def f(x):
        calls.append(x)
        return x * 2

    assert isinstance(f, MemoizedFunction)
    assert isinstance(f.backend, DiskBackend)
    assert str(f.backend.path) == os.environ["MEMOSHARE_DIR"]
    assert f(2) == 4 and f(2) == 4
    assert calls == [2]
    g = memoize()(lambda x: x)
    assert g.backend is f.backend


def test_partial_and_callable_object(memory_backend):
    def add(a, b):
        return a + b

    class Adder:
        def __init__(self, n):
            self.n = n

        def __call__(self, x):
            return x + self.n

    p = memoize(memory_backend)(functools.partial(add, 10))
    c = memoize(memory_backend)(Adder(5))
    assert p(1) == 11 and p(1) == 11 and p.stats.hits == 1
    assert c(1) == 6 and c(1) == 6 and c.stats.hits == 1
    assert "memoized" in repr(p) and "memoized" in repr(c)


# -- methods -----------------------------------------------------------------------------------
def test_methods_in_a_class_body(memory_backend):
    calls = []

    class Model:
        def __init__(self, w):
            self.w = w

        @memoize(memory_backend)
        def predict(self, x):
            calls.append(("predict", self.w, x))
            return self.w * x

        @memoize(memory_backend, ignore_args=["self"])
        def constant(self, x):
            calls.append(("constant", self.w, x))
            return x + 1

    a, b, a_twin = Model(2), Model(3), Model(2)
    assert a.predict(5) == 10
    assert b.predict(5) == 15
    assert a_twin.predict(5) == 10  # equal state: the same entry
    assert a.predict(x=5) == 10
    assert calls == [("predict", 2, 5), ("predict", 3, 5)]
    assert Model.predict.stats.hits == 2
    assert Model.predict.cache_key(a, 5) == Model.predict.cache_key(a_twin, 5)
    assert Model.predict.cache_key(a, 5) != Model.predict.cache_key(b, 5)
    a.w = 4  # the state changed: a new key
    assert a.predict(5) == 20
    calls.clear()
    assert a.constant(1) == 2 and b.constant(1) == 2
    assert calls == [("constant", 4, 1)]
    assert Model.predict.invalidate(b, 5) is True
    b.predict(5)
    assert calls[-1] == ("predict", 3, 5)


def test_bound_method_decorated_later(memory_backend):
    class Model:
        def __init__(self, w):
            self.w = w

        def predict(self, x):
            return self.w * x

    f2 = memoize(memory_backend)(Model(2).predict)
    f3 = memoize(memory_backend)(Model(3).predict)
    assert f2(5) == 10 and f3(5) == 15
    assert f2.cache_key(5) != f3.cache_key(5)


# -- stochastic functions ----------------------------------------------------------------------
def _converges_after(values, rtol, min_repetitions):
    """How many evaluations the stopping rule needs for this sequence (None: never)."""
    for n in range(1, len(values) + 1):
        seen = np.asarray(values[:n], dtype=float)
        stderr = seen.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else 0.0
        # pyDVL's rule: re-evaluate while count <= min_repetitions (or the error is too large)
        if n > min_repetitions and np.all(stderr <= rtol * np.abs(seen.mean(axis=0))):
            return n
    return None


@pytest.mark.parametrize("sign", [1, -1], ids=["positive", "negative"])
def test_running_moments_and_stopping_rule(any_backend, sign):
    values = [sign * v for v in (10.0, 14.0, 7.0, 11.0, 9.5, 10.5, 10.2, 9.9, 10.1, 10.0)]
    expected_n = _converges_after(values, rtol=0.1, min_repetitions=3)
    assert expected_n == 6
    produced = []

    @memoize(any_backend, allow_repeated_evaluations=True, rtol_stderr=0.1, min_repetitions=3)
    def noisy(x):
        produced.append(values[len(produced)])
        return produced[-1]

    returned = []
    for n in range(1, expected_n + 1):
        returned.append(noisy(1))
        record = stored_moments(noisy, 1)
        assert record.count == n
        assert record.mean == pytest.approx(np.mean(produced))
        assert record.variance == pytest.approx(np.var(produced, ddof=1) if n > 1 else 0.0)
        assert record.stderr == pytest.approx(np.std(produced, ddof=1) / np.sqrt(n) if n > 1 else 0)
        assert returned[-1] == pytest.approx(np.mean(produced))  # calls return the running mean
    assert noisy.stats.misses == expected_n and noisy.stats.hits == 0
    for _ in range(3):  # converged: served from the store, no more evaluations
        assert noisy(1) == pytest.approx(np.mean(values[:expected_n]))
    assert len(produced) == expected_n
    assert noisy.stats.hits == 3
    assert noisy.stats.hits + noisy.stats.misses == expected_n + 3


def test_negative_mean_stochastic_function_converges(any_backend):
    rng = np.random.default_rng(0)
    produced = []

    @memoize(any_backend, allow_repeated_evaluations=True)
    def noisy(x):
        produced.append(-10 + rng.normal(scale=0.01))
        return produced[-1]

    for _ in range(10):
        assert noisy(0) == pytest.approx(-10, abs=0.1)
    assert len(produced) == 4  # more than the default min_repetitions (3), then only hits
    assert noisy.stats.hits == 6


def test_min_repetitions_and_no_convergence(memory_backend):
    produced = []
    rng = np.random.default_rng(1)

    @memoize(memory_backend, allow_repeated_evaluations=True, rtol_stderr=0.001, min_repetitions=2)
    def very_noisy(x):
        produced.append(1.0 + rng.normal(scale=5.0))
        return produced[-1]

    for _ in range(15):
        very_noisy(0)
    assert len(produced) == 15 and very_noisy.stats.hits == 0
    assert stored_moments(very_noisy, 0).count == 15

    @memoize(memory_backend, allow_repeated_evaluations=True, min_repetitions=6)
    def constant(x):
        produced.append(x)
        return 5.0

    produced.clear()
    for _ in range(8):
        assert constant(0) == 5.0
    assert len(produced) == 7  # zero spread, but more than min_repetitions evaluations


def test_array_valued_stochastic_function(any_backend):
    rng = np.random.default_rng(2)
    base = np.array([1.0, -5.0, 100.0])
    produced = []

    @memoize(any_backend, allow_repeated_evaluations=True, rtol_stderr=0.05, min_repetitions=4)
    def noisy(x):
        produced.append(base + rng.normal(scale=[0.05, 1.0, 1.0]))
        return produced[-1]

    for _ in range(4):
        noisy(0)
    record = stored_moments(noisy, 0)
    stack = np.stack(produced)
    assert record.count == 4
    np.testing.assert_allclose(record.mean, stack.mean(axis=0))
    np.testing.assert_allclose(record.variance, stack.var(axis=0, ddof=1))
    np.testing.assert_allclose(record.stderr, stack.std(axis=0, ddof=1) / 2)
    for _ in range(200):
        result = noisy(0)
        if noisy.stats.hits:
            break
    n = len(produced)
    assert n > 4 and noisy.stats.hits == 1
    assert _converges_after(produced, 0.05, 4) == n  # stopped as soon as the rule held
    np.testing.assert_allclose(result, np.stack(produced).mean(axis=0))
    np.testing.assert_allclose(stored_moments(noisy, 0).mean, np.stack(produced).mean(axis=0))
    noisy(0)
    assert noisy.stats.hits == 2 and len(produced) == n


def test_array_element_stuck_at_zero_keeps_evaluating(memory_backend):
    produced = []

    @memoize(memory_backend, allow_repeated_evaluations=True, min_repetitions=2)
    def noisy(x):
        produced.append(np.array([10.0, (-1.0) ** len(produced)]))  # element 1: mean ~ 0
        return produced[-1]

    for _ in range(12):
        noisy(0)
    assert len(produced) == 12 and noisy.stats.hits == 0
    np.testing.assert_allclose(stored_moments(noisy, 0).mean, [10.0, 0.0], atol=1e-12)


def test_concurrent_observations_are_all_counted(any_backend):
    @memoize(any_backend, allow_repeated_evaluations=True, rtol_stderr=0.0, min_repetitions=10**6)
    def noisy(x):
        return float(threading.get_ident() % 7)

    def work():
        for _ in range(15):
            noisy(0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stored_moments(noisy, 0).count == 60
    assert noisy.stats.sets == 60 and noisy.stats.errors == 0


def test_stochastic_entry_with_a_lost_chunk_is_rebuilt():
    class SmallItems(MemoryBackend):
        max_item_size = 1024

    store = SmallItems()

    @memoize(store, allow_repeated_evaluations=True, min_repetitions=100)
    def noisy(x):
        return np.ones(1000)

    noisy(0)
    store.delete(EntryStore(store).chunk_keys(noisy.cache_key(0))[0])
    start = time.monotonic()
    noisy(0)
    assert time.monotonic() - start < 1.0  # no retry loop against an entry that never reads
    assert noisy.stats.errors == 0
    assert stored_moments(noisy, 0).count == 1  # the unreadable record was replaced
    noisy(0)
    assert stored_moments(noisy, 0).count == 2


# -- unpicklable results -----------------------------------------------------------------------
class LockHolder:
    def __init__(self):
        self.lock = threading.Lock()
        self.fn = lambda: 1


@pytest.mark.parametrize(
    "make", [LockHolder, lambda: (i for i in range(3))], ids=["lock-holder", "generator"]
)
def test_unpicklable_result_is_returned_uncached_with_one_warning(any_backend, make):
    @memoize(any_backend)
    def f(x):
        return make()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [f(1) for _ in range(4)]
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert "cannot be pickled" in str(runtime[0].message)
    assert len({id(r) for r in results}) == 4  # each call computed its own value
    assert all(type(r) is type(make()) for r in results)
    assert (f.stats.misses, f.stats.hits, f.stats.sets) == (4, 0, 0)


def test_unpicklable_result_strict_raises(any_backend):
    @memoize(any_backend, strict=True)
    def f(x):
        return LockHolder()

    start = time.monotonic()
    for _ in range(2):  # the second call is not left waiting on the first one's lease
        with pytest.raises(UnpicklableValue):
            f(1)
    assert time.monotonic() - start < 5


def test_unpicklable_stochastic_result_warns_once(memory_backend):
    @memoize(memory_backend, allow_repeated_evaluations=True)
    def f(x):
        return LockHolder()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [f(1) for _ in range(3)]
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert all(isinstance(r, LockHolder) for r in results)


# -- pickling and other processes --------------------------------------------------------------
def test_module_level_function_pickles_by_reference():
    for dumps_ in (pickle.dumps, cloudpickle.dumps):
        data = dumps_(module_square)
        assert len(data) < 200 and b"module_square" in data
        assert pickle.loads(data) is module_square


def test_local_function_pickles_by_value(any_backend):
    offset = 100

    @memoize(any_backend, namespace="by-value", ignore_args=["tag"])
    def f(x, tag=None):
        return x + offset

    assert f(1) == 101
    for dumps_ in (pickle.dumps, cloudpickle.dumps):
        clone = pickle.loads(dumps_(f))
        assert isinstance(clone, MemoizedFunction) and clone is not f
        assert clone.cache_key(1) == f.cache_key(1)
        assert clone.cache_key(1, tag="x") == f.cache_key(1)
        assert clone.namespace == "by-value"
        assert clone.stats.calls == 0  # fresh counters in the receiver
        assert clone(1) == 101
        if isinstance(any_backend, MemoryBackend):
            assert clone.stats.misses == 1  # an in-process store arrives empty
        else:
            assert clone.stats.hits == 1  # the parent's entry


def _call_in_child(fn, x):
    before = fn.stats.snapshot()
    value = fn(x)
    delta = fn.stats.snapshot() - before
    return value, delta.hits, delta.misses


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_other_processes_hit_the_parents_entries(method, memcached_backend, tmp_path):
    offset = 7

    @memoize(memcached_backend)
    def on_memcached(x):
        return x + offset

    @memoize(DiskBackend(tmp_path / "store"))
    def on_disk(x):
        return [x, offset]

    module_square.invalidate(12)
    assert module_square(12) == 144
    assert on_memcached(12) == 19
    assert on_disk(12) == [12, 7]
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(1) as pool:
        results = [
            pool.apply(_call_in_child, (fn, 12)) for fn in (module_square, on_memcached, on_disk)
        ]
        assert pool.apply(_call_in_child, (on_memcached, 13)) == (20, 0, 1)  # a new entry
    assert results == [(144, 1, 0), (19, 1, 0), ([12, 7], 1, 0)]
    assert on_memcached(13) == 20 and on_memcached.stats.hits == 1  # stored by the child


# -- the pyDVL spelling ------------------------------------------------------------------------
def test_pydvl_memcached_decorator(memcached_server, memcached_backend):
    config = MemcachedClientConfig(server=memcached_server.address)
    calls = []

    @memcached(client_config=config, time_threshold=0, ignore_args=["job_id"])
    def utility(x, job_id):
        calls.append(job_id)
        return x * 2

    assert isinstance(utility.backend, MemcachedBackend)
    assert utility(3, job_id=1) == 6
    assert utility(3, job_id=2) == 6
    assert utility(3, 3) == 6
    assert calls == [1]
    assert utility.stats.hits == 2

    def fun(x):
        return x + 1

    def edited_fun(x):
        return x + 1000  # a different body under the same signature: the entry is reused

    cached = memcached(client_config=config, time_threshold=0)(fun, signature=b"utility-v1")
    assert cached(1) == 2
    reused = memcached(client_config=config, time_threshold=0)(edited_fun, signature=b"utility-v1")
    assert reused(1) == 2 and reused.stats.hits == 1
    other = memcached(client_config=config, time_threshold=0)(fun, signature=b"utility-v2")
    assert other.cache_key(1) != cached.cache_key(1)


def test_pydvl_default_threshold_skips_fast_calls(memcached_server, memcached_backend):
    config = MemcachedClientConfig(server=f"{memcached_server.address[0]}:{memcached_server.port}")

    @memcached(client_config=config)
    def fast(x):
        return x

    fast(1)
    fast(1)
    assert (fast.stats.misses, fast.stats.hits, fast.stats.sets) == (2, 0, 0)
    assert fast.options.time_threshold == 0.3


def test_stored_format_is_a_plain_entry(memory_backend):
    @memoize(memory_backend)
    def f(x):
        return {"x": x}

    f(1)
    assert memory_backend.get(f.cache_key(1)) == dumps({"x": 1})


def test_bound_method_helpers_pass_the_instance(memory_backend):
    class Scaler:
        def __init__(self, k):
            self.k = k

        @memoize(memory_backend)
        def scale(self, x):
            return self.k * x

    a, b = Scaler(2), Scaler(3)
    assert a.scale(5) == 10 and b.scale(5) == 15
    assert a.scale.cache_key(5) == Scaler.scale.cache_key(a, 5)
    assert a.scale.cache_key(5) != b.scale.cache_key(5)
    assert a.scale.invalidate(5) is True
    assert a.scale.invalidate(5) is False
    assert a.scale.stats is Scaler.scale.stats  # one function, shared counters
    assert a.scale(5) == 10 and Scaler.scale.stats.misses == 3


def test_invalidate_removes_the_chunks_too(memcached_backend):
    small_items = MemcachedBackend(memcached_backend.servers, max_item_size=1024)

    @memoize(small_items)
    def blob(n):
        return bytes(range(256)) * n

    blob(40)  # ~10 KB: about ten chunks
    key = blob.cache_key(40)
    prefix_count = len(EntryStore(small_items).read(key))
    assert prefix_count > 10 * 1024 - 1
    manifest = small_items.get(key)
    assert blob.invalidate(40) is True
    assert small_items.get(key) is None
    nonce_hex = manifest[4:20].hex()
    assert small_items.get_many([f"{key}~{nonce_hex}~{i}" for i in range(12)]) == {}


def test_memoizing_a_memoized_function_keeps_both_layers(memory_backend):
    inner_store, outer_store = MemoryBackend(), memory_backend
    inner = memoize(inner_store, shared_stats=False)(lambda x: x + 1)
    outer = memoize(outer_store, shared_stats=False)(inner)
    assert outer.backend is outer_store and outer.stats is not inner.stats
    assert outer(1) == 2 and outer(1) == 2
    assert outer.stats.hits == 1 and inner.stats.misses == 1
    assert outer_store.info()["items"] == 1 and inner_store.info()["items"] == 1


def test_callable_object_with_attributes_named_like_ours(memory_backend):
    class Model:
        def __init__(self):
            self.stats = "training statistics"
            self.backend = "torch"

        def __call__(self, x):
            return x * 2

    model = memoize(memory_backend, shared_stats=False)(Model())
    assert model(2) == 4 and model(2) == 4
    assert model.stats.hits == 1


def test_stochastic_function_returning_a_list(memory_backend):
    @memoize(memory_backend, allow_repeated_evaluations=True, shared_stats=False)
    def pair(x):
        return [1.0, 3.0]

    for _ in range(5):
        assert list(pair(0)) == [1.0, 3.0]


def test_a_chunked_hit_reads_the_manifest_once(memcached_backend):
    class Counting(MemcachedBackend):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            self.trips: list[str] = []

        def get(self, key):  # type: ignore[no-untyped-def]
            self.trips.append("get")
            return super().get(key)

        def get_many(self, keys):  # type: ignore[no-untyped-def]
            self.trips.append("get_many")
            return super().get_many(keys)

    backend = Counting(memcached_backend.servers, max_item_size=64 << 10)

    @memoize(backend, shared_stats=False)
    def big(n):
        return np.arange(n, dtype=np.int64)  # 8 bytes each: several chunks

    assert (big(100_000) == np.arange(100_000)).all()
    backend.trips.clear()
    assert (big(100_000) == np.arange(100_000)).all() and big.stats.hits == 1
    assert backend.trips == ["get", "get_many"]  # the manifest, then all its chunks


def test_an_unreadable_entry_is_recomputed_with_one_warning(memory_backend, caplog):
    @memoize(memory_backend, time_threshold=10.0, shared_stats=False)  # never stored
    def f(x):
        return x + 1

    memory_backend.set(f.cache_key(1), b"ms\\x00garbage")
    for _ in range(3):
        assert f(1) == 2  # the entry stays unreadable: recomputed every time
    assert f.stats.misses == 3 and f.stats.hits == 0
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([r for r in warned if "unreadable" in r.getMessage()]) == 1
