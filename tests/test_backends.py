"""The Backend contract run against every store (real servers for memcached and Redis), then
the tests of one store's own behaviour: LMDB maps and errors, memory limits, several memcached
servers, outages and silent servers.

The generic tests live in ``backend_contract.py``; each ``Test*Backend`` class below runs all of
them on one store, given by a fixture of ``conftest.py``.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from backend_contract import BackendContract

from memoshare import DiskBackend, MemcachedBackend, MemoryBackend, make_backend, memoize
from memoshare.backends import BackendError, BackendRefused, BackendTimeout, BackendUnavailable

MIB = 1 << 20


# -- the contract, on every store ----------------------------------------------------------------
class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def backend(self, memory_backend):  # type: ignore[no-untyped-def]
        return memory_backend


class TestDiskBackend(BackendContract):
    @pytest.fixture
    def backend(self, disk_backend):  # type: ignore[no-untyped-def]
        return disk_backend


class TestMemcachedBackend(BackendContract):
    @pytest.fixture
    def backend(self, memcached_backend):  # type: ignore[no-untyped-def]
        return memcached_backend


class TestRedisBackend(BackendContract):
    @pytest.fixture
    def backend(self, redis_backend):  # type: ignore[no-untyped-def]
        return redis_backend


# -- each store's own behaviour -----------------------------------------------------------------
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


def stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGSTOP ``proc`` and wait until every thread of it is stopped: the signal is delivered
    asynchronously, and a thread still running would answer the next request."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 5.0
    tasks = Path(f"/proc/{proc.pid}/task")
    while True:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
        if all(state in "Tt" for state in states):
            return
        assert time.monotonic() < deadline, f"memcached not stopped: {states}"
        time.sleep(0.01)


def test_memcached_silent_server_times_out(own_memcached):
    import signal

    from memoshare import BackendTimeout

    store = MemcachedBackend(own_memcached.address, timeout=0.5, retry_interval=0.1)
    store.set("k", b"1")  # connected
    stop(own_memcached.proc)  # up, but never answers
    try:
        start = time.monotonic()
        with pytest.raises(BackendTimeout):
            store.get("k")
        assert 0.3 < time.monotonic() - start < 3.0
    finally:
        own_memcached.proc.send_signal(signal.SIGCONT)
    # Reconnects after the back-off interval (0.1 s; polled, as a loaded machine may take a
    # moment to resume the server).
    deadline = time.monotonic() + 5.0
    while True:
        try:
            assert store.get("k") == b"1"
            break
        except BackendError:
            assert time.monotonic() < deadline, "no reconnection within 5 s"
            time.sleep(0.1)


# -- DiskBackend: map sizes that differ between processes, typed LMDB errors ---------------------


def write_in_another_process(path, map_size: int, count: int, size: int = MIB) -> None:
    """A second process opens ``path`` with its own ``map_size`` and writes ``count`` values."""
    code = f"""
        from memoshare import DiskBackend
        store = DiskBackend({str(path)!r}, map_size={map_size})
        for i in range({count}):
            store.set(f"other{{i}}", bytes([i % 256]) * {size})
        assert store.info()["map_size"] >= {map_size}
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=60)


FIRST_OPS = ["get", "get_many", "gets", "exists_many", "keys", "info", "set", "memoize"]


