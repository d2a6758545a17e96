"""Many workers, one cache: atomic moments, threads, load.

Stampede protection is in test_stampede.py, shared statistics in test_shared_stats.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time

import numpy as np
import pytest

from memoshare import MemcachedBackend, memoize, serialization
from memoshare.moments import Moments
from memoshare.storage import EntryStore

FORK = mp.get_context("fork")


def _stored_moments(fn, *args) -> Moments:  # type: ignore[no-untyped-def]
    payload = EntryStore(fn.backend).read(fn.cache_key(*args))
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
