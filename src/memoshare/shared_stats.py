"""Totals of every worker, kept in the store itself: :func:`stats` and ``memoshare stats``.

Each process counts calls locally in the function's :class:`~memoshare.CacheStats` (no round
trip, no lock on a hit) and a background thread adds the increase since its last flush to
counters in the store with atomic ``incr``, every :data:`FLUSH_INTERVAL` seconds, at interpreter
exit, when a ``multiprocessing`` child (a DataLoader or Pool worker) exits, and when you call
:func:`flush_stats`. So the totals read from anywhere lag the truth by at most one interval,
plus whatever a process that was killed (``SIGKILL``) had not flushed yet.

Keys (per namespace): ``<ns>:~stats:<function id>:<field>`` for the counters and
``<ns>:~stats:index`` listing the functions; ``~memoshare:namespaces`` lists the namespaces.
The function id is the first 16 hex digits of its digest, so two workers running the same code
add to the same counters.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .backends import Backend, BackendError, make_backend

if TYPE_CHECKING:
    from .memoize import MemoizedFunction

__all__ = ["FLUSH_INTERVAL", "FunctionStats", "flush_stats", "stats"]

logger = logging.getLogger("memoshare")

FIELDS = ("hits", "misses", "sets", "errors", "timeouts", "reconnects")
NAMESPACES_KEY = "~memoshare:namespaces"
#: Seconds between two flushes of the background thread (env ``MEMOSHARE_STATS_INTERVAL``).
FLUSH_INTERVAL = float(os.environ.get("MEMOSHARE_STATS_INTERVAL", "5"))


def _counter_key(namespace: str, fn_id: str, field: str) -> str:
    return f"{namespace}:~stats:{fn_id}:{field}"


def _index_key(namespace: str) -> str:
    return f"{namespace}:~stats:index"


def _append_line(backend: Backend, key: str, line: str) -> None:
    """Add ``line`` to the newline-separated list stored under ``key`` (atomic, idempotent)."""
    for _ in range(50):
        current, token = backend.gets(key)
        if current is None:
            if backend.add(key, line.encode()):
                return
            continue
        lines = current.decode().split("\n")
        if line in lines or backend.cas(key, "\n".join([*lines, line]).encode(), token):
            return
        time.sleep(0.001)
    raise BackendError(f"could not update the list {key!r}: too many concurrent writers")


class _Tracked:
    __slots__ = ("function", "baseline", "indexed")

    def __init__(self, function: MemoizedFunction[Any, Any]) -> None:
        self.function = weakref.ref(function)
        self.baseline = function.stats.asdict()  # an unpickled/forked copy starts from here
        self.indexed = False


class _Flusher:
    """The process-wide set of functions whose counts go to the store."""

    def __init__(self) -> None:
        self._tracked: dict[int, _Tracked] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._at_exit_registered = False

    def track(self, function: MemoizedFunction[Any, Any]) -> None:
        entry = _Tracked(function)
        weakref.finalize(function, self._forget, id(function))
        with self._lock:
            self._tracked[id(function)] = entry
            self._ensure_running()

    def _forget(self, ident: int) -> None:
        # No lock: this runs from the garbage collector, possibly inside a section holding it.
        # dict.pop is atomic, and flush() iterates over a copy.
        self._tracked.pop(ident, None)

    def _ensure_running(self) -> None:
        if not self._at_exit_registered:
            self._at_exit_registered = True
            atexit.register(self.flush)
            self.register_exit_flush()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="memoshare-stats", daemon=True)
            self._thread.start()

    def register_exit_flush(self) -> None:
        """Flush when a multiprocessing child exits: it leaves through ``os._exit``, which
        skips atexit, but runs the finalizers that have an exit priority."""
        multiprocessing.util.Finalize(None, self.flush, exitpriority=100)

    def _run(self) -> None:
        while not self._wake.wait(FLUSH_INTERVAL):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            tracked = list(self._tracked.values())
            for entry in tracked:
                function = entry.function()
                if function is not None:
                    self._flush_one(function, entry)

    def _flush_one(self, function: MemoizedFunction[Any, Any], entry: _Tracked) -> None:
        current = function.stats.asdict()
        for f in FIELDS:
            if current[f] < entry.baseline[f]:  # stats.reset() since the last flush
                entry.baseline[f] = 0
        delta = {f: current[f] - entry.baseline[f] for f in FIELDS}
        if not any(d > 0 for d in delta.values()):
            entry.baseline = current  # nothing new (or the counters were reset)
            return
        backend, namespace = function.backend, function.namespace
        fn_id = function._memoshare_digest.hex()[:16]
        try:
            if not entry.indexed:
                _append_line(backend, NAMESPACES_KEY, namespace)
                _append_line(backend, _index_key(namespace), f"{fn_id}\t{function.__qualname__}")
                entry.indexed = True
            for field, increase in delta.items():
                if increase > 0:
                    backend.incr(_counter_key(namespace, fn_id, field), increase)
                    entry.baseline[field] += increase
        except Exception as exc:  # noqa: BLE001 - counts are kept for the next flush
            # Whatever the store or its client raise (redis-py closing its socket at exit
            # raises ValueError), statistics must never break the program or the flusher.
            logger.debug("memoshare: shared stats of %s not flushed: %s", function, exc)

    def after_fork_in_child(self) -> None:
        # The child counts only its own calls from here on; the parent flushes what it had.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._at_exit_registered = False  # multiprocessing clears its finalizers in children
        for entry in list(self._tracked.values()):
            function = entry.function()
            if function is not None:
                entry.baseline = function.stats.asdict()
        if self._tracked:
            self._ensure_running()


_flusher = _Flusher()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_flusher.after_fork_in_child)
# A multiprocessing child clears the finalizer registry after the fork hooks ran: register the
# exit flush again (the fork hook above has already reset the rest and started the thread).
multiprocessing.util.register_after_fork(_flusher, lambda flusher: flusher.register_exit_flush())


def track(function: MemoizedFunction[Any, Any]) -> None:
    """Send the counts of ``function`` to its store from now on (done by ``memoize``)."""
    _flusher.track(function)


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
    if namespace is None:
        raw = store.get(NAMESPACES_KEY)
        namespaces = raw.decode().split("\n") if raw else []
    else:
        namespaces = [namespace]
    found = []
    for ns in namespaces:
        raw = store.get(_index_key(ns))
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
