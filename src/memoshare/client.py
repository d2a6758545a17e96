"""The one client layer under both front ends: :class:`CacheClient`.

A memoized function and a dataset cache need the same things of their store: read and write
*values* (not bytes), survive a store that fails (:class:`~memoshare.health.StoreHealth`),
count what happened (:class:`~memoshare.CacheStats`), and treat bad data alike. The policy lives
here, once:

* an unreadable entry (damaged, foreign, from another format version) is a miss: logged at
  WARNING once per client, then at DEBUG;
* a value that cannot be pickled is not cached: a ``RuntimeWarning`` once per client, then a
  DEBUG line (with ``strict=True`` it is raised);
* a store error is counted and reported by the health tracker, per server, and the caller goes
  on uncached (with ``strict=True`` it is raised).

Below it, :class:`~memoshare.storage.EntryStore` turns payloads of any size into the backend's
items.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

from .backends.base import Backend
from .counters import CacheStats
from .errors import BackendError, ContendedUpdate, CorruptEntry, UnpicklableValue
from .health import StoreHealth
from .serialization import dumps as default_dumps
from .serialization import loads
from .storage import NOT_STORED_ITEM, EntryStore

__all__ = ["MISSING", "NOT_STORED", "CacheClient"]

logger = logging.getLogger("memoshare")


class _Sentinel:
    """A named marker that pickles as itself (by reference to this module)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name.lower().replace('_', ' ')}>"

    def __reduce__(self) -> str:
        return self.name


#: What a lookup returns for "no usable entry": ``None`` and other falsy values are values.
MISSING: Any = _Sentinel("MISSING")
#: What a lookup returns where the last caller left the "not stored" mark: compute at once,
#: nobody is computing for you (see memoshare.storage).
NOT_STORED: Any = _Sentinel("NOT_STORED")


