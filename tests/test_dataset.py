"""CachedDataset (:mod:`memoshare.datasets.dataset`): samples round trip on every store,
indices and the datasets it accepts; pickling and DataLoader workers; from_cache and clear;
use without PyTorch.

Helpers shared by the dataset tests are in datasets_helpers.py.
"""

from __future__ import annotations

import pickle
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from datasets_helpers import SlowDataset, assert_sample, logged_calls, run_python

from memoshare import CachedDataset, DiskBackend, MemcachedBackend, MemoryBackend
from memoshare.datasets import IncompleteCacheError

# -- samples and indices ---------------------------------------------------------------------------


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


# -- from_cache and clear --------------------------------------------------------------------------


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
    # every sample and chunk is gone; the manifest is written back (the dataset is here)
    assert backend.keys(ds.key(0).rsplit(":", 1)[0]) == [ds._cache.manifest_key]
    assert ds.missing_indices() == list(range(5))
    assert keep[0] == "other" and keep.stats.hits == 1


def test_from_cache_verifies_on_memcached(memcached_backend: MemcachedBackend) -> None:
    ds = CachedDataset(SlowDataset(30), backend=memcached_backend, dataset_name="mc")
    ds.__getitems__(list(range(29)))
    with pytest.raises(IncompleteCacheError, match="missing: 29"):
        CachedDataset.from_cache("mc", backend=memcached_backend)
    ds[29]
    assert len(CachedDataset.from_cache("mc", backend=memcached_backend)) == 30


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


@pytest.mark.parametrize("warm", [False, True], ids=["misses", "hits"])
def test_an_index_asked_twice_in_a_batch_gives_independent_samples(memory_backend, warm) -> None:
    """A sampler with replacement asks for one index twice; an in-place transform (or collate)
    then must not apply twice to one object, as with the plain dataset."""
    data = [np.array([float(i)]) for i in range(4)]
    ds = CachedDataset(data, backend=memory_backend, dataset_name="twice", flush_interval=None)
    if warm:
        ds.__getitems__([0, 1, 2, 3])
        ds.flush()
    batch = ds.__getitems__([1, 1, 2])
    assert batch[0] is not batch[1]
    for sample in batch:
        sample *= 2  # an in-place transform
    assert [float(s[0]) for s in batch] == [2.0, 2.0, 4.0]  # as uncached: [2., 2., 4.]
    assert [float(s[0]) for s in ds.__getitems__([1, 1])] == [1.0, 1.0]  # the cache is intact


def test_manifest_stays_consistent_after_clear_refill_and_eviction(memory_backend) -> None:
    ds = CachedDataset(SlowDataset(6), backend=memory_backend, dataset_name="m", version=1)
    ds.__getitems__(range(6))
    ds.flush()
    ds.clear()
    ds.__getitems__(range(6))  # refill
    ds.flush()
    assert ds.is_complete()
    again = CachedDataset.from_cache("m", backend=memory_backend, version=1)
    assert len(again) == 6 and again[5] is not None
    with pytest.raises(ValueError, match="6 samples"):  # another length, same name: refused
        CachedDataset(SlowDataset(7), backend=memory_backend, dataset_name="m", version=1)
    memory_backend.delete(ds._cache.manifest_key)  # evicted
    assert ds.is_complete()  # ... and written back
    assert len(CachedDataset.from_cache("m", backend=memory_backend, version=1)) == 6


def _fill_then_wait(backend, ready) -> None:  # type: ignore[no-untyped-def]
    ds = CachedDataset(
        list(range(500)),
        backend=backend,
        dataset_name="sigterm",
        writer_buffer_size=1000,
        flush_interval=None,
    )
    for i in range(500):
        ds[i]
    ready.set()
    time.sleep(60)


def test_a_worker_ended_by_sigterm_writes_its_buffer(disk_backend) -> None:
    import multiprocessing as mp

    fork = mp.get_context("fork")
    ready = fork.Event()
    worker = fork.Process(target=_fill_then_wait, args=(disk_backend, ready))
    worker.start()
    assert ready.wait(60)
    worker.terminate()  # SIGTERM, as Pool.terminate and DataLoader shutdown send
    worker.join(30)
    ds = CachedDataset(list(range(500)), backend=disk_backend, dataset_name="sigterm")
    assert ds.num_cached() == 500


def test_a_sample_whose_loader_failed_is_not_counted_as_cached(memory_backend) -> None:
    class FailsOnce:
        failed = False

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> int:
            if i == 3 and not FailsOnce.failed:
                FailsOnce.failed = True
                raise OSError("a flaky read")
            return i

    ds = CachedDataset(FailsOnce(), backend=memory_backend, dataset_name="flaky")
    with pytest.raises(OSError):
        ds[3]
    assert ds.missing_indices() == [0, 1, 2, 3]
    assert not ds.is_complete()
    ds.preload(progress=False).wait()
    assert ds.is_complete() and ds[3] == 3


def test_a_refill_right_after_clear_does_not_wait_for_old_leases(memcached_backend) -> None:
    ds = CachedDataset(
        SlowDataset(16), backend=memcached_backend, dataset_name="refill", writer_buffer_size=16
    )
    ds.__getitems__(list(range(16)))
    ds.flush()  # written: their leases are let go, and live on for lease_timeout
    ds.clear()
    start = time.monotonic()
    ds.__getitems__(list(range(16)))
    assert time.monotonic() - start < 2.0  # not the 5 s of the old leases
    memcached_backend.delete(ds.key(3))  # evicted, say, while its old lease still lives
    start = time.monotonic()
    assert_sample(ds[3], 3)
    assert time.monotonic() - start < 2.0
