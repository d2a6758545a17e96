"""Entries in a store through :mod:`memoshare.storage`: chunking of large values, manifests,
reads and writes of one or many entries, damaged chunks and manifests."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from memoshare import MemcachedBackend, MemoryBackend, memoize
from memoshare.serialization import loads
from memoshare.storage import EntryStore


# -- chunking ----------------------------------------------------------------------------------
class SmallItems(MemoryBackend):
    """An in-process store with memcached-like item limits."""

    max_item_size = 1024


def payload_of(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def chunk_keys(backend, key: str) -> list[str]:
    keys = EntryStore(backend).chunk_keys(key)
    assert keys, f"{key} is not chunked"
    return keys


def test_small_values_are_not_chunked():
    store = SmallItems()
    EntryStore(store).write("k", payload_of(1024))
    assert store.keys() == ["k"]
    assert EntryStore(store).read("k") == payload_of(1024)


@pytest.mark.parametrize("size", [1025, 2048, 10_000, 100_001])
def test_large_values_are_chunked_and_reassembled(size):
    store = SmallItems()
    payload = payload_of(size)
    EntryStore(store).write("k", payload)
    chunks = chunk_keys(store, "k")
    assert len(chunks) == math.ceil(size / 1024)
    stored_keys = store.keys()
    assert sorted(stored_keys) == sorted(["k", *chunks])
    assert all(len(store.get(k)) <= 1024 for k in stored_keys)
    assert EntryStore(store).read("k") == payload
    # a new value under the same key replaces the old one
    EntryStore(store).write("k", payload_of(size, seed=1))
    assert EntryStore(store).read("k") == payload_of(size, seed=1)


def test_missing_or_damaged_chunk_is_a_miss():
    payload = payload_of(5000)
    damages = {
        "deleted": lambda store, k: store.delete(k),
        "flipped": lambda store, k: store.set(k, bytes([store.get(k)[0] ^ 1]) + store.get(k)[1:]),
        "truncated": lambda store, k: store.set(k, store.get(k)[:-1]),
        "emptied": lambda store, k: store.set(k, b""),
    }
    for name, damage in damages.items():
        for index in (0, 2, 4):
            store = SmallItems()
            EntryStore(store).write("k", payload)
            damage(store, chunk_keys(store, "k")[index])
            assert EntryStore(store).read("k") is None, (name, index)
            assert EntryStore(store).read_many(["k"]) == {}, (name, index)
    store = SmallItems()
    EntryStore(store).write("k", payload)
    first, second = chunk_keys(store, "k")[:2]
    a, b = store.get(first), store.get(second)
    store.set(first, b)
    store.set(second, a)  # swapped chunks
    assert EntryStore(store).read("k") is None


def test_damaged_manifest_is_a_miss():
    store = SmallItems()
    EntryStore(store).write("k", payload_of(5000))
    EntryStore(store).write("plain", b"small")
    store.set("k", store.get("k")[:-3])
    assert EntryStore(store).read("k") is None
    assert EntryStore(store).read_many(["k", "plain"]) == {"plain": b"small"}


def test_read_entries_mixes_chunked_and_plain():
    store = SmallItems()
    entries = {f"big{i}": payload_of(3000 + i, seed=i) for i in range(3)}
    entries.update({f"small{i}": payload_of(10 + i, seed=i) for i in range(3)})
    EntryStore(store).write_many(entries)
    store.delete(chunk_keys(store, "big1")[1])  # big1 lost a chunk
    found = EntryStore(store).read_many([*entries, "absent"])
    expected = {k: v for k, v in entries.items() if k != "big1"}
    assert found == expected


def test_add_and_update_chunked_entries():
    store = SmallItems()
    entries = EntryStore(store)
    assert entries.add("k", payload_of(4000)) is True
    assert entries.add("k", payload_of(4000, seed=1)) is False
    seen = []

    def replace(current):
        seen.append(current)
        if len(seen) == 1:  # another writer changes the entry between our read and our write
            entries.write("k", payload_of(10, seed=3))
        return payload_of(6000, seed=2)

    assert entries.update("k", replace) == payload_of(6000, seed=2)
    assert seen == [payload_of(4000), payload_of(10, seed=3)]  # the lost race was read again
    assert entries.read("k") == payload_of(6000, seed=2)
    assert entries.update("k", lambda current: None) is None  # declined: left as it is
    assert entries.read("k") == payload_of(6000, seed=2)


def test_update_of_an_absent_or_unreadable_entry_starts_from_none():
    store = SmallItems()
    entries = EntryStore(store)
    assert entries.update("new", lambda current: b"first" if current is None else b"no") == b"first"
    entries.write("k", payload_of(5000))
    store.delete(chunk_keys(store, "k")[0])  # a lost chunk: the entry cannot be read
    assert entries.update("k", lambda c: b"fresh" if c is None else b"no") == b"fresh"
    assert entries.read("k") == b"fresh"


def test_update_gives_up_after_losing_every_race():
    from memoshare import ContendedUpdate

    store = SmallItems()
    entries = EntryStore(store)
    entries.write("k", b"v0")
    rounds = iter(range(1000))

    def always_overtaken(current):
        store.set("k", f"v{next(rounds)}".encode())  # someone else wins every time
        return b"mine"

    with pytest.raises(ContendedUpdate):
        entries.update("k", always_overtaken, attempts=5)


def test_chunking_on_memcached(memcached_server, memcached_backend):
    store = MemcachedBackend(memcached_server.address, max_item_size=4096)
    payload = payload_of(50_000)
    EntryStore(store).write("k", payload)
    EntryStore(store).write("plain", b"p")
    chunks = chunk_keys(store, "k")
    assert len(chunks) == math.ceil(50_000 / 4096)
    assert EntryStore(store).read("k") == payload
    assert EntryStore(store).read_many(["k", "plain", "absent"]) == {"k": payload, "plain": b"p"}
    store.delete(chunks[-1])
    assert EntryStore(store).read("k") is None
    assert EntryStore(store).read_many(["k", "plain"]) == {"plain": b"p"}


def test_twenty_megabyte_array_through_memcached(memcached_backend):
    calls = []

    @memoize(memcached_backend)
    def big(seed):
        calls.append(seed)
        return np.random.default_rng(seed).standard_normal(20 * 2**20 // 8)

    first = big(7)
    second = big(7)
    assert calls == [7]
    assert big.stats.hits == 1 and big.stats.misses == 1 and big.stats.sets == 1
    assert second.nbytes == 20 * 2**20
    np.testing.assert_array_equal(first, second)
    assert second.flags.writeable
    manifest = memcached_backend.get(big.cache_key(7))
    assert len(manifest) < 100  # the entry itself is a manifest; the data is in chunks
    assert len(chunk_keys(memcached_backend, big.cache_key(7))) >= 20


# -- entries written by earlier versions --------------------------------------------------------
def test_entries_written_before_the_client_layer_are_read(tmp_path) -> None:
    """tests/data/format_v1.json holds the items that memoshare wrote before the client layer
    (commit 4fdaa3c): a plain entry, a chunked one, running moments, dataset samples and the
    dataset's manifest. Today's code must read every one of them as a hit."""
    import json
    from pathlib import Path

    from memoshare import CachedDataset, Moments

    fixture = json.loads((Path(__file__).parent / "data" / "format_v1.json").read_text())
    store = SmallItems()
    for key, value in fixture["items"].items():
        store.set(key, bytes.fromhex(value))

    # The code changed, the pinned signature did not: the old entries must be served.
    f = memoize(store, signature=b"format-v1", shared_stats=False)(lambda x: "recomputed")
    small, large = f(3), f(2000)
    assert small["x"] == 3 and np.array_equal(small["a"], np.arange(3))
    assert large["x"] == 2000 and np.array_equal(large["a"], np.arange(2000))
    assert EntryStore(store).chunk_keys(f.cache_key(2000))  # the large one was chunked
    assert (f.stats.hits, f.stats.misses) == (2, 0)

    g = memoize(
        store, signature=b"format-v1-moments", allow_repeated_evaluations=True, min_repetitions=1
    )(lambda x: 99.0)
    assert g(1.5) == 1.5 and g.stats.hits == 1  # count 2 > 1, no spread: converged

    ds = CachedDataset.from_cache("format-v1", backend=store, version=1)
    assert len(ds) == 5
    for i in range(5):
        assert np.array_equal(ds[i], np.full(3, i, dtype=np.float32))
    assert ds.stats.hits == 5
    record = EntryStore(store).read(g.cache_key(1.5))
    assert record is not None and isinstance(loads(record), Moments)


# -- damaged and forged manifests -----------------------------------------------------------------
class KeyCounting(SmallItems):
    def __init__(self) -> None:
        super().__init__()
        self.keys_read = 0

    def get_many(self, keys):  # type: ignore[no-untyped-def]
        keys = list(keys)
        self.keys_read += len(keys)
        return super().get_many(keys)


@pytest.mark.parametrize(
    ("count", "total"),
    [
        (1_000_000, 1_000_000 * 4096),  # plausible sizes, chunks that were never written
        (0x01010101, 0x0101010101010101),  # 44 bytes of 0x01 after the header
        (1_000_000, 5000),  # more chunks than bytes allow
        (2, 2 * (600 << 20)),  # chunks larger than any store keeps
    ],
)
def test_a_forged_manifest_costs_at_most_one_batch(count: int, total: int) -> None:
    import struct

    from memoshare.serialization import FLAG_CHUNKED, header
    from memoshare.storage import CHUNK_BATCH

    store = KeyCounting()
    forged = header(FLAG_CHUNKED) + struct.pack("<16sIQ16s", b"\x01" * 16, count, total, b"x" * 16)
    store.set("k", forged)
    entries = EntryStore(store)
    start = time.monotonic()
    assert entries.read("k") is None
    assert entries.read_many(["k"]) == {}
    assert entries.delete("k") is True
    assert time.monotonic() - start < 1.0
    assert store.keys_read <= 2 * CHUNK_BATCH + 1  # two reads of one batch, not a million keys


def test_a_value_of_many_chunks_is_read_in_batches() -> None:
    from memoshare.storage import CHUNK_BATCH

    store = KeyCounting()
    payload = payload_of(4096 * (CHUNK_BATCH + 10))  # more chunks than one batch
    EntryStore(store).write("k", payload)
    assert EntryStore(store).read("k") == payload
    assert EntryStore(store).read_many(["k", "absent"]) == {"k": payload}
    EntryStore(store).delete("k")
    assert store.keys() == []