class CacheClient:
    """Values in a store, for one cache user (a memoized function, a dataset cache).

    Args:
        backend: the store.
        name: what the user is called in messages (``f``, ``dataset 'train'``).
        strict: raise store errors and unpicklable values instead of going on uncached.
        dumps: value -> payload (default :func:`memoshare.serialization.dumps`; datasets pass
            their sample codec). Payloads are read back with :func:`~memoshare.serialization.loads`.

    Attributes:
        entries: the :class:`~memoshare.storage.EntryStore` on ``backend``.
        stats: this process's counts.
        health: the failure state of the store, per server.
    """

    __slots__ = (
        "backend",
        "entries",
        "name",
        "strict",
        "stats",
        "health",
        "_dumps",
        "_read",
        "_warned_corrupt",
        "_warned_unpicklable",
    )

    def __init__(
        self,
        backend: Backend,
        name: str,
        *,
        strict: bool = False,
        dumps: Callable[[Any], bytes] = default_dumps,
    ) -> None:
        self.backend = backend
        self.entries = EntryStore(backend)
        self._read = self.entries.read
        self.name = name
        self.strict = strict
        self.stats = CacheStats()
        self.health = StoreHealth(name, self.stats, strict, backend.server_for)
        self._dumps = dumps
        self._warned_corrupt = False
        self._warned_unpicklable = False

    # -- reading -------------------------------------------------------------------------------
    def lookup(self, key: str) -> Any:
        """The value stored under ``key``; :data:`MISSING` (absent, unreadable, or the store
        failed) or :data:`NOT_STORED` (the mark). Counts nothing: hits and misses are the
        front end's to count."""
        try:
            payload = self._read(key)
        except BackendError as exc:
            self.health.failed(exc, "read")
            return MISSING
        if self.health.failing:
            self.health.ok(key)
        if payload is None:
            return MISSING
        if payload == NOT_STORED_ITEM:  # bytes of another length: compared in O(1)
            return NOT_STORED
        try:  # decode(), inlined: this is every hit's path
            return loads(payload)
        except CorruptEntry as exc:
            return self._unreadable(key, exc)

    def lookup_many(self, keys: list[str]) -> dict[str, Any]:
        """The values found among ``keys`` (absent, unreadable and marked ones are left out),
        in one round trip (two if any is chunked). A store of several servers that partly
        failed still gives what the others returned."""
        try:
            payloads = self.entries.read_many(keys)
        except BackendError as exc:
            self.health.failed(exc, "read")
            payloads = dict(exc.found or {})
        else:
            if self.health.failing:
                self.health.ok_many(keys)
        found: dict[str, Any] = {}
        # Release each payload once decoded: the next one then reuses its memory instead of
        # growing the heap (measured: a third of a batch's decoding time).
        while payloads:
            key, payload = payloads.popitem()
            if payload == NOT_STORED_ITEM:
                continue  # a mark, not a value
            value = self.decode(key, payload)
            del payload
            if value is not MISSING:
                found[key] = value
        return found

    def present(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are stored, without downloading values where the store can tell.

        Raises:
            BackendError: the store failed (the caller decides what "unknown" means).
        """
        return self.backend.exists_many(keys)

    def decode(self, key: str, payload: bytes) -> Any:
        """The value of a payload, or :data:`MISSING` if it cannot be read (warned once)."""
        try:
            return loads(payload)
        except CorruptEntry as exc:
            return self._unreadable(key, exc)

    def _unreadable(self, key: str, exc: CorruptEntry) -> Any:
        # Once per client at WARNING (the recomputed value replaces the entry; a miss path may
        # read it a second time), then at DEBUG.
        level = logging.DEBUG if self._warned_corrupt else logging.WARNING
        self._warned_corrupt = True
        logger.log(
            level, "memoshare: unreadable entry %s for %s (%s): recomputing", key, self.name, exc
        )
        return MISSING

    # -- writing -------------------------------------------------------------------------------
    def encode(self, value: Any) -> bytes | None:
        """The payload of ``value``, or ``None`` if it cannot be pickled (warned once; raised
        with ``strict``)."""
        try:
            return self._dumps(value)
        except UnpicklableValue as exc:
            if self.strict:
                raise
            if self._warned_unpicklable:
                logger.debug("memoshare: %s: value not cached: %s", self.name, exc)
            else:
                self._warned_unpicklable = True
                warnings.warn(
                    f"{self.name} gave a value that cannot be pickled, so it is not cached: {exc}",
                    RuntimeWarning,
                    stacklevel=5,
                )
            return None

    def store(self, key: str, value: Any) -> bool:
        """Write ``value`` under ``key``; return whether it is stored (counted in ``sets``)."""
        payload = self.encode(value)
        if payload is None:
            return False
        try:
            self.entries.write(key, payload)
        except BackendError as exc:
            self.health.failed(exc, "write")
            return False
        self.health.write_ok((key,))
        self.stats.count("sets")
        return True

    def write_many(self, payloads: dict[str, bytes]) -> None:
        """Write encoded payloads in one round trip, counted in ``sets``.

        Raises:
            BackendError: the write failed (nothing is counted; the caller may retry, then
                report it with :meth:`failed`).
        """
        self.entries.write_many(payloads)
        self.health.write_ok(payloads)
        self.stats.count("sets", len(payloads))

    def update(self, key: str, change: Callable[[Any], Any]) -> Any:
        """Read-modify-write the value under ``key`` atomically.

        ``change(current)`` returns the new value (``current`` is :data:`MISSING` when absent or
        unreadable); it may run more than once. Returns the value stored, or :data:`MISSING`
        if it could not be (store failure, unpicklable value, lost races: counted, reported).
        """
        stored: list[Any] = []

        def change_payload(payload: bytes | None) -> bytes | None:
            current = MISSING if payload is None else self.decode(key, payload)
            new = change(current)
            stored[:] = [new]
            return self.encode(new)

        try:
            payload = self.entries.update(key, change_payload)
        except BackendError as exc:
            self.health.failed(exc, "update")
            return MISSING
        except ContendedUpdate as exc:
            self.stats.count("errors")
            logger.warning("memoshare: %s: value not recorded: %s", self.name, exc)
            return MISSING
        if payload is None:
            return MISSING
        self.health.write_ok((key,))
        self.stats.count("sets")
        return stored[0]

    def delete(self, key: str) -> bool:
        """Remove the entry under ``key`` (and its chunks); return whether it existed."""
        return self.entries.delete(key)

    def failed(self, exc: BackendError, what: str) -> None:
        """Report a store error of operation ``what`` (counted; raised with ``strict``)."""
        self.health.failed(exc, what)

    def __repr__(self) -> str:
        return f"<CacheClient {self.name} on {self.backend!r}>"
