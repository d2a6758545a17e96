"""Shared statistics (:mod:`memoshare.shared_stats`): totals of every worker kept in the store,
read with :func:`memoshare.stats`, flushed by :func:`memoshare.flush_stats`, at exit, by pool
workers and for collected functions. One test also reads the totals through the
``memoshare stats`` command."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import textwrap
import time

import pytest

import memoshare
from memoshare import memoize

FORK = mp.get_context("fork")


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
    )
    assert out.returncode == 0, out.stderr
    (printed,) = json.loads(out.stdout)
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
