"""Totals of every worker, kept in the store itself: :func:`stats` and ``memoshare stats``.

Each process counts calls locally in the function's :class:`~memoshare.CacheStats` (no round
trip, no lock on a hit) and a background thread adds the increase since its last flush to
counters in the store with atomic ``incr``, every :data:`FLUSH_INTERVAL` seconds, at interpreter
exit, when a ``multiprocessing`` child (a DataLoader or Pool worker) exits, and when you call
:func:`flush_stats`. A multiprocessing child also flushes when it is ended with SIGTERM
(``Pool.terminate``, so the end of ``with Pool() as pool:``), if nobody else handles that
signal. The counts of a function that is garbage-collected are flushed with the next batch.
So the totals read from anywhere lag the truth by at most one interval, plus whatever a
process killed otherwise (``SIGKILL``, the OOM killer) had not flushed yet.

Keys (per namespace): ``<ns>:~stats:<function id>:<field>`` for the counters and
``<ns>:~stats:index`` listing the functions; ``~memoshare:namespaces`` lists the namespaces.
The function id is the first 16 hex digits of its digest, so two workers running the same code
add to the same counters.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import _process
from .backends import Backend, make_backend
from .counters import FIELDS, CacheStats
from .storage import EntryStore

__all__ = ["FLUSH_INTERVAL", "FunctionStats", "StatsHandle", "flush_stats", "stats", "track"]

logger = logging.getLogger("memoshare")

NAMESPACES_KEY = "~memoshare:namespaces"
#: Seconds between two flushes of the background thread (env ``MEMOSHARE_STATS_INTERVAL``).
FLUSH_INTERVAL = float(os.environ.get("MEMOSHARE_STATS_INTERVAL", "5"))
#: Seconds a multiprocessing child killed by SIGTERM waits for its last flush.
SIGTERM_WAIT = 2.0
#: Seconds the flush at exit may take in all (a store that is down must not hold the exit).
EXIT_FLUSH_BUDGET = 5.0
#: Failed flushes after which the counts of a collected function are given up.
RETIRED_TRIES = 3


def _counter_key(namespace: str, fn_id: str, field: str) -> str:
    return f"{namespace}:~stats:{fn_id}:{field}"


def _index_key(namespace: str) -> str:
    return f"{namespace}:~stats:index"


def _append_line(backend: Backend, key: str, line: str) -> None:
    """Add ``line`` to the newline-separated list stored under ``key`` (atomic, idempotent)."""

    def append(current: bytes | None) -> bytes | None:
        lines = current.decode().split("\n") if current else []
        return None if line in lines else "\n".join([*lines, line]).encode()

    # Raw lines, not pickles: this list is read by every version and by the CLI.
    EntryStore(backend).update(key, append, attempts=50)


class StatsHandle:
    """What the flusher needs of one tracked function (returned by :func:`track`).

    It holds no reference to the function itself, so that the counts of a function collected
    before the next flush (a copy unpickled for one Pool task chunk, say) are still flushed.
    """

    __slots__ = (
        *("stats", "backend", "store", "namespace", "name", "digest", "baseline", "indexed"),
        *("alive", "failures"),
    )

    def __init__(
        self,
        stats: CacheStats,
        backend: Backend,
        namespace: str,
        name: str,
        digest: Callable[[], bytes],
    ) -> None:
        self.stats = stats
        self.backend = backend
        self.store = repr(backend)  # names the server or directory
        self.namespace = namespace
        self.name = name
        self.digest = digest
        self.baseline = stats.lifetime()  # an unpickled/forked copy starts from here
        self.indexed = False
        self.alive = True
        self.failures = 0  # flushes that failed in a row

    @property
    def fn_id(self) -> str:
        """The function id: the first 16 hex digits of the function part of its keys (read
        at each flush: the first call may take the digest again)."""
        return self.digest().hex()[:16]

    def retire(self) -> None:
        """The function is gone: flush what it counted, then forget it. Called by the garbage
        collector: no lock, only a flag the next flush reads."""
        self.alive = False


class _StatsFlusher:
    """The process-wide set of functions whose counts go to the store."""

    def __init__(self) -> None:
        self._tracked: list[StatsHandle] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._reset_requests()

    def _reset_requests(self) -> None:
        # Flushes asked of the background thread (by the SIGTERM hook) and done by it.
        self._requests = threading.Condition()
        self._requested = self._completed = 0

    def track(self, owner: object, handle: StatsHandle) -> StatsHandle:
        weakref.finalize(owner, handle.retire)
        with self._lock:
            self._tracked.append(handle)
            self._ensure_running()
        return handle

    def _ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="memoshare-stats", daemon=True)
            self._thread.start()
        _process.arm_sigterm()

    def flush_at_exit(self) -> None:
        self.flush(budget=EXIT_FLUSH_BUDGET)

    def flush_on_sigterm(self) -> None:
        """Dying of SIGTERM: have the background thread flush, and wait for it a little.

        Not on this (main) thread: it may have been stopped inside a store operation, whose
        connection or write lock it cannot use again.
        """
        if not self._tracked:
            return
        with self._requests:
            self._requested += 1
            wanted = self._requested
            self._requests.notify_all()
            self._requests.wait_for(lambda: self._completed >= wanted, timeout=SIGTERM_WAIT)

    def _run(self) -> None:
        while True:
            with self._requests:
                self._requests.wait_for(
                    lambda: self._requested > self._completed, timeout=FLUSH_INTERVAL
                )
                wanted = self._requested
            self.flush()
            with self._requests:
                self._completed = wanted
                self._requests.notify_all()

    def flush(self, budget: float | None = None) -> None:
        """Add every function's new counts to the store, within ``budget`` seconds if given.

        A store that fails is not asked again in the same flush (its other functions keep
        their counts for the next one). A collected function is forgotten once its counts are
        stored, or after :data:`RETIRED_TRIES` failed flushes (its counts are then lost).
        """
        deadline = None if budget is None else time.monotonic() + budget
        # A SIGTERM arriving meanwhile (the exit flush, typically) takes effect afterwards.
        with _process.sigterm_deferred(), self._lock:
            keep, failed_stores = [], set()
            for entry in self._tracked:
                alive = entry.alive  # read first: a function counts nothing once gone
                if entry.store in failed_stores or (
                    deadline is not None and time.monotonic() > deadline
                ):
                    flushed = False
                else:
                    flushed = self._flush_one(entry)
                    if not flushed:
                        failed_stores.add(entry.store)
                entry.failures = 0 if flushed else entry.failures + 1
                if alive or not (flushed or entry.failures >= RETIRED_TRIES):
                    keep.append(entry)
            self._tracked = keep

    def _flush_one(self, entry: StatsHandle) -> bool:
        """Add the increase since the last flush to the store; False if that failed."""
        current = entry.stats.lifetime()
        delta = {f: current[f] - entry.baseline[f] for f in FIELDS}
        if not any(delta.values()):
            return True
        backend, namespace, fn_id = entry.backend, entry.namespace, entry.fn_id
        try:
            if not entry.indexed:
                _append_line(backend, NAMESPACES_KEY, namespace)
                _append_line(backend, _index_key(namespace), f"{fn_id}\t{entry.name}")
                entry.indexed = True
            for field, increase in delta.items():
                if increase > 0:
                    backend.incr(_counter_key(namespace, fn_id, field), increase)
                    entry.baseline[field] += increase
        except Exception as exc:  # noqa: BLE001 - counts are kept for the next flush
            # Whatever the store or its client raise (redis-py closing its socket at exit
            # raises ValueError), statistics must never break the program or the flusher.
            logger.debug("memoshare: shared stats of %s not flushed: %s", entry.name, exc)
            return False
        return True

    def after_fork_in_child(self) -> None:
        # The child counts only its own calls from here on; the parent flushes what it had.
        self._lock = threading.Lock()
        self._reset_requests()
        self._thread = None
        for entry in self._tracked:
            entry.baseline = entry.stats.lifetime()
        if self._tracked:
            self._ensure_running()


_flusher = _StatsFlusher()
_process.after_fork_child(_flusher.after_fork_in_child, _process.Order.STATS)
_process.at_exit(_flusher.flush_at_exit, _process.Order.STATS)
_process.on_sigterm(_flusher.flush_on_sigterm, _process.Order.STATS)


def track(
    owner: object,
    stats: CacheStats,
    backend: Backend,
    namespace: str,
    name: str,
    digest: Callable[[], bytes],
) -> StatsHandle:
    """Send the counts in ``stats`` to ``backend`` from now on, under the function id of
    ``digest()`` (the function part of the keys), until ``owner`` is collected (done by
    ``memoize``)."""
    return _flusher.track(owner, StatsHandle(stats, backend, namespace, name, digest))


def flush_stats() -> None:
    """Add this process's counts not yet flushed to the shared counters now."""
    _flusher.flush()


