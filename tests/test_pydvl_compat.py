"""pyDVL users' code on memoshare: the config, the decorator, and what pyDVL's own caching tests
check (failed connection, single job, parallel jobs sharing entries through ``ignore_args``,
repeated training, parallel repeated training), with real memcached and real joblib (loky)
and Ray workers."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymemcache.client.base import Client
from pymemcache.serde import PickleSerde

from memoshare import (
    CacheStats,
    MemcachedClientConfig,
    MemcachedConfig,
    MemoryBackend,
    StatsSnapshot,
    memcached,
    memoize,
)

# -- what pyDVL's MapReduceJob does to a map function -------------------------------------------


def accepted(fn: Callable[..., Any], **extra: Any) -> dict[str, Any]:
    """The extra keyword arguments ``fn`` can take, as pyDVL's ``maybe_add_argument`` decides
    from its signature (a memoized function shows the wrapped function's)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return extra
    names = {p.name for p in params}
    return {k: v for k, v in extra.items() if k in names}


def map_reduce_loky(inputs: np.ndarray, map_func: Callable[..., Any], n_jobs: int, run: int) -> Any:
    """pyDVL 0.7's MapReduceJob on joblib: chunks to loky workers with job_id and run_id."""
    from joblib import Parallel, delayed

    chunks = np.array_split(inputs, n_jobs)
    with Parallel(n_jobs=n_jobs, backend="loky") as parallel:
        results = parallel(
            delayed(map_func)(chunk, **accepted(map_func, job_id=j, run_id=run))
            for j, chunk in enumerate(chunks)
        )
    return float(np.sum(results))


@pytest.fixture
def config(memcached_server, memcached_backend) -> MemcachedClientConfig:  # type: ignore[no-untyped-def]
    # memcached_backend flushes the server for this test
    return MemcachedClientConfig(server=memcached_server.address, connect_timeout=1.0, timeout=1)


@pytest.fixture
def raw_client(config: MemcachedClientConfig) -> Iterator[Client]:
    client = Client(**dataclasses.asdict(config))
    yield client
    client.close()


def server_stat(client: Client, name: str) -> int:
    return int(client.stats()[name.encode()])


# -- the config ----------------------------------------------------------------------------------


def test_client_config_is_pydvls(raw_client: Client) -> None:
    fields = {f.name: f.default for f in dataclasses.fields(MemcachedClientConfig)}
    assert list(fields) == ["server", "connect_timeout", "timeout", "no_delay", "serde"]
    assert fields["server"] == ("localhost", 11211)
    assert (fields["connect_timeout"], fields["timeout"], fields["no_delay"]) == (1.0, 1.0, True)
    assert isinstance(fields["serde"], PickleSerde)
    config = MemcachedClientConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timeout = 2.0  # type: ignore[misc]
    assert hash(config) == hash(MemcachedClientConfig())
    # pyDVL code builds raw clients from it
    raw_client.set("k", {"a": 1})
    assert raw_client.get("k") == {"a": 1}


def test_memcached_config_works_through_asdict(config: MemcachedClientConfig) -> None:
    options = MemcachedConfig(client_config=config, time_threshold=0)
    fields = [f.name for f in dataclasses.fields(MemcachedConfig)]
    assert fields == [
        "client_config",
        "time_threshold",
        "allow_repeated_evaluations",
        "rtol_stderr",
        "min_repetitions",
        "ignore_args",
    ]
    # asdict() turns client_config into a dict; pyDVL's Utility keeps it a dataclass: both work
    for x, keywords in enumerate(
        (
            dataclasses.asdict(options),
            {**dataclasses.asdict(options), "client_config": options.client_config},
        )
    ):
        double = memcached(**keywords)(lambda x: 2 * x)
        assert double(x) == double(x) == 2 * x
        assert (double.stats.misses, double.stats.hits) == (1, 1)


def test_cache_stats_is_pydvls_dataclass() -> None:
    stats = CacheStats()
    assert dataclasses.is_dataclass(stats)
    assert dataclasses.asdict(stats) == dict.fromkeys(
        ["sets", "misses", "hits", "timeouts", "errors", "reconnects"], 0
    )
    stats.hits += 1  # as pyDVL code does
    stats.misses = 3
    assert (stats.hits, stats.misses) == (1, 3)
    assert stats == CacheStats(misses=3, hits=1) == StatsSnapshot(misses=3, hits=1)
    assert stats != CacheStats(hits=2)
    with pytest.raises(TypeError):
        stats.sets = 1.5  # type: ignore[assignment]

    @memoize(MemoryBackend())
    def f(x):
        return x

    def calls() -> None:
        for i in range(2000):
            f(i % 10)

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert f.stats.hits + f.stats.misses == 8000  # lock-free counting loses nothing


# -- failing fast, surviving later ---------------------------------------------------------------


def test_failed_connection_raises_at_decoration() -> None:
    config = MemcachedClientConfig(server=("localhost", 0), connect_timeout=0.1)
    with pytest.raises((ConnectionRefusedError, OSError)):
        memcached(config)(lambda x: x)


def test_memoize_connects_lazily_and_survives(own_memcached, caplog) -> None:  # type: ignore[no-untyped-def]
    from memoshare import MemcachedBackend

    own_memcached.kill()
    backend = MemcachedBackend(own_memcached.address, connect_timeout=0.2, retry_interval=60)
    double = memoize(backend)(lambda x: 2 * x)  # no error at decoration
    with caplog.at_level(logging.WARNING, logger="memoshare"):
        assert [double(i) for i in range(5)] == [0, 2, 4, 6, 8]
    assert double.stats.misses == 5 and double.stats.errors >= 1


def test_outage_after_decoration_is_survived(own_memcached) -> None:  # type: ignore[no-untyped-def]
    config = MemcachedClientConfig(server=own_memcached.address, connect_timeout=0.2, timeout=0.2)
    cached = memcached(config, time_threshold=0, backend_options={"retry_interval": 0.05})(
        lambda x: x + 1
    )
    assert cached(1) == cached(1) == 2 and cached.stats.hits == 1
    own_memcached.kill()
    assert cached(1) == 2  # computed through
    assert cached.stats.errors + cached.stats.timeouts >= 1
    own_memcached.start()
    time.sleep(0.1)
    assert cached(1) == 2 and cached(1) == 2
    assert cached.stats.reconnects >= 1 and cached.stats.hits >= 2  # cached again


# -- pyDVL's defaults cost nothing extra --------------------------------------------------------


class CountingBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def get(self, key: str) -> bytes | None:
        self.ops.append("get")
        return super().get(key)

    def add(self, key: str, value: bytes, expire: float | None = None) -> bool:
        self.ops.append("add")
        return super().add(key, value, expire)

    def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        self.ops.append("set")
        super().set(key, value, expire)


def test_a_call_that_is_not_stored_costs_one_lookup() -> None:
    store = CountingBackend()

    @memoize(store, time_threshold=0.3, shared_stats=False)  # pyDVL's default threshold
    def fast(x):
        return x

    assert fast(1) == 1  # the first caller takes the lease, computes, leaves the mark
    store.ops.clear()
    for _ in range(50):
        assert fast(1) == 1
    assert store.ops == ["get"] * 50  # one lookup each: no lease, no pause
    assert (fast.stats.misses, fast.stats.hits, fast.stats.sets) == (51, 0, 0)


def test_a_call_that_is_not_stored_costs_one_get_on_memcached(
    config: MemcachedClientConfig, raw_client: Client
) -> None:
    @memcached(config)  # time_threshold=0.3
    def fast(x):
        return x

    fast(1)
    before = {name: server_stat(raw_client, name) for name in ("cmd_get", "cmd_set")}
    for _ in range(50):
        fast(1)
    after = {name: server_stat(raw_client, name) for name in ("cmd_get", "cmd_set")}
    assert after["cmd_get"] - before["cmd_get"] == 50
    assert after["cmd_set"] == before["cmd_set"]  # no lease taken (add counts as a set)


def test_a_slow_call_stores_over_the_mark() -> None:
    store = MemoryBackend()
    delay = [0.0]

    @memoize(store, time_threshold=0.05, shared_stats=False)
    def sometimes_slow(x):
        time.sleep(delay[0])
        return x

    sometimes_slow(1)  # fast: not stored, marked
    delay[0] = 0.06
    sometimes_slow(1)  # slow: stored over the mark
    delay[0] = 0.0
    assert sometimes_slow(1) == 1 and sometimes_slow.stats.hits == 1


# -- pyDVL's caching tests, on memoshare ----------------------------------------------------------


def test_single_job(config: MemcachedClientConfig, raw_client: Client) -> None:
    @memcached(client_config=config, time_threshold=0)
    def foo(indices: np.ndarray) -> float:
        return float(np.sum(indices))

    foo(np.arange(1000))
    hits_before = server_stat(raw_client, "get_hits")
    foo(np.arange(1000))
    assert server_stat(raw_client, "get_hits") > hits_before
    assert (foo.stats.misses, foo.stats.hits) == (1, 1)


def test_parallel_jobs_share_entries_with_loky(
    config: MemcachedClientConfig, raw_client: Client
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # **kwargs can receive job_id: no warning

        @memcached(client_config=config, time_threshold=0, ignore_args=["job_id", "run_id"])
        def foo(indices: np.ndarray, *args: Any, **kwargs: Any) -> float:
            return float(np.sum(indices))

    n, n_runs, n_jobs = 1234, 10, 2
    hits_before = server_stat(raw_client, "get_hits")
    results = [map_reduce_loky(np.arange(n), foo, n_jobs, run) for run in range(n_runs)]
    assert results == [n * (n - 1) / 2] * n_runs
    # every run after the first is served: each chunk's entry is shared by all jobs and runs
    assert server_stat(raw_client, "get_hits") - hits_before >= (n_runs - 1) * n_jobs


def test_ignored_name_the_function_cannot_take_warns_once(config: MemcachedClientConfig) -> None:
    with pytest.warns(UserWarning, match="job_id") as caught:

        @memcached(client_config=config, time_threshold=0, ignore_args=["job_id", "run_id"])
        def foo(indices: np.ndarray) -> float:
            return float(np.sum(indices))

    assert len(caught) == 1
    # as in pyDVL's MapReduceJob, the runner passes job_id only to functions that take it
    assert map_reduce_loky(np.arange(10), foo, 2, run=0) == 45.0


def test_repeated_training(config: MemcachedClientConfig) -> None:
    rng = np.random.default_rng(0)

    @memcached(
        client_config=config,
        time_threshold=0,
        allow_repeated_evaluations=True,
        rtol_stderr=0.01,
        ignore_args=["job_id", "run_id"],
    )
    def foo(indices: np.ndarray, **kwargs: Any) -> float:
        return float(np.sum(indices)) + rng.normal(scale=10)

    n = 7
    for _ in range(10_000):
        result = foo(np.arange(n))
    assert abs(result - np.sum(np.arange(n))) < 1
    assert foo.stats.sets < foo.stats.hits
    assert foo.stats.hits + foo.stats.misses == 10_000


def test_faster_with_repeated_training(config: MemcachedClientConfig) -> None:
    rng = np.random.default_rng(1)

    def noisy(indices: np.ndarray) -> float:
        time.sleep(0.01)
        return float(np.sum(indices)) + rng.normal(scale=1)

    cached = memcached(
        client_config=config, time_threshold=0, allow_repeated_evaluations=True, rtol_stderr=0.1
    )(noisy)
    indices = np.arange(3)
    start = time.perf_counter()
    fast = [cached(indices) for _ in range(300)]
    cached_time = time.perf_counter() - start
    start = time.perf_counter()
    slow = [noisy(indices) for _ in range(300)]
    uncached_time = time.perf_counter() - start
    assert abs(fast[-1] - np.mean(slow)) < 1
    assert cached.stats.misses < 30  # converged early: the rest are hits
    assert cached_time < uncached_time


def noisy_training(config: MemcachedClientConfig) -> Any:
    """pyDVL's repeated-training map function: the sum of a chunk, plus noise."""

    @memcached(
        client_config=config,
        time_threshold=0,
        allow_repeated_evaluations=True,
        rtol_stderr=0.01,
        ignore_args=["job_id", "run_id"],
    )
    def map_func(indices: np.ndarray, **kwargs: Any) -> float:
        return float(np.sum(indices)) + np.random.normal(scale=5)

    return map_func


@pytest.mark.parametrize(("n", "atol"), [(10, 5), (20, 10)])
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_parallel_repeated_training(
    config: MemcachedClientConfig, n: int, atol: float, n_jobs: int
) -> None:
    map_func = noisy_training(config)
    results = [map_reduce_loky(np.arange(n), map_func, n_jobs, run) for run in range(20)]
    exact = float(np.sum(np.arange(n)))
    assert np.isclose(results[-1], results[-2], atol=atol)
    assert np.isclose(results[-1], exact, atol=atol)


# -- Ray workers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    # Loopback only: with "cluster" mode off (read when ray is imported), Ray runs its head
    # node, object store and workers on 127.0.0.1 instead of the machine's own address.
    saved = os.environ.get(RAY_CLUSTER_MODE)
    os.environ[RAY_CLUSTER_MODE] = "0"
    # Ray installs signal handlers in the driver; forked workers of later tests would inherit
    # them (and then not flush on SIGTERM): put the previous ones back afterwards.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        # the workers import this module's helpers (cloudpickle pickles them by reference)
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}},
    )
    assert ray._private.worker.global_worker.node.node_ip_address == "127.0.0.1"
    yield ray
    ray.shutdown()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if saved is None:
        del os.environ[RAY_CLUSTER_MODE]
    else:
        os.environ[RAY_CLUSTER_MODE] = saved


