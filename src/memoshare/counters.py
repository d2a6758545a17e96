"""Per-function counters of one process: :class:`CacheStats` (shared totals: shared_stats)."""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["FIELDS", "CacheStats", "StatsSnapshot"]

#: The counters, in the order they are shown (the shared totals keep the same ones).
FIELDS = ("sets", "misses", "hits", "timeouts", "errors", "reconnects")


_exhaust = collections.deque(maxlen=0).extend


def _value(counter: itertools.count[int]) -> int:
    # repr(count(5)) is "count(5)"; reading it does not advance the counter. (Its __reduce__
    # is deprecated since Python 3.12 and gone in 3.14.)
    return int(repr(counter)[6:-1])


class _Counter:
    """A field of :class:`CacheStats`: reads as an ``int``, counted by an ``itertools.count``.

    ``next`` on an ``itertools.count`` is one atomic C call in CPython, so counting from many
    threads loses nothing and takes no lock. Assigning (``stats.hits += 1``, as pyDVL code
    does) replaces the counter with one starting at the new value.
    """

    __slots__ = ("name", "slot")

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = f"_{name}"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return 0  # the dataclass default
        return _value(getattr(obj, self.slot))

    def __set__(self, obj: Any, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"CacheStats.{self.name} is an int, got {value!r}")
        object.__setattr__(obj, self.slot, itertools.count(value))


@dataclass(eq=False)
class CacheStats:
    """What one memoized function did, counted in this process.

    A dataclass with pyDVL's six ``int`` fields: ``dataclasses.asdict(stats)`` works, fields
    can be read and assigned (``stats.hits += 1``), ``==`` compares the counts (with another
    ``CacheStats`` or a :class:`StatsSnapshot`).

    Attributes:
        sets: entries written to the store.
        misses: calls that ran the function (no entry, an unreadable one, or a stochastic
            function re-evaluated to refine its moments).
        hits: calls served from the store without running the function.
        timeouts: store operations that timed out.
        errors: store operations that failed otherwise (refused connection, full disk, ...).
        reconnects: times the store answered again after failing.

    ``hits + misses`` is the number of calls. Counting is thread-safe and lock-free, so it
    costs the hit path nothing measurable. :meth:`reset` zeroes the counters; an increment
    racing with it (or with an assignment) may be lost. :meth:`snapshot` freezes the figures.
    """

    sets: int = _Counter()  # type: ignore[assignment]
    misses: int = _Counter()  # type: ignore[assignment]
    hits: int = _Counter()  # type: ignore[assignment]
    timeouts: int = _Counter()  # type: ignore[assignment]
    errors: int = _Counter()  # type: ignore[assignment]
    reconnects: int = _Counter()  # type: ignore[assignment]

    __slots__ = (*(f"_{name}" for name in FIELDS), "_retired")

    def __post_init__(self) -> None:
        # What reset() took away, so that totals since creation stay monotonic (shared stats
        # add the increase of those totals to the store).
        self._retired = dict.fromkeys(FIELDS, 0)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` (default 1) to the counter ``name`` (one of the attributes above)."""
        counter = getattr(self, f"_{name}")
        if n == 1:
            next(counter)
        elif n > 0:
            # Advance by n in C, without running Python code in between (so no other thread
            # interleaves, and a batch of 64 hits costs one call instead of 64).
            _exhaust(itertools.islice(counter, n))

    def hit(self) -> None:
        """Count one hit (the hit path's own spelling of ``count("hits")``: one call less)."""
        next(self._hits)

    def reset(self) -> None:
        """Set every counter back to 0."""
        for name in FIELDS:
            self._retired[name] += _value(getattr(self, f"_{name}"))
            object.__setattr__(self, f"_{name}", itertools.count())

    def lifetime(self) -> dict[str, int]:
        """Counts since creation, resets included: they never go down."""
        return {name: self._retired[name] + value for name, value in self.asdict().items()}

    def snapshot(self) -> StatsSnapshot:
        """The current figures, frozen."""
        return StatsSnapshot(**self.asdict())

    def asdict(self) -> dict[str, int]:
        """The current figures as a dict."""
        return {name: _value(getattr(self, f"_{name}")) for name in FIELDS}

    @property
    def calls(self) -> int:
        """``hits + misses``."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """``hits / calls`` (0.0 before the first call)."""
        calls = self.calls
        return self.hits / calls if calls else 0.0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CacheStats | StatsSnapshot):
            return self.asdict() == other.asdict()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, int]:
        return self.asdict()

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(**state)  # type: ignore[misc]


@dataclass(frozen=True)
class StatsSnapshot:
    """Frozen figures of a :class:`CacheStats` (same fields)."""

    sets: int = 0
    misses: int = 0
    hits: int = 0
    timeouts: int = 0
    errors: int = 0
    reconnects: int = 0

    def asdict(self) -> dict[str, Any]:
        """The figures as a dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __sub__(self, other: StatsSnapshot) -> StatsSnapshot:
        return StatsSnapshot(**{k: v - getattr(other, k) for k, v in self.asdict().items()})
