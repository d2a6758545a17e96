"""In-process store: a dict of bytes, with optional LRU eviction."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import BackendRefused
from .base import Backend, CasToken

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    """Keeps entries in this process only (threads share it; other processes do not).

    Args:
        capacity: most entries kept; the least recently *used* one is evicted past it.
            ``None`` (default) keeps everything.
        max_bytes: most value bytes kept, evicting least recently used entries past it. A
            single value larger than ``max_bytes`` is refused (:class:`BackendRefused`) and
            evicts nothing, as :class:`DiskBackend` does with its ``size_limit``.

    Values are stored serialized, so a caller that mutates a returned object never changes
    the cached one. A pickled ``MemoryBackend`` arrives empty in the receiving process.
    """

    scope = "process"
    can_list_keys = True

    def __init__(self, capacity: int | None = None, max_bytes: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None, got {capacity!r}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes!r}")
        super().__init__()
        self.capacity = capacity
        self.max_bytes = max_bytes
        # key -> (value, expire_at or 0.0, version). The version doubles as CAS token.
        self._data: OrderedDict[str, tuple[bytes, float, int]] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        self._versions = itertools.count(1)
        self._lock = threading.RLock()

    def _live(self, key: str) -> tuple[bytes, float, int] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] and entry[1] <= time.time():
            self._remove(key)
            return None
        return entry

    def _remove(self, key: str) -> bool:
        entry = self._data.pop(key, None)
        if entry is None:
            return False
        self._bytes -= len(entry[0])
        return True

    def _refuse_too_large(self, value: bytes) -> None:
        if self.max_bytes is not None and len(value) > self.max_bytes:
            # Keeping it would evict every other entry and still exceed the limit.
            raise BackendRefused(
                f"a value of {len(value)} bytes exceeds the memory cache's max_bytes "
                f"({self.max_bytes} bytes)"
            )

    def _store(self, key: str, value: bytes, expire: float | None) -> None:
        self._refuse_too_large(value)  # before anything is removed: the old entry stays
        value = bytes(value)
        self._remove(key)
        expire_at = time.time() + expire if expire else 0.0
        self._data[key] = (value, expire_at, next(self._versions))
        self._bytes += len(value)
        while self._data and (
            (self.capacity is not None and len(self._data) > self.capacity)
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            oldest = next(iter(self._data))
            self._remove(oldest)
            self._evictions += 1

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._live(key)
            if entry is None:
                return None
            self._data.move_to_end(key)
            return entry[0]

    def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        with self._lock:
            self._store(key, value, expire)

    def add(self, key: str, value: bytes, expire: float | None = None) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._store(key, value, expire)
            return True

    def gets(self, key: str) -> tuple[bytes | None, CasToken]:
        with self._lock:
            entry = self._live(key)
            return (None, None) if entry is None else (entry[0], entry[2])

    def cas(self, key: str, value: bytes, token: CasToken, expire: float | None = None) -> bool:
        with self._lock:
            entry = self._live(key)
            if entry is None or entry[2] != token:
                return False
            self._store(key, value, expire)
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._remove(key)

    def incr(self, key: str, delta: int = 1) -> int:
        with self._lock:
            entry = self._live(key)
            value = (int(entry[0]) if entry else 0) + delta
            self._store(key, str(value).encode(), None)
            return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def set_many(self, items: Mapping[str, bytes], expire: float | None = None) -> None:
        with self._lock:
            for value in items.values():  # all or nothing, as on disk
                self._refuse_too_large(value)
            for key, value in items.items():
                self._store(key, value, expire)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        with self._lock:
            return {k: v for k in keys if (v := self.get(k)) is not None}

    def exists_many(self, keys: Iterable[str]) -> set[str]:
        with self._lock:
            return {k for k in keys if self._live(k) is not None}

    def keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [k for k in list(self._data) if k.startswith(prefix) and self._live(k)]

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"items": len(self._data), "bytes": self._bytes, "evictions": self._evictions}

    def _after_fork(self) -> None:
        self._lock = threading.RLock()  # the parent's may have been held by another thread

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "max_bytes": self.max_bytes}

    def __repr__(self) -> str:
        return f"MemoryBackend(capacity={self.capacity!r}, max_bytes={self.max_bytes!r})"
