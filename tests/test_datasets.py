"""Dataset caching: CachedDataset and CacheLoader on real stores, with and without PyTorch.

Round trips are counted by subclasses of the real backends (nothing mocks a store); calls of
the wrapped dataset across processes are counted through a file that each call appends to.
"""

from __future__ import annotations

import collections
import logging
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import start_memcached, start_redis

from memoshare import (
    BackendError,
    CachedDataset,
    CacheLoader,
    DiskBackend,
    MemcachedBackend,
    MemoryBackend,
)
from memoshare.datasets import IncompleteCacheError
from memoshare.datasets.buffer import REFUSED_TRIES

# -- helpers ---------------------------------------------------------------------------------------


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


# -- samples come back equal, on every store -------------------------------------------------------


def test_samples_round_trip_on_every_backend(any_backend) -> None:  # type: ignore[no-untyped-def]
    data = SlowDataset(12)
    ds = CachedDataset(data, backend=any_backend, dataset_name="rt", writer_buffer_size=4)
    for i in range(12):
        assert_sample(ds[i], i)
    ds.flush()
    assert ds.stats.misses == 12 and ds.stats.sets == 12
    again = CachedDataset(SlowDataset(12), backend=any_backend, dataset_name="rt")
    for i in range(12):
        assert_sample(again[i], i)
    assert again.dataset.calls == [] and again.stats.hits == 12
    assert [s[1] for s in again.__getitems__([3, 1, 3, 11])] == [3, 1, 3, 11]
    assert again.num_cached() == 12 and again.is_complete()


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


def test_indices_behave_like_a_list(memory_backend: MemoryBackend) -> None:
    ds = CachedDataset(list("abcde"), backend=memory_backend, dataset_name="idx")
    assert ds[-1] == "e" and ds[4] == "e" and ds[np.int64(2)] == "c"
    assert ds.key(-1) == ds.key(4)
    for bad in (5, -6, 100):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]
    with pytest.raises(IndexError):
        ds.__getitems__([0, 5])
    with pytest.raises(TypeError, match="integers"):
        ds["a"]
    with pytest.raises(TypeError, match="integers"):
        ds[1:3]
    assert list(ds) == list("abcde")
    assert [x for x in ds] == list("abcde")


def test_non_map_style_datasets_are_refused(memory_backend: MemoryBackend) -> None:
    with pytest.raises(TypeError, match="__len__"):
        CachedDataset(iter([1, 2]), backend=memory_backend, dataset_name="x")
    with pytest.raises(TypeError, match="CacheLoader"):
        CachedDataset({"a": 1}, backend=memory_backend, dataset_name="x")

    class NoGetItem:
        def __len__(self) -> int:
            return 1

    with pytest.raises(TypeError, match="__getitem__"):
        CachedDataset(NoGetItem(), backend=memory_backend, dataset_name="x")
    with pytest.raises(TypeError, match="dataset_name"):
        CachedDataset([1], backend=memory_backend)
    with pytest.raises(ValueError, match="writer_buffer_size"):
        CachedDataset([1], backend=memory_backend, dataset_name="x", writer_buffer_size=0)
    with pytest.raises(TypeError, match="Bagua"):
        CachedDataset([1], backend="redis", dataset_name="x", capacity_per_node=10)


def test_torch_iterable_dataset_is_refused(memory_backend: MemoryBackend) -> None:
    torch = pytest.importorskip("torch")

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield 1

    with pytest.raises(TypeError, match="IterableDataset"):
        CachedDataset(Stream(), backend=memory_backend, dataset_name="x")


def test_name_attribute_of_the_dataset_is_the_default_name(memory_backend: MemoryBackend) -> None:
    class Named(list):
        name = "named-set"

    assert CachedDataset(Named([1]), backend=memory_backend).dataset_name == "named-set"


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


# -- writes ----------------------------------------------------------------------------------------


