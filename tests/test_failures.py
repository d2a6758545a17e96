"""Failures: a store that dies and comes back, refused writes, and crashed writers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from memoshare import BackendError, BackendTimeout, DiskBackend, MemcachedBackend, memoize
from memoshare.serialization import loads
from memoshare.storage import EntryStore

RETRY = 0.1


def backend_for(server) -> MemcachedBackend:
    return MemcachedBackend(server.address, retry_interval=RETRY, connect_timeout=0.5, timeout=0.5)


def memoshare_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "memoshare" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("stampede", [True, False])
def test_server_killed_and_restarted(own_memcached, caplog, stampede):
    caplog.set_level(logging.DEBUG, logger="memoshare")
    calls = []

    @memoize(backend_for(own_memcached), stampede=stampede)
    def f(x):
        calls.append(x)
        return x * 10

    assert f(1) == 10 and f(1) == 10
    assert f.stats.hits == 1 and f.stats.sets == 1
    assert memoshare_warnings(caplog) == []

    own_memcached.kill()
    outage_start = time.monotonic()
    for i in range(12):  # spans several retry intervals: real reconnection attempts fail too
        assert f(i % 3) == (i % 3) * 10
        time.sleep(0.025)
    assert time.monotonic() - outage_start > 2 * RETRY
    assert calls == [1, *[i % 3 for i in range(12)]]  # every call computed
    assert f.stats.errors + f.stats.timeouts >= 12  # at least the lookup of every call
    assert f.stats.sets == 1 and f.stats.hits == 1
    during = memoshare_warnings(caplog)
    assert len(during) == 1, [r.getMessage() for r in during]
    assert "cannot" in during[0].getMessage()

    own_memcached.start()  # empty, on the same port
    time.sleep(RETRY * 1.5)
    assert f(5) == 50
    assert f.stats.reconnects == 1
    assert f(5) == 50  # stored again after the restart
    assert f.stats.hits == 2 and f.stats.sets == 2
    assert calls[-1] == 5 and calls.count(5) == 1
    assert f.stats.reconnects == 1
    failures = [r for r in memoshare_warnings(caplog) if "cannot" in r.getMessage()]
    assert len(failures) == 1  # the recovery may be logged, a second failure may not


@pytest.mark.parametrize("stampede", [True, False])
def test_failure_between_lookup_and_store(own_memcached, caplog, stampede):
    caplog.set_level(logging.WARNING, logger="memoshare")

    kills = []

    @memoize(backend_for(own_memcached), stampede=stampede)
    def f(x):
        if x == "kill" and not kills:
            kills.append(x)
            own_memcached.kill()  # the lookup has succeeded; the store will fail
        return f"value of {x}"

    assert f("before") == "value of before"
    assert f("kill") == "value of kill"
    assert f.stats.sets == 1 and f.stats.misses == 2
    assert f.stats.errors + f.stats.timeouts >= 1
    assert len(memoshare_warnings(caplog)) == 1
    assert f("during") == "value of during"
    assert len(memoshare_warnings(caplog)) == 1

    own_memcached.start()
    time.sleep(RETRY * 1.5)
    assert f("kill") == "value of kill"  # computed again (nothing was stored) and stored
    assert f.stats.reconnects == 1
    assert f("kill") == "value of kill"
    assert f.stats.hits == 1


def test_strict_raises_backend_errors(own_memcached):
    kills = []

    @memoize(backend_for(own_memcached), strict=True)
    def f(x):
        if x == "kill" and not kills:
            kills.append(x)
            own_memcached.kill()
        return x

    assert f(1) == 1
    with pytest.raises(BackendError):
        f("kill")  # the store failed after the function ran
    with pytest.raises(BackendError):
        f(1)  # the lookup fails
    with pytest.raises(BackendError):
        f(2)  # and keeps failing within the retry interval, without a new connection
    own_memcached.start()
    time.sleep(RETRY * 1.5)
    assert f(3) == 3 and f(3) == 3
    assert f.stats.hits == 1


def test_oversized_write_is_an_error_not_a_silent_drop(own_memcached, caplog):
    # The server takes items up to 1 MiB (-I 1m); chunking is set above that.
    backend = MemcachedBackend(own_memcached.address, max_item_size=4_000_000, retry_interval=5)
    with pytest.raises(BackendError):
        backend.set("big", bytes(2_000_000))
    assert backend.get("big") is None
    backend.set("small", b"1")  # a refused item is not an outage: the server is asked at once
    assert backend.get("small") == b"1"

    calls = []

    @memoize(backend)
    def big(n):
        calls.append(n)
        return np.full(n, 3, dtype=np.uint8)

    assert (big(2_000_000) == 3).all()
    assert big.stats.errors >= 1 and big.stats.sets == 0
    assert (big(2_000_000) == 3).all()  # not cached: computed again
    assert calls == [2_000_000, 2_000_000]
    assert big.stats.hits == 0
    assert big(10).sum() == 30 and big(10).sum() == 30  # small values are still cached
    assert big.stats.hits == 1
    # a refusal is not an outage: no reconnect is counted, one warning names the refusal
    assert big.stats.reconnects == 0
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1


_WRITER = """
import sys
import numpy as np
from memoshare import DiskBackend, memoize

