"""Entries on top of a byte store: values larger than an item are split into chunks.

A value larger than :attr:`Backend.max_item_size` is stored as chunks under keys of their own
plus a small *manifest* under the entry's key. The manifest names the chunks by a random nonce
(so two writers of the same key never mix their chunks) and carries the length and blake2b
digest of the whole value. The chunks are written first and the manifest last, so a reader
either finds no manifest (a miss) or a manifest whose chunks were all written. A chunk that was
evicted since, or that does not match the digest, makes the read a miss, never a wrong value.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Mapping

from .backends.base import Backend
from .serialization import FLAG_CHUNKED, HEADER_SIZE, CorruptEntry, header

__all__ = [
    "MAX_ENTRY_KEY_LENGTH",
    "add_entry",
    "delete_entry",
    "read_chunks",
    "read_entries",
    "read_entry",
    "read_entry_for_update",
    "replace_entry",
    "write_entries",
    "write_entry",
]

_MANIFEST = struct.Struct("<16sIQ16s")  # nonce, chunk count, total length, digest
_MANIFEST_HEADER = header(FLAG_CHUNKED)
#: Entry keys may be at most this long: a chunk key adds ``~<32 hex>~<index>``.
MAX_ENTRY_KEY_LENGTH = 200


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _chunk_keys(key: str, nonce: bytes, count: int) -> list[str]:
    return [f"{key}~{nonce.hex()}~{i}" for i in range(count)]


def _split(key: str, payload: bytes, limit: int) -> dict[str, bytes]:
    """The items to write for ``payload``: chunks first, manifest last (dicts keep order)."""
    view = memoryview(payload)
    nonce = os.urandom(16)
    count = -(-len(payload) // limit)
    keys = _chunk_keys(key, nonce, count)
    items: dict[str, bytes] = {
        k: bytes(view[i * limit : (i + 1) * limit]) for i, k in enumerate(keys)
    }
    manifest = _MANIFEST.pack(nonce, count, len(payload), _digest(payload))
    items[key] = header(FLAG_CHUNKED) + manifest
    return items


def _parse_manifest(data: bytes) -> tuple[bytes, int, int, bytes]:
    if len(data) != HEADER_SIZE + _MANIFEST.size:
        raise CorruptEntry("chunk manifest has the wrong size")
    nonce, count, total, digest = _MANIFEST.unpack_from(data, HEADER_SIZE)
    if not 0 < count <= total:
        raise CorruptEntry(f"chunk manifest names {count} chunks for {total} bytes")
    return nonce, count, total, digest


def _manifest_chunk_keys(key: str, data: bytes) -> list[str] | None:
    """The chunk keys a manifest names, or ``None`` if it is damaged (the entry is a miss)."""
    try:
        nonce, count, _, _ = _parse_manifest(data)
    except CorruptEntry:
        return None
    return _chunk_keys(key, nonce, count)


def is_manifest(data: bytes) -> bool:
    """Whether ``data`` is a chunk manifest rather than a plain entry."""
    # Anything else (a plain entry, or garbage left for serialization.loads to report).
    # bytes.startswith saves the slice's copy on every hit.
    if type(data) is bytes:
        return data.startswith(_MANIFEST_HEADER)
    return data[:4] == _MANIFEST_HEADER


def _join(manifest: bytes, chunks: Mapping[str, bytes], key: str) -> bytes | None:
    nonce, count, total, digest = _parse_manifest(manifest)
    parts = [chunks.get(k) for k in _chunk_keys(key, nonce, count)]
    if any(p is None for p in parts):
        return None
    payload = b"".join(parts)  # type: ignore[arg-type]
    if len(payload) != total or _digest(payload) != digest:
        return None
    return payload


def write_entry(backend: Backend, key: str, payload: bytes, expire: float | None = None) -> None:
    """Store ``payload`` under ``key``, chunked if the backend's items are too small for it."""
    limit = backend.max_item_size
    if limit is None or len(payload) <= limit:
        backend.set(key, payload, expire)
    else:
        backend.set_many(_split(key, payload, limit), expire)


def write_entries(backend: Backend, entries: Mapping[str, bytes]) -> None:
    """Store several entries in as few round trips as the backend allows."""
    limit = backend.max_item_size
    items: dict[str, bytes] = {}
    for key, payload in entries.items():
        if limit is None or len(payload) <= limit:
            items[key] = payload
        else:
            items.update(_split(key, payload, limit))
    backend.set_many(items)


def read_entry(backend: Backend, key: str) -> bytes | None:
    """The payload stored under ``key``, or ``None`` (absent, or a chunk is missing/corrupt)."""
    data = backend.get(key)
    if data is None or not is_manifest(data):
        return data
    return read_chunks(backend, key, data)


def read_chunks(backend: Backend, key: str, manifest: bytes) -> bytes | None:
    """The payload a manifest already read describes, or ``None`` (a chunk missing/corrupt)."""
    chunk_keys = _manifest_chunk_keys(key, manifest)
    return None if chunk_keys is None else _join(manifest, backend.get_many(chunk_keys), key)


def read_entries(backend: Backend, keys: Iterable[str]) -> dict[str, bytes]:
    """The payloads found among ``keys``: one ``get_many``, plus one more if any is chunked."""
    found = backend.get_many(keys)
    manifests = {k: v for k, v in found.items() if is_manifest(v)}
    if not manifests:
        return found
    wanted = []
    for key, data in list(manifests.items()):
        chunk_keys = _manifest_chunk_keys(key, data)
        if chunk_keys is None:
            del manifests[key], found[key]
        else:
            wanted.extend(chunk_keys)
    chunks = backend.get_many(wanted)
    for key, data in manifests.items():
        payload = _join(data, chunks, key)
        if payload is None:
            del found[key]
        else:
            found[key] = payload
    return found


def delete_entry(backend: Backend, key: str) -> bool:
    """Remove the entry under ``key``, with its chunks; return whether it existed."""
    data = backend.get(key)
    if data is None:
        return False
    chunk_keys = _manifest_chunk_keys(key, data) if is_manifest(data) else None
    existed = backend.delete(key)
    if chunk_keys:
        backend.delete_many(chunk_keys)
    return existed


def read_entry_for_update(backend: Backend, key: str) -> tuple[bytes | None, object]:
    """Like :func:`read_entry`, plus the CAS token that :func:`replace_entry` needs.

    ``(None, token)`` with a token means the key holds a chunked entry that cannot be read
    (a lost chunk, a damaged manifest): write over it, as adding would fail.
    """
    data, token = backend.gets(key)
    if data is None or not is_manifest(data):
        return data, token
    chunk_keys = _manifest_chunk_keys(key, data)
    if chunk_keys is None:
        return None, token
    return _join(data, backend.get_many(chunk_keys), key), token


def _manifest_and_chunks(backend: Backend, key: str, payload: bytes) -> bytes:
    """Write the chunks of a large payload; return what to store under ``key`` itself."""
    limit = backend.max_item_size
    if limit is None or len(payload) <= limit:
        return payload
    items = _split(key, payload, limit)
    manifest = items.pop(key)
    backend.set_many(items)
    return manifest


def add_entry(backend: Backend, key: str, payload: bytes) -> bool:
    """Store ``payload`` only if ``key`` holds nothing; return whether it was stored."""
    return backend.add(key, _manifest_and_chunks(backend, key, payload))


def replace_entry(backend: Backend, key: str, payload: bytes, token: object) -> bool:
    """Store ``payload`` if ``key`` is unchanged since :func:`read_entry_for_update`."""
    return backend.cas(key, _manifest_and_chunks(backend, key, payload), token)
