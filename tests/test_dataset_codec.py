"""The sample codec (:mod:`memoshare.datasets.codec`): arrays and tensors in samples come back
equal, with their types, dtypes, shapes and flags."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pytest

from memoshare import CachedDataset, MemcachedBackend


def assert_same(got: Any, want: Any) -> None:
    """Equal values of the same types, dtypes, shapes (and grad flags for tensors)."""
    assert type(got) is type(want), (type(got), type(want))
    if type(want).__module__.startswith("torch"):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.requires_grad == want.requires_grad
        assert bool((got.detach() == want.detach()).all())
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable  # arrays come back writable, as pickle gives them
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    else:
        assert got == want


def test_array_samples_come_back_equal(memcached_backend: MemcachedBackend) -> None:
    read_only = np.arange(5)
    read_only.flags.writeable = False
    samples = [
        (np.full((3, 4), 1.5, np.float32), 1),
        {"empty": np.zeros((2, 0, 3)), "scalar": np.array(7), "swapped": np.arange(3, dtype=">i4")},
        [read_only, np.array([1 + 2j]), np.array([True, False]), np.float32(3)],
        (np.asfortranarray(np.arange(6).reshape(2, 3)), np.array(["a", "bc"])),
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
        np.zeros((200, 200)),  # large enough for out-of-band buffers
    ]
    ds = CachedDataset(samples, backend=memcached_backend, dataset_name="arrays")
    ds.__getitems__(range(len(samples)))
    for sample, got in zip(samples, ds.__getitems__(range(len(samples))), strict=True):
        assert_same(got, sample)
    assert ds.stats.hits == len(samples)


def test_tensor_samples_come_back_equal(memcached_backend: MemcachedBackend) -> None:
    torch = pytest.importorskip("torch")
    pair = collections.namedtuple("pair", "image label")
    samples = [
        (torch.arange(12.0).reshape(3, 4), torch.tensor(3)),
        pair(torch.ones(2, 2, dtype=torch.uint8), 5),
        {"x": torch.zeros(0), "y": [torch.tensor([True, False]), "text"]},
        torch.arange(10)[::2],  # a strided view: torch's own pickling
        torch.arange(10.0)[5:],  # a contiguous view into a larger storage
        torch.ones(2, requires_grad=True),
        torch.ones(2, dtype=torch.bfloat16),
        torch.nn.Parameter(torch.ones(2)),
        torch.randn(2, dtype=torch.complex64),
    ]
    ds = CachedDataset(samples, backend=memcached_backend, dataset_name="tensors")
    ds.__getitems__(range(len(samples)))
    cached = ds.__getitems__(range(len(samples)))
    assert ds.stats.hits == len(samples)
    for sample, got in zip(samples, cached, strict=True):
        assert_same(got, sample)
    cached[0][0].add_(1)  # plain tensors come back writable
    assert_same(ds[0], samples[0])  # and the cached copy is not changed