store = DiskBackend(sys.argv[1], size_limit=48 << 20)

@memoize(store, namespace="crash", signature=b"crash-test")
def big(i):
    return np.full(500_000 + 1000 * i, i, dtype=np.float64)  # 4 MB and more

i = int(sys.argv[2])
while True:
    big(i)
    print(i, flush=True)
    i += 1
"""


def _expected(i: int) -> np.ndarray:
    return np.full(500_000 + 1000 * i, i, dtype=np.float64)


def test_disk_entries_are_never_half_written(tmp_path):
    path = tmp_path / "store"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER))
    start = 0
    for round_, delay in enumerate((0.0, 0.013, 0.031)):
        writer = subprocess.Popen(
            [sys.executable, str(script), str(path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            written = [int(writer.stdout.readline()) for _ in range(4)]
            time.sleep(delay)  # somewhere inside the next write
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(10)
            writer.stdout.close()
        assert written == list(range(start, start + 4)), round_
        start = written[-1] + 10

    store = DiskBackend(path)
    keys = [k for k in store.keys("crash:") if "~" not in k]
    assert len(keys) >= 3
    reader = memoize(store, namespace="crash", signature=b"crash-test")(_expected)
    for key in keys:
        value = loads(EntryStore(store).read(key))
        i = int(value[0])
        assert reader.cache_key(i) == key  # the value under the key is the one for the key
        np.testing.assert_array_equal(value, _expected(i))
    info = store.info()
    every_key = store.keys()
    assert info["items"] == len(every_key)  # the bookkeeping was committed with the data
    assert info["bytes"] == sum(len(store.get(k)) for k in every_key)
    assert info["bytes"] <= 48 << 20


def test_an_outage_of_writes_only_warns_once_and_ends_with_a_write(tmp_path, caplog):
    class WritesTimeOut(DiskBackend):  # a real store whose writes time out while `down`
        down = True

        def set(self, key, value, expire=None):  # type: ignore[no-untyped-def]
            if self.down:
                raise BackendTimeout("write timed out")
            return super().set(key, value, expire)

    backend = WritesTimeOut(tmp_path / "store")

    @memoize(backend, stampede=False, shared_stats=False)
    def double(x):
        return 2 * x

    for i in range(5):
        assert double(i) == 2 * i  # each read succeeds, each write times out
    assert double.stats.timeouts == 5 and double.stats.sets == 0
    assert double.stats.reconnects == 0  # a successful read does not end a write outage
    assert len(memoshare_warnings(caplog)) == 1
    backend.down = False
    assert double(7) == 14
    assert double.stats.sets == 1 and double.stats.reconnects == 1
    assert double(7) == 14 and double.stats.hits == 1
    assert len(memoshare_warnings(caplog)) == 1
