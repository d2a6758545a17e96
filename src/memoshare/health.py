"""How a memoized function or a dataset cache lives with an unreliable store.

A store error never fails the caller: it is counted (``timeouts`` or ``errors``), logged once
per outage on the ``memoshare`` logger, and the call goes on uncached; ``reconnects`` counts the
store answering again. A value the store *refuses* (too large, store full) is not an outage: it
is logged once and only that value stays uncached. With ``strict=True`` every error is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable

from .counters import CacheStats
from .errors import BackendError, BackendRefused, BackendTimeout

__all__ = ["StoreHealth"]

logger = logging.getLogger("memoshare")

# Operations that only read (leases, updates and the rest write): a successful read ends an
# outage that one of them started.
_READS = frozenset({"read"})


class StoreHealth:
    """The failure state of one cache user (a memoized function, a dataset cache).

    An outage is kept per server when the store has several (memcached), so that the keys of
    a live server do not end the outage of a dead one (and warn again at every switch).
    """

    __slots__ = ("name", "stats", "strict", "failing", "_down", "_locate", "warned_refused")

    def __init__(
        self,
        name: str,
        stats: CacheStats,
        strict: bool,
        locate: Callable[[str], Hashable],
    ) -> None:
        self.name = name
        self.stats = stats
        self.strict = strict
        self.failing = False  # bool(self._down), read on every call
        # Failing server (None: the store as a whole) -> whether only writes failed there. An
        # outage seen only by writes (a read-only directory, large writes timing out) is not
        # over when a read succeeds: only a successful write ends it.
        self._down: dict[Hashable, bool] = {}
        self._locate = locate  # key -> its server (Backend.server_for; None: one store)
        self.warned_refused = False

    def failed(self, exc: BackendError, what: str) -> None:
        """Count a store error of operation ``what``; warn once per outage (or raise if strict)."""
        self.stats.count("timeouts" if isinstance(exc, BackendTimeout) else "errors")
        if self.strict:
            raise exc
        if isinstance(exc, BackendRefused):  # the store is up: no outage, just this value
            if not self.warned_refused:
                self.warned_refused = True
                logger.warning(
                    "memoshare: %s: the store refused to %s an entry (%s); such values stay "
                    "uncached",
                    self.name,
                    what,
                    exc,
                )
            return
        server = exc.server
        is_write = what not in _READS
        if server in self._down:
            self._down[server] = self._down[server] and is_write
            return
        self._down[server] = is_write
        self.failing = True
        logger.warning(
            "memoshare: %s cannot %s its cache (%s); it goes on uncached until the store "
            "answers again",
            self.name,
            what,
            exc,
        )

    def ok(self, key: str) -> None:
        """A read of ``key`` succeeded: end the outage of its server (counted in
        ``reconnects``), unless only writes failed there."""
        if self.failing:
            self._recovered((key,), reads=True)

    def ok_many(self, keys: Iterable[str]) -> None:
        """A batch read of ``keys`` succeeded: end the outages of their servers."""
        if self.failing:
            self._recovered(keys, reads=True)

    def write_ok(self, keys: Iterable[str]) -> None:
        """A write of ``keys`` succeeded: end the outages of their servers."""
        if self.failing:
            self._recovered(keys, reads=False)

    def _recovered(self, keys: Iterable[str], reads: bool) -> None:
        servers: set[Hashable] = {None}  # the store as a whole answered
        servers.update(self._locate(key) for key in keys)
        ended = False
        for server in servers:
            writes_only = self._down.get(server)
            if writes_only is not None and not (reads and writes_only):
                del self._down[server]
                ended = True
        if ended:
            self.failing = bool(self._down)
            self.stats.count("reconnects")
            logger.info("memoshare: %s reaches its cache again", self.name)