@pytest.mark.parametrize("first_op", FIRST_OPS)
def test_disk_adopts_a_map_another_process_grew(tmp_path, first_op):
    # Process A maps 4 MiB; process B maps 64 MiB and grows the data to 8 MiB. A's next
    # transaction meets MDB_MAP_RESIZED: it must adopt the new size, not raise lmdb's error.
    store = DiskBackend(tmp_path / "s", map_size=4 * MIB)
    store.set("k", b"v")
    calls = []

    @memoize(store, stampede=False)
    def f(x):
        calls.append(x)
        return x * 2

    assert f(1) == 2
    write_in_another_process(tmp_path / "s", map_size=64 * MIB, count=8)

    if first_op == "get":
        assert store.get("k") == b"v"
    elif first_op == "get_many":
        assert store.get_many(["k", "other3"]) == {"k": b"v", "other3": bytes([3]) * MIB}
    elif first_op == "gets":
        assert store.gets("k")[0] == b"v"
    elif first_op == "exists_many":
        assert store.exists_many(["k", "other7", "absent"]) == {"k", "other7"}
    elif first_op == "keys":
        assert len(store.keys("other")) == 8
    elif first_op == "info":
        assert store.info()["items"] >= 9
    elif first_op == "set":
        store.set("new", bytes(MIB))
    else:  # a user's call: a hit, no error
        assert f(1) == 2 and calls == [1]
        assert f.stats.hits == 1 and f.stats.errors == 0

    assert store.get("other5") == bytes([5]) * MIB
    store.set("after", bytes(2 * MIB))  # beyond A's own 4 MiB map
    assert store.get("after") == bytes(2 * MIB)
    assert store.info()["map_size"] >= 64 * MIB
    assert f(1) == 2 and calls == [1]


def test_disk_write_grows_into_the_larger_map_of_another_process(tmp_path):
    # B's larger map is recorded in the file by B's first write, long before the data outgrows
    # A's map: A's writes must not fail as "full" at A's 4 MiB.
    store = DiskBackend(tmp_path / "s", map_size=4 * MIB)
    store.set("k", b"v")
    write_in_another_process(tmp_path / "s", map_size=64 * MIB, count=1, size=100)
    for i in range(8):
        store.set(f"mine{i}", bytes(MIB))
    assert store.get_many([f"mine{i}" for i in range(8)]) == {
        f"mine{i}": bytes(MIB) for i in range(8)
    }
    assert store.info()["map_size"] >= 64 * MIB


def test_disk_opened_after_another_process_uses_its_larger_map(tmp_path):
    # A process with a small map (e.g. a size_limit's 256 MiB) opening a directory that a
    # default process (64 GiB) has filled beyond that must still be able to write.
    write_in_another_process(tmp_path / "s", map_size=64 * MIB, count=6)
    store = DiskBackend(tmp_path / "s", map_size=4 * MIB)
    assert store.info()["map_size"] >= 64 * MIB
    for i in range(6):
        store.set(f"mine{i}", bytes(MIB))
    assert store.get("other5") == bytes([5]) * MIB and store.get("mine5") == bytes(MIB)


def test_disk_backends_of_one_process_use_the_largest_map(tmp_path):
    # One environment per path and process: a backend opened with a larger map than the first
    # one (the default store after a size_limit store, say) must get it.
    small = DiskBackend(tmp_path / "s", map_size=4 * MIB)
    small.set("a", b"1")
    large = DiskBackend(tmp_path / "s", map_size=64 * MIB)
    large.set_many({f"big{i}": bytes(MIB) for i in range(8)})
    assert small.get("big7") == bytes(MIB) and large.get("a") == b"1"
    assert small.info()["map_size"] >= 64 * MIB


def test_disk_remap_while_threads_read_and_write(tmp_path):
    store = DiskBackend(tmp_path / "s", map_size=4 * MIB)
    store.set_many({f"k{i}": str(i).encode() for i in range(50)})
    errors: list[BaseException] = []
    reads = [0]
    stop = threading.Event()

    def reader(n: int) -> None:
        try:
            while not stop.is_set():
                for i in range(50):
                    assert store.get(f"k{i}") == str(i).encode()
                    reads[0] += 1
                assert len(store.get_many([f"k{i}" for i in range(50)])) == 50
                if n == 0:
                    store.set(f"w{reads[0] % 10}", bytes(1000))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        write_in_another_process(tmp_path / "s", map_size=64 * MIB, count=8)
        time.sleep(0.3)  # the threads meet the grown map and adopt it (several at once)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert reads[0] > 0
    assert store.get("other7") == bytes([7]) * MIB


