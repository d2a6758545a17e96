"""Entries: serialization round trips, damaged bytes and unpicklable values (chunking of large
values is in test_storage.py)."""

from __future__ import annotations

import math
import pickle
import struct
import threading

import numpy as np
import pytest

from memoshare import CorruptEntry, UnpicklableValue
from memoshare.serialization import FLAG_CHUNKED, HEADER_SIZE, dumps, header, loads

#: Where the body of a checked entry starts: the header, then the 8-byte checksum.
BODY = HEADER_SIZE + 8


def n_buffers(entry: bytes) -> int:
    """How many out-of-band buffers an entry carries (see the format in serialization.py)."""
    return struct.unpack_from("<I", entry, BODY)[0]


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**100),
        1.5,
        -0.0,
        math.inf,
        complex(1, -2),
        "",
        "héllo \udcff",
        b"\x00\xff",
        bytearray(b"abc"),
        (),
        [1, [2, [3, (4, {5: "five"})]]],
        {"a": {1, 2}, "b": frozenset({"x"}), ("t", 1): None},
        range(3, 10, 2),
    ],
    ids=repr,
)
def test_roundtrip_scalars_and_containers(value):
    entry = dumps(value)
    assert entry[:2] == b"ms"
    back = loads(entry)
    assert back == value
    assert type(back) is type(value)


def test_roundtrip_special_floats():
    back = loads(dumps([math.nan, -0.0]))
    assert math.isnan(back[0])
    assert math.copysign(1.0, back[1]) == -1.0


def test_roundtrip_lambdas_by_value():
    offset = 3
    fn = loads(dumps(lambda x: x + offset))
    assert fn(1) == 4


@pytest.mark.parametrize("size", [0, 1, 100, 8191, 8192, 2_000_000])
def test_roundtrip_numpy_arrays(size):
    arr = np.random.default_rng(size).standard_normal(size)
    entry = dumps(arr)
    assert n_buffers(entry) == (1 if arr.nbytes >= 64 * 1024 else 0)
    assert len(entry) < arr.nbytes + 1024  # one copy of the data, not two
    back = loads(entry)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable
    back[...] = 7  # writable, and independent of the entry
    np.testing.assert_array_equal(loads(entry), arr)


def test_roundtrip_several_arrays_of_all_layouts():
    rng = np.random.default_rng(1)
    value = {
        "big": rng.integers(0, 100, size=(300, 400), dtype=np.int32),
        "fortran": np.asfortranarray(rng.standard_normal((200, 100))),
        "strided": np.arange(400_000, dtype=np.float64)[::3],
        "structured": np.zeros(20_000, dtype=[("a", "<i4"), ("b", "<f8")]),
        "small": np.arange(5, dtype=np.uint8),
        "objects": np.array([1, "two", None], dtype=object),
        "bools": rng.random(100_000) > 0.5,
        "scalar": np.float32(2.5),
    }
    entry = dumps(value)
    assert n_buffers(entry) >= 3
    back = loads(entry)
    assert back.keys() == value.keys()
    for name, arr in value.items():
        assert back[name].dtype == arr.dtype, name
        assert np.shape(back[name]) == np.shape(arr), name
        np.testing.assert_array_equal(back[name], arr, err_msg=name)
    for name in ("big", "fortran", "strided", "structured", "small", "bools"):
        assert back[name].flags.writeable, name


def test_loads_from_bytearray_and_memoryview_copies():
    arr = np.arange(100_000, dtype=np.int64)
    for small in (False, True):
        value = arr[:10] if small else arr
        entry = bytearray(dumps(value))
        snapshot = bytes(entry)
        back = loads(entry)
        back[...] = -1
        assert bytes(entry) == snapshot  # the returned array does not alias the entry
        np.testing.assert_array_equal(loads(memoryview(entry)), value)


# -- damaged and foreign bytes -----------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"m",
        b"ms",
        b"ms\x01",
        b"garbage that is not an entry",
        pickle.dumps({"a": 1}),  # a pickle without our header
        b"ms\x02\x00" + dumps(1)[4:],  # a future format version
        b"xx" + dumps(1)[2:],
        header(FLAG_CHUNKED) + bytes(44),  # a chunk manifest is not a value
    ],
)
def test_foreign_bytes_are_corrupt(data):
    with pytest.raises(CorruptEntry):
        loads(data)


@pytest.mark.parametrize(
    "value",
    [{"a": [1, 2, 3], "b": "x" * 100}, np.arange(50_000, dtype=np.float64), ["s", np.ones(9000)]],
    ids=["small", "out-of-band", "mixed"],
)
def test_truncated_entries_are_corrupt(value):
    entry = dumps(value)
    cuts = sorted(
        {*range(0, 40), *range(40, len(entry), max(1, len(entry) // 200)), len(entry) - 1}
    )
    for cut in cuts:
        with pytest.raises(CorruptEntry):
            loads(entry[:cut])


def test_wrong_lengths_are_corrupt():
    entry = bytearray(dumps([np.arange(20_000.0), np.arange(10_000.0)]))
    assert n_buffers(entry) == 2
    with pytest.raises(CorruptEntry):
        loads(bytes(entry) + b"extra")
    for offset in range(BODY, BODY + 4 + 3 * 8, 4):  # count and length fields
        damaged = bytearray(entry)
        damaged[offset] ^= 0x55
        with pytest.raises(CorruptEntry):
            loads(damaged)


@pytest.mark.parametrize(
    "value",
    [
        threading.Lock(),
        (i for i in range(3)),
        {"deep": [1, (2, threading.RLock())]},
    ],
    ids=["lock", "generator", "nested"],
)
def test_unpicklable_values(value):
    with pytest.raises(UnpicklableValue) as info:
        dumps(value)
    assert isinstance(info.value, TypeError)


# -- integrity -------------------------------------------------------------------------------------
def test_a_flipped_byte_anywhere_is_a_miss_not_a_wrong_value():
    """A plain entry (not chunked) carries a checksum too: one flipped bit in a stored float64
    array used to come back as a hit with a wrong element."""
    value = np.arange(1000.0)
    entry = dumps(value)
    for offset in [*range(HEADER_SIZE, 64), len(entry) // 2, len(entry) - 1]:
        damaged = bytearray(entry)
        damaged[offset] ^= 0x01
        with pytest.raises(CorruptEntry):
            loads(bytes(damaged))
    with pytest.raises(CorruptEntry):
        loads(entry[:-1])  # truncated


def test_entries_written_before_checksums_are_still_read():
    # the format of memoshare 0.1.0: header (flags 0) | count | lengths | pickle
    import pickle as stdlib_pickle

    stream = stdlib_pickle.dumps({"a": 1}, protocol=5)
    old = header(0) + struct.pack("<IQ", 0, len(stream)) + stream
    assert loads(old) == {"a": 1}
