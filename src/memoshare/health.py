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


class StoreHealth:
    """The failure state of one cache user (a memoized function, a dataset cache)."""

    __slots__ = ("name", "stats", "strict", "failing", "warned_refused")

    def __init__(self, name: str, stats: CacheStats, strict: bool) -> None:
        self.name = name
        self.stats = stats
        self.strict = strict
        self.failing = False
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
        if not self.failing:
            self.failing = True
            logger.warning(
                "memoshare: %s cannot %s its cache (%s); it goes on uncached until the store "
                "answers again",
                self.name,
                what,
                exc,
            )

    def ok(self) -> None:
        """The store answered: end an outage (counted in ``reconnects``)."""
        if self.failing:
            self.failing = False
            self.stats.count("reconnects")
            logger.info("memoshare: %s reaches its cache again", self.name)
