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

import atexit
import logging
import multiprocessing.util
import os
import signal
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
    """What the flusher needs of one function; no reference to the function itself, so that
    the counts of a function collected before the next flush (a copy unpickled for one Pool
    task chunk, say) are still flushed."""

    __slots__ = (
        *("stats", "backend", "store", "namespace", "fn_id", "name", "baseline", "indexed"),
        *("alive", "failures"),
    )

    def __init__(self, function: MemoizedFunction[Any, Any]) -> None:
        self.stats = function.stats
        self.backend = function.backend
        self.store = repr(function.backend)  # names the server or directory
        self.namespace = function.namespace
        self.fn_id = function._digest.hex()[:16]  # the first call may take it again
        self.name = function.__qualname__
        self.baseline = self.stats._lifetime()  # an unpickled/forked copy starts from here
        self.indexed = False
        self.alive = True
        self.failures = 0  # flushes that failed in a row

    def retire(self) -> None:
        # Called by the garbage collector: no lock, only a flag the next flush reads.
        self.alive = False


class _Flusher:
    """The process-wide set of functions whose counts go to the store."""

    def __init__(self) -> None:
        self._tracked: list[_Tracked] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._at_exit_registered = False
        self._reset_requests()

    def _reset_requests(self) -> None:
        # Flushes asked of the background thread (by the SIGTERM handler) and done by it.
        self._requests = threading.Condition()
        self._requested = self._completed = 0
        self._flushing: int | None = None  # the thread inside flush()
        self._deferred_signal: int | None = None

    def track(self, function: MemoizedFunction[Any, Any]) -> _Tracked:
        entry = _Tracked(function)
        weakref.finalize(function, entry.retire)
        with self._lock:
            self._tracked.append(entry)
            self._ensure_running()
        return entry

    def _ensure_running(self) -> None:
        if not self._at_exit_registered:
            self._at_exit_registered = True
            atexit.register(self.flush_at_exit)
            self.register_exit_flush()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="memoshare-stats", daemon=True)
            self._thread.start()
        self.flush_on_sigterm()

    def register_exit_flush(self) -> None:
        """Flush when a multiprocessing child exits: it leaves through ``os._exit``, which
        skips atexit, but runs the finalizers that have an exit priority."""
        multiprocessing.util.Finalize(None, self.flush_at_exit, exitpriority=100)

    def flush_at_exit(self) -> None:
        self.flush(budget=EXIT_FLUSH_BUDGET)

    def flush_on_sigterm(self) -> None:
        """In a multiprocessing child, flush before dying of SIGTERM, which is how
        ``Pool.terminate`` (and so ``with Pool() as pool:``) ends its workers.

        Only where SIGTERM still has its default action, and only from the main thread
        (Python's rule for signal handlers); the handler dies of the signal as before.
        """
        # A spawned child imports the parent's main module (and so decorates its functions)
        # before parent_process() is set; multiprocessing itself knows it by _inheriting.
        in_child = multiprocessing.parent_process() is not None or getattr(
            multiprocessing.current_process(), "_inheriting", False
        )
        if (
            in_child
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, self._flush_and_die)

    def _flush_and_die(self, signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        if self._flushing == threading.get_ident():
            # Stopped inside a flush (the exit flush, typically): let it finish, then die.
            self._deferred_signal = signum
            return
        # The flush runs on the background thread: this (main) thread may have been stopped
        # inside a store operation, whose connection or write lock it cannot use again.
        with self._requests:
            self._requested += 1
            wanted = self._requested
            self._requests.notify_all()
            self._requests.wait_for(lambda: self._completed >= wanted, timeout=SIGTERM_WAIT)
        os.kill(os.getpid(), signum)

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
        with self._lock:
            self._flushing = threading.get_ident()
            try:
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
            finally:
                self._flushing = None
        if self._deferred_signal is not None:
            os.kill(os.getpid(), self._deferred_signal)

    def _flush_one(self, entry: _Tracked) -> bool:
        """Add the increase since the last flush to the store; False if that failed."""
        current = entry.stats._lifetime()
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
        self._at_exit_registered = False  # multiprocessing clears its finalizers in children
        for entry in self._tracked:
            entry.baseline = entry.stats._lifetime()
        if self._tracked:
            self._ensure_running()


_flusher = _Flusher()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_flusher.after_fork_in_child)


# A multiprocessing child clears the finalizer registry after the fork hooks ran: register the
# exit flush again (the fork hook above has already reset the rest and started the thread).
# Only now is multiprocessing.parent_process() set, which flush_on_sigterm asks.
def _in_multiprocessing_child(flusher: _Flusher) -> None:
    flusher.register_exit_flush()
    if flusher._tracked:
        flusher.flush_on_sigterm()


multiprocessing.util.register_after_fork(_flusher, _in_multiprocessing_child)


def track(function: MemoizedFunction[Any, Any]) -> _Tracked:
    """Send the counts of ``function`` to its store from now on (done by ``memoize``)."""
    return _flusher.track(function)


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
