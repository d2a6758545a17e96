"""CacheLoader (:mod:`memoshare.datasets.loader`): keyed entries on every store, and inside a
dataset that augments its samples."""

from __future__ import annotations

from typing import Any

import numpy as np

from memoshare import CacheLoader


def test_cache_loader_on_every_backend(any_backend) -> None:  # type: ignore[no-untyped-def]
    calls: list[Any] = []

    def load(key: Any) -> Any:
        calls.append(key)
        return {"key": key, "pixels": np.arange(4) * len(calls)}

    loader = CacheLoader(any_backend, dataset_name="aug", writer_buffer_size=3)
    first = [loader.get(k, load)["key"] for k in (0, 1, "two", (3, "x"))]
    assert first == [0, 1, "two", (3, "x")]
    assert loader.pending == 1  # one batch of 3 written, one waiting
    assert loader.get((3, "x"), load)["key"] == (3, "x")  # from the buffer
    assert loader.num_keys() == 4 and loader.pending == 0
    other = CacheLoader(any_backend, dataset_name="aug")
    assert [other.get(k, load)["key"] for k in (0, 1)] == [0, 1]
    assert calls == [0, 1, "two", (3, "x")]
    assert CacheLoader(any_backend, dataset_name="other").num_keys() == 0
    assert loader.stats.misses == 4 and other.stats.hits == 2


def test_cache_loader_in_a_dataset_with_augmentation(redis_backend) -> None:  # type: ignore[no-untyped-def]
    decoded: list[int] = []

    class Augmented:
        def __init__(self) -> None:
            self.cache = CacheLoader(redis_backend, dataset_name="augmented")
            self.rng = np.random.default_rng(0)

        def __len__(self) -> int:
            return 5

        def decode(self, i: int) -> np.ndarray:  # the slow, deterministic part
            decoded.append(i)
            return np.full(8, float(i))

        def __getitem__(self, i: int) -> np.ndarray:
            return self.cache.get(i, self.decode) + self.rng.normal(size=8)  # random part

    ds = Augmented()
    first = [ds[i] for i in range(5)]
    second = [ds[i] for i in range(5)]
    assert decoded == list(range(5))
    assert not np.allclose(first[0], second[0])  # augmented anew each time