def test_writes_are_batched_and_buffered_samples_served(tmp_path: Path) -> None:
    backend = CountingDisk(tmp_path / "store")
    data = SlowDataset(10)
    with CachedDataset(
        data, backend=backend, dataset_name="buf", writer_buffer_size=4, flush_interval=None
    ) as ds:
        for i in range(10):
            ds[i]
        assert backend.batches == [4, 4]  # two full buffers, one round trip each
        assert ds.pending == 2
        assert_sample(ds[9], 9)  # served from the buffer
        assert data.calls == list(range(10)) and ds.stats.hits == 1
    assert backend.batches == [4, 4, 2]  # the rest on exit of the with block
    assert ds.samples_cached == 10 and ds.bytes_stored > 10 * 64


def test_batch_misses_are_written_in_one_round_trip(memcached_server) -> None:  # type: ignore[no-untyped-def]
    backend = CountingMemcached(memcached_server.address)
    backend.clear()
    ds = CachedDataset(SlowDataset(32), backend=backend, dataset_name="batchw", stampede=False)
    ds.__getitems__(list(range(16)))
    assert backend.batches == [16]


def test_flush_interval_writes_an_idle_buffer(memory_backend: MemoryBackend) -> None:
    ds = CachedDataset(
        SlowDataset(4), backend=memory_backend, dataset_name="idle", writer_buffer_size=100,
        flush_interval=0.2,
    )  # fmt: skip
    ds[0]
    deadline = time.monotonic() + 5
    while ds.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ds.pending == 0 and memory_backend.get(ds.key(0)) is not None


def test_a_sample_waiting_in_another_buffer_is_waited_for(
    memcached_backend: MemcachedBackend,
) -> None:
    # Two caches of one name stand for two processes: each has its own write buffer.
    writer = CachedDataset(
        SlowDataset(4), backend=memcached_backend, dataset_name="lease", writer_buffer_size=100,
        flush_interval=0.3,
    )  # fmt: skip
    writer[0]  # computed and buffered: its lease is held until it is written
    assert writer.pending == 1
    reader_data = SlowDataset(4)
    reader = CachedDataset(reader_data, backend=memcached_backend, dataset_name="lease")
    start = time.monotonic()
    assert_sample(reader[0], 0)
    assert reader_data.calls == []  # waited for the writer's flush instead of computing
    assert time.monotonic() - start < 5 and reader.stats.hits == 1
    assert memcached_backend.get(reader.key(0) + "~lease") is None  # released once written


