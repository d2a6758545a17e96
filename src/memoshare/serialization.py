"""How values are turned into bytes and back.

An entry is ``header | checksum | body``. The header is 4 bytes: the magic ``b"ms"``, the
format version and a flags byte (:data:`FLAG_CHECKED`). The checksum is the xxh3-64 of the body
(8 bytes; about 3.5 µs per 100 KB, see docs/benchmarks.md), so a flipped byte is a miss, not a
wrong value. The body is a cloudpickle stream (protocol 5) followed by the large buffers it
references out of band (numpy arrays and other PEP 574 buffers), so an array is copied once into
the entry instead of being embedded in the pickle stream and copied again::

    n_buffers (4 bytes) | len(pickle), len(buffer 0), ... (8 bytes each) | pickle | buffers...

Entries written before checksums (flags 0, no checksum) are still read. Anything that does not
start with a known header, or does not match its checksum, is reported as :class:`CorruptEntry`,
which the callers treat as a miss: a damaged or foreign entry is recomputed, never returned.
The checksum guards against damage, not against forgery: anyone who can write to the store can
write a matching one.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import cloudpickle
import xxhash
from xxhash import xxh3_64_digest

from .errors import CorruptEntry, UnpicklableValue

__all__ = [
    "FLAG_CHECKED",
    "FLAG_CHUNKED",
    "FLAG_NOT_STORED",
    "FORMAT_VERSION",
    "CorruptEntry",
    "UnpicklableValue",
    "dumps",
    "loads",
    "read_header",
]

MAGIC = b"ms"
FORMAT_VERSION = 1
FLAG_CHUNKED = 0x01  # the body is a chunk manifest (see memoshare.storage)
FLAG_NOT_STORED = 0x02  # no body: the last caller did not store its value (memoshare.storage)
FLAG_CHECKED = 0x04  # an xxh3-64 checksum of the body follows the header
_HEADER = struct.Struct("<2sBB")
HEADER_SIZE = _HEADER.size
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")

#: Buffers at least this large travel out of band; smaller ones stay in the pickle stream,
#: where their framing costs less than a separate length field and copy.
OUT_OF_BAND_MIN_BYTES = 64 * 1024


_SUM_SIZE = 8  # xxh3-64, big-endian (as xxhash's digest() gives it)
_CHECKED = _HEADER.pack(MAGIC, FORMAT_VERSION, 0x04)
_BODY = HEADER_SIZE + _SUM_SIZE  # where the checked body starts
_NO_BUFFERS = _COUNT.pack(0)
_PICKLE_IN_BODY = _COUNT.size + _LENGTH.size  # the pickle of a body without buffers


def header(flags: int = 0) -> bytes:
    """The 4-byte header of an entry with the given flags."""
    return _HEADER.pack(MAGIC, FORMAT_VERSION, flags)


def read_header(data: bytes | memoryview) -> int:
    """Check the header of ``data`` and return its flags."""
    if len(data) < HEADER_SIZE:
        raise CorruptEntry(f"entry of {len(data)} bytes is shorter than its header")
    magic, version, flags = _HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptEntry(f"unknown entry format (magic {magic!r}, version {version})")
    return flags


def dumps(value: Any) -> bytes:
    """Serialize ``value`` into one entry (header and checksum included)."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # keep in band
        buffers.append(buffer)
        return False

    try:
        stream = cloudpickle.dumps(value, protocol=5, buffer_callback=out_of_band)
    except Exception as exc:  # pickling raises many types: TypeError, PicklingError, ...
        raise UnpicklableValue(f"cannot pickle {type(value).__qualname__}: {exc}") from exc
    views = [b.raw() for b in buffers]
    body: list[bytes | memoryview] = [
        _COUNT.pack(len(views)),
        _LENGTH.pack(len(stream)),
        *(_LENGTH.pack(v.nbytes) for v in views),
        stream,
        *views,
    ]
    checksum = xxhash.xxh3_64()
    for part in body:
        checksum.update(part)
    return b"".join([_CHECKED, checksum.digest(), *body])


def loads(data: bytes | memoryview) -> Any:
    """Rebuild the value of an entry written by :func:`dumps`.

    The checksum is verified first: a damaged entry raises :class:`CorruptEntry` (a miss),
    never comes back as a wrong value. Entries written before checksums (flags 0) are read
    unchecked. Out-of-band buffers are copied into ``bytearray`` objects so that arrays come
    back writable, as they were before caching.
    """
    if type(data) is bytes and len(data) < 4096 and data.startswith(_CHECKED):
        # The common case, kept short: for a small entry, copying a slice of bytes is cheaper
        # than a memoryview (this is ~1 us of a local hit).
        body = data[_BODY:]
        if xxh3_64_digest(body) != data[HEADER_SIZE:_BODY]:
            raise CorruptEntry("the entry does not match its checksum (damaged or truncated)")
        if body.startswith(_NO_BUFFERS):
            try:
                return pickle.loads(body[_PICKLE_IN_BODY:])
            except Exception as exc:
                raise CorruptEntry(f"cannot unpickle entry: {exc}") from exc
    view = memoryview(data)
    if bytes(view[:HEADER_SIZE]) == _CHECKED:
        if len(view) < _BODY or xxh3_64_digest(view[_BODY:]) != view[HEADER_SIZE:_BODY]:
            raise CorruptEntry("the entry does not match its checksum (damaged or truncated)")
        return _body(view, _BODY)
    flags = read_header(view)
    if flags & FLAG_CHUNKED:
        raise CorruptEntry("a chunk manifest is not a value (read it through memoshare.storage)")
    if flags:
        raise CorruptEntry(f"not a value (header flags {flags:#x})")
    return _body(view, HEADER_SIZE)  # written before checksums


def _body(view: memoryview, offset: int) -> Any:
    """The value of the body starting at ``offset``: counts, lengths, pickle, buffers."""
    try:
        (count,) = _COUNT.unpack_from(view, offset)
        offset += _COUNT.size
        if not count:  # the common case: no out-of-band buffer, the pickle is the rest
            return pickle.loads(view[offset + _LENGTH.size :])
        lengths = [
            _LENGTH.unpack_from(view, offset + i * _LENGTH.size)[0] for i in range(count + 1)
        ]
        offset += (count + 1) * _LENGTH.size
        if offset + sum(lengths) != len(view):
            raise CorruptEntry(
                f"entry is {len(view)} bytes, its lengths add up to {offset + sum(lengths)}"
            )
        stream = view[offset : offset + lengths[0]]
        offset += lengths[0]
        buffers = []
        for length in lengths[1:]:
            buffers.append(bytearray(view[offset : offset + length]))
            offset += length
        return pickle.loads(stream, buffers=buffers)
    except CorruptEntry:
        raise
    except Exception as exc:  # a truncated or foreign stream fails in many ways
        raise CorruptEntry(f"cannot unpickle entry: {exc}") from exc
