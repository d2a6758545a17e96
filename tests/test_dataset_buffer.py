"""The write buffer of a dataset cache (:mod:`memoshare.datasets.buffer`): batched writes,
timed flushes, leases held until a buffered sample is written, failed and refused writes
retried, dropped and reported, strict mode, the flush at interpreter exit."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import start_redis
from datasets_helpers import CountingDisk, CountingMemcached, SlowDataset, assert_sample, run_python

from memoshare import BackendError, CachedDataset, DiskBackend, MemcachedBackend, MemoryBackend
from memoshare.datasets.buffer import REFUSED_TRIES


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
    # once written, the lease is no longer renewed: it expires within lease_timeout
    assert memcached_backend.get(reader.key(0)) is not None


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


def _buffer_then_idle(backend, ready, done) -> None:  # type: ignore[no-untyped-def]
    ds = CachedDataset(
        SlowDataset(8),
        backend=backend,
        dataset_name="held",
        writer_buffer_size=100,
        flush_interval=None,  # nothing is written until the buffer fills, or someone asks
    )
    for i in range(4):
        ds[i]
    ready.set()
    done.wait(60)  # alive and idle, as a persistent DataLoader worker between epochs


def test_a_sample_waiting_in_an_idle_process_buffer_is_written_when_asked_for(
    memcached_backend,
) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing as mp

    fork = mp.get_context("fork")
    ready, done = fork.Event(), fork.Event()
    holder = fork.Process(target=_buffer_then_idle, args=(memcached_backend, ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        log: list[int] = []
        ds = CachedDataset(SlowDataset(8, log=log), backend=memcached_backend, dataset_name="held")
        start = time.monotonic()
        assert_sample(ds[2], 2)  # held, leased and renewed by the idle process
        assert time.monotonic() - start < 1.0  # as long as the holder's write takes
        assert log == []  # not computed a second time
        assert ds.stats.hits == 1
    finally:
        done.set()
        holder.join(30)