def test_disk_lmdb_errors_are_typed(tmp_path):
    # Any other LMDB error is a BackendError, which memoize handles (it computes and counts it)
    # instead of letting lmdb.Error reach the caller. Here: LMDB refuses an empty key.
    import lmdb

    store = DiskBackend(tmp_path / "s")
    store.set("k", b"v")
    for op in (
        lambda: store.get(""),
        lambda: store.get_many(["k", ""]),
        lambda: store.gets(""),
        lambda: store.exists_many(["k", ""]),
        lambda: store.set("", b"v"),
        lambda: store.delete(""),
    ):
        with pytest.raises(BackendError) as info:
            op()
        assert isinstance(info.value.__cause__, lmdb.Error)
    assert store.get("k") == b"v"  # and the store goes on working


# -- MemoryBackend: a value above max_bytes ----------------------------------------------------


def test_memory_refuses_a_value_above_max_bytes():
    store = MemoryBackend(max_bytes=1000)
    store.set("small", bytes(100))
    store.set("k", bytes(10))
    with pytest.raises(BackendRefused, match="max_bytes"):
        store.set("big", bytes(2000))
    with pytest.raises(BackendRefused):
        store.set("k", bytes(2000))  # the entry already under "k" stays
    with pytest.raises(BackendRefused):
        store.add("new", bytes(2000))
    with pytest.raises(BackendRefused):
        store.set_many({"a": b"1", "big": bytes(2000)})  # all or nothing, as on disk
    assert store.get_many(["small", "k", "a", "big", "new"]) == {
        "small": bytes(100),
        "k": bytes(10),
    }
    assert store.info() == {"items": 2, "bytes": 110, "evictions": 0}
    store.set("fits", bytes(1000 - 110))  # exactly at the limit: kept, nothing evicted
    assert store.info()["evictions"] == 0


# -- MemcachedBackend: several servers, one of them down ---------------------------------------


def split_by_server(keys, server) -> tuple[list[str], list[str]]:
    """(keys stored on ``server``, the others), read from the server itself."""
    on_server = set(MemcachedBackend(server.address).get_many(keys))
    return [k for k in keys if k in on_server], [k for k in keys if k not in on_server]


def test_memcached_one_dead_server_leaves_the_others_working(own_memcached):
    from conftest import start_memcached

    other = start_memcached()
    try:
        store = MemcachedBackend(
            [own_memcached.address, other.address], retry_interval=0.5, connect_timeout=0.5
        )
        keys = [f"key{i}" for i in range(100)]
        store.set_many({k: k.encode() for k in keys})
        dead, live = split_by_server(keys, own_memcached)
        assert dead and live

        own_memcached.kill()
        with pytest.raises(BackendError):
            store.get(dead[0])  # the failure that starts this server's back-off
        start = time.monotonic()
        served = 0
        for key in live:
            assert store.get(key) == key.encode()
            served += 1
        assert served == len(live)
        unavailable = 0
        for key in dead:
            with pytest.raises(BackendUnavailable) as failure:  # at once, no connection attempt
                store.get(key)
            assert failure.value.server == own_memcached.address
            unavailable += 1
        assert unavailable == len(dead)
        # writes and the other single-key operations route the same way
        store.set(live[0], b"new")
        assert store.add(live[1], b"1") is False
        assert store.delete(live[1]) is True and store.add(live[1], b"1") is True
        assert store.delete(live[2]) is True and store.incr(live[2]) == 1
        with pytest.raises(BackendUnavailable):
            store.set(dead[1], b"new")
        # a batch serves the live server and reports the dead one
        with pytest.raises(BackendUnavailable) as info:
            store.get_many(keys)
        expected = {k: k.encode() for k in live} | {live[0]: b"new", live[1]: b"1", live[2]: b"1"}
        assert info.value.found == expected
        assert time.monotonic() - start < 1.0  # no timeout paid per call

        own_memcached.start()  # empty, on the same port
        time.sleep(0.6)
        assert store.get(dead[0]) is None  # reconnected
        store.set(dead[0], b"back")
        assert store.get(dead[0]) == b"back"
        assert store.get_many(live[3:5]) == {k: k.encode() for k in live[3:5]}
    finally:
        other.stop()


