"""Helpers of the dataset tests (test_dataset*.py, test_cache_loader.py); not collected.

Round trips are counted by subclasses of the real backends (nothing mocks a store); calls of
the wrapped dataset across processes are counted through a file that each call appends to.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from memoshare import DiskBackend, MemcachedBackend, MemoryBackend


class SlowDataset:
    """Sample ``i``: ``(float32 array of i, i, {"name": ...})``; logs each call to a file."""

    def __init__(self, n: int, log: Path | None = None, delay: float = 0.0, nbytes: int = 64):
        self.n = n
        self.log = str(log) if log else None
        self.delay = delay
        self.nbytes = nbytes
        self.calls: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.calls.append(i)
        if self.log:
            with open(self.log, "a") as f:  # one short O_APPEND write: atomic across processes
                f.write(f"{i}\n")
        if self.delay:
            time.sleep(self.delay)
        return (np.full(self.nbytes // 4, i, np.float32), i, {"name": f"s{i}"})


def logged_calls(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def expected(i: int, nbytes: int = 64) -> Any:
    return (np.full(nbytes // 4, i, np.float32), i, {"name": f"s{i}"})


def assert_sample(got: Any, i: int, nbytes: int = 64) -> None:
    array, label, meta = got
    np.testing.assert_array_equal(np.asarray(array), expected(i, nbytes)[0])
    assert int(label) == i
    assert meta == {"name": f"s{i}"}


class RoundTrips:
    """Mixin counting the store operations of a real backend."""

    def _count(self, op: str) -> None:
        counts = self.__dict__.setdefault("counts", Counter())
        counts[op] += 1

    def get(self, key):  # type: ignore[no-untyped-def]
        self._count("get")
        return super().get(key)  # type: ignore[misc]

    def get_many(self, keys):  # type: ignore[no-untyped-def]
        self._count("get_many")
        return super().get_many(keys)  # type: ignore[misc]

    def set(self, key, value, expire=None):  # type: ignore[no-untyped-def]
        self._count("set")
        return super().set(key, value, expire)  # type: ignore[misc]

    def set_many(self, items, expire=None):  # type: ignore[no-untyped-def]
        self._count("set_many")
        self.__dict__.setdefault("batches", []).append(len(items))
        return super().set_many(items, expire)  # type: ignore[misc]

    def add(self, key, value, expire=None):  # type: ignore[no-untyped-def]
        self._count("add")
        return super().add(key, value, expire)  # type: ignore[misc]

    def delete(self, key):  # type: ignore[no-untyped-def]
        self._count("delete")
        return super().delete(key)  # type: ignore[misc]

    def delete_many(self, keys):  # type: ignore[no-untyped-def]
        self._count("delete_many")
        return super().delete_many(keys)  # type: ignore[misc]


class CountingMemcached(RoundTrips, MemcachedBackend):
    pass


class CountingMemory(RoundTrips, MemoryBackend):
    pass


class CountingDisk(RoundTrips, DiskBackend):
    pass


def run_python(code: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
