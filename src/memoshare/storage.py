"""Entries on top of a byte store: :class:`EntryStore`.

A backend stores items of at most :attr:`Backend.max_item_size` bytes; an *entry* is a payload
of any size. A payload that fits is stored as one item. A larger one is stored as chunks under
keys of their own plus a small *manifest* under the entry's key. The manifest names the chunks
by a random nonce (so two writers of the same key never mix their chunks) and carries the
length and blake2b digest of the whole payload. The chunks are written first and the manifest
last, so a reader either finds no manifest (a miss) or a manifest whose chunks were all
written. A chunk that was evicted since, or that does not match the digest, makes the read a
miss, never a wrong value.

A key may also hold the *not stored* mark (:data:`NOT_STORED_ITEM`, written by
:meth:`EntryStore.mark_not_stored`): the last caller computed the value but did not store it (its
call was faster than ``time_threshold``, the value cannot be pickled, or the function raised).
Readers then compute for themselves at once, without waiting for anyone; the mark expires, and a
stored value replaces it.

Everything that knows this layout is here: the front ends read and write payloads only.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

from .backends.base import Backend
from .errors import BackendError, ContendedUpdate, CorruptEntry
from .serialization import FLAG_CHUNKED, FLAG_NOT_STORED, HEADER_SIZE, header

__all__ = [
    "MAX_ENTRY_KEY_LENGTH",
    "MAX_UPDATE_ATTEMPTS",
    "NOT_STORED_ITEM",
    "EntryStore",
    "is_manifest",
]

_MANIFEST = struct.Struct("<16sIQ16s")  # nonce, chunk count, total length, digest
_MANIFEST_HEADER = header(FLAG_CHUNKED)
#: Entry keys may be at most this long: a chunk key adds ``~<32 hex>~<index>``.
MAX_ENTRY_KEY_LENGTH = 200
#: What :meth:`EntryStore.read` returns for a key holding the "not stored" mark.
NOT_STORED_ITEM = header(FLAG_NOT_STORED)
#: Chunks read per round trip; a manifest whose chunks are missing costs one batch at most.
CHUNK_BATCH = 256
#: The smallest and largest chunks any writer makes (memcached's smallest item limit, and
#: Redis's largest value): a manifest implying others is damaged or forged.
MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 512 << 20
#: Compare-and-set attempts of :meth:`EntryStore.update` before it gives up.
MAX_UPDATE_ATTEMPTS = 100


def is_manifest(data: bytes) -> bool:
    """Whether a stored item is a chunk manifest rather than a whole payload."""
    # bytes.startswith saves the slice's copy on every hit.
    if type(data) is bytes:
        return data.startswith(_MANIFEST_HEADER)
    return data[:4] == _MANIFEST_HEADER


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class _Manifest:
    """A parsed manifest: which chunks make the payload, and how to check them.

    A damaged or forged manifest must not cost more than a miss: it is refused unless its
    chunk count fits its stated length (chunks of :data:`MIN_CHUNK_BYTES` to
    :data:`MAX_CHUNK_BYTES`), and chunks are read :data:`CHUNK_BATCH` at a time, stopping at
    the first batch with a chunk missing. So a manifest naming a million chunks that do not
    exist costs one batch, not a million keys.
    """

    __slots__ = ("key", "nonce", "count", "total", "digest")

    def __init__(self, key: str, data: bytes) -> None:
        if len(data) != HEADER_SIZE + _MANIFEST.size:
            raise CorruptEntry("chunk manifest has the wrong size")
        nonce, count, total, digest = _MANIFEST.unpack_from(data, HEADER_SIZE)
        if not 0 < count <= total:
            raise CorruptEntry(f"chunk manifest names {count} chunks for {total} bytes")
        if count > -(-total // MIN_CHUNK_BYTES) or -(-total // count) > MAX_CHUNK_BYTES:
            raise CorruptEntry(
                f"chunk manifest names {count} chunks for {total} bytes: no writer splits so"
            )
        self.key = key
        self.nonce = nonce.hex()
        self.count = count
        self.total = total
        self.digest = digest

    @classmethod
    def of(cls, key: str, data: bytes | None) -> _Manifest | None:
        """The manifest of a stored item, or ``None`` (absent, a whole payload, damaged)."""
        return None if data is None or not is_manifest(data) else cls.parse(key, data)

    @classmethod
    def parse(cls, key: str, data: bytes) -> _Manifest | None:
        """The manifest, or ``None`` if it is damaged (the entry is then a miss)."""
        try:
            return cls(key, data)
        except CorruptEntry:
            return None

    def chunk_keys(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The keys of chunks ``start`` to ``stop`` (default: all)."""
        stop = self.count if stop is None else min(stop, self.count)
        return [f"{self.key}~{self.nonce}~{i}" for i in range(start, stop)]

    def batches(self) -> Iterator[list[str]]:
        """The chunk keys, :data:`CHUNK_BATCH` at a time."""
        for start in range(0, self.count, CHUNK_BATCH):
            yield self.chunk_keys(start, start + CHUNK_BATCH)

    def read(self, backend: Backend) -> bytes | None:
        """The payload, read batch by batch; ``None`` at the first missing chunk."""
        parts: list[bytes] = []
        for keys in self.batches():
            found = backend.get_many(keys)
            if len(found) != len(keys):
                return None
            parts.extend(found[k] for k in keys)
        return self._whole(parts)

    def join(self, chunks: Mapping[str, bytes]) -> bytes | None:
        """The payload from chunks already read, or ``None`` if one is missing."""
        parts = [chunks.get(k) for k in self.chunk_keys()]
        if any(p is None for p in parts):
            return None
        return self._whole(parts)  # type: ignore[arg-type]

    def _whole(self, parts: list[bytes]) -> bytes | None:
        """The joined payload if it has the stated length and digest, else ``None``."""
        if sum(map(len, parts)) != self.total:
            return None
        payload = b"".join(parts)
        return payload if _digest(payload) == self.digest else None


