"""The Backend contract, run against every store (real servers for memcached and Redis)."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from memoshare import DiskBackend, MemcachedBackend, MemoryBackend, make_backend
from memoshare.backends import BackendError, BackendUnavailable


def test_get_set_roundtrip(any_backend):
    assert any_backend.get("k1") is None
    any_backend.set("k1", b"value")
    assert any_backend.get("k1") == b"value"
    any_backend.set("k1", b"other")
    assert any_backend.get("k1") == b"other"


def test_empty_value_is_not_a_miss(any_backend):
    any_backend.set("empty", b"")
    assert any_backend.get("empty") == b""


def test_many(any_backend):
    any_backend.set_many({"a": b"1", "b": b"2", "c": b"3"})
    assert any_backend.get_many(["a", "c", "missing"]) == {"a": b"1", "c": b"3"}
    assert any_backend.get_many([]) == {}
    assert any_backend.delete_many(["a", "b", "missing"]) == 2
    assert any_backend.get_many(["a", "b", "c"]) == {"c": b"3"}


def test_add_only_when_absent(any_backend):
    assert any_backend.add("lease", b"me") is True
    assert any_backend.add("lease", b"you") is False
    assert any_backend.get("lease") == b"me"


def test_cas(any_backend):
    assert any_backend.gets("x") == (None, None)
    any_backend.set("x", b"1")
    value, token = any_backend.gets("x")
    assert value == b"1"
    any_backend.set("x", b"2")  # another writer got there first
    assert any_backend.cas("x", b"3", token) is False
    value, token = any_backend.gets("x")
    assert any_backend.cas("x", b"3", token) is True
    assert any_backend.get("x") == b"3"
    assert any_backend.cas("gone", b"1", None) is False


def test_delete_and_incr(any_backend):
    any_backend.set("d", b"1")
    assert any_backend.delete("d") is True
    assert any_backend.delete("d") is False
    assert any_backend.incr("n") == 1
    assert any_backend.incr("n", 5) == 6
    assert int(any_backend.get("n")) == 6


def test_expire(any_backend):
    any_backend.set("short", b"1", expire=1)
    any_backend.add("lease", b"1", expire=1)
    assert any_backend.get("short") == b"1"
    time.sleep(2.1)
    assert any_backend.get("short") is None
    assert any_backend.add("lease", b"2", expire=1) is True


def test_clear(any_backend):
    any_backend.set_many({"a": b"1", "b": b"2"})
    any_backend.clear()
    assert any_backend.get_many(["a", "b"]) == {}


def test_concurrent_incr_from_threads(any_backend):
    def work() -> None:
        for _ in range(50):
            any_backend.incr("counter")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(any_backend.get("counter")) == 400


def test_pickle_keeps_configuration_only(any_backend):
    any_backend.set("p", b"1")
    clone = pickle.loads(pickle.dumps(any_backend))
    assert type(clone) is type(any_backend)
    if isinstance(any_backend, MemoryBackend):
        assert clone.get("p") is None  # in-process store: the copy starts empty
    else:
        assert clone.get("p") == b"1"  # same store, own connection


def test_keys_with_prefix(any_backend):
    if isinstance(any_backend, MemcachedBackend):
        with pytest.raises(NotImplementedError):
            any_backend.keys("ns:")
        return
    any_backend.set_many({"ns:a": b"1", "ns:b": b"2", "other:c": b"3"})
    assert sorted(any_backend.keys("ns:")) == ["ns:a", "ns:b"]


def test_disk_survives_reopen_and_evicts_oldest(tmp_path):
    store = DiskBackend(tmp_path / "s", size_limit=10_000)
    for i in range(20):
        store.set(f"k{i}", bytes(1000))
    info = store.info()
    assert info["bytes"] <= 10_000
    assert info["evictions"] >= 10
    assert store.get("k0") is None and store.get("k19") == bytes(1000)
    reopened = pickle.loads(pickle.dumps(store))
    assert reopened.get("k19") == bytes(1000)


def test_disk_full_is_a_clear_error(tmp_path):
    store = DiskBackend(tmp_path / "tiny", map_size=1 << 20)
    with pytest.raises(BackendError, match="map_size"):
        store.set("big", bytes(4 << 20))


def test_memory_lru_capacity():
    store = MemoryBackend(capacity=2)
    store.set("a", b"1")
    store.set("b", b"2")
    store.get("a")  # a is now more recent than b
    store.set("c", b"3")
    assert store.get("b") is None
    assert store.get("a") == b"1" and store.get("c") == b"3"
    assert store.info()["evictions"] == 1


def test_memcached_down_fails_fast_then_retries(own_memcached):
    store = MemcachedBackend(own_memcached.address, retry_interval=0.5, connect_timeout=0.5)
    store.set("k", b"1")
    own_memcached.kill()
    with pytest.raises(BackendError):
        store.get("k")
    with pytest.raises(BackendUnavailable):
        store.get("k")  # inside the back-off interval: no new connection attempt
    own_memcached.start()
    time.sleep(0.6)
    assert store.get("k") is None  # the restarted server is empty, and reachable


def test_memcached_several_servers_share_keys(own_memcached, memcached_server):
    store = MemcachedBackend([own_memcached.address, memcached_server.address])
    items = {f"key{i}": str(i).encode() for i in range(200)}
    store.set_many(items)
    assert store.get_many(list(items)) == items
    alone = MemcachedBackend(own_memcached.address)
    on_first = alone.get_many(list(items))
    assert 0 < len(on_first) < 200  # rendezvous hashing spread the keys over both servers


def test_make_backend_names_and_errors(tmp_path):
    assert isinstance(make_backend("memory"), MemoryBackend)
    assert isinstance(make_backend("disk", path=tmp_path), DiskBackend)
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("sqlite")
    with pytest.raises(TypeError, match="constructor"):
        make_backend(MemoryBackend(), capacity=3)


def test_redis_down_fails_fast_then_retries():
    from conftest import start_redis

    from memoshare.backends.redis import RedisBackend

    server = start_redis()
    try:
        store = RedisBackend(port=server.port, retry_interval=0.5)
        store.set("k", b"1")
        server.kill()
        with pytest.raises(BackendError):
            store.get("k")
        with pytest.raises(BackendUnavailable):
            store.get("k")
        server.start()
        time.sleep(0.6)
        assert store.get("k") is None  # restarted empty (no persistence), and reachable
        store.set("k", b"2")
        assert store.get("k") == b"2"
    finally:
        server.stop()


def test_info_reports_items_and_bytes(any_backend):
    any_backend.set_many({f"i{n}": bytes(100) for n in range(5)})
    info = any_backend.info()
    assert info["items"] >= 5
    assert info["bytes"] >= 500
    assert "evictions" in info


def test_disk_refuses_a_value_above_its_size_limit(tmp_path):
    from memoshare import BackendRefused

    store = DiskBackend(tmp_path / "s", size_limit=1000)
    store.set("small", bytes(100))
    with pytest.raises(BackendRefused, match="size_limit"):
        store.set("big", bytes(2000))
    assert store.get("small") == bytes(100)  # nothing was evicted for it


def test_disk_clear_does_not_revive_old_cas_tokens(tmp_path):
    store = DiskBackend(tmp_path / "s")
    store.set("k", b"1")
    _, token = store.gets("k")
    store.clear()
    store.set("k", b"2")
    assert store.cas("k", b"3", token) is False
    assert store.get("k") == b"2"


def test_exists_many(any_backend):
    any_backend.set_many({"a": b"1", "b": b""})
    any_backend.set("gone", b"1", expire=1)
    assert any_backend.exists_many(["a", "b", "c"]) == {"a", "b"}
    assert any_backend.exists_many([]) == set()


def test_memcached_silent_server_times_out(own_memcached):
    import signal

    from memoshare import BackendTimeout

    store = MemcachedBackend(own_memcached.address, timeout=0.5, retry_interval=0.1)
    store.set("k", b"1")  # connected
    own_memcached.proc.send_signal(signal.SIGSTOP)  # up, but never answers
    try:
        start = time.monotonic()
        with pytest.raises(BackendTimeout):
            store.get("k")
        assert 0.3 < time.monotonic() - start < 3.0
    finally:
        own_memcached.proc.send_signal(signal.SIGCONT)
    time.sleep(0.2)
    assert store.get("k") == b"1"  # reconnects after the back-off interval
