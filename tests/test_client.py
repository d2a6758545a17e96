"""The policy both front ends share through CacheClient: bad data, unpicklable values, store
failures per server, and options checked where they are given."""

from __future__ import annotations

import logging
import math
import threading

import pytest
from conftest import start_memcached

from memoshare import CachedDataset, CacheLoader, MemcachedBackend, MemoryBackend, memoize
from memoshare.client import MISSING, CacheClient

GARBAGE = b"ms\x01\x00not a pickle"


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_unreadable_entries_warn_once_in_both_front_ends(memory_backend, caplog) -> None:
    @memoize(memory_backend)
    def f(x):
        return x

    ds = CachedDataset(list(range(4)), backend=memory_backend, dataset_name="bad")
    for i in range(4):
        memory_backend.set(f.cache_key(i), GARBAGE)
        memory_backend.set(ds.key(i), GARBAGE)
    with caplog.at_level(logging.DEBUG, logger="memoshare"):
        assert [f(i) for i in range(4)] == [0, 1, 2, 3]
        assert [ds[i] for i in range(4)] == [0, 1, 2, 3]
    assert warnings_of(caplog, "unreadable entry") == 2  # one per front end
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("unreadable entry" in r.getMessage() for r in debug) >= 6  # then quietly


def test_unpicklable_values_warn_once_in_both_front_ends(memory_backend) -> None:
    @memoize(memory_backend)
    def make_lock(i):
        return threading.Lock()

    loader = CacheLoader(memory_backend, dataset_name="locks")
    with pytest.warns(RuntimeWarning, match="cannot be pickled") as caught:
        for i in range(3):
            make_lock(i)
            loader.get(i, lambda key: threading.Lock())
    assert len(caught) == 2  # one per front end
    assert make_lock.stats.sets == 0 and loader.stats.sets == 0


def test_strict_raises_unpicklable_values_in_both_front_ends(memory_backend) -> None:
    from memoshare import UnpicklableValue

    make_lock = memoize(memory_backend, strict=True)(lambda i: threading.Lock())
    loader = CacheLoader(memory_backend, dataset_name="strict-locks", strict=True)
    with pytest.raises(UnpicklableValue):
        make_lock(1)
    with pytest.raises(UnpicklableValue):
        loader.get(1, lambda key: threading.Lock())


def test_client_lookup_and_update_contract(memory_backend) -> None:
    client = CacheClient(memory_backend, "contract")
    assert client.lookup("k") is MISSING
    assert client.store("k", None) is True
    assert client.lookup("k") is None  # a stored None is a value, not a miss
    assert client.update("n", lambda current: 1 if current is MISSING else current + 1) == 1
    assert client.update("n", lambda current: 1 if current is MISSING else current + 1) == 2
    assert client.lookup_many(["k", "n", "absent"]) == {"k": None, "n": 2}
    assert client.stats.sets == 3


# -- per-server health ---------------------------------------------------------------------------
@pytest.fixture
def three_memcached():  # type: ignore[no-untyped-def]
    servers = [start_memcached() for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


def test_one_dead_server_is_one_outage_in_both_front_ends(three_memcached, caplog) -> None:
    """Reads of keys on live servers must not end the dead server's outage: that reported
    the outage again at every switch (a warning and a false reconnect each time)."""
    backend = MemcachedBackend(
        [s.address for s in three_memcached], retry_interval=60, timeout=0.5, connect_timeout=0.5
    )

    @memoize(backend, stampede=False, shared_stats=False)
    def f(x):
        return x * 2

    ds = CachedDataset(list(range(60)), backend=backend, dataset_name="nodes", flush_interval=None)
    for i in range(60):
        f(i)
        ds[i]
    ds.flush()
    three_memcached[0].kill()
    with caplog.at_level(logging.INFO, logger="memoshare"):
        for _ in range(2):
            assert [f(i) for i in range(60)] == [2 * i for i in range(60)]
            assert [ds[i] for i in range(60)] == list(range(60))
            assert ds.__getitems__(list(range(60))) == list(range(60))
    assert warnings_of(caplog, "cannot") == 2  # one outage per front end
    assert f.stats.reconnects == 0 and ds.stats.reconnects == 0
    assert 0 < f.stats.hits < 120 and 0 < ds.stats.hits < 240  # the live servers kept serving


# -- options checked where they are given ------------------------------------------------------
BAD_MEMOIZE_OPTIONS = [
    ({"lease_timeout": math.inf}, ValueError),
    ({"lease_timeout": math.nan}, ValueError),
    ({"lease_timeout": 0}, ValueError),
    ({"lease_timeout": "60"}, TypeError),
    ({"wait_timeout": -1}, ValueError),
    ({"wait_timeout": math.nan}, ValueError),
    ({"time_threshold": -0.1}, ValueError),
    ({"time_threshold": math.inf}, ValueError),
    ({"rtol_stderr": math.nan}, ValueError),
    ({"rtol_stderr": -1}, ValueError),
    ({"min_repetitions": 2.5}, TypeError),
    ({"min_repetitions": -1}, ValueError),
    ({"min_repetitions": True}, TypeError),
    ({"allow_repeated_evaluations": "yes"}, TypeError),
    ({"strict": 1}, TypeError),
    ({"stampede": "no"}, TypeError),
    ({"shared_stats": None}, TypeError),
    ({"ignore_args": "job_id"}, TypeError),
    ({"ignore_args": [1]}, TypeError),
    ({"signature": 3}, TypeError),
    ({"signature": b"s", "version": "1"}, ValueError),
    ({"stampede": True, "allow_repeated_evaluations": True}, ValueError),
    ({"namespace": "a b"}, ValueError),
    ({"lease_timeut": 3}, TypeError),  # a typo names the valid options
]


@pytest.mark.parametrize(("options", "error"), BAD_MEMOIZE_OPTIONS)
def test_memoize_options_are_checked_at_decoration(options, error) -> None:
    with pytest.raises(error):
        memoize(MemoryBackend(), **options)(lambda x: x)


def test_pydvl_spelling_checks_options_at_decoration() -> None:
    from memoshare import memcached

    with pytest.raises(ValueError):
        memcached(time_threshold=math.nan)
    with pytest.raises(TypeError):
        memcached(min_repetitions=1.5)


BAD_DATASET_OPTIONS = [
    ({"lease_timeout": math.inf}, ValueError),
    ({"lease_timeout": -1}, ValueError),
    ({"wait_timeout": math.nan}, ValueError),
    ({"flush_interval": 0}, ValueError),
    ({"flush_interval": math.inf}, ValueError),
    ({"writer_buffer_size": 0}, ValueError),
    ({"writer_buffer_size": 2.0}, TypeError),
    ({"log_every": -1}, ValueError),
    ({"stampede": "yes"}, TypeError),
    ({"version": threading.Lock()}, TypeError),
    ({"namespace": ""}, ValueError),
    ({"hosts": [{"host": "h", "port": 1}]}, TypeError),  # Bagua's, said so in the message
]


@pytest.mark.parametrize(("options", "error"), BAD_DATASET_OPTIONS)
def test_dataset_options_are_checked_at_construction(options, error) -> None:
    with pytest.raises(error):
        CachedDataset([1, 2], backend=MemoryBackend(), dataset_name="opts", **options)
    with pytest.raises(error):
        CacheLoader(MemoryBackend(), dataset_name="opts", **options)
