"""The cache of one named dataset (:mod:`memoshare.datasets.cache`): falsy samples, keys,
names, versions and the stored length; round trips per batch and per missed sample, chunked
samples; unpicklable samples; strict mode on store errors."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from datasets_helpers import CountingMemcached, SlowDataset, assert_sample

from memoshare import (
    BackendError,
    CachedDataset,
    CacheLoader,
    DiskBackend,
    MemcachedBackend,
    MemoryBackend,
)


# -- lookups ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample", [None, 0, "", [], {}, False, 0.0, b""])
def test_falsy_samples_are_cached(memory_backend: MemoryBackend, sample: Any) -> None:
    calls = []

    class Falsy:
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> Any:
            calls.append(i)
            return sample

    ds = CachedDataset(Falsy(), backend=memory_backend, dataset_name="falsy")
    assert [ds[i] for i in range(3)] == [sample] * 3
    assert [ds[i] for i in range(3)] == [sample] * 3
    assert ds.__getitems__([0, 1, 2]) == [sample] * 3
    assert calls == [0, 1, 2] and ds.stats.hits == 6


# -- keys ------------------------------------------------------------------------------------------


def test_names_and_keys_cannot_collide(redis_backend) -> None:  # type: ignore[no-untyped-def]
    a = CacheLoader(redis_backend, dataset_name="a")
    ab = CacheLoader(redis_backend, dataset_name="a_b")
    assert a.get("b_2", lambda k: "from a") == "from a"
    assert ab.get("2", lambda k: "from a_b") == "from a_b"
    assert a.get("b_2", lambda k: "recomputed") == "from a"
    assert ab.get("2", lambda k: "recomputed") == "from a_b"
    assert a.key("b_2") != ab.key("2")
    # Keys are typed, and any plain value can be one.
    assert a.get(1, lambda k: "int") == "int" and a.get("1", lambda k: "str") == "str"
    assert a.get(("x", 1), lambda k: k) == ("x", 1)

    one = CachedDataset(["one"] * 3, backend=redis_backend, dataset_name="ds1")
    two = CachedDataset(["two"] * 3, backend=redis_backend, dataset_name="ds2")
    assert one[0] == "one" and two[0] == "two" and one[0] == "one"
    # A name may hold any character; the same name reuses the samples.
    odd = CachedDataset(["x"], backend=redis_backend, dataset_name="a b:c/\u00e9 ~lease")
    assert odd[0] == "x"
    reuse = CachedDataset(["stale?"] * 3, backend=redis_backend, dataset_name="ds1")
    assert reuse[0] == "one"


def test_version_keeps_stale_samples_out(disk_backend: DiskBackend) -> None:
    v1 = CachedDataset(["old"] * 2, backend=disk_backend, dataset_name="v", version="resize=64")
    assert v1[0] == "old"
    v2 = CachedDataset(["new"] * 2, backend=disk_backend, dataset_name="v", version="resize=96")
    assert v2[0] == "new"
    again = CachedDataset(["?"] * 2, backend=disk_backend, dataset_name="v", version="resize=64")
    assert again[0] == "old"
    params = {"size": 96, "mean": (0.5, 0.5)}
    v3 = CachedDataset(["p"] * 2, backend=disk_backend, dataset_name="v", version=params)
    assert v3[1] == "p"


def test_another_length_under_the_same_name_is_refused(memory_backend: MemoryBackend) -> None:
    CachedDataset([1, 2, 3], backend=memory_backend, dataset_name="len")
    with pytest.raises(ValueError, match="version="):
        CachedDataset([1, 2, 3, 4], backend=memory_backend, dataset_name="len")
    CachedDataset([1, 2, 3, 4], backend=memory_backend, dataset_name="len", version=2)


# -- reads -----------------------------------------------------------------------------------------


def test_getitems_is_one_round_trip_per_batch(memcached_server) -> None:  # type: ignore[no-untyped-def]
    backend = CountingMemcached(memcached_server.address)
    backend.clear()
    data = SlowDataset(64)
    ds = CachedDataset(data, backend=backend, dataset_name="rt1", writer_buffer_size=8)
    for i in range(0, 64, 2):  # half of them cached beforehand
        ds[i]
    ds.flush()
    data.calls.clear()
    batches = [list(range(s, s + 16)) for s in range(0, 64, 16)]
    for batch in batches:
        for i, sample in zip(batch, ds.__getitems__(batch), strict=True):
            assert_sample(sample, i)
    assert sorted(data.calls) == list(range(1, 64, 2))  # only the missing ones computed
    ds.flush()
    backend.counts.clear()
    for batch in batches:  # a cached epoch
        ds.__getitems__(batch)
    assert backend.counts == Counter(get_many=len(batches))


def test_a_missed_sample_costs_a_lease_add_and_a_get(memcached_server) -> None:  # type: ignore[no-untyped-def]
    backend = CountingMemcached(memcached_server.address)
    backend.clear()
    ds = CachedDataset(
        SlowDataset(16), backend=backend, dataset_name="rt-miss", writer_buffer_size=16
    )
    backend.counts.clear()  # the manifest
    ds.__getitems__(list(range(16)))
    # Per batch: the read and the write. Per missed sample: take the lease and read the
    # sample again (another process may have stored it since the batch read). The leases of
    # written samples are let go (no longer renewed), not deleted: a waiter finds the sample.
    assert backend.counts == Counter(get_many=1, set_many=1, add=16, get=16)


def test_large_samples_are_chunked(memcached_server) -> None:  # type: ignore[no-untyped-def]
    backend = CountingMemcached(memcached_server.address, max_item_size=4096)
    backend.clear()
    ds = CachedDataset(SlowDataset(4, nbytes=20_000), backend=backend, dataset_name="big")
    ds.__getitems__([0, 1, 2, 3])
    backend.counts.clear()
    for i, sample in enumerate(ds.__getitems__([0, 1, 2, 3])):
        assert_sample(sample, i, nbytes=20_000)
    assert backend.counts == Counter(get_many=2)  # entries, then all their chunks


# -- samples that cannot be stored, strict mode ----------------------------------------------------
def test_unpicklable_samples_are_returned_uncached(
    memory_backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    lock = threading.Lock()
    ds = CachedDataset([lock, 1], backend=memory_backend, dataset_name="unpick")
    # The same policy as memoize's: one RuntimeWarning per cache, then DEBUG lines.
    with pytest.warns(RuntimeWarning, match="cannot be pickled") as caught:
        assert ds[0] is lock and ds[0] is lock and ds[1] == 1
    assert sum("cannot be pickled" in str(w.message) for w in caught) == 1
    assert ds.stats.misses == 3


def test_strict_mode_raises_store_errors(own_memcached) -> None:  # type: ignore[no-untyped-def]
    backend = MemcachedBackend(own_memcached.address, retry_interval=0.05, timeout=0.5)
    ds = CachedDataset(SlowDataset(4), backend=backend, dataset_name="strict", strict=True)
    own_memcached.kill()
    with pytest.raises(BackendError):
        ds[1]
