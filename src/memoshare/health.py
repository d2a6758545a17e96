"""How a memoized function or a dataset cache lives with an unreliable store.

A store error never fails the caller: it is counted (``timeouts`` or ``errors``), logged once
per outage on the ``memoshare`` logger, and the call goes on uncached; ``reconnects`` counts the
store answering again. A value the store *refuses* (too large, store full) is not an outage: it
is logged once and only that value stays uncached. With ``strict=True`` every error is raised.
"""

from __future__ import annotations

import logging

from .backends import BackendError, BackendRefused, BackendTimeout
from .counters import CacheStats

__all__ = ["StoreHealth"]

logger = logging.getLogger("memoshare")

# Operations that only read (leases, updates and the rest write): a successful read ends an
# outage that one of them started.
_READS = frozenset({"read"})


class StoreHealth:
    """The failure state of one cache user (a memoized function, a dataset cache)."""

    __slots__ = ("name", "stats", "strict", "failing", "writes_only", "warned_refused")

    def __init__(self, name: str, stats: CacheStats, strict: bool) -> None:
        self.name = name
        self.stats = stats
        self.strict = strict
        self.failing = False
        # An outage seen only by writes (a read-only directory, large writes timing out) is not
        # over when a read succeeds: only a successful write ends it.
        self.writes_only = False
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
        is_write = what not in _READS
        if self.failing:
            self.writes_only = self.writes_only and is_write
        else:
            self.failing = True
            self.writes_only = is_write
            logger.warning(
                "memoshare: %s cannot %s its cache (%s); it goes on uncached until the store "
                "answers again",
                self.name,
                what,
                exc,
            )

    def ok(self) -> None:
        """A read succeeded: end an outage (counted in ``reconnects``), unless only writes
        failed."""
        if self.failing and not self.writes_only:
            self._recovered()

    def write_ok(self) -> None:
        """A write succeeded: end any outage."""
        if self.failing:
            self._recovered()

    def _recovered(self) -> None:
        self.failing = self.writes_only = False
        self.stats.count("reconnects")
        logger.info("memoshare: %s reaches its cache again", self.name)
