"""Epoch times of a cached dataset on memcached, against the uncached dataset and raw get_many.

The dataset's ``__getitem__`` costs about 2 ms (a sleep standing for file reads and decoding)
and returns ``(float32 array of 3x32x32, label)``, about 12 KiB pickled. Measured:

* uncached epoch: ``dataset[i]`` for every index;
* first epoch: ``CachedDataset.__getitems__`` by batches, computing and writing every sample;
* cached epochs, per item: ``cached[i]`` (one ``get`` round trip per sample);
* cached epochs, batched: ``cached.__getitems__(batch)`` (one ``get_many`` per batch);
* raw: pymemcache ``get_many`` of the same keys (the same bytes, not deserialized), with the
  default client and with one using the socket timeouts that ``MemcachedBackend`` sets;
* with PyTorch installed, a DataLoader over the cached dataset (batches collated).

Target: a batched cached epoch within 1.5x of raw ``get_many`` per sample.

Usage::

    python benchmarks/bench_datasets.py [--samples 1000] [--batch 64] [--repeat 21] [--tensors]
                                        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pymemcache.client.base import Client

sys.path.insert(0, str(Path(__file__).parent))
from _servers import memcached_server  # noqa: E402

from memoshare import CachedDataset, MemcachedBackend  # noqa: E402


class SlowDataset:
    """``__getitem__`` costs ``delay`` seconds and returns a 3x32x32 float32 array (a torch
    tensor with ``tensors``) and a label."""

    def __init__(self, n: int, delay: float = 0.002, tensors: bool = False) -> None:
        self.n = n
        self.delay = delay
        self.tensors = tensors

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, int]:
        time.sleep(self.delay)
        image = np.full((3, 32, 32), i, np.float32)
        if self.tensors:
            import torch

            return torch.from_numpy(image), i % 10
        return image, i % 10


BATCHED = "cached epoch, __getitems__"
RAW = "raw get_many, default client"
RAW_TIMEOUTS = "raw get_many, backend's timeouts"


def timed(fn: Callable[[], Any], repeat: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeat`` runs of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def batches(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def run(samples: int, batch: int, repeat: int, tensors: bool = False) -> dict[str, float]:
    """Seconds per epoch of each variant (median of ``repeat`` for the cached ones)."""
    results: dict[str, float] = {}
    plan = batches(samples, batch)
    with memcached_server(memory_mb=512) as (host, port):
        backend = MemcachedBackend((host, port))
        data = SlowDataset(samples, tensors=tensors)
        data[0]  # imports torch (with --tensors) before anything is timed
        results["uncached epoch"] = timed(lambda: [data[i] for i in range(samples)])[0]

        cached = CachedDataset(
            data, backend=backend, dataset_name="bench", writer_buffer_size=batch, log_every=None
        )

        def first_epoch() -> None:
            for b in plan:
                cached.__getitems__(b)
            cached.flush()

        results["first epoch (compute + write)"] = timed(first_epoch)[0]
        assert cached.stats.misses == samples

        def per_item() -> None:
            for i in range(samples):
                cached[i]

        def batched() -> None:
            for b in plan:
                cached.__getitems__(b)

        # Two raw baselines: pymemcache's default client, and one with the socket timeouts
        # MemcachedBackend sets (a socket with a timeout polls before each recv).
        raw_default = Client((host, port), no_delay=True)
        raw_timeouts = Client((host, port), no_delay=True, timeout=1.0, connect_timeout=1.0)
        key_plan = [[cached.key(i) for i in b] for b in plan]

        def raw(client: Client) -> Callable[[], None]:
            def run_raw() -> None:
                for keys in key_plan:
                    client.get_many(keys)

            return run_raw

        sizes = [len(v) for v in raw_default.get_many(key_plan[0]).values()]
        results["sample bytes"] = statistics.mean(sizes)
        variants = {
            "cached epoch, per item": per_item,
            BATCHED: batched,
            RAW: raw(raw_default),
            RAW_TIMEOUTS: raw(raw_timeouts),
        }
        for fn in variants.values():
            fn()  # warm-up: connections, allocator
        # Interleaved, so that a slow moment of the machine hits every variant alike.
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeat):
            for name, fn in variants.items():
                times[name] += timed(fn)
        for name, values in times.items():
            results[name] = statistics.median(values)
            results[f"{name} (best)"] = min(values)
        # Each repeat runs the variants back to back: the ratio within a repeat cancels the
        # slow moments of a shared machine better than a ratio of medians.
        for raw_name in (RAW, RAW_TIMEOUTS):
            paired = [b / r for b, r in zip(times[BATCHED], times[raw_name], strict=True)]
            results[f"ratio to {raw_name}"] = statistics.median(paired)
        assert cached.stats.misses == samples  # nothing was recomputed

        try:
            import torch.utils.data as tud
        except ImportError:
            return results
        for workers in (0, 2):
            loader = tud.DataLoader(cached, batch_size=batch, num_workers=workers)
            timed(lambda loader=loader: list(loader))
            results[f"DataLoader(num_workers={workers}), cached"] = statistics.median(
                timed(lambda loader=loader: list(loader), repeat)
            )
    return results


def persistent_workers(samples: int, batch: int) -> dict[str, float]:
    """Second-epoch seconds of a DataLoader with 2 persistent, shuffling workers, for several
    ``flush_interval`` values, and of the same loader over a cache written in full first.

    Samples computed in epoch 1 may still wait in a worker's write buffer when epoch 2 asks
    another worker for them: that worker must not wait longer than the buffer's write.
    """
    import torch
    import torch.utils.data as tud

    epochs: dict[str, float] = {}
    with memcached_server(memory_mb=256) as (host, port):
        backend = MemcachedBackend((host, port))
        for label, flush_interval in (("fully flushed", 0.05), ("3 s", 3.0), ("None", None)):
            cached = CachedDataset(
                SlowDataset(samples),
                backend=backend,
                dataset_name=f"persistent-{label}",
                writer_buffer_size=10 * batch,  # larger than an epoch's share of a worker
                flush_interval=flush_interval,
                log_every=None,
            )
            loader = tud.DataLoader(
                cached,
                batch_size=batch,
                num_workers=2,
                persistent_workers=True,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
            )
            list(loader)  # epoch 1: computes
            if label == "fully flushed":
                time.sleep(0.5)  # every buffer written before epoch 2
            epochs[label] = timed(lambda loader=loader: list(loader))[0]
            del loader
    return {f"persistent workers, epoch 2, flush_interval={k}": v for k, v in epochs.items()}


def report(results: dict[str, float], samples: int, tensors: bool) -> None:
    """Print the table and the ratios to the target."""
    size = results.pop("sample bytes")
    kind = "torch tensor" if tensors else "numpy array"
    print(f"{samples} samples ({kind} + label) of {size / 1024:.1f} KiB, memcached on loopback")
    print(f"{'variant':40} {'epoch (s)':>10} {'us/sample':>10} {'best us/sample':>15}")
    for name, seconds in results.items():
        if name.endswith("(best)") or name.startswith("ratio"):
            continue
        best = results.get(f"{name} (best)")
        best_text = f"{best / samples * 1e6:15.1f}" if best is not None else ""
        print(f"{name:40} {seconds:10.4f} {seconds / samples * 1e6:10.1f} {best_text}")
    for raw in (RAW, RAW_TIMEOUTS):
        paired = results[f"ratio to {raw}"]
        best = results[f"{BATCHED} (best)"] / results[f"{raw} (best)"]
        verdict = "meets" if paired <= 1.5 else "misses"
        print(f"__getitems__ / {raw}: {paired:.2f}x (median of paired runs; {best:.2f}x "
              f"best to best): {verdict} the 1.5x target")  # fmt: skip
    speedup = results["uncached epoch"] / results[BATCHED]
    print(f"cached epoch (__getitems__) vs uncached: {speedup:.0f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--tensors", action="store_true", help="samples hold torch tensors")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    results = run(args.samples, args.batch, args.repeat, args.tensors)
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        persistent = persistent_workers(args.samples, args.batch)
        flushed = persistent["persistent workers, epoch 2, flush_interval=fully flushed"]
        for name, seconds in persistent.items():
            print(f"{name:60} {seconds:8.3f} s  {seconds / flushed:5.2f}x of fully flushed")
        results.update(persistent)
    if args.json:  # before report(), which takes "sample bytes" out of the results
        settings = {"samples": args.samples, "batch": args.batch, "tensors": args.tensors}
        # results: seconds per epoch (median and best of the repeats), "sample bytes", ratios
        args.json.write_text(json.dumps({**settings, "results": results}, indent=2))
    report(results, args.samples, args.tensors)


if __name__ == "__main__":
    main()
