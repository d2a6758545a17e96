"""Stampede protection (:mod:`memoshare.stampede`): one computation for many processes, leases
that expire with a crashed worker, holders that do not store, waiters that stop waiting."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from memoshare import memoize

FORK = mp.get_context("fork")


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


def _count_run(backend, name: str) -> None:  # type: ignore[no-untyped-def]
    backend.incr(name)


def _holder_computing(fn, arg, backend):  # type: ignore[no-untyped-def]
    """A forked process calling ``fn(arg)``, returned once it holds the lease and computes
    (``fn`` counts its runs in ``backend`` under "runs")."""
    holder = FORK.Process(target=fn, args=(arg,))
    holder.start()
    deadline = time.monotonic() + 10
    while backend.get("runs") != b"1":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return holder


def test_a_crashed_holder_is_taken_over_by_exactly_one_waiter(own_memcached):  # type: ignore[no-untyped-def]
    from memoshare import MemcachedBackend

    backend = MemcachedBackend(own_memcached.address)

    @memoize(backend, lease_timeout=1.5, shared_stats=False)
    def slow(x):
        _count_run(backend, "runs")
        time.sleep(1.0)
        return x * 10

    holder = _holder_computing(slow, 7, backend)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    results, elapsed = _run_together(slow, 7, workers=7)
    assert [value for value, _, _ in results] == [70] * 7
    # the killed holder's run, and exactly one waiter's once its lease expired
    assert backend.get("runs") == b"2"
    assert sum(stats["hits"] for _, _, stats in results) == 6
    assert elapsed < 1.5 + 1.0 + 5.0  # the lease, one run, and process start-up


def test_when_the_holder_fails_the_waiters_do_not_take_turns(shared_backend):
    @memoize(shared_backend, shared_stats=False)
    def fails(x):
        time.sleep(1.0)
        raise RuntimeError("boom")

    def call(barrier, out) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        start = time.monotonic()
        try:
            fails(1)
        except RuntimeError:
            out.put(time.monotonic() - start)

    barrier, out = FORK.Barrier(8), FORK.Queue()
    procs = [FORK.Process(target=call, args=(barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    latencies = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    # every caller learns of the failure by running the function itself, side by side: all
    # are done in about twice the run time, not one after another (8 s)
    assert len(latencies) == 8
    assert latencies[-1] < 3.5, latencies


def test_the_not_stored_mark_never_replaces_a_stored_value(memory_backend):
    from memoshare.stampede import StoreLease
    from memoshare.storage import EntryStore

    entries = EntryStore(memory_backend)
    lease = StoreLease(entries, timeout=30)
    token = lease.acquire("k")
    assert token is not None
    entries.write("k", b"stored by another caller meanwhile")  # our lease had expired
    lease.release("k", token, stored=False)  # we failed (or were too fast to store)
    assert entries.read("k") == b"stored by another caller meanwhile"


def test_the_not_stored_mark_is_short_lived(memory_backend):
    from memoshare.stampede import NOT_STORED_MARK_SECONDS

    expiries = []
    add = memory_backend.add

    def spying_add(key, value, expire=None):  # type: ignore[no-untyped-def]
        expiries.append((key, expire))
        return add(key, value, expire)

    memory_backend.add = spying_add

    @memoize(memory_backend, lease_timeout=600, shared_stats=False)
    def fails(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fails(1)
    mark = [expire for key, expire in expiries if key == fails.cache_key(1)]
    assert mark == [NOT_STORED_MARK_SECONDS]  # not the 600 s lease: protection is back soon


# -- leases kept alive by their holder ------------------------------------------------------------
def test_a_computation_longer_than_the_lease_runs_once(own_memcached):  # type: ignore[no-untyped-def]
    from memoshare import MemcachedBackend

    backend = MemcachedBackend(own_memcached.address)

    @memoize(backend, lease_timeout=1.0, shared_stats=False)
    def long_job(x):
        _count_run(backend, "runs")
        time.sleep(3.5)  # three and a half leases: the holder renews it meanwhile
        return x + 1

    results, _ = _run_together(long_job, 1, workers=4)
    assert [value for value, _, _ in results] == [2] * 4
    assert backend.get("runs") == b"1"


def test_a_hung_holder_is_taken_over_within_one_lease(own_memcached):  # type: ignore[no-untyped-def]
    from memoshare import MemcachedBackend

    backend = MemcachedBackend(own_memcached.address)

    @memoize(backend, lease_timeout=1.0, shared_stats=False)
    def job(x):
        _count_run(backend, "runs")
        time.sleep(0.5)
        return x * 3

    holder = _holder_computing(job, 5, backend)
    os.kill(holder.pid, signal.SIGSTOP)  # hangs: no result, no renewal
    try:
        start = time.monotonic()
        assert job(5) == 15
        assert time.monotonic() - start < 1.0 + 0.5 + 1.5  # one lease, one run, slack
        assert backend.get("runs") == b"2"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)


def test_short_computations_cost_the_lease_keeper_nothing():
    from memoshare import MemoryBackend

    class CountingGets(MemoryBackend):
        gets_calls = 0

        def gets(self, key):  # type: ignore[no-untyped-def]
            CountingGets.gets_calls += 1
            return super().gets(key)

    store = CountingGets()

    @memoize(store, lease_timeout=3.0, shared_stats=False)
    def quick(x):
        time.sleep(0.005)  # far shorter than a third of the lease
        return x

    for i in range(50):
        quick(i)
    time.sleep(0.2)
    assert CountingGets.gets_calls == 0  # no lease lived long enough to be renewed

    @memoize(store, lease_timeout=0.6, shared_stats=False)
    def slow(x):
        time.sleep(0.7)
        return x

    slow(1)
    assert 1 <= CountingGets.gets_calls <= 4  # renewed every 0.2 s while it ran
