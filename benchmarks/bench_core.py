"""Hit latency and hashing throughput of memoshare, side by side with the raw operations.

Run from the repository root::

    .venv/bin/python benchmarks/bench_core.py
    .venv/bin/python benchmarks/bench_core.py --pydvl-python /tmp/pydvl-venv/bin/python

What is measured (each against its baseline, in the same run):

a. a memoized function hit on memcached (a small return value, and a ~100 KB numpy array)
   against a raw ``pymemcache`` ``Client.get`` of the very bytes memoshare stored, from the
   same server, with the same socket options;
b. a hit on the embedded default (``DiskBackend``, LMDB) and on ``MemoryBackend``;
c. ``memoshare.value_digest`` of a 10 MiB array against ``hashlib.blake2b`` over its buffer;
d. a raw ``get`` of a small value from diskcache and from LMDB (why LMDB is the default).

Variants of one comparison run in interleaved rounds (A, B, A, B, ...) and the figures are
medians over the rounds, so that a burst of load on a shared machine hits both sides alike.
Ratios are medians of the per-round ratios. Every loop is bounded; a run takes about a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import memcached_server  # noqa: E402

import memoshare  # noqa: E402
from memoshare import DiskBackend, MemcachedBackend, MemoryBackend, memoize, value_digest  # noqa: E402

US = 1e6
# Keep the benchmark's own counters out of the shared totals (where that option exists).
_NO_SHARED = (
    {"shared_stats": False}
    if "shared_stats" in inspect.signature(memoshare.MemoizedFunction.__init__).parameters
    else {}
)
PAYLOAD_BYTES = 100 * 1024
HASH_BYTES = 10 * 1024 * 1024

# -- timing -----------------------------------------------------------------------------------


def interleaved(
    variants: dict[str, Callable[[], Any]], *, batch: int, rounds: int, warmup: int = 200
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round; variants alternate each round."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    perf_counter = time.perf_counter
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            start = perf_counter()
            for _ in range(batch):
                fn()
            samples[name].append((perf_counter() - start) / batch)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a / b``: robust to load that changes from round to round."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


class Report:
    """Rows of the result table, and the same figures as JSON."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print(f"  {row['name']}: {row['memoshare']} vs {row['baseline']} -> {row['ratio']}")

    def markdown(self) -> str:
        lines = [
            "| benchmark | memoshare | baseline | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in self.rows:
            lines.append(
                f"| {row['name']} | {row['memoshare']} | {row['baseline']} | {row['ratio']} "
                f"| {row.get('target', '')} | {row.get('met', '')} |"
            )
        return "\n".join(lines)


def yes_no(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**no**")


# -- a. memcached hit ---------------------------------------------------------------------------


def bench_memcached(
    report: Report, address: tuple[str, int], batch: int, rounds: int
) -> list[dict[str, Any]]:
    """Rows of (a); returns where the time of each hit goes (see ``breakdown_table``)."""
    from pymemcache.client.base import Client

    from memoshare import serialization
    from memoshare.client import CacheClient
    from memoshare.storage import EntryStore

    backend = MemcachedBackend(address)
    array = np.random.default_rng(0).random(PAYLOAD_BYTES // 8)
    blob = os.urandom(PAYLOAD_BYTES)

    @memoize(backend, **_NO_SHARED)
    def small_value(x: int) -> float:
        return x * 0.5

    @memoize(backend, **_NO_SHARED)
    def large_bytes(x: int) -> bytes:
        return blob[x:]

    @memoize(backend, **_NO_SHARED)
    def large_array(x: int) -> np.ndarray:
        return array * x

    # The raw client has the socket options of memoshare's own client (MemcachedBackend's
    # defaults: 1 s timeouts, TCP_NODELAY), so the difference is memoshare's work.
    raw = Client(address, connect_timeout=1.0, timeout=1.0, no_delay=True)
    breakdown = []
    entries = EntryStore(backend)
    client = CacheClient(backend, "bench")
    cases = (
        ("small value", small_value),
        ("100 KB bytes", large_bytes),
        ("100 KB ndarray", large_array),
    )
    for label, fn in cases:
        fn(3)  # miss: computes and stores
        key = fn.cache_key(3)
        payload = raw.get(key)
        assert payload is not None and fn(3) is not None and fn.stats.hits >= 1
        samples = interleaved(
            {
                "memoshare": lambda fn=fn: fn(3),
                "raw": lambda key=key: raw.get(key),
                # the hit path cut short at each layer, from the socket up
                # (CacheClient.lookup is EntryStore.read + loads + error handling)
                "backend.get": lambda key=key: backend.get(key),
                "read_entry": lambda key=key: entries.read(key),
                "read+loads": lambda key=key: serialization.loads(entries.read(key)),
                "lookup": lambda key=key: client.lookup(key),
                "key": lambda fn=fn: fn.cache_key(3),
            },
            batch=batch,
            rounds=rounds,
        )
        ratio = paired_ratio(samples["memoshare"], samples["raw"])
        report.add(
            name=f"memcached hit, {label} ({len(payload):,} B entry)",
            memoshare=f"{median(samples['memoshare']) * US:.1f} µs",
            baseline=f"{median(samples['raw']) * US:.1f} µs (pymemcache get)",
            ratio=f"{ratio:.2f}×",
            target="≤ 1.20×",
            met=yes_no(ratio <= 1.2),
            value=ratio,
        )
        breakdown.append({"case": label, **{k: median(v) * US for k, v in samples.items()}})
    bench_unstored(report, backend, raw, batch=batch, rounds=rounds)
    raw.close()
    backend.close()
    return breakdown


def bench_unstored(report: Report, backend: Any, raw: Any, batch: int, rounds: int) -> None:
    """A call faster than ``time_threshold`` (pyDVL's default 0.3 s): not stored, so every
    call computes; with stampede protection on (the default) it must still cost no more than
    its own lookup (pyDVL 0.7.1 pays one get too)."""

    @memoize(backend, time_threshold=0.3, **_NO_SHARED)
    def fast(x: int) -> float:
        return x * 0.5

    fast(5)  # the first caller leaves the "not stored" mark
    key = fast.cache_key(5)
    fresh = iter(range(10, 10**9))  # a new key at every call: pyDVL's distinct subsets
    samples = interleaved(
        {
            "repeated": lambda: fast(5),
            "new": lambda: fast(next(fresh)),
            "raw": lambda: raw.get(key),
        },
        batch=batch,
        rounds=rounds,
    )
    assert fast.stats.sets == 0 and fast.stats.hits == 0
    for variant, label in (("repeated", "a repeated key"), ("new", "a new key each call")):
        ratio = paired_ratio(samples[variant], samples["raw"])
        report.add(
            name=f"memcached call not stored (time_threshold=0.3 not reached), {label}",
            memoshare=f"{median(samples[variant]) * US:.1f} µs",
            baseline=f"{median(samples['raw']) * US:.1f} µs (pymemcache get)",
            ratio=f"{ratio:.2f}×",
            target="≤ 1.10×",
            met=yes_no(ratio <= 1.1),
            value=ratio,
        )


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    """Where the time of a memcached hit goes (µs, medians).

    Each row adds one layer of the hit path to the previous one, measured in sequence as the
    hit runs it (so the memory traffic of a large value is counted where it happens); the key
    is measured alone.
    """
    lines = [
        "| layer (µs) | " + " | ".join(row["case"] for row in rows) + " |",
        "| --- |" + " --- |" * len(rows),
    ]
    stages = [
        ("pymemcache `Client.get` (the raw baseline)", lambda r: r["raw"]),
        ("+ `MemcachedBackend.get` (`_call` wrapper)", lambda r: r["backend.get"] - r["raw"]),
        ("+ `EntryStore.read` (manifest check)", lambda r: r["read_entry"] - r["backend.get"]),
        ("+ `serialization.loads` (unpickle)", lambda r: r["read+loads"] - r["read_entry"]),
        ("+ `CacheClient.lookup` (error handling)", lambda r: r["lookup"] - r["read+loads"]),
        ("+ key, dispatch, stats (`__call__`)", lambda r: r["memoshare"] - r["lookup"]),
        ("  of which `KeyBuilder.key` alone (via `cache_key`)", lambda r: r["key"]),
        ("**whole hit**", lambda r: r["memoshare"]),
    ]
    for name, stage in stages:
        lines.append(f"| {name} | " + " | ".join(f"{stage(r):.1f}" for r in rows) + " |")
    return "\n".join(lines)


PYDVL_SCRIPT = r"""
import json, statistics, sys, time
from hashlib import blake2b
import numpy as np
from pymemcache.client.base import Client
from pydvl.utils.caching import memcached, serialize
from pydvl.utils.config import MemcachedClientConfig

host, port, batch, rounds, nbytes = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:])
config = MemcachedClientConfig(server=(host, port), connect_timeout=1.0, timeout=1.0)
big = np.random.default_rng(0).random(nbytes // 8)

def small_result(x):
    return x * 0.5

def large_result(x):
    return big * x

raw = Client((host, port), connect_timeout=1.0, timeout=1.0, no_delay=True)
out = {"version": __import__("pydvl").__version__}
for label, fun in (("small", small_result), ("large", large_result)):
    cached = memcached(client_config=config, time_threshold=0.0)(fun)
    cached(3)  # miss: pyDVL stores with noreply=True, so wait until the entry is there
    key = blake2b(cached._signature + serialize(((3,), []))).hexdigest().encode("ASCII")
    for _ in range(100):
        payload = raw.get(key)
        if payload is not None:
            break
        time.sleep(0.01)
    assert payload is not None, "pyDVL did not store its entry"
    variants = {"pydvl": lambda: cached(3), "raw": lambda: raw.get(key)}
    for f in variants.values():
        for _ in range(200):
            f()
    samples = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:
            f = variants[name]
            t = time.perf_counter()
            for _ in range(batch):
                f()
            samples[name].append((time.perf_counter() - t) / batch)
    assert cached.stats.hits > 0
    out[label] = {
        "pydvl": statistics.median(samples["pydvl"]),
        "raw": statistics.median(samples["raw"]),
        "ratio": statistics.median(a / b for a, b in zip(samples["pydvl"], samples["raw"])),
        "entry_bytes": len(payload),
    }
print(json.dumps(out))
"""


def bench_pydvl(
    report: Report, python: str, address: tuple[str, int], batch: int, rounds: int
) -> None:
    argv = [python, "-c", PYDVL_SCRIPT, address[0], str(address[1])]
    argv += [str(batch), str(rounds), str(PAYLOAD_BYTES)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        stderr = (getattr(exc, "stderr", "") or "").strip().splitlines()
        print(f"  pyDVL comparison skipped: {type(exc).__name__}: {stderr[-1:] or exc}")
        return
    for label, part in (("small value", "small"), ("100 KB ndarray", "large")):
        fig = result[part]
        report.add(
            name=f"pyDVL {result['version']} memcached hit, {label} ({fig['entry_bytes']:,} B)",
            memoshare=f"{fig['pydvl'] * US:.1f} µs (pyDVL)",
            baseline=f"{fig['raw'] * US:.1f} µs (pymemcache get)",
            ratio=f"{fig['ratio']:.2f}×",
            target="(reference)",
            met="",
            value=fig["ratio"],
        )


# -- b. local hits ------------------------------------------------------------------------------


def bench_local(report: Report, tmp: Path, batch: int, rounds: int) -> None:
    disk = DiskBackend(tmp / "disk")
    memory = MemoryBackend()

    @memoize(disk, **_NO_SHARED)
    def on_disk(x: int) -> float:
        return x * 0.5

    @memoize(memory, **_NO_SHARED)
    def in_memory(x: int) -> float:
        return x * 0.5

    on_disk(3)
    in_memory(3)
    samples = interleaved(
        {"disk": lambda: on_disk(3), "memory": lambda: in_memory(3)},
        batch=batch,
        rounds=rounds,
    )
    assert on_disk.stats.hits > 0 and in_memory.stats.hits > 0
    disk_us = median(samples["disk"]) * US
    report.add(
        name="embedded default (DiskBackend, LMDB) hit, small value",
        memoshare=f"{disk_us:.2f} µs",
        baseline="",
        ratio="",
        target="≤ 10 µs",
        met=yes_no(disk_us <= 10),
        value=disk_us,
    )
    report.add(
        name="MemoryBackend hit, small value",
        memoshare=f"{median(samples['memory']) * US:.2f} µs",
        baseline="",
        ratio="",
        target="",
        met="",
        value=median(samples["memory"]) * US,
    )


# -- c. hashing ---------------------------------------------------------------------------------


def bench_hashing(report: Report, rounds: int) -> None:
    array = np.random.default_rng(1).random(HASH_BYTES // 8)
    samples = interleaved(
        {
            "value_digest": lambda: value_digest(array),
            "blake2b": lambda: hashlib.blake2b(array.data, digest_size=32).digest(),
        },
        batch=1,
        rounds=rounds,
        warmup=2,
    )
    throughput = paired_ratio(samples["blake2b"], samples["value_digest"])

    def gbs(seconds: float) -> str:
        return f"{HASH_BYTES / seconds / 1e9:.2f} GB/s"

    report.add(
        name="hash a 10 MiB float64 array",
        memoshare=f"{gbs(median(samples['value_digest']))} (value_digest)",
        baseline=f"{gbs(median(samples['blake2b']))} (hashlib.blake2b)",
        ratio=f"{throughput:.2f}× throughput",
        target="≥ 0.90×",
        met=yes_no(throughput >= 0.9),
        value=throughput,
    )


# -- d. diskcache vs LMDB -----------------------------------------------------------------------


def bench_stores(report: Report, tmp: Path, batch: int, rounds: int) -> None:
    try:
        import diskcache
    except ImportError:
        print("  diskcache is not installed (pip install diskcache): comparison skipped")
        return
    import lmdb

    value = os.urandom(100)
    cache = diskcache.Cache(str(tmp / "diskcache"))
    cache.set("key", value)
    env = lmdb.open(str(tmp / "lmdb"), map_size=64 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"key", value)

    def lmdb_get() -> bytes | None:
        with env.begin() as txn:
            return txn.get(b"key")

    assert cache.get("key") == value and lmdb_get() == value
    samples = interleaved(
        {"diskcache": lambda: cache.get("key"), "lmdb": lmdb_get}, batch=batch, rounds=rounds
    )
    ratio = paired_ratio(samples["diskcache"], samples["lmdb"])
    report.add(
        name="raw get of a 100 B value: diskcache (SQLite) vs LMDB",
        memoshare=f"{median(samples['lmdb']) * US:.2f} µs (LMDB)",
        baseline=f"{median(samples['diskcache']) * US:.2f} µs (diskcache)",
        ratio=f"diskcache {ratio:.1f}× slower",
        target="(reference)",
        met="",
        value=ratio,
    )
    cache.close()
    env.close()


# -- main ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "memoshare": memoshare.__version__,
        "numpy": np.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pydvl-python",
        help="a Python interpreter with pydvl==0.7.1 installed, to compare its @memcached hit",
    )
    parser.add_argument("--rounds", type=int, default=25, help="rounds per comparison")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    rounds = max(3, args.rounds)

    info = machine()
    print(f"machine: {info}")
    report = Report()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memoshare-bench-") as tmp:
        print("a. memcached hit")
        with memcached_server() as address:
            breakdown = bench_memcached(report, address, batch=200, rounds=rounds)
            if args.pydvl_python:
                bench_pydvl(report, args.pydvl_python, address, batch=300, rounds=rounds)
        print("b. local hits")
        bench_local(report, Path(tmp), batch=5000, rounds=rounds)
        print("c. hashing")
        bench_hashing(report, rounds=rounds)
        print("d. diskcache vs LMDB")
        bench_stores(report, Path(tmp), batch=5000, rounds=rounds)
    elapsed = time.perf_counter() - started
    print()
    print(report.markdown())
    print("\nWhere a memcached hit spends its time (layers added one at a time):\n")
    print(breakdown_table(breakdown))
    load = info["load_average"]
    print(f"\n{len(report.rows)} rows in {elapsed:.0f} s; load average at start {load}")
    if args.json:
        figures = {"machine": info, "rows": report.rows, "breakdown": breakdown}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
