"""What happens when several processes share one memcached: memoshare against naive memoizers.

Run from the repository root::

    .venv/bin/python benchmarks/bench_concurrency.py

Two scenarios, each run with a naive memoizer and with memoshare, on one fresh memcached:

1. **Lost updates.** 8 processes each evaluate a stochastic function 50 times with the same
   argument and fold every value into the running mean/variance/count stored under one key.
   The naive memoizer does what pyDVL 0.7.1 does: ``get``, update the moments, ``set`` (no
   compare-and-set), so concurrent writers overwrite each other. memoshare updates the moments
   with ``gets``/``cas`` and retries on conflict. The stored count should end at 400.
2. **Stampede.** 8 processes call a deterministic function that takes 0.5 s of CPU with the
   same argument at the same moment, on an empty cache. The naive memoizer (``get``; on a miss,
   compute and ``set``) lets all of them compute; memoshare lets one compute while the others
   wait for its entry.

All processes start together behind a barrier. Every loop is bounded; a run takes ~15-30 s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import memcached_server  # noqa: E402

import memoshare  # noqa: E402
from memoshare import MemcachedBackend, Moments, memoize, serialization  # noqa: E402
from memoshare.storage import EntryStore  # noqa: E402

PROCESSES = 8
EVALUATIONS = 50
WORK_SECONDS = 0.5
JOIN_TIMEOUT = 60.0


# -- the functions being memoized ---------------------------------------------------------------


def noisy(x: int) -> float:
    """A stochastic function: about 1 ms of work, then a noisy value around ``x``."""
    time.sleep(0.001)
    return x + random.gauss(0.0, 1.0)


def expensive(x: int) -> int:
    """A deterministic function that burns ``WORK_SECONDS`` of CPU time."""
    deadline = time.process_time() + WORK_SECONDS
    n = 0
    while time.process_time() < deadline:
        n += 1
    return x * 2


# -- naive memoizers (what memoshare is compared with) ------------------------------------------


def naive_moments_update(client: Any, key: str, value: float) -> None:
    """pyDVL 0.7.1's update of the running moments: read, modify, write, no CAS."""
    raw = client.get(key)
    if raw is None:
        record = {"value": value, "count": 1, "variance": 0.0}
    else:
        record = pickle.loads(raw)
        count = record["count"] + 1
        delta = value - record["value"]
        mean = record["value"] + delta / count
        # running (population) variance, as pyDVL's running_moments computes it
        variance = record["variance"] * (count - 1) / count + delta * (value - mean) / count
        record = {"value": mean, "count": count, "variance": variance}
    client.set(key, pickle.dumps(record), noreply=False)


def naive_memoized_call(client: Any, key: str, x: int) -> tuple[int, bool]:
    """Get; on a miss compute and set. No lock: every process that misses computes."""
    raw = client.get(key)
    if raw is not None:
        return pickle.loads(raw), False
    value = expensive(x)
    client.set(key, pickle.dumps(value), noreply=False)
    return value, True


# -- workers ------------------------------------------------------------------------------------


def _client(address: tuple[str, int]) -> Any:
    from pymemcache.client.base import Client

    return Client(address, connect_timeout=1.0, timeout=5.0, no_delay=True)


def _memoize_options() -> dict[str, Any]:
    sig = memoshare.MemoizedFunction.__init__
    import inspect

    return {"shared_stats": False} if "shared_stats" in inspect.signature(sig).parameters else {}


