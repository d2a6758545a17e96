"""Many workers, one cache: atomic moments, stampede protection, shared stats, threads, load."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import memoshare
from memoshare import MemcachedBackend, memoize, serialization, storage
from memoshare.moments import Moments

FORK = mp.get_context("fork")

# Multi-process tests need a store that processes share.
SHARED = ["disk", "memcached", "redis"]


@pytest.fixture(params=SHARED)
def shared_backend(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(f"{request.param}_backend")


def _stored_moments(fn, *args) -> Moments:  # type: ignore[no-untyped-def]
    payload = storage.read_entry(fn.backend, fn.cache_key(*args))
    assert payload is not None
    record = serialization.loads(payload)
    assert isinstance(record, Moments)
    return record


# -- no lost updates ----------------------------------------------------------------------------
def _evaluate_many(fn, n: int, barrier, out) -> None:  # type: ignore[no-untyped-def]
    produced: list[float] = []
    rng = random.Random(os.getpid())

    def noisy(x):  # type: ignore[no-untyped-def]
        value = x + rng.gauss(0.0, 1.0)
        produced.append(value)
        return value

    fn._target = noisy  # same key (digest fixed at decoration); values recorded per worker
    barrier.wait()
    for _ in range(n):
        fn(3.0)
    out.put(produced)


def test_moments_updates_are_atomic_across_processes(shared_backend):
    @memoize(
        shared_backend,
        allow_repeated_evaluations=True,
        rtol_stderr=0.0,
        min_repetitions=10**9,
        shared_stats=False,
    )
    def noisy(x):
        return x

    workers, per_worker = 8, 50
    barrier, out = FORK.Barrier(workers), FORK.Queue()
    procs = [
        FORK.Process(target=_evaluate_many, args=(noisy, per_worker, barrier, out))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    values = [v for _ in procs for v in out.get(timeout=120)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(values) == workers * per_worker
    stored = _stored_moments(noisy, 3.0)
    assert stored.count == workers * per_worker  # not one update lost
    assert stored.mean == pytest.approx(np.mean(values), rel=1e-9)
    assert stored.variance == pytest.approx(np.var(values, ddof=1), rel=1e-9)


def test_moments_updates_are_atomic_across_threads(memory_backend):
    @memoize(
        memory_backend,
        allow_repeated_evaluations=True,
        rtol_stderr=0.0,
        min_repetitions=10**9,
        shared_stats=False,
    )
    def noisy(x):
        return x + random.random()

    threads = [threading.Thread(target=lambda: [noisy(1.0) for _ in range(50)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _stored_moments(noisy, 1.0).count == 400
    assert noisy.stats.misses == 400 and noisy.stats.sets == 400


# -- stampede protection ------------------------------------------------------------------------
def _call_at_once(fn, arg, barrier, out) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    start = time.monotonic()
    value = fn(arg)
    out.put((value, time.monotonic() - start, fn.stats.asdict()))


def _run_together(fn, arg, workers: int = 8):  # type: ignore[no-untyped-def]
    barrier, out = FORK.Barrier(workers), FORK.Queue()
    procs = [
        FORK.Process(target=_call_at_once, args=(fn, arg, barrier, out)) for _ in range(workers)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    elapsed = time.monotonic() - start
    for p in procs:
        p.join(30)
    return results, elapsed


def test_stampede_one_computation_for_eight_processes(shared_backend):
    runs = f"{shared_backend!r}-runs"

    @memoize(shared_backend, shared_stats=False)
    def slow(x):
        shared_backend.incr(runs)  # counted in the store: visible across processes
        time.sleep(1.0)
        return {"x": x, "squared": x * x}

    results, elapsed = _run_together(slow, 7)
    assert int(shared_backend.get(runs)) == 1
    assert all(value == {"x": 7, "squared": 49} for value, _, _ in results)
    assert elapsed < 4.0  # far below the 8 s of eight computations
    assert sum(s["misses"] for _, _, s in results) == 1
    assert sum(s["hits"] for _, _, s in results) == 7


def test_stampede_off_computes_in_every_process(disk_backend):
    runs = "runs"

    @memoize(disk_backend, stampede=False, shared_stats=False)
    def slow(x):
        disk_backend.incr(runs)
        time.sleep(0.5)
        return x

    _run_together(slow, 1, workers=4)
    assert int(disk_backend.get(runs)) == 4


def _hold_lease_and_die(fn) -> None:  # type: ignore[no-untyped-def]
    fn(5)  # the function blocks; the test kills this process while it holds the lease


def test_expired_lease_of_a_crashed_worker_lets_others_compute(memcached_backend):
    @memoize(memcached_backend, lease_timeout=2.0, wait_timeout=30.0, shared_stats=False)
    def stuck(x):
        if os.environ.get("MEMOSHARE_TEST_STUCK") == "1":
            time.sleep(60)
        return x * 10

    os.environ["MEMOSHARE_TEST_STUCK"] = "1"
    try:
        holder = FORK.Process(target=_hold_lease_and_die, args=(stuck,))
        holder.start()
        deadline = time.monotonic() + 10
        while memcached_backend.get(stuck.cache_key(5) + "~lease") is None:
            assert time.monotonic() < deadline, "the worker never took the lease"
            time.sleep(0.02)
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    finally:
        os.environ.pop("MEMOSHARE_TEST_STUCK")
    start = time.monotonic()
    assert stuck(5) == 50  # waits for the dead worker's lease to expire, then computes
    # memcached expires at whole-second ticks: the lease is gone 1 to 2 s after it was taken,
    # long before the 30 s wait_timeout would have let this caller compute anyway.
    assert time.monotonic() - start < 5.0
    assert stuck.stats.misses == 1


def test_holder_that_does_not_store_releases_waiters_quickly(disk_backend):
    @memoize(disk_backend, time_threshold=10.0, shared_stats=False)  # never stored
    def fast(x):
        time.sleep(0.3)
        return x + 1

    results, _ = _run_together(fast, 1, workers=8)
    assert all(value == 2 for value, _, _ in results)
    # The holder marks its lease "uncached": the waiters compute together (0.3 s + 0.3 s)
    # instead of taking turns for the lease (8 x 0.3 s), or sitting out the 60 s lease.
    assert max(duration for _, duration, _ in results) < 1.5
    assert sum(s["misses"] for _, _, s in results) == 8


def _hold_lease_for(fn, seconds: float) -> None:  # type: ignore[no-untyped-def]
    os.environ["MEMOSHARE_TEST_HOLD"] = str(seconds)
    fn(1)


def test_waiter_computes_itself_after_wait_timeout(disk_backend):
    @memoize(disk_backend, lease_timeout=60.0, wait_timeout=1.0, shared_stats=False)
    def slow(x):
        time.sleep(float(os.environ.get("MEMOSHARE_TEST_HOLD", "0")))
        return x * 3

    holder = FORK.Process(target=_hold_lease_for, args=(slow, 8.0))
    holder.start()
    try:
        deadline = time.monotonic() + 10
        while disk_backend.get(slow.cache_key(1) + "~lease") is None:
            assert time.monotonic() < deadline, "the holder never took the lease"
            time.sleep(0.02)
        start = time.monotonic()
        assert slow(1) == 3  # the holder is alive and holds its lease for 8 s
        assert 1.0 <= time.monotonic() - start < 4.0
        assert slow.stats.misses == 1
    finally:
        holder.kill()
        holder.join(10)


# -- threads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["memory", "disk", "memcached", "redis"])
def test_sixteen_threads_share_one_function(request, backend_name):
    backend = request.getfixturevalue(f"{backend_name}_backend")

    @memoize(backend, shared_stats=False)
    def square(x):
        return x * x

    errors: list[BaseException] = []
    calls_per_thread = 200

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(calls_per_thread):
                x = rng.randrange(50)
                assert square(x) == x * x
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = square.stats
    assert stats.hits + stats.misses == 16 * calls_per_thread
    # Stampede protection works between threads too: each of the 50 keys computed once.
    assert stats.misses == 50
    assert stats.errors == stats.timeouts == 0


# -- shared stats -------------------------------------------------------------------------------
def _calls_then_exit(fn, n: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(n):
        fn(i % 10)
    # no explicit flush: the exit of a multiprocessing child must flush


def test_shared_stats_add_up_over_processes(memcached_backend, memcached_server):
    @memoize(memcached_backend, namespace="shared-test")
    def cube(x):
        return x**3

    procs = [FORK.Process(target=_calls_then_exit, args=(cube, 100)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = memoshare.stats(memcached_backend, namespace="shared-test")
    assert len(rows) == 1
    row = rows[0]
    assert row.function.endswith("cube")
    assert row.calls == 400
    assert row.misses == 10 and row.hits == 390 and row.sets == 10
    assert row.hit_rate == pytest.approx(0.975)

    # the command line reads the same totals
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "memoshare",
            "stats",
            "--backend",
            "memcached",
            "--server",
            f"127.0.0.1:{memcached_server.port}",
            "--namespace",
            "shared-test",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (printed,) = json.loads(out)
    assert printed["calls"] == 400 and printed["hits"] == 390
    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "memoshare",
            "stats",
            "--backend",
            "memcached",
            "--server",
            f"127.0.0.1:{memcached_server.port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "cube" in table and "97.5%" in table and "shared-test" in table


def test_shared_stats_are_not_flushed_on_the_call_path(disk_backend):
    @memoize(disk_backend, namespace="lazy")
    def double(x):
        return 2 * x

    for i in range(20):
        double(i % 4)
    assert memoshare.stats(disk_backend, namespace="lazy") == []  # nothing flushed yet
    memoshare.flush_stats()
    (row,) = memoshare.stats(disk_backend, namespace="lazy")
    assert (row.hits, row.misses) == (16, 4)
    memoshare.flush_stats()  # flushing again adds nothing twice
    (row,) = memoshare.stats(disk_backend, namespace="lazy")
    assert (row.hits, row.misses) == (16, 4)


def test_shared_stats_can_be_turned_off(disk_backend):
    @memoize(disk_backend, namespace="private", shared_stats=False)
    def ident(x):
        return x

    ident(1)
    memoshare.flush_stats()
    assert memoshare.stats(disk_backend, namespace="private") == []


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_shared_stats_of_pool_workers_ended_by_terminate(disk_backend, start_method):
    # A closure is pickled by value: every task chunk rebuilds (then drops) its own copy, and
    # `with Pool()` ends the workers with SIGTERM well before the flush interval.
    def make(k):  # type: ignore[no-untyped-def]
        @memoize(disk_backend, namespace=f"pool-{start_method}")
        def scale(x):
            return k * x

        return scale

    scale = make(3)
    with mp.get_context(start_method).Pool(2) as pool:
        assert pool.map(scale, range(60), chunksize=5) == [3 * x for x in range(60)]
    (row,) = memoshare.stats(disk_backend, namespace=f"pool-{start_method}")
    assert (row.calls, row.misses, row.sets) == (60, 60, 60)


def test_shared_stats_of_a_collected_function_are_flushed(disk_backend):
    def job():  # type: ignore[no-untyped-def]
        @memoize(disk_backend, namespace="gone")
        def square(x):
            return x * x

        for i in range(6):
            square(i % 2)

    job()  # the function is garbage now; its counts were never flushed
    memoshare.flush_stats()
    (row,) = memoshare.stats(disk_backend, namespace="gone")
    assert (row.hits, row.misses) == (4, 2)


def test_shared_stats_count_every_call_across_a_reset(disk_backend):
    @memoize(disk_backend, namespace="reset")
    def ident(x):
        return x

    for _ in range(4):
        ident(0)  # 1 miss, 3 hits
    memoshare.flush_stats()
    ident.stats.reset()
    for _ in range(10):
        ident(0)  # 10 hits: more than before the reset
    memoshare.flush_stats()
    (row,) = memoshare.stats(disk_backend, namespace="reset")
    assert (row.hits, row.misses) == (13, 1)


def test_a_dead_store_does_not_hold_the_exit():
    # Forty functions with unflushed counts on stores that are down: the exit flush asks each
    # store once and gives up within its budget (redis-py alone would back off 4 s a call).
    script = textwrap.dedent(
        """
        from memoshare import MemcachedBackend, memoize
        from memoshare.backends.redis import RedisBackend

        keep = []
        for i in range(20):
            for store in (RedisBackend(port=1), MemcachedBackend("127.0.0.1:1")):
                fn = memoize(store, stampede=False)(lambda x, i=i: x + i)
                assert fn(1) == 1 + i
                keep.append(fn)
        """
    )
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert time.monotonic() - start < 10.0


# -- load ---------------------------------------------------------------------------------------
def _load_worker(fn, seed: int, calls: int, out) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    wrong = 0
    for _ in range(calls):
        x = rng.randrange(2000)
        if fn(x) != (x, x * 3 + 1):
            wrong += 1
    out.put((wrong, fn.stats.asdict()))


@pytest.mark.slow
def test_load_many_processes_one_memcached(memcached_backend):
    @memoize(MemcachedBackend(memcached_backend.servers), namespace="load", shared_stats=False)
    def transform(x):
        return (x, x * 3 + 1)

    workers, calls = 4, 10_000  # 40,000 calls, bounded
    out = FORK.Queue()
    procs = [
        FORK.Process(target=_load_worker, args=(transform, i, calls, out)) for i in range(workers)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert time.monotonic() - start < 300
    assert sum(wrong for wrong, _ in results) == 0
    totals = {k: sum(s[k] for _, s in results) for k in results[0][1]}
    assert totals["hits"] + totals["misses"] == workers * calls
    assert totals["errors"] == totals["timeouts"] == 0
    assert 2000 * 0.9 <= totals["misses"] <= 2000 + workers * 50  # few duplicate computations
    assert totals["sets"] == totals["misses"]


def test_shared_stats_survive_a_local_reset(disk_backend):
    @memoize(disk_backend, namespace="reset")
    def ident(x):
        return x

    for i in range(6):
        ident(i % 2)  # 2 misses, 4 hits
    memoshare.flush_stats()
    ident.stats.reset()
    for i in range(3):
        ident(i % 2)  # 3 hits
    memoshare.flush_stats()
    (row,) = memoshare.stats(disk_backend, namespace="reset")
    assert (row.hits, row.misses) == (7, 2)