RAY_CLUSTER_MODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def map_reduce_ray(ray: Any, inputs: np.ndarray, map_func: Callable[..., Any], run: int) -> float:
    @ray.remote
    def task(chunk: np.ndarray, job_id: int) -> float:
        return map_func(chunk, **accepted(map_func, job_id=job_id, run_id=run))

    chunks = np.array_split(inputs, 2)
    return float(np.sum(ray.get([task.remote(c, j) for j, c in enumerate(chunks)])))


def test_parallel_jobs_share_entries_with_ray(
    ray_local: Any, config: MemcachedClientConfig, raw_client: Client
) -> None:
    @memcached(client_config=config, time_threshold=0, ignore_args=["job_id", "run_id"])
    def foo(indices: np.ndarray, *args: Any, **kwargs: Any) -> float:
        return float(np.sum(indices))

    n, n_runs = 1234, 5
    hits_before = server_stat(raw_client, "get_hits")
    results = [map_reduce_ray(ray_local, np.arange(n), foo, run) for run in range(n_runs)]
    assert results == [n * (n - 1) / 2] * n_runs
    assert server_stat(raw_client, "get_hits") - hits_before >= (n_runs - 1) * 2


def test_parallel_repeated_training_with_ray(ray_local: Any, config: MemcachedClientConfig) -> None:
    map_func = noisy_training(config)
    results = [map_reduce_ray(ray_local, np.arange(20), map_func, run) for run in range(20)]
    assert np.isclose(results[-1], results[-2], atol=10)
    assert np.isclose(results[-1], 190.0, atol=10)


def test_unique_fast_calls_cost_one_lookup_each() -> None:
    """pyDVL's workload: mostly distinct subsets, each faster than time_threshold. Once the
    function is known to be fast, a miss takes no lease and leaves no mark."""
    store = CountingBackend()

    @memoize(store, time_threshold=0.3, shared_stats=False)
    def fast(x):
        return x

    fast(-1)  # the first call ever: its run time is not known yet
    store.ops.clear()
    for i in range(50):
        fast(i)
    assert store.ops == ["get"] * 50
    assert store.keys() == [fast.cache_key(-1)]  # only the first call's short-lived mark


def test_the_pydvl_utility_pattern_keys_the_signature_not_the_instance(
    config: MemcachedClientConfig,
) -> None:
    class Utility:
        def __init__(self, data: np.ndarray) -> None:
            self.data = data  # large: digesting it at every call would cost as much

        def _utility(self, indices: tuple[int, ...]) -> float:
            return float(len(indices))

    first, second = Utility(np.zeros(10)), Utility(np.ones(10))
    cached = memcached(config, time_threshold=0)(first._utility, signature=b"utility-v1")
    other = memcached(config, time_threshold=0)(second._utility, signature=b"utility-v1")
    assert cached.cache_key((1, 2)) == other.cache_key((1, 2))  # the signature pins it
    # without a signature memoshare keys the instance, as memoize does
    assert memcached(config)(first._utility).cache_key((1,)) != memcached(config)(
        second._utility
    ).cache_key((1,))


def test_the_ignore_args_warning_is_not_repeated_by_copies(config: MemcachedClientConfig) -> None:
    import pickle

    with pytest.warns(UserWarning, match="job_id"):
        fn = memcached(config, ignore_args=["job_id"])(_plain_utility)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            pickle.loads(pickle.dumps(fn))  # as each worker unpickles it


def _plain_utility(indices: Any) -> float:
    return float(np.sum(indices))


def test_pydvl_accepts_a_single_name_and_zero_repetitions(config: MemcachedClientConfig) -> None:
    cached = memcached(config, time_threshold=0, ignore_args="job_id", min_repetitions=0)(
        lambda indices, job_id=0: float(np.sum(indices))
    )
    assert cached.cache_key([1], job_id=1) == cached.cache_key([1], job_id=2)