def worker(kind: str, address: tuple[str, int], tag: str, barrier: Any, results: Any) -> None:
    random.seed(os.getpid() ^ time.time_ns())
    out: dict[str, Any] = {"kind": kind}
    try:
        if kind == "naive-moments":
            client = _client(address)
            key = f"naive-moments-{tag}"
            barrier.wait(JOIN_TIMEOUT)
            for _ in range(EVALUATIONS):
                naive_moments_update(client, key, noisy(1))
            out["key"] = key
        elif kind == "memoshare-moments":
            fn = memoize(
                MemcachedBackend(address, timeout=5.0),
                namespace=f"moments-{tag}",
                allow_repeated_evaluations=True,
                rtol_stderr=0,
                min_repetitions=10**9,
                **_memoize_options(),
            )(noisy)
            barrier.wait(JOIN_TIMEOUT)
            for _ in range(EVALUATIONS):
                fn(1)
            out["key"] = fn.cache_key(1)
            out["stats"] = fn.stats.asdict()
        elif kind == "naive-stampede":
            client = _client(address)
            barrier.wait(JOIN_TIMEOUT)
            start = time.perf_counter()
            value, ran = naive_memoized_call(client, f"naive-stampede-{tag}", 21)
            out.update(value=value, ran=ran, seconds=time.perf_counter() - start)
        elif kind == "memoshare-stampede":
            fn = memoize(
                MemcachedBackend(address, timeout=5.0),
                namespace=f"stampede-{tag}",
                **_memoize_options(),
            )(expensive)
            barrier.wait(JOIN_TIMEOUT)
            start = time.perf_counter()
            value = fn(21)
            out.update(value=value, ran=fn.stats.misses > 0, seconds=time.perf_counter() - start)
            out["stats"] = fn.stats.asdict()
        else:
            raise ValueError(kind)
    except Exception as exc:  # reported by the parent
        out["error"] = f"{type(exc).__name__}: {exc}"
    results.put(out)


def run_processes(kind: str, address: tuple[str, int], tag: str) -> tuple[list[dict], float]:
    """Run PROCESSES workers of ``kind``; return their reports and the wall time."""
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(kind, address, tag, barrier, results))
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    barrier.wait(JOIN_TIMEOUT)  # every worker is connected and ready: go
    start = time.perf_counter()
    reports = [results.get(timeout=JOIN_TIMEOUT) for _ in procs]
    wall = time.perf_counter() - start
    for proc in procs:
        proc.join(JOIN_TIMEOUT)
        if proc.is_alive():
            proc.kill()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"{kind}: {len(errors)} workers failed: {errors[0]}")
    return reports, wall


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    tag = f"{os.getpid()}-{time.time_ns()}"
    expected = PROCESSES * EVALUATIONS
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with memcached_server(threads=2) as address:
        client = _client(address)

        print(f"1. lost updates: {PROCESSES} processes x {EVALUATIONS} evaluations, one key")
        reports, wall = run_processes("naive-moments", address, tag)
        record = pickle.loads(client.get(reports[0]["key"]))
        rows.append(
            {
                "scenario": "running moments",
                "memoizer": "naive get/update/set (pyDVL 0.7.1 style)",
                "result": f"stored count {record['count']} of {expected}",
                "lost": expected - record["count"],
                "wall": wall,
            }
        )
        reports, wall = run_processes("memoshare-moments", address, tag)
        keys = {r["key"] for r in reports}
        assert len(keys) == 1, f"workers disagree on the key: {keys}"
        payload = EntryStore(MemcachedBackend(address)).read(keys.pop())
        moments = serialization.loads(payload) if payload is not None else None
        count = moments.count if isinstance(moments, Moments) else 0
        errors = sum(r["stats"]["errors"] + r["stats"]["timeouts"] for r in reports)
        rows.append(
            {
                "scenario": "running moments",
                "memoizer": "memoshare (gets/cas, retried)",
                "result": f"stored count {count} of {expected}",
                "lost": expected - count,
                "wall": wall,
                "store_errors": errors,
            }
        )

        print(f"2. stampede: {PROCESSES} processes, one {WORK_SECONDS} s (CPU) call, same argument")
        for kind, name in (
            ("naive-stampede", "naive get / compute / set, no lock"),
            ("memoshare-stampede", "memoshare (stampede protection, default)"),
        ):
            reports, wall = run_processes(kind, address, tag)
            runs = sum(bool(r["ran"]) for r in reports)
            assert all(r["value"] == 42 for r in reports), reports
            rows.append(
                {
                    "scenario": "stampede",
                    "memoizer": name,
                    "result": f"function ran {runs} time{'s' if runs != 1 else ''}",
                    "lost": "",
                    "wall": wall,
                }
            )
        client.close()
    elapsed = time.perf_counter() - started

    print()
    print("| scenario | memoizer | result | lost updates | wall time |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['scenario']} | {row['memoizer']} | {row['result']} | {row['lost']} "
            f"| {row['wall']:.2f} s |"
        )
    print(f"\n{os.cpu_count()} CPUs; whole run {elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