@dataclass(frozen=True)
class FunctionStats:
    """Totals of one memoized function over every process that flushed to the store."""

    namespace: str
    function: str
    function_id: str
    hits: int = 0
    misses: int = 0
    sets: int = 0
    errors: int = 0
    timeouts: int = 0
    reconnects: int = 0

    @property
    def calls(self) -> int:
        """``hits + misses``."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """``hits / calls`` (0.0 without calls)."""
        return self.hits / self.calls if self.calls else 0.0

    def asdict(self) -> dict[str, Any]:
        """The fields, plus ``calls`` and ``hit_rate``, as a dict (what ``--json`` prints)."""
        return {**asdict(self), "calls": self.calls, "hit_rate": self.hit_rate}


def stats(
    backend: Backend | str | None = None,
    namespace: str | None = None,
    **backend_options: Any,
) -> list[FunctionStats]:
    """The shared totals per function, read from the store.

    Args:
        backend: the store (as for :func:`memoshare.memoize`; ``None``: the embedded default).
        namespace: only this namespace; ``None``: every namespace that has flushed counts.
        **backend_options: to build the backend from a name, as in ``make_backend``.

    Counts lag by up to :data:`FLUSH_INTERVAL` seconds; call :func:`flush_stats` first to
    include this process's latest calls.
    """
    store = make_backend(backend, **backend_options)
    entries = EntryStore(store)  # the lists are entries (a long one is chunked)
    if namespace is None:
        raw = entries.read(NAMESPACES_KEY)
        namespaces = raw.decode().split("\n") if raw else []
    else:
        namespaces = [namespace]
    found = []
    for ns in namespaces:
        raw = entries.read(_index_key(ns))
        if not raw:
            continue
        functions = [line.split("\t", 1) for line in raw.decode().split("\n") if "\t" in line]
        keys = [_counter_key(ns, fn_id, f) for fn_id, _ in functions for f in FIELDS]
        counts = store.get_many(keys)
        for fn_id, name in functions:
            values = {f: int(counts.get(_counter_key(ns, fn_id, f), b"0")) for f in FIELDS}
            found.append(FunctionStats(namespace=ns, function=name, function_id=fn_id, **values))
    return found


def format_table(rows: list[FunctionStats]) -> str:
    """A plain-text table of :func:`stats` rows, as printed by ``memoshare stats``."""
    header = (
        "namespace",
        "function",
        "calls",
        "hits",
        "misses",
        "hit rate",
        "sets",
        "errors",
        "timeouts",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r.namespace,
                r.function,
                str(r.calls),
                str(r.hits),
                str(r.misses),
                f"{r.hit_rate:.1%}",
                str(r.sets),
                str(r.errors),
                str(r.timeouts),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )
