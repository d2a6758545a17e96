"""The Backend contract: one suite of tests that every store must pass.

``BackendContract`` holds the generic tests of the :class:`memoshare.backends.Backend`
interface (get/set, many, add, cas, delete/incr, expiry, clear, threads, pickling, key listing,
info, exists_many). It is not collected by itself: this module's name does not start with
``test_`` and the class name does not start with ``Test``.

To run it against a backend (a new one included), subclass it in a ``test_*.py`` file under a
name starting with ``Test`` and define the ``backend`` fixture, returning a fresh, empty
instance (closing it afterwards if it holds connections)::

    import pytest
    from backend_contract import BackendContract

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend(self, tmp_path):
            store = MyBackend(tmp_path / "store")
            yield store
            store.close()

then run ``pytest``. The fixtures of ``conftest.py`` (``memory_backend``, ``disk_backend``,
``memcached_backend``, ``redis_backend``, ...) can be requested by the fixture; see
``test_backends.py`` for the built-in stores.

A store declares its capabilities as class attributes (``scope``, ``max_item_size``,
``can_list_keys``) and, with several servers, ``server_for(key)``; the contract checks them. A
store that cannot list its keys (memcached) declares ``can_list_keys = False``: the contract
then checks that ``keys()`` raises ``NotImplementedError`` instead of listing them. The last
test runs memoize and a dataset cache on the store, end to end.
"""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from memoshare import MemoryBackend
from memoshare.backends import Backend


class BackendContract:
    """Generic tests of the Backend interface; subclasses provide the ``backend`` fixture."""

    @pytest.fixture
    def backend(self):  # type: ignore[no-untyped-def]
        """A fresh, empty instance of the store under test."""
        raise NotImplementedError("a subclass of BackendContract must define a backend fixture")

    def test_get_set_roundtrip(self, backend):
        assert backend.get("k1") is None
        backend.set("k1", b"value")
        assert backend.get("k1") == b"value"
        backend.set("k1", b"other")
        assert backend.get("k1") == b"other"

    def test_empty_value_is_not_a_miss(self, backend):
        backend.set("empty", b"")
        assert backend.get("empty") == b""

    def test_many(self, backend):
        backend.set_many({"a": b"1", "b": b"2", "c": b"3"})
        assert backend.get_many(["a", "c", "missing"]) == {"a": b"1", "c": b"3"}
        assert backend.get_many([]) == {}
        assert backend.delete_many(["a", "b", "missing"]) == 2
        assert backend.get_many(["a", "b", "c"]) == {"c": b"3"}

    def test_add_only_when_absent(self, backend):
        assert backend.add("lease", b"me") is True
        assert backend.add("lease", b"you") is False
        assert backend.get("lease") == b"me"

    def test_cas(self, backend):
        assert backend.gets("x") == (None, None)
        backend.set("x", b"1")
        value, token = backend.gets("x")
        assert value == b"1"
        backend.set("x", b"2")  # another writer got there first
        assert backend.cas("x", b"3", token) is False
        value, token = backend.gets("x")
        assert backend.cas("x", b"3", token) is True
        assert backend.get("x") == b"3"
        assert backend.cas("gone", b"1", None) is False

    def test_delete_and_incr(self, backend):
        backend.set("d", b"1")
        assert backend.delete("d") is True
        assert backend.delete("d") is False
        assert backend.incr("n") == 1
        assert backend.incr("n", 5) == 6
        assert int(backend.get("n")) == 6

    def test_expire(self, backend):
        backend.set("short", b"1", expire=1)
        backend.add("lease", b"1", expire=1)
        assert backend.get("short") == b"1"
        time.sleep(2.1)
        assert backend.get("short") is None
        assert backend.add("lease", b"2", expire=1) is True

    def test_clear(self, backend):
        backend.set_many({"a": b"1", "b": b"2"})
        backend.clear()
        assert backend.get_many(["a", "b"]) == {}

    def test_concurrent_incr_from_threads(self, backend):
        def work() -> None:
            for _ in range(50):
                backend.incr("counter")

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert int(backend.get("counter")) == 400

    def test_pickle_keeps_configuration_only(self, backend):
        backend.set("p", b"1")
        clone = pickle.loads(pickle.dumps(backend))
        assert type(clone) is type(backend)
        if isinstance(backend, MemoryBackend):
            assert clone.get("p") is None  # in-process store: the copy starts empty
        else:
            assert clone.get("p") == b"1"  # same store, own connection

    def test_keys_with_prefix(self, backend):
        if not backend.can_list_keys:
            with pytest.raises(NotImplementedError):
                backend.keys("ns:")
            return
        backend.set_many({"ns:a": b"1", "ns:b": b"2", "other:c": b"3"})
        assert sorted(backend.keys("ns:")) == ["ns:a", "ns:b"]

    def test_info_reports_items_and_bytes(self, backend):
        backend.set_many({f"i{n}": bytes(100) for n in range(5)})
        info = backend.info()
        assert info["items"] >= 5
        assert info["bytes"] >= 500
        assert "evictions" in info

    def test_exists_many(self, backend):
        backend.set_many({"a": b"1", "b": b""})
        backend.set("gone", b"1", expire=1)
        assert backend.exists_many(["a", "b", "c"]) == {"a", "b"}
        assert backend.exists_many([]) == set()

    def test_declared_capabilities(self, backend):
        assert isinstance(backend, Backend)
        assert backend.scope in ("process", "machine", "network")
        assert isinstance(backend.can_list_keys, bool)
        limit = backend.max_item_size
        assert limit is None or (isinstance(limit, int) and limit >= 1024)
        server = backend.server_for("some-key")
        assert server == backend.server_for("some-key")  # stable, and hashable:
        hash(server)

    def test_the_front_ends_run_on_it(self, backend):
        """What memoize and the dataset cache need of a store, end to end: hits, an entry
        larger than one item (chunked), atomic running moments, batched samples."""
        from memoshare import CacheLoader, memoize

        @memoize(backend, shared_stats=False)
        def big(n):
            return bytes(range(256)) * n

        size = (backend.max_item_size or 1 << 20) * 2 // 256 + 1  # over two items
        assert big(size) == big(size) == bytes(range(256)) * size
        assert (big.stats.misses, big.stats.hits, big.stats.sets) == (1, 1, 1)
        assert big.invalidate(size) is True and big.invalidate(size) is False

        @memoize(backend, allow_repeated_evaluations=True, min_repetitions=3, shared_stats=False)
        def noisy(x):
            return 1.0

        assert [noisy(0) for _ in range(5)] == [1.0] * 5
        assert noisy.stats.hits == 1  # more than min_repetitions evaluations, then converged

        loader = CacheLoader(backend, dataset_name="contract", writer_buffer_size=4)
        assert [loader.get(i, lambda k: k * 10) for i in range(6)] == [0, 10, 20, 30, 40, 50]
        loader.flush()
        assert loader.get(5, lambda k: -1) == 50 and loader.stats.hits == 1