class EntryStore:
    """Payloads of any size on a :class:`~memoshare.backends.Backend`.

    Every method raises :class:`~memoshare.BackendError` when the store fails; a missing,
    damaged or partly evicted entry reads as ``None`` (absent).
    """

    __slots__ = ("backend", "_get")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._get = backend.get  # bound once: the hit path

    # -- reading -------------------------------------------------------------------------------
    def read(self, key: str) -> bytes | None:
        """The payload stored under ``key``, :data:`NOT_STORED_ITEM`, or ``None``."""
        data = self._get(key)
        # is_manifest(), inlined: this is every hit's path.
        if data is None or not (
            data.startswith(_MANIFEST_HEADER) if type(data) is bytes else is_manifest(data)
        ):
            return data
        return self._chunked(key, data)

    def _chunked(self, key: str, manifest_data: bytes) -> bytes | None:
        manifest = _Manifest.parse(key, manifest_data)
        return None if manifest is None else manifest.read(self.backend)

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The payloads found among ``keys`` (marks included): one ``get_many``, one more if
        any is chunked.

        Raises:
            BackendError: a store of several servers failed in part; its ``found`` holds the
                whole payloads read from the others (chunked ones joined).
        """
        failure: BackendError | None = None
        try:
            found = self.backend.get_many(keys)
        except BackendError as exc:
            failure, found = exc, dict(exc.found or {})
        manifests: dict[str, _Manifest] = {}
        for key, data in list(found.items()):
            if is_manifest(data):
                del found[key]
                manifest = _Manifest.parse(key, data)
                if manifest is not None:
                    manifests[key] = manifest
        # The chunks of every small manifest in one more round trip; a large one batch by batch.
        small = {k: m for k, m in manifests.items() if m.count <= CHUNK_BATCH}
        try:
            if small:
                chunks = self.backend.get_many([c for m in small.values() for c in m.chunk_keys()])
                for key, manifest in small.items():
                    payload = manifest.join(chunks)
                    if payload is not None:
                        found[key] = payload
            for key, manifest in manifests.items():
                if key not in small and (payload := manifest.read(self.backend)) is not None:
                    found[key] = payload
        except BackendError as exc:  # the entries already joined are kept
            failure = failure or exc
        if failure is not None:
            failure.found = found
            raise failure
        return found

    def chunk_keys(self, key: str) -> list[str]:
        """The keys of the chunks of the entry under ``key`` (none for a whole or absent
        entry, or a damaged manifest)."""
        manifest = _Manifest.of(key, self._get(key))
        return [] if manifest is None else manifest.chunk_keys()

    # -- writing -------------------------------------------------------------------------------
    def _items(self, key: str, payload: bytes) -> dict[str, bytes]:
        """What to write for ``payload``: itself, or its chunks then its manifest (dicts keep
        order, and the manifest must come last)."""
        limit = self.backend.max_item_size
        if limit is None or len(payload) <= limit:
            return {key: payload}
        view = memoryview(payload)
        count = -(-len(payload) // limit)
        manifest = _MANIFEST_HEADER + _MANIFEST.pack(
            os.urandom(16), count, len(payload), _digest(payload)
        )
        keys = _Manifest(key, manifest).chunk_keys()  # named where readers name them
        items = {k: bytes(view[i * limit : (i + 1) * limit]) for i, k in enumerate(keys)}
        items[key] = manifest
        return items

    def _prepared(self, key: str, payload: bytes, expire: float | None = None) -> bytes:
        """Write the chunks of a large payload; return the item to store under ``key``."""
        items = self._items(key, payload)
        item = items.pop(key)
        if items:
            self.backend.set_many(items, expire)
        return item

    def write(self, key: str, payload: bytes, expire: float | None = None) -> None:
        """Store ``payload`` under ``key`` (``expire``: lifetime in seconds)."""
        items = self._items(key, payload)
        if len(items) == 1:
            self.backend.set(key, payload, expire)
        else:
            self.backend.set_many(items, expire)

    def write_many(self, entries: Mapping[str, bytes], expire: float | None = None) -> None:
        """Store several entries in as few round trips as the backend allows."""
        items: dict[str, bytes] = {}
        for key, payload in entries.items():
            items.update(self._items(key, payload))
        self.backend.set_many(items, expire)

    def add(self, key: str, payload: bytes, expire: float | None = None) -> bool:
        """Store ``payload`` only if ``key`` holds nothing; return whether it was stored."""
        return self.backend.add(key, self._prepared(key, payload, expire), expire)

    def mark_not_stored(self, key: str, expire: float) -> None:
        """Leave the "not stored" mark under ``key`` for ``expire`` seconds (see above), unless
        the key holds something: a value another caller stored meanwhile is never replaced."""
        self.backend.add(key, NOT_STORED_ITEM, expire)

    def update(
        self,
        key: str,
        change: Callable[[bytes | None], bytes | None],
        attempts: int = MAX_UPDATE_ATTEMPTS,
    ) -> bytes | None:
        """Read-modify-write ``key`` atomically: ``change(current)`` gives the new payload.

        ``current`` is ``None`` when the key is absent or unreadable. ``change`` may run several
        times (another writer won the compare-and-set: it is called again with that writer's
        payload); returning ``None`` leaves the entry as it is. Returns the payload stored, or
        ``None`` if ``change`` declined.

        Raises:
            ContendedUpdate: other writers won ``attempts`` times in a row.
        """
        backend = self.backend
        for attempt in range(attempts):
            data, token = backend.gets(key)
            current = None if data == NOT_STORED_ITEM else data
            if data is not None and is_manifest(data):
                # A lost chunk or a damaged manifest reads as None: it is overwritten (with
                # the token: adding would fail, the key is taken).
                current = self._chunked(key, data)
            new = change(current)
            if new is None:
                return None
            item = self._prepared(key, new)
            stored = backend.add(key, item) if token is None else backend.cas(key, item, token)
            if stored:
                return new
            time.sleep(min(0.001 * 2**attempt, 0.05) * random.random())
        raise ContendedUpdate(f"{key!r}: lost {attempts} compare-and-set races in a row")

    # -- removing ------------------------------------------------------------------------------
    def delete(self, key: str) -> bool:
        """Remove the entry under ``key`` with its chunks; return whether it existed (a
        "not stored" mark is removed too, but is no entry)."""
        data = self._get(key)
        manifest = _Manifest.of(key, data)
        existed = self.backend.delete(key) and data != NOT_STORED_ITEM
        if manifest is not None:
            for keys in manifest.batches():
                if not self.backend.delete_many(keys):
                    break  # none of this batch was there: the rest were never written
        return existed


# -- the functions of earlier versions ---------------------------------------------------------
# Before EntryStore, this module was free functions taking the backend. They still work, as thin
# deprecated wrappers, for code written against them.
def _deprecated(name: str, replacement: str) -> None:
    warnings.warn(
        f"memoshare.storage.{name}() is deprecated: use EntryStore(backend).{replacement}",
        DeprecationWarning,
        stacklevel=3,
    )


def read_entry(backend: Backend, key: str) -> bytes | None:
    """Deprecated: ``EntryStore(backend).read(key)``."""
    _deprecated("read_entry", "read(key)")
    return EntryStore(backend).read(key)


def read_entries(backend: Backend, keys: Iterable[str]) -> dict[str, bytes]:
    """Deprecated: ``EntryStore(backend).read_many(keys)``."""
    _deprecated("read_entries", "read_many(keys)")
    return EntryStore(backend).read_many(keys)


def write_entry(backend: Backend, key: str, payload: bytes, expire: float | None = None) -> None:
    """Deprecated: ``EntryStore(backend).write(key, payload, expire)``."""
    _deprecated("write_entry", "write(key, payload)")
    EntryStore(backend).write(key, payload, expire)


def write_entries(backend: Backend, entries: Mapping[str, bytes]) -> None:
    """Deprecated: ``EntryStore(backend).write_many(entries)``."""
    _deprecated("write_entries", "write_many(entries)")
    EntryStore(backend).write_many(entries)


def add_entry(backend: Backend, key: str, payload: bytes) -> bool:
    """Deprecated: ``EntryStore(backend).add(key, payload)``."""
    _deprecated("add_entry", "add(key, payload)")
    return EntryStore(backend).add(key, payload)


def delete_entry(backend: Backend, key: str) -> bool:
    """Deprecated: ``EntryStore(backend).delete(key)``."""
    _deprecated("delete_entry", "delete(key)")
    return EntryStore(backend).delete(key)


def read_entry_for_update(backend: Backend, key: str) -> tuple[bytes | None, object]:
    """Deprecated: use ``EntryStore(backend).update(key, change)``, which retries itself."""
    _deprecated("read_entry_for_update", "update(key, change)")
    data, token = backend.gets(key)
    if data is not None and is_manifest(data):
        return EntryStore(backend)._chunked(key, data), token
    return data, token


def replace_entry(backend: Backend, key: str, payload: bytes, token: object) -> bool:
    """Deprecated: use ``EntryStore(backend).update(key, change)``, which retries itself."""
    _deprecated("replace_entry", "update(key, change)")
    return backend.cas(key, EntryStore(backend)._prepared(key, payload), token)


def read_chunks(backend: Backend, key: str, manifest: bytes) -> bytes | None:
    """Deprecated: ``EntryStore(backend).read(key)`` reads chunked entries whole."""
    _deprecated("read_chunks", "read(key)")
    return EntryStore(backend)._chunked(key, manifest)
