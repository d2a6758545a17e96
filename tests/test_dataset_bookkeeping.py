"""What a dataset cache keeps count of (:mod:`memoshare.datasets.bookkeeping`, with the
eviction check of :mod:`memoshare.datasets.cache`): evictions noticed, recomputed and warned
about once; samples and bytes counted, with a log line every ``log_every`` inserts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import start_memcached, start_redis
from datasets_helpers import SlowDataset, assert_sample

from memoshare import CachedDataset, DiskBackend, MemcachedBackend, MemoryBackend


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
