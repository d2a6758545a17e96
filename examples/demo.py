"""memoshare on the embedded default store: no server, shared by every process of the machine.

Run it twice: the second run finds every result of the first one on disk.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np

import memoshare
from memoshare import memoize


@memoize()
def simulate(seed: int, size: int = 200_000) -> float:
    """A stand-in for an expensive, pure computation (about half a second)."""
    time.sleep(0.5)
    rng = np.random.default_rng(seed)
    return float(rng.standard_normal(size).std())


def timed(label: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    value = fn(*args)
    print(f"  {label:<32} -> {value:.6f}   {1000 * (time.perf_counter() - start):8.2f} ms")


def worker(seed: int) -> float:
    return simulate(seed)


def main() -> None:
    print(f"store: {simulate.backend!r}")
    print("one process:")
    timed("simulate(1)", simulate, 1)
    timed("simulate(1) again", simulate, 1)
    timed("simulate(seed=1, size=200_000)", lambda: simulate(seed=1, size=200_000))
    print(f"  {simulate.stats}")

    print("four worker processes, seeds 0..7 (seed 1 is already stored):")
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(worker, range(8))
        pool.close()
        pool.join()  # a clean exit lets each worker flush its counts to the store
    print(f"  done in {time.perf_counter() - start:.2f} s")

    memoshare.flush_stats()
    print("totals of every process so far (`memoshare stats` prints the same):")
    rows = [r for r in memoshare.stats(namespace="memoshare") if r.function.endswith("simulate")]
    print(memoshare.shared_stats.format_table(rows))
    print("\nRun the demo again: every call is now a hit, served from disk.")


if __name__ == "__main__":
    main()
