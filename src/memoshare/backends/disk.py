"""The embedded default: an LMDB directory shared by every process of one machine.

Why LMDB: a read is a memory-mapped B-tree lookup (about 1 us, versus 10 to 12 us for diskcache's
SQLite, measured in docs/benchmarks.md), every write is an ACID transaction (a reader never sees
a half-written entry, a crash never leaves one), and write transactions are serialized across
processes by LMDB's own lock, which makes ``add``/``cas``/``incr`` atomic for free.

Layout of one entry in the ``data`` table: ``seq (8 bytes) | expire_at (8 bytes) | value``.
``seq`` is a store-wide counter bumped on every write: it is the CAS token and the position in
the ``order`` table (``seq -> key``) that eviction walks from the oldest write.

Map size. Processes may open one directory with different ``map_size`` values (a
``size_limit`` gives 256 MiB, the default 64 GiB). LMDB records in the file the largest map
size any writer has used; a process adopts it when it opens the directory, when its next
transaction finds that another process grew the data past its own map (``MapResizedError``),
and when a write finds its own map full (``MapFullError``). Adopting it remaps the file, which
LMDB allows only while no transaction of the process is active: :class:`_MapGuard` makes
readers of the process wait (or, mid-transaction, finish) while that happens.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lmdb

from .. import _process
from ..errors import BackendError, BackendRefused
from .base import Backend, CasToken

__all__ = ["DiskBackend", "default_cache_dir"]

_HEADER = struct.Struct(">Qd")  # seq, expire_at (0.0: never)
_SEQ = struct.Struct(">Q")
_NEVER = struct.pack(">d", 0.0)
_META_SEQ = b"seq"
_META_BYTES = b"bytes"
_META_ITEMS = b"items"
_META_EVICTIONS = b"evictions"
_INFO_FIELDS = (("items", _META_ITEMS), ("bytes", _META_BYTES), ("evictions", _META_EVICTIONS))

#: Environment variable naming the default cache directory.
ENV_VAR = "MEMOSHARE_DIR"

# LMDB forbids opening one file twice in a process: environments are shared per path.
_envs: dict[str, tuple[Any, ...]] = {}  # path -> (environment, data, order, meta, _MapGuard)
_envs_lock = threading.Lock()
# Held around every write transaction of this process, and by fork() (see below): a child must
# not inherit (and then abort, when it closes the environment) a write transaction in flight.
_write_lock = threading.RLock()
_inherited: list[lmdb.Environment] = []  # a parent's environments: never used nor closed


def default_cache_dir() -> Path:
    """Where the default store lives: ``$MEMOSHARE_DIR``, else the platform's cache folder.

    Linux: ``$XDG_CACHE_HOME/memoshare`` (``~/.cache/memoshare``); macOS:
    ``~/Library/Caches/memoshare``; Windows: ``%LOCALAPPDATA%\\memoshare\\Cache``.
    """
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "memoshare" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "memoshare"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memoshare"


def _before_fork() -> None:
    _write_lock.acquire()


def _after_fork_in_parent() -> None:
    _write_lock.release()


def _reopen_envs_after_fork() -> None:
    # LMDB environments must not be used across fork. py-lmdb refuses to open a path twice in
    # one process, so the child closes what it inherited (this releases only the child's own
    # locks and reader slots, never the parent's) and opens the path afresh on first use.
    global _envs_lock, _write_lock
    _envs_lock = threading.Lock()  # a parent's thread may have held them at the fork
    _write_lock = threading.RLock()
    for handles in _envs.values():
        try:
            handles[0].close()
        except lmdb.Error:
            _inherited.append(handles[0])
    _envs.clear()


_process.before_fork(_before_fork, _process.Order.STORES)
_process.after_fork_parent(_after_fork_in_parent, _process.Order.STORES)
_process.after_fork_child(_reopen_envs_after_fork, _process.Order.STORES)


class _MapGuard:
    """Lets one thread remap an environment while no other thread of the process reads it.

    LMDB may change the map size of an open environment only while the process has no active
    transaction. Write transactions already run under ``_write_lock``; each read transaction
    appends a marker to ``readers`` for its duration and checks ``resizing`` (list append/pop
    and the flag are atomic under the GIL, and cost about 0.1 us: no lock on the read path). A
    resizer sets ``resizing`` first and then waits for ``readers`` to empty: a reader either
    saw the flag (and waits for ``lock``) or is counted.
    """

    __slots__ = ("readers", "resizing", "lock", "map_size")

    def __init__(self, map_size: int) -> None:
        self.readers: list[None] = []
        self.resizing = False
        self.lock = threading.Lock()
        self.map_size = map_size  # the environment's, changed only by a resize

    def wait(self) -> None:
        """Block until a resize in progress is over."""
        with self.lock:
            pass


#: How long a resize waits for the read transactions in flight (a transaction of memoshare
#: reads a few keys; this bound only guards against a marker that was never removed).
_DRAIN_TIMEOUT = 10.0

_PAUSED = object()  # a read that met a resize in progress, or an LMDB error: take the slow path


def _current_map_size(env: lmdb.Environment) -> int:
    return int(env.info()["map_size"])


def _adopt_map_size(env: lmdb.Environment, wanted: int) -> int:
    """Grow ``env``'s map to the largest of its own, ``wanted`` and the size recorded in the
    file by any process, and return it. Call only while no transaction of this process is
    active.
    """
    before = _current_map_size(env)
    # Size 0 adopts the size recorded in the file: LMDB persists only increases, so it is the
    # largest any process committed with (see mdb_env_set_mapsize).
    env.set_mapsize(0)
    after = _current_map_size(env)
    target = max(before, wanted)
    if after < target:
        env.set_mapsize(target)
        after = _current_map_size(env)
    return after


def _clear_stale_readers(env: lmdb.Environment) -> int:
    """Free the reader slots of processes that died inside a read transaction (SIGKILL, OOM):
    LMDB keeps the pages such a reader saw, so the file only grows. Returns how many."""
    try:
        return int(env.reader_check())
    except lmdb.Error:
        return 0


def _expire_at(expire: float | None) -> float:
    return time.time() + expire if expire else 0.0


def _expired(expire_at: float) -> bool:
    return expire_at != 0.0 and expire_at <= time.time()


class DiskBackend(Backend):
    """A persistent store in a local directory, shared by all processes of the machine.

    Args:
        path: directory of the store (created if missing); default :func:`default_cache_dir`.
        size_limit: most value bytes kept; past it the oldest writes are evicted (least
            recently *stored*, which keeps reads free of writes). ``None``: no limit.
        map_size: the largest the LMDB file may grow, in bytes. LMDB reserves this as a sparse
            file: 64 GiB by default, ``max(2 * size_limit, 256 MiB)`` when a limit is set.
            Processes (and backends of one process) that open one directory with different
            map sizes all end up using the largest of them.
        sync: flush every write transaction to disk (``True``, default) so a machine crash
            loses at most the last one; ``False`` trades that for faster writes.

    Entries survive restarts. Reads never block on writers; writers are serialized.
    """

    scope = "machine"
    can_list_keys = True
    max_item_size = None

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        size_limit: int | None = None,
        map_size: int | None = None,
        sync: bool = True,
    ) -> None:
        if size_limit is not None and size_limit < 1:
            raise ValueError(f"size_limit must be >= 1 byte or None, got {size_limit!r}")
        super().__init__()
        self.path = Path(path).expanduser() if path is not None else default_cache_dir()
        self.size_limit = size_limit
        if map_size is None:
            map_size = max(2 * size_limit, 256 << 20) if size_limit else 64 << 30
        self.map_size = map_size
        self.sync = sync
        self._env: lmdb.Environment | None = None
        self._guard: _MapGuard  # set with _env, by _open
        self._readers: list[None]

    # -- opening -------------------------------------------------------------------------------
    def _open(self) -> lmdb.Environment:
        key = str(self.path.resolve())
        with _envs_lock:
            handles = _envs.get(key)
            if handles is None:
                try:
                    self.path.mkdir(parents=True, exist_ok=True)
                    env = lmdb.open(
                        str(self.path),
                        map_size=self.map_size,
                        max_dbs=4,
                        max_readers=2048,
                        metasync=False,
                        sync=self.sync,
                        readahead=False,
                    )
                    # open_db runs a write transaction of its own: do it once, here, before
                    # any other thread can hold LMDB's writer lock.
                    dbs = tuple(env.open_db(name) for name in (b"data", b"order", b"meta"))
                    # Another process may have opened the directory with a larger map: use
                    # it too, or our writes would fail once the file outgrows our map.
                    guard = _MapGuard(_adopt_map_size(env, self.map_size))
                    _clear_stale_readers(env)  # left by processes killed mid-read
                except (OSError, lmdb.Error) as exc:
                    raise BackendError(f"cannot open the disk cache at {self.path}: {exc}") from exc
                handles = _envs[key] = (env, *dbs, guard)
        env, self._data, self._order, self._meta, guard = handles
        self._guard = guard
        self._readers = guard.readers
        if self.map_size > guard.map_size:
            # Opened earlier in this process with a smaller map (say a size_limit's 256 MiB
            # before the default's 64 GiB): grow it, or this backend's writes would fail.
            self._remap(env)
        self._env = env
        return env

    def _remap(self, env: lmdb.Environment) -> bool:
        """Adopt the largest map size (ours or the file's), with no transaction active in this
        process: writers are held by ``_write_lock``, readers by the :class:`_MapGuard`.

        Returns whether the map grew.
        """
        guard = self._guard
        with _write_lock, guard.lock:
            guard.resizing = True
            try:
                deadline = time.monotonic() + _DRAIN_TIMEOUT
                while guard.readers:  # read transactions in flight finish
                    if time.monotonic() > deadline:
                        raise BackendError(
                            f"disk cache at {self.path}: cannot adopt the map size another "
                            "process set: read transactions of this process do not end"
                        )
                    time.sleep(0.0001)
                before = guard.map_size
                guard.map_size = _adopt_map_size(env, self.map_size)
                return guard.map_size > before
            except lmdb.Error as exc:
                raise BackendError(f"disk cache at {self.path}: remapping failed: {exc}") from exc
            finally:
                guard.resizing = False

    def _read(self, what: str, fn: Any, buffers: bool = False) -> Any:
        """``fn(txn)`` in a read transaction; LMDB errors become :class:`BackendError`.

        A map that another process grew past ours (``MapResizedError``) is adopted and the read
        retried once; a resize in progress in this process is waited for.
        """
        adopted = False
        while True:
            env = self._env or self._open()
            guard = self._guard
            readers = guard.readers
            failure: Any = None
            readers.append(None)
            try:
                if guard.resizing:
                    failure = _PAUSED
                else:
                    with env.begin(db=self._data, buffers=buffers) as txn:
                        return fn(txn)
            except lmdb.Error as exc:
                failure = exc
            finally:
                readers.pop()
            if failure is _PAUSED:
                guard.wait()
            elif isinstance(failure, lmdb.MapResizedError) and not adopted:
                adopted = True
                self._remap(env)
            else:
                raise BackendError(
                    f"disk cache {what} failed at {self.path}: {failure}"
                ) from failure

    def _after_fork(self) -> None:
        self._env = None  # the next use opens the path afresh, with a guard of its own

    # -- helpers inside a write transaction ----------------------------------------------------
    def _meta_add(self, txn: Any, name: bytes, delta: int) -> int:
        raw = txn.get(name, db=self._meta)
        value = (int(raw) if raw else 0) + delta
        txn.put(name, str(value).encode(), db=self._meta)
        return value

    def _current(self, txn: Any, bkey: bytes) -> tuple[int, bytes] | None:
        """(seq, stored record) of a live entry, removing it if expired."""
        raw = txn.get(bkey, db=self._data)
        if raw is None:
            return None
        seq, expire_at = _HEADER.unpack_from(raw)
        if _expired(expire_at):
            self._drop(txn, bkey, raw)
            return None
        return seq, raw

    def _drop(self, txn: Any, bkey: bytes, raw: bytes) -> None:
        seq, _ = _HEADER.unpack_from(raw)
        txn.delete(bkey, db=self._data)
        txn.delete(_SEQ.pack(seq), db=self._order)
        self._meta_add(txn, _META_BYTES, -(len(raw) - _HEADER.size))
        self._meta_add(txn, _META_ITEMS, -1)

    def _put(self, txn: Any, bkey: bytes, value: bytes, expire: float | None) -> None:
        if self.size_limit is not None and len(value) > self.size_limit:
            # Keeping it would evict everything else and still exceed the limit.
            raise BackendRefused(
                f"a value of {len(value)} bytes exceeds the disk cache's size_limit "
                f"({self.size_limit} bytes)"
            )
        old = txn.get(bkey, db=self._data)
        if old is not None:
            self._drop(txn, bkey, old)
        seq = self._meta_add(txn, _META_SEQ, 1)
        txn.put(bkey, _HEADER.pack(seq, _expire_at(expire)) + value, db=self._data)
        txn.put(_SEQ.pack(seq), bkey, db=self._order)
        total = self._meta_add(txn, _META_BYTES, len(value))
        self._meta_add(txn, _META_ITEMS, 1)
        if self.size_limit is not None and total > self.size_limit:
            self._evict(txn, total, keep=bkey)

    def _evict(self, txn: Any, total: int, keep: bytes) -> None:
        # Walk the order table from the oldest write, only as far as needed (not a full scan).
        cursor = txn.cursor(db=self._order)
        evicted = 0
        positioned = cursor.first()
        while positioned and total > self.size_limit:  # type: ignore[operator]
            victim = cursor.value()
            if victim == keep:
                positioned = cursor.next()
                continue
            raw = txn.get(victim, db=self._data)
            positioned = cursor.delete()  # the order entry; the cursor moves to the next one
            if raw is not None:
                total -= len(raw) - _HEADER.size
                txn.delete(victim, db=self._data)
                self._meta_add(txn, _META_BYTES, -(len(raw) - _HEADER.size))
                self._meta_add(txn, _META_ITEMS, -1)
                evicted += 1
        if evicted:
            self._meta_add(txn, _META_EVICTIONS, evicted)

    def _run(self, what: str, fn: Any) -> Any:
        """``fn(txn)`` in a write transaction (retried once after adopting a larger map)."""
        adopted = False
        while True:
            env = self._env or self._open()
            try:
                with _write_lock, env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapResizedError as exc:
                # Another process grew the data past our map: adopt its size and try again.
                if adopted:
                    raise BackendError(f"disk cache {what} failed at {self.path}: {exc}") from exc
                adopted = True
                self._remap(env)
            except lmdb.MapFullError as exc:
                # Our map is full; another process may have opened the file with a larger one,
                # or a reader that died (SIGKILL) pins old pages that could be reused.
                if not adopted:
                    adopted = True
                    stale = _clear_stale_readers(env)
                    if self._remap(env) or stale:
                        continue
                # Refused, not down: the store answers, it has no room for this value.
                raise BackendRefused(self._full_message(env)) from exc
            except lmdb.Error as exc:
                raise BackendError(f"disk cache {what} failed at {self.path}: {exc}") from exc

    def _full_message(self, env: lmdb.Environment) -> str:
        readers = env.readers().count("\n") - 1  # a header line, then one line per reader
        held = (
            f"; {readers} read transactions of live processes are open, and the pages they "
            "still see cannot be reused until they end"
            if readers > 0
            else ""
        )
        limit = f", size_limit {self.size_limit} bytes" if self.size_limit else ""
        return (
            f"the disk cache at {self.path} is full (map {self._guard.map_size} bytes{limit})"
            f"{held}: pass a larger map_size=, or a size_limit= so old entries are evicted"
        )

    # -- the interface -------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        env = self._env or self._open()
        # The hit path: _read's body inlined (no closure, no extra frame); anything unusual (a
        # resize in progress, any LMDB error) goes to _read, which handles and reports it.
        readers = self._readers
        readers.append(None)
        try:
            if self._guard.resizing:
                raw = _PAUSED
            else:
                # Without buffers=True LMDB copies the value once; that beats the buffer
                # protocol's set-up cost for the small values of most calls (1.1 us vs 2.0 us).
                with env.begin(db=self._data) as txn:
                    raw = txn.get(key.encode())
        except lmdb.Error:
            raw = _PAUSED
        finally:
            readers.pop()
        if raw is _PAUSED:
            raw = self._read("get", lambda txn: txn.get(key.encode()))
        if raw is None or (raw[8:16] != _NEVER and _expired(_HEADER.unpack_from(raw)[1])):
            return None
        return raw[_HEADER.size :]

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)

        def read_all(txn: Any) -> dict[str, bytes]:
            found = {}
            for key in keys:
                raw = txn.get(key.encode())
                if raw is not None and not _expired(_HEADER.unpack_from(raw)[1]):
                    found[key] = bytes(raw[_HEADER.size :])
            return found

        return self._read("get_many", read_all, buffers=True)

    def exists_many(self, keys: Iterable[str]) -> set[str]:
        keys = list(keys)

        def check_all(txn: Any) -> set[str]:
            found = set()
            for key in keys:
                raw = txn.get(key.encode())  # buffers: nothing is copied
                if raw is not None and not _expired(_HEADER.unpack_from(raw)[1]):
                    found.add(key)
            return found

        return self._read("exists_many", check_all, buffers=True)

    def gets(self, key: str) -> tuple[bytes | None, CasToken]:
        def read_one(txn: Any) -> tuple[bytes | None, CasToken]:
            raw = txn.get(key.encode())
            if raw is None:
                return None, None
            seq, expire_at = _HEADER.unpack_from(raw)
            if _expired(expire_at):
                return None, None
            return bytes(raw[_HEADER.size :]), seq

        return self._read("gets", read_one, buffers=True)

    def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        self._run("set", lambda txn: self._put(txn, key.encode(), value, expire))

    def set_many(self, items: Mapping[str, bytes], expire: float | None = None) -> None:
        def put_all(txn: Any) -> None:
            for key, value in items.items():
                self._put(txn, key.encode(), value, expire)

        self._run("set_many", put_all)

    def add(self, key: str, value: bytes, expire: float | None = None) -> bool:
        def add_one(txn: Any) -> bool:
            bkey = key.encode()
            if self._current(txn, bkey) is not None:
                return False
            self._put(txn, bkey, value, expire)
            return True

        return self._run("add", add_one)

    def cas(self, key: str, value: bytes, token: CasToken, expire: float | None = None) -> bool:
        def cas_one(txn: Any) -> bool:
            bkey = key.encode()
            current = self._current(txn, bkey)
            if current is None or current[0] != token:
                return False
            self._put(txn, bkey, value, expire)
            return True

        return self._run("cas", cas_one)

    def delete(self, key: str) -> bool:
        def delete_one(txn: Any) -> bool:
            bkey = key.encode()
            raw = txn.get(bkey, db=self._data)
            if raw is None:
                return False
            self._drop(txn, bkey, raw)
            return True

        return self._run("delete", delete_one)

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)  # a transaction may be retried: an iterator would be spent

        def delete_all(txn: Any) -> int:
            count = 0
            for key in keys:
                raw = txn.get(key.encode(), db=self._data)
                if raw is not None:
                    self._drop(txn, key.encode(), raw)
                    count += 1
            return count

        return self._run("delete_many", delete_all)

    def incr(self, key: str, delta: int = 1) -> int:
        def incr_one(txn: Any) -> int:
            bkey = key.encode()
            current = self._current(txn, bkey)
            value = (int(current[1][_HEADER.size :]) if current else 0) + delta
            self._put(txn, bkey, str(value).encode(), None)
            return value

        return self._run("incr", incr_one)

    def clear(self) -> None:
        def drop_all(txn: Any) -> None:
            seq = txn.get(_META_SEQ, db=self._meta)
            for db in (self._data, self._order, self._meta):
                txn.drop(db, delete=False)
            if seq is not None:  # keep counting: a CAS token from before must not match again
                txn.put(_META_SEQ, seq, db=self._meta)

        self._run("clear", drop_all)

    def keys(self, prefix: str = "") -> list[str]:
        bprefix = prefix.encode()

        def scan(txn: Any) -> list[str]:
            found: list[str] = []
            cursor = txn.cursor()
            if not cursor.set_range(bprefix):
                return found
            for bkey, raw in cursor:
                if not bkey.startswith(bprefix):
                    break
                if not _expired(_HEADER.unpack_from(raw)[1]):
                    found.append(bkey.decode())
            return found

        return self._read("keys", scan)

    def info(self) -> dict[str, Any]:
        def read_meta(txn: Any) -> dict[str, int]:
            def read(name: bytes) -> int:
                raw = txn.get(name, db=self._meta)
                return int(raw) if raw else 0

            return {name: read(raw) for name, raw in _INFO_FIELDS}

        figures = self._read("info", read_meta)
        return {
            "path": str(self.path),
            **figures,
            "size_limit": self.size_limit,
            "map_size": self._guard.map_size,  # may exceed ours: see the module's docstring
        }

    def close(self) -> None:
        # The environment is shared by every DiskBackend of this path in the process; it
        # stays open until the process exits.
        self._env = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size_limit": self.size_limit,
            "map_size": self.map_size,
            "sync": self.sync,
        }

    def __repr__(self) -> str:
        return f"DiskBackend({str(self.path)!r}, size_limit={self.size_limit!r})"
