"""The small interface every store implements.

The decorator and the dataset cache only ever talk to a :class:`Backend`; they never know
whether the bytes live in this process, in a local LMDB file, in memcached or in Redis.

Keys are ``str`` (printable ASCII, no whitespace, at most :data:`MAX_KEY_LENGTH` characters:
the strictest store, memcached, sets that limit). Values are ``bytes``. Framing, chunking of
values larger than :attr:`Backend.max_item_size` and (de)serialization happen above this layer
(:mod:`memoshare.storage`), so a backend is a plain byte store.
"""

from __future__ import annotations

import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from .. import _process
from ..errors import BackendError, BackendRefused, BackendTimeout, BackendUnavailable

__all__ = [
    "MAX_KEY_LENGTH",
    "Backend",
    "BackendError",
    "BackendRefused",
    "BackendTimeout",
    "BackendUnavailable",
    "CasToken",
    "RetryGate",
]

#: memcached refuses longer keys; every backend enforces the same limit so that a namespace that
#: works on one store works on all of them.
MAX_KEY_LENGTH = 250

#: Opaque token returned by :meth:`Backend.gets` and checked by :meth:`Backend.cas`.
CasToken = Any


_live_backends: weakref.WeakSet[Backend] = weakref.WeakSet()
_live_backends_lock = threading.Lock()


def _reset_all_after_fork() -> None:
    # A forked child must never share a socket or an LMDB environment with its parent. Its
    # locks start free: a parent's thread may have held one at the fork, and is gone here.
    global _live_backends_lock
    _live_backends_lock = threading.Lock()
    for backend in list(_live_backends):
        backend._after_fork()


_process.after_fork_child(_reset_all_after_fork, _process.Order.STORES)


class RetryGate:
    """Fails fast for ``interval`` seconds after a store failed.

    A dead network store would otherwise cost every call a connect timeout; with the gate, the
    calls in between fail at once (as :class:`BackendUnavailable`) and one call per interval
    tries the store again.
    """

    __slots__ = ("interval", "_closed_until")

    def __init__(self, interval: float) -> None:
        if interval < 0:
            raise ValueError(f"retry_interval must be >= 0 seconds, got {interval!r}")
        self.interval = interval
        self._closed_until = 0.0

    def check(self, where: str, server: Any = None) -> None:
        """Raise :class:`BackendUnavailable` (naming ``server``) while the store is in its
        back-off interval."""
        if self._closed_until and time.monotonic() < self._closed_until:
            raise BackendUnavailable(
                f"{where} failed less than {self.interval}s ago", server=server
            )

    def failed(self) -> None:
        self._closed_until = time.monotonic() + self.interval

    def succeeded(self) -> None:
        self._closed_until = 0.0


class Backend(ABC):
    """A byte store shared by the processes that use it.

    Subclasses implement the abstract methods; the ``*_many`` methods have correct (if slow)
    defaults built on the single-key ones. Every method raises :class:`BackendError` (or
    :class:`BackendTimeout`) when the store cannot be reached; none returns a fake miss.

    Backends are picklable: the pickle holds the configuration only, and the receiving process
    opens its own connections on first use. After ``fork`` the child does the same.
    """

    #: Largest value (in bytes) the store accepts in one item; ``None`` for no limit. Larger
    #: values are split into chunks by :mod:`memoshare.storage`.
    max_item_size: int | None = None

    #: Whether several machines can share this store (``"network"``: memcached, Redis) or only
    #: the processes of one machine (``"machine"``: disk) or one process (``"process"``).
    scope: str = "process"

    #: Whether :meth:`keys` can list the stored keys (memcached cannot). Callers that need a
    #: listing (clearing one dataset, counting entries) fall back on other means without it.
    can_list_keys: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A backend written before can_list_keys was declared lists its keys if it overrides
        # keys(): infer the capability unless the class declares it.
        if "can_list_keys" not in vars(cls) and cls.keys is not Backend.keys:
            cls.can_list_keys = True

    def __init__(self) -> None:
        with _live_backends_lock:
            _live_backends.add(self)

    # -- single keys ---------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """Return the value stored under ``key`` or ``None``."""

    @abstractmethod
    def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        """Store ``value`` under ``key``; acknowledged (raises if the store refused it).

        ``expire`` is a lifetime in seconds (``None``: until evicted or deleted).
        """

    @abstractmethod
    def add(self, key: str, value: bytes, expire: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; return whether it was stored."""

    @abstractmethod
    def gets(self, key: str) -> tuple[bytes | None, CasToken]:
        """Return ``(value, token)`` for a later :meth:`cas`; ``(None, None)`` if absent."""

    @abstractmethod
    def cas(self, key: str, value: bytes, token: CasToken, expire: float | None = None) -> bool:
        """Store ``value`` if ``key`` is unchanged since :meth:`gets` returned ``token``.

        Returns ``False`` if another writer got there first (or the key vanished); the caller
        re-reads and retries.
        """

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""

    @abstractmethod
    def incr(self, key: str, delta: int = 1) -> int:
        """Atomically add ``delta`` (>= 0) to the integer counter ``key``, creating it at 0."""

    @abstractmethod
    def clear(self) -> None:
        """Remove every entry of this store (for memcached/Redis: of the whole server/db)."""

    # -- batches -------------------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Return the entries found among ``keys`` (absent keys are left out)."""
        found = {}
        for key in keys:
            value = self.get(key)
            if value is not None:
                found[key] = value
        return found

    def exists_many(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` are stored. Stores that can tell without sending the values
        (disk, memory, Redis) do; memcached has no such command and reads them."""
        return set(self.get_many(keys))

    def set_many(self, items: Mapping[str, bytes], expire: float | None = None) -> None:
        """Store all ``items``; raises :class:`BackendError` if any was refused."""
        for key, value in items.items():
            self.set(key, value, expire)

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove ``keys``; return how many were there."""
        return sum(self.delete(key) for key in keys)

    # -- introspection -------------------------------------------------------------------------
    def keys(self, prefix: str = "") -> list[str]:
        """List the keys starting with ``prefix`` (only where :attr:`can_list_keys`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its keys")

    def server_for(self, key: str) -> Hashable | None:
        """The server that holds ``key`` in a store of several servers (``None``: one store).

        Errors name the same server in :attr:`BackendError.server`, so that an outage is
        tracked per server: the keys of a live server keep working while another is down.
        """
        return None

    def info(self) -> dict[str, Any]:
        """Store-level figures (bytes used, items, evictions, ...) where the store has them."""
        return {}

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections/handles; the backend reopens them if used again."""

    def _after_fork(self) -> None:  # noqa: B027 - optional hook
        """Forget connections inherited from the parent process (called in the child)."""

    def __getstate__(self) -> dict[str, Any]:
        raise NotImplementedError  # every concrete backend defines its own

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