def test_failed_writes_are_retried_counted_reported_and_bounded(
    own_memcached, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    backend = MemcachedBackend(own_memcached.address, retry_interval=0.05, timeout=0.5)
    ds = CachedDataset(
        SlowDataset(100), backend=backend, dataset_name="down", writer_buffer_size=2,
        flush_interval=None,
    )  # fmt: skip
    ds[0]
    own_memcached.kill()
    caplog.set_level(logging.WARNING, logger="memoshare")
    for i in range(1, 40):
        assert_sample(ds[i], i)  # the loop goes on uncached
    bound = ds._cache.buffer.max_pending
    assert ds.pending <= bound  # bounded while the store is down
    assert ds.samples_dropped == 40 - bound  # and what went is counted ...
    assert ds.stats.errors >= 1
    outage = [r for r in caplog.records if "cannot" in r.getMessage()]
    assert len(outage) == 1  # ... and reported: one warning per outage
    assert any("dropped" in r.getMessage() for r in caplog.records)
    own_memcached.start()
    time.sleep(0.1)
    ds.flush()  # the samples kept are retried and written
    assert ds.pending == 0 and ds.stats.reconnects >= 1
    assert any("again" in r.getMessage() for r in caplog.records)
    kept = CachedDataset(SlowDataset(100), backend=backend, dataset_name="down")
    assert kept.num_cached() == bound


def test_refused_writes_are_retried_then_dropped_counted_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from memoshare.backends.redis import RedisBackend

    class CountingRedis(RedisBackend):
        """A real Redis; counts how often each key was offered to it."""

        def set_many(self, items, expire=None):  # type: ignore[no-untyped-def]
            self.__dict__.setdefault("offered", Counter()).update(list(items))
            return super().set_many(items, expire)

    server = start_redis(maxmemory="2mb")
    try:
        backend = CountingRedis(port=server.port)
        backend.client.config_set("maxmemory-policy", "noeviction")  # refuse, do not evict
        caplog.set_level(logging.WARNING, logger="memoshare")
        data = SlowDataset(40, nbytes=200_000)
        ds = CachedDataset(data, backend=backend, dataset_name="full", writer_buffer_size=4)
        for i in range(40):
            assert_sample(ds[i], i, nbytes=200_000)  # the loop goes on
        ds.flush()
        assert ds.samples_dropped > 0 and ds.samples_cached + ds.samples_dropped == 40
        assert ds.pending == 0 and ds.stats.errors > 0
        # Retried before being given up: every sample missing from the store was offered to it
        # REFUSED_TRIES times at least (once, and dropped at once, used to be the rule).
        missing = [ds.key(i) for i in ds.missing_indices()]
        assert missing and all(backend.offered[k] >= REFUSED_TRIES for k in missing)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("refused" in m for m in messages) == 1
        assert any("dropped" in m for m in messages)
        assert not any("cannot" in m or "again" in m for m in messages)  # not an outage
    finally:
        server.stop()


def test_leases_of_dropped_samples_are_released(tmp_path: Path) -> None:
    # The store refuses the batch (a sample is above its size_limit). While the buffer retries
    # it the leases stay held; once it gives up, another process must not wait lease_timeout
    # for samples that nobody will write.
    backend = DiskBackend(tmp_path / "small", size_limit=10_000)
    writer = CachedDataset(
        SlowDataset(4, nbytes=20_000), backend=backend, dataset_name="drop",
        writer_buffer_size=4, flush_interval=None, lease_timeout=30,
    )  # fmt: skip
    writer.__getitems__([0, 1, 2, 3])  # refused once: kept for a retry
    leases = [writer.key(i) + "~lease" for i in range(4)]
    assert writer.pending == 4 and all(backend.get(lease) is not None for lease in leases)
    backend.set(leases[3], b"another process's token")  # ours expired, another took it
    writer.flush()  # refused again: dropped
    assert writer.pending == 0 and writer.samples_dropped == 4
    # Ours are released; the one another process holds now is left alone.
    assert [backend.get(lease) for lease in leases] == [None] * 3 + [b"another process's token"]
    reader_data = SlowDataset(4, nbytes=20_000)
    reader = CachedDataset(reader_data, backend=backend, dataset_name="drop", lease_timeout=30)
    start = time.monotonic()
    assert_sample(reader[0], 0, nbytes=20_000)
    assert time.monotonic() - start < 5 and reader_data.calls == [0]


def test_strict_mode_bounds_the_buffer_before_raising(tmp_path: Path) -> None:
    backend = DiskBackend(tmp_path / "small", size_limit=10_000)  # refuses every sample
    ds = CachedDataset(
        SlowDataset(100, nbytes=20_000), backend=backend, dataset_name="strict-bound",
        writer_buffer_size=2, strict=True, flush_interval=None,
    )  # fmt: skip
    raised = 0
    for i in range(100):
        try:
            ds[i]
        except BackendError:
            raised += 1
    assert raised >= 100 // 2  # every failed flush raises ...
    assert ds.pending <= ds._cache.buffer.max_pending  # ... once the buffer is bounded
    assert ds.samples_dropped == 100 - ds.pending
    ds._cache.buffer.discard()  # nothing left for the flush at exit to warn about


def test_strict_mode_raises_store_errors(own_memcached) -> None:  # type: ignore[no-untyped-def]
    backend = MemcachedBackend(own_memcached.address, retry_interval=0.05, timeout=0.5)
    ds = CachedDataset(SlowDataset(4), backend=backend, dataset_name="strict", strict=True)
    own_memcached.kill()
    with pytest.raises(BackendError):
        ds[1]


def test_buffer_is_flushed_at_interpreter_exit(tmp_path: Path) -> None:
    code = f"""
        import numpy as np
        from memoshare import CachedDataset, DiskBackend
        samples = [np.arange(i + 1) for i in range(10)]
        ds = CachedDataset(samples, backend=DiskBackend({str(tmp_path)!r}), dataset_name="exit",
                           writer_buffer_size=100, flush_interval=None)
        for i in range(10):
            ds[i]
        assert ds.pending == 10
        # no flush, no close: the interpreter exit must write them
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    reopened = CachedDataset.from_cache("exit", backend=DiskBackend(tmp_path))
    assert [len(reopened[i]) for i in range(10)] == list(range(1, 11))


def test_unpicklable_samples_are_returned_uncached(
    memory_backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    lock = threading.Lock()
    ds = CachedDataset([lock, 1], backend=memory_backend, dataset_name="unpick")
    with caplog.at_level(logging.WARNING, logger="memoshare"):
        assert ds[0] is lock and ds[0] is lock and ds[1] == 1
    assert sum("cannot be pickled" in r.getMessage() for r in caplog.records) == 1
    assert ds.stats.misses == 3


def test_large_samples_are_chunked(memcached_server) -> None:  # type: ignore[no-untyped-def]
    backend = CountingMemcached(memcached_server.address, max_item_size=4096)
    backend.clear()
    ds = CachedDataset(SlowDataset(4, nbytes=20_000), backend=backend, dataset_name="big")
    ds.__getitems__([0, 1, 2, 3])
    backend.counts.clear()
    for i, sample in enumerate(ds.__getitems__([0, 1, 2, 3])):
        assert_sample(sample, i, nbytes=20_000)
    assert backend.counts == Counter(get_many=2)  # entries, then all their chunks


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


def test_a_missed_sample_costs_a_lease_add_get_and_delete(memcached_server) -> None:  # type: ignore[no-untyped-def]
    backend = CountingMemcached(memcached_server.address)
    backend.clear()
    ds = CachedDataset(
        SlowDataset(16), backend=backend, dataset_name="rt-miss", writer_buffer_size=16
    )
    backend.counts.clear()  # the manifest
    ds.__getitems__(list(range(16)))
    # Per batch: the read, the write and the check of the lease tokens. Per missed sample:
    # take the lease, read the sample again (another process may have stored it since the
    # batch read) and delete the lease (one delete per key on memcached).
    assert backend.counts == Counter(
        get_many=2, set_many=1, add=16, get=16, delete_many=1, delete=16
    )


def test_evictions_are_recomputed_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = DiskBackend(tmp_path / "small", size_limit=20_000)
    data = SlowDataset(40, nbytes=2000)
    ds = CachedDataset(data, backend=backend, dataset_name="evict", log_every=None)
    caplog.set_level(logging.WARNING, logger="memoshare")
    for _ in range(2):
        for i in range(40):
            assert_sample(ds[i], i, nbytes=2000)
    assert data.calls.count(0) == 2  # evicted, recomputed ...
    assert ds.stats.misses == 80  # ... counted as a miss
    warnings = [r for r in caplog.records if "smaller than the dataset" in r.getMessage()]
    assert len(warnings) == 1


def test_the_eviction_warning_is_given_once_per_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two caches of one dataset (two DataLoader workers, say): one warning, the other is told
    # at INFO level.
    backend = DiskBackend(tmp_path / "small", size_limit=20_000)
    data = SlowDataset(40, nbytes=2000)
    workers = [CachedDataset(data, backend=backend, dataset_name="evict") for _ in range(2)]
    caplog.set_level(logging.INFO, logger="memoshare")
    for _ in range(2):
        for i in range(40):
            ds = workers[i % 2]  # each worker reads its own half (a sampler's shard)
            assert_sample(ds[i], i, nbytes=2000)
    told = [r for r in caplog.records if "smaller than the dataset" in r.getMessage()]
    assert [r.levelno for r in told] == [logging.WARNING, logging.INFO]


@pytest.mark.parametrize("store", ["redis", "memcached"])
def test_server_eviction_counters_are_read(store: str, caplog: pytest.LogCaptureFixture) -> None:
    if store == "redis":
        from memoshare.backends.redis import RedisBackend

        server = start_redis(maxmemory="3mb")
        backend: Any = RedisBackend(port=server.port)
    else:
        server = start_memcached(memory_mb=2, item_size="512k")
        backend = MemcachedBackend(server.address)
    try:
        caplog.set_level(logging.WARNING, logger="memoshare")
        data = SlowDataset(120, nbytes=60_000)  # ~7 MB: more than the store holds
        ds = CachedDataset(data, backend=backend, dataset_name="srv", writer_buffer_size=8)
        ds.__getitems__(list(range(120)))
        ds.flush()
        assert backend.info()["evictions"] > 0
        ds.__getitems__(list(range(40)))  # the oldest went first: recomputed
        assert ds.stats.misses > 120
        warned = [r for r in caplog.records if "smaller than the dataset" in r.getMessage()]
        assert len(warned) == 1 and "since this cache was opened" in warned[0].getMessage()
    finally:
        server.stop()


def test_stats_and_a_log_line_every_n_inserts(
    memory_backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    ds = CachedDataset(SlowDataset(40), backend=memory_backend, dataset_name="log", log_every=10)
    with caplog.at_level(logging.INFO, logger="memoshare"):
        for i in range(25):
            ds[i]
        ds.__getitems__(list(range(25, 40)))  # one write crossing 30: one line
    lines = [r.getMessage() for r in caplog.records if "samples cached" in r.getMessage()]
    assert len(lines) == 3 and "40 samples cached (" in lines[-1]
    assert ds.samples_cached == 40 and ds.bytes_stored >= 40 * 64


# -- pickling and DataLoader workers ---------------------------------------------------------------


def test_pickles_without_connections_or_buffer(memcached_backend: MemcachedBackend) -> None:
    ds = CachedDataset(
        SlowDataset(8), backend=memcached_backend, dataset_name="pick", writer_buffer_size=100
    )
    ds[0]
    ds.backend.get("warm-up")  # a live connection
    state = pickle.dumps(ds)
    assert b"socket" not in state
    copy = pickle.loads(state)
    assert copy.pending == 0 and copy.stats.calls == 0
    assert len(copy) == 8 and copy.dataset_name == "pick"
    assert_sample(copy[3], 3)
    assert copy.n == 8  # attributes of the wrapped dataset are reachable


def test_two_epochs_two_workers_second_epoch_computes_nothing(
    memcached_backend: MemcachedBackend, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    log = tmp_path / "calls"
    # A buffer larger than the dataset and no timed flush: only the workers' exit writes.
    ds = CachedDataset(
        SlowDataset(64, log=log), backend=memcached_backend, dataset_name="dl",
        writer_buffer_size=1000, flush_interval=None,
    )  # fmt: skip
    assert_sample(ds[0], 0)  # peeked at in the parent: its forked workers serve it from
    assert ds.pending == 1  # their copy of its buffer instead of waiting for its lease
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    for epoch in range(2):
        labels = sorted(int(x) for _, y, _ in loader for x in y)
        assert labels == list(range(64))
        if epoch == 0:
            assert sorted(logged_calls(log)) == list(range(64))
    assert len(logged_calls(log)) == 64  # the second epoch called __getitem__ zero times


def test_persistent_shuffling_workers_compute_each_sample_once(
    redis_backend, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    log = tmp_path / "calls"
    ds = CachedDataset(
        SlowDataset(48, log=log), backend=redis_backend, dataset_name="persist",
        writer_buffer_size=1000, flush_interval=0.1,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        ds, batch_size=6, num_workers=2, persistent_workers=True, shuffle=True
    )
    for _ in range(3):
        assert sorted(int(x) for _, y, _ in loader for x in y) == list(range(48))
    # Samples still buffered in one worker were waited for (lease), not recomputed by the other.
    assert sorted(logged_calls(log)) == list(range(48))


def test_spawned_workers_reopen_their_connections(
    memcached_backend: MemcachedBackend, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    log = tmp_path / "calls"
    ds = CachedDataset(
        SlowDataset(24, log=log), backend=memcached_backend, dataset_name="spawn",
        writer_buffer_size=5,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, multiprocessing_context="spawn", persistent_workers=True
    )
    for _ in range(2):
        assert sorted(int(x) for _, y, _ in loader for x in y) == list(range(24))
    assert sorted(logged_calls(log)) == list(range(24))


# -- preload ---------------------------------------------------------------------------------------


def test_preload_follows_the_given_order(memory_backend: MemoryBackend) -> None:
    data = SlowDataset(30)
    ds = CachedDataset(data, backend=memory_backend, dataset_name="order", writer_buffer_size=4)
    ds[7]
    order = list(range(29, -1, -1))
    job = ds.preload(order, workers=1, progress=False)
    assert job.wait(timeout=20)
    assert data.calls == [7] + [i for i in order if i != 7]
    assert job.computed == 29 and job.already_cached == 1 and job.total == 30
    assert ds.is_complete() and ds.pending == 0
    data.calls.clear()
    ds.__getitems__(order)
    assert data.calls == []


def test_preload_follows_a_seeded_sampler_without_disturbing_it(
    memory_backend: MemoryBackend,
) -> None:
    torch = pytest.importorskip("torch")
    data = SlowDataset(40)
    ds = CachedDataset(data, backend=memory_backend, dataset_name="sampler")
    sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(3))
    rng_before = torch.get_rng_state()
    job = ds.preload(sampler, workers=1, progress=False)
    assert job.wait(timeout=20)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert data.calls == list(sampler)  # the order the DataLoader gets next


def test_preload_bounds_the_bytes_it_holds(memory_backend: MemoryBackend) -> None:
    nbytes = 64 * 1024
    data = SlowDataset(48, nbytes=nbytes, delay=0.002)
    # The buffer would take all 48 samples (3 MiB); the preload may hold 4 at a time.
    ds = CachedDataset(
        data, backend=memory_backend, dataset_name="bytes", writer_buffer_size=1000,
        flush_interval=None,
    )  # fmt: skip
    job = ds.preload(workers=4, max_bytes=4 * nbytes + 4096, progress=False)
    assert job.wait(timeout=30)
    assert ds.is_complete()
    assert ds._cache.buffer.peak_bytes <= 5 * (nbytes + 1024)


def test_preload_bounds_the_bytes_before_a_sample_size_is_known(
    memory_backend: MemoryBackend,
) -> None:
    nbytes = 256 * 1024
    lock, computing, peak = threading.Lock(), [0], [0]

    class Big(SlowDataset):
        """Records the most bytes held at once: samples being computed plus those buffered."""

        def __getitem__(self, i: int) -> Any:
            with lock:
                computing[0] += 1
                held = computing[0] * nbytes + ds._cache.buffer.pending_bytes
                peak[0] = max(peak[0], held)
            try:
                return super().__getitem__(i)
            finally:
                with lock:
                    computing[0] -= 1

    # Samples above max_bytes / workers: starting 4 tasks before the first sample is measured
    # would hold 1 MiB.
    ds = CachedDataset(
        Big(12, nbytes=nbytes, delay=0.02), backend=memory_backend, dataset_name="unknown",
        writer_buffer_size=1000, flush_interval=None,
    )  # fmt: skip
    max_bytes = 3 * nbytes // 2
    job = ds.preload(workers=4, max_bytes=max_bytes, progress=False)
    assert job.wait(timeout=30) and ds.is_complete()
    assert peak[0] <= max_bytes and ds._cache.buffer.peak_bytes <= max_bytes


def test_cancelled_preload_counts_only_what_it_did() -> None:
    # A task cancelled before it started was counted as already cached: repeat, as cancel()
    # must land between a task's submission and its start.
    for trial in range(10):
        data = SlowDataset(2000, delay=0.001)
        ds = CachedDataset(
            data, backend=MemoryBackend(), dataset_name="count", writer_buffer_size=8
        )
        job = ds.preload(workers=8, progress=False)
        time.sleep(0.02 + 0.005 * trial)
        job.cancel()
        assert job.already_cached == 0  # nothing was stored beforehand
        assert job.computed == len(data.calls) < 2000
        assert "cancelled" in repr(job) and job.cancelled


def test_preload_can_be_cancelled(disk_backend: DiskBackend) -> None:
    data = SlowDataset(500, delay=0.005)
    ds = CachedDataset(data, backend=disk_backend, dataset_name="cancel", writer_buffer_size=3)
    job = ds.preload(workers=2, progress=False)
    time.sleep(0.1)
    job.cancel()
    assert job.done and job.cancelled and 0 < job.computed < 500
    assert ds.pending == 0 and ds.num_cached() == len(set(data.calls))
    assert job.wait(0)


def test_preload_errors_are_reraised_by_wait(memory_backend: MemoryBackend) -> None:
    class Broken(SlowDataset):
        def __getitem__(self, i: int) -> Any:
            if i == 5:
                raise OSError("unreadable file")
            return super().__getitem__(i)

    ds = CachedDataset(Broken(20), backend=memory_backend, dataset_name="broken")
    job = ds.preload(workers=1, progress=False)
    with pytest.raises(OSError, match="unreadable"):
        job.wait(timeout=20)


def test_preload_and_training_loop_never_compute_a_sample_twice(
    memcached_backend: MemcachedBackend, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    log = tmp_path / "calls"
    ds = CachedDataset(
        SlowDataset(60, log=log, delay=0.01), backend=memcached_backend, dataset_name="race",
        writer_buffer_size=4, flush_interval=0.1,
    )  # fmt: skip
    job = ds.preload(workers=2, progress=False)
    # At the same time, two worker processes and this thread ask for the same samples.
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    seen = sorted(int(x) for _, y, _ in loader for x in y)
    mine = [ds[i][1] for i in range(60)]
    assert job.wait(timeout=30)
    assert seen == mine == list(range(60))
    counts = Counter(logged_calls(log))
    assert sorted(counts) == list(range(60)) and set(counts.values()) == {1}


def test_preload_progress_bar(
    memory_backend: MemoryBackend,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("tqdm")
    ds = CachedDataset(SlowDataset(20), backend=memory_backend, dataset_name="bar")
    ds.preload(workers=2).wait(timeout=20)
    assert "20/20" in capsys.readouterr().err
    ds.clear()
    ds.preload(workers=2, progress=False).wait(timeout=20)
    assert capsys.readouterr().err == ""
    ds.clear()
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    with caplog.at_level(logging.INFO, logger="memoshare"):
        ds.preload(workers=2).wait(timeout=20)
    assert any("20/20" in r.getMessage() for r in caplog.records)


def test_preload_option_of_the_constructor(memory_backend: MemoryBackend) -> None:
    ds = CachedDataset(SlowDataset(10), backend=memory_backend, dataset_name="ctor", preload=True)
    assert ds._preload is not None and ds._preload.wait(timeout=20)
    assert ds.is_complete()


# -- persistence, resume and from_cache ------------------------------------------------------------

_KILLED_PRELOAD = """
    import sys
    sys.path.insert(0, {tests!r})
    from test_datasets import SlowDataset
    from memoshare import CachedDataset, DiskBackend
    ds = CachedDataset(SlowDataset(200, log={log!r}, delay=0.01), backend=DiskBackend({store!r}),
                       dataset_name="resume", writer_buffer_size=4)
    ds.preload(workers=2, progress=False).wait()
"""


def test_killed_preload_resumes_with_the_stored_samples(tmp_path: Path) -> None:
    log, store = tmp_path / "calls", tmp_path / "store"
    code = _KILLED_PRELOAD.format(tests=str(Path(__file__).parent), log=str(log), store=str(store))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)])
    try:
        deadline = time.monotonic() + 30
        while len(logged_calls(log)) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    data = SlowDataset(200)
    ds = CachedDataset(data, backend=DiskBackend(store), dataset_name="resume", lease_timeout=1)
    missing = ds.missing_indices()
    assert 30 <= 200 - len(missing) < 200  # what was written before the kill stays
    job = ds.preload(workers=4, progress=False)
    assert job.wait(timeout=60)
    assert sorted(data.calls) == missing and job.already_cached == 200 - len(missing)
    assert ds.is_complete()


def test_from_cache_needs_neither_the_dataset_nor_its_code(tmp_path: Path) -> None:
    module_dir = tmp_path / "code"
    module_dir.mkdir()
    (module_dir / "secret_dataset.py").write_text(
        textwrap.dedent("""
        import numpy as np
        class Secret:
            def __len__(self):
                return 15
            def __getitem__(self, i):
                return {"image": np.full((2, 2), i), "label": i}
        """)
    )
    store = str(tmp_path / "store")
    fill = f"""
        import sys
        sys.path.insert(0, {str(module_dir)!r})
        from secret_dataset import Secret
        from memoshare import CachedDataset, DiskBackend
        CachedDataset(Secret(), backend=DiskBackend({store!r}), dataset_name="secret",
                      version=3).preload(progress=False).wait()
    """
    assert run_python(fill).returncode == 0
    read = f"""
        import sys
        from memoshare import CachedDataset, DiskBackend
        ds = CachedDataset.from_cache("secret", backend=DiskBackend({store!r}), version=3)
        assert len(ds) == 15
        assert [s["label"] for s in ds.__getitems__(range(15))] == list(range(15))
        assert int(ds[-1]["image"].sum()) == 4 * 14
        assert "secret_dataset" not in sys.modules
        print("ok")
    """
    proc = run_python(read)  # a fresh process: survives the restart
    assert proc.stdout.strip() == "ok", proc.stderr


def test_from_cache_refuses_incomplete_or_unknown_caches(disk_backend: DiskBackend) -> None:
    with pytest.raises(IncompleteCacheError, match="no cache"):
        CachedDataset.from_cache("nothing", backend=disk_backend)
    ds = CachedDataset(SlowDataset(20), backend=disk_backend, dataset_name="part")
    for i in range(0, 20, 3):
        ds[i]
    with pytest.raises(IncompleteCacheError, match="holds 7 of 20 samples"):
        CachedDataset.from_cache("part", backend=disk_backend)
    lazy = CachedDataset.from_cache("part", backend=disk_backend, verify=False)
    assert_sample(lazy[3], 3)
    with pytest.raises(IncompleteCacheError, match="sample 1 "):
        lazy[1]
    with pytest.raises(TypeError, match="from_cache"):
        lazy.preload()


def test_clear_removes_every_key_of_the_dataset(redis_server) -> None:  # type: ignore[no-untyped-def]
    from memoshare.backends.redis import RedisBackend

    backend = RedisBackend(port=redis_server.port, max_item_size=1024)  # chunked samples
    backend.clear()
    keep = CachedDataset(["other"], backend=backend, dataset_name="keep")
    keep[0]
    ds = CachedDataset(SlowDataset(5, nbytes=5000), backend=backend, dataset_name="gone")
    ds.__getitems__(range(5))
    assert len(backend.keys(ds.key(0).rsplit(":", 1)[0])) > 6  # samples, chunks, manifest
    assert ds.clear() > 6
    assert backend.keys(ds.key(0).rsplit(":", 1)[0]) == []
    assert ds.missing_indices() == list(range(5))
    assert keep[0] == "other" and keep.stats.hits == 1


def test_from_cache_verifies_on_memcached(memcached_backend: MemcachedBackend) -> None:
    ds = CachedDataset(SlowDataset(30), backend=memcached_backend, dataset_name="mc")
    ds.__getitems__(list(range(29)))
    with pytest.raises(IncompleteCacheError, match="missing: 29"):
        CachedDataset.from_cache("mc", backend=memcached_backend)
    ds[29]
    assert len(CachedDataset.from_cache("mc", backend=memcached_backend)) == 30


# -- CacheLoader -----------------------------------------------------------------------------------


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


# -- without torch ---------------------------------------------------------------------------------


def test_works_without_torch(tmp_path: Path) -> None:
    code = f"""
        import sys
        sys.modules["torch"] = None  # import torch now fails
        from memoshare import CachedDataset, CacheLoader, DiskBackend
        ds = CachedDataset(list(range(10)), backend=DiskBackend({str(tmp_path)!r}),
                           dataset_name="nt", writer_buffer_size=3)
        assert ds.__getitems__([1, 2]) == [1, 2] and ds[9] == 9
        ds.preload(iter(range(9, -1, -1)), progress=False).wait()
        assert ds.is_complete()
        assert CacheLoader(DiskBackend({str(tmp_path)!r})).get("k", str.upper) == "K"
        print("ok")
    """
    proc = run_python(code)
    assert proc.stdout.strip() == "ok", proc.stderr
