"""Preloading a dataset (:mod:`memoshare.datasets.preload`): order, samplers, memory bounds,
cancellation, errors, progress, racing a training loop, resuming after a kill."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from datasets_helpers import SlowDataset, logged_calls

from memoshare import CachedDataset, DiskBackend, MemcachedBackend, MemoryBackend


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


# -- resuming after a kill -------------------------------------------------------------------------

_KILLED_PRELOAD = """
    import sys
    sys.path.insert(0, {tests!r})
    from datasets_helpers import SlowDataset
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


def _compute_then_wait(backend, ready) -> None:  # type: ignore[no-untyped-def]
    ds = CachedDataset(
        SlowDataset(40),
        backend=backend,
        dataset_name="killed",
        writer_buffer_size=1000,  # everything waits in the buffer, its leases held
        flush_interval=None,
    )
    for i in range(30):
        ds[i]
    ready.set()
    time.sleep(120)


def test_a_preload_after_a_killed_worker_waits_one_short_lease(memcached_backend) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing as mp
    import os
    import signal

    fork = mp.get_context("fork")
    ready = fork.Event()
    worker = fork.Process(target=_compute_then_wait, args=(memcached_backend, ready))
    worker.start()
    assert ready.wait(60)
    os.kill(worker.pid, signal.SIGKILL)  # its 30 buffered samples and their leases are lost
    worker.join(10)
    ds = CachedDataset(SlowDataset(40), backend=memcached_backend, dataset_name="killed")
    start = time.monotonic()
    ds.preload(progress=False).wait()
    elapsed = time.monotonic() - start
    assert ds.is_complete()
    assert elapsed < 5.0 + 4.0  # the default 5 s lease of the dead worker, then the work