def test_memcached_silent_server_times_out_once_for_its_keys_only(own_memcached):
    from conftest import start_memcached

    other = start_memcached()
    store = MemcachedBackend(
        [own_memcached.address, other.address], retry_interval=0.5, timeout=0.3
    )
    keys = [f"key{i}" for i in range(60)]
    store.set_many({k: k.encode() for k in keys})
    silent, live = split_by_server(keys, own_memcached)
    stop(own_memcached.proc)  # up, but never answers
    try:
        start = time.monotonic()
        with pytest.raises(BackendTimeout):
            store.get(silent[0])
        assert 0.2 < time.monotonic() - start < 3.0
        start = time.monotonic()
        for key in silent[1:]:
            with pytest.raises(BackendUnavailable):
                store.get(key)
        assert [store.get(key) for key in live] == [key.encode() for key in live]
        assert time.monotonic() - start < 0.25  # one timeout in all, not one per call
    finally:
        own_memcached.proc.send_signal(signal.SIGCONT)
        other.stop()
    time.sleep(0.6)
    assert store.get(silent[0]) == silent[0].encode()


def test_memcached_memoized_calls_hit_on_the_live_server(own_memcached, caplog):
    from conftest import start_memcached

    other = start_memcached()
    try:
        store = MemcachedBackend(
            [own_memcached.address, other.address], retry_interval=0.5, connect_timeout=0.5
        )
        calls = []

        @memoize(store, stampede=False)
        def f(x):
            calls.append(x)
            return x * 10

        for x in range(40):
            f(x)
        keys = [f.cache_key(x) for x in range(40)]
        dead, live = split_by_server(keys, own_memcached)
        assert dead and live
        own_memcached.kill()
        calls.clear()
        f.stats.reset()
        assert [f(x) for x in range(40)] == [x * 10 for x in range(40)]
        assert f.stats.hits == len(live)  # every key of the live server is still a hit
        assert sorted(calls) == sorted(keys.index(k) for k in dead)  # only these computed
        # One outage (of one server): one warning, not one per switch between the servers,
        # and the live server's answers do not count as reconnects.
        warned = [r for r in caplog.records if "cannot" in r.getMessage()]
        assert len(warned) == 1 and f.stats.reconnects == 0
    finally:
        other.stop()


def test_disk_store_reuses_pages_pinned_by_a_killed_reader(tmp_path):
    """A process SIGKILLed inside a read transaction leaves its LMDB reader slot behind: the
    snapshot it saw stays pinned, and the file fills up although old entries are evicted."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "store"
    store = DiskBackend(path, size_limit=20 << 20, sync=False)
    store.set("seed", b"x")
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import lmdb, sys, time\n"
            f"env = lmdb.open({str(path)!r}, max_dbs=4, map_size=256 << 20)\n"
            "txn = env.begin()\n"
            "txn.get(b'seed')\n"
            "print('reading', flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
    finally:
        reader.send_signal(signal.SIGKILL)
        reader.wait(10)
    refused = 0
    value = bytes(1 << 20)
    for i in range(600):
        try:
            store.set(f"v{i}", value)
        except BackendRefused:
            refused += 1
    assert refused == 0  # the killed reader's slot was cleared when the map filled up
    assert (path / "data.mdb").stat().st_size <= 256 << 20  # the map, not more
    assert store.get("v599") == value


def test_redis_silent_server_costs_one_socket_timeout(redis_server_of_test):
    from memoshare import BackendTimeout
    from memoshare.backends.redis import RedisBackend

    store = RedisBackend(port=redis_server_of_test.port, host="127.0.0.1", socket_timeout=0.5)
    store.set("k", b"1")  # connected
    stop(redis_server_of_test.proc)  # up, but never answers
    try:
        start = time.monotonic()
        with pytest.raises(BackendTimeout):
            store.get("k")
        elapsed = time.monotonic() - start
        assert 0.4 < elapsed < 0.9, f"{elapsed:.2f}s: one socket_timeout is 0.5 s"
    finally:
        redis_server_of_test.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server_of_test():  # type: ignore[no-untyped-def]
    from conftest import start_redis

    server = start_redis()
    yield server
    server.stop()
