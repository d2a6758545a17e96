"""The life of the process, in one place: what runs around ``fork``, at exit and on SIGTERM.

Modules register *hooks* here instead of calling ``os.register_at_fork``, ``atexit`` or
``signal`` themselves, so that the order in which they run is declared (:class:`Order`), not
the order in which modules happen to be imported:

========================  ==================================================================
phase                     runs
========================  ==================================================================
``before_fork``           in the parent, just before ``fork`` (take locks a child must not
                          inherit mid-operation)
``after_fork_parent``     in the parent, just after ``fork`` (release them)
``after_fork_child``      in the child: forget the parent's connections, locks and threads
``at_exit``               once per process: at interpreter exit, and when a
                          ``multiprocessing`` child (a Pool or DataLoader worker) exits through
                          ``os._exit``, which skips ``atexit``
``on_sigterm``            in a ``multiprocessing`` child killed by SIGTERM (``Pool.terminate``,
                          ``with Pool() as p:``), once armed (:func:`arm_sigterm`); the child
                          then dies of the signal as before
========================  ==================================================================

Within a phase, hooks run by ascending :class:`Order`, then in registration order. A hook that
raises is logged and the next one runs.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import enum
import itertools
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
from collections.abc import Callable, Iterator

__all__ = [
    "Order",
    "after_fork_child",
    "after_fork_parent",
    "arm_sigterm",
    "at_exit",
    "before_fork",
    "hooks",
    "on_sigterm",
    "run_exit_hooks",
    "sigterm_deferred",
]

logger = logging.getLogger("memoshare")

Hook = Callable[[], None]


class Order(enum.IntEnum):
    """Where a hook runs within its phase: lower first."""

    #: Module-level locks and registries (a parent's thread may have held a lock at the fork).
    LOCKS = 0
    #: Backends: connections and LMDB environments of the parent are forgotten.
    STORES = 10
    #: Caches on top of the stores: dataset write buffers, the lease keeper.
    CACHES = 20
    #: Shared statistics: flushed last, after everything that counts.
    STATS = 30


_PHASES = ("before_fork", "after_fork_parent", "after_fork_child", "at_exit", "on_sigterm")
_hooks: dict[str, list[tuple[int, int, Hook]]] = {phase: [] for phase in _PHASES}
_sequence = itertools.count()
_exit_done = False
_sigterm_wanted = False
_deferring = threading.local()
_pending_signal: int | None = None


def _register(phase: str, hook: Hook, order: Order) -> Hook:
    bisect.insort(_hooks[phase], (int(order), next(_sequence), hook))
    return hook


def before_fork(hook: Hook, order: Order) -> Hook:
    """Run ``hook`` in the parent just before ``fork``."""
    return _register("before_fork", hook, order)


def after_fork_parent(hook: Hook, order: Order) -> Hook:
    """Run ``hook`` in the parent just after ``fork``."""
    return _register("after_fork_parent", hook, order)


def after_fork_child(hook: Hook, order: Order) -> Hook:
    """Run ``hook`` in a forked child, before any other code of the child."""
    return _register("after_fork_child", hook, order)


def at_exit(hook: Hook, order: Order) -> Hook:
    """Run ``hook`` once when the process exits (``multiprocessing`` children included)."""
    return _register("at_exit", hook, order)


def on_sigterm(hook: Hook, order: Order) -> Hook:
    """Run ``hook`` when a ``multiprocessing`` child that armed SIGTERM is terminated."""
    return _register("on_sigterm", hook, order)


def hooks(phase: str) -> list[Hook]:
    """The hooks of ``phase`` in the order they run (for tests and docs)."""
    return [hook for _, _, hook in _hooks[phase]]


def _run(phase: str) -> None:
    for hook in hooks(phase):
        try:
            hook()
        except Exception:  # noqa: BLE001 - one failing hook must not skip the others
            logger.exception(
                "memoshare: %s hook %s failed", phase, getattr(hook, "__qualname__", hook)
            )


def run_exit_hooks() -> None:
    """Run the ``at_exit`` hooks, once per process (atexit and multiprocessing both call it)."""
    global _exit_done
    if _exit_done:
        return
    _exit_done = True
    _run("at_exit")


def _child_after_fork() -> None:
    global _exit_done, _pending_signal, _deferring
    _exit_done = False
    _pending_signal = None
    _deferring = threading.local()
    _run("after_fork_child")


def _register_exit_finalizer() -> None:
    # multiprocessing children leave through os._exit after running the finalizers that have
    # an exit priority; a forked child clears that registry first, so this runs again there.
    multiprocessing.util.Finalize(None, run_exit_hooks, exitpriority=100)


def _in_multiprocessing_child(_: object) -> None:
    _register_exit_finalizer()
    if _sigterm_wanted:
        arm_sigterm()


class _Anchor:
    """What multiprocessing's after-fork registry holds on to (it keys callbacks weakly)."""


_anchor = _Anchor()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=lambda: _run("before_fork"),
        after_in_parent=lambda: _run("after_fork_parent"),
        after_in_child=_child_after_fork,
    )
atexit.register(run_exit_hooks)
_register_exit_finalizer()
multiprocessing.util.register_after_fork(_anchor, _in_multiprocessing_child)


# -- SIGTERM ---------------------------------------------------------------------------------------
def _is_multiprocessing_child() -> bool:
    # A spawned child imports the parent's main module (and so may arm this) before
    # parent_process() is set; multiprocessing itself knows it by _inheriting.
    return multiprocessing.parent_process() is not None or bool(
        getattr(multiprocessing.current_process(), "_inheriting", False)
    )


def arm_sigterm() -> None:
    """Run the ``on_sigterm`` hooks if this process is a ``multiprocessing`` child that gets
    SIGTERM. Call when there is something to save; cheap to call again.

    Only where SIGTERM still has its default action (a handler of the user's is left alone) and
    from the main thread (Python's rule for signal handlers); a forked child of an armed
    process arms itself.
    """
    global _sigterm_wanted
    _sigterm_wanted = True
    if (
        _is_multiprocessing_child()
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: object) -> None:
    global _pending_signal
    signal.signal(signum, signal.SIG_DFL)
    if getattr(_deferring, "depth", 0):
        # Stopped inside a section that must finish (the exit flush): die when it ends.
        _pending_signal = signum
        return
    _run("on_sigterm")
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """A section a SIGTERM must not interrupt: the signal takes effect when it ends."""
    _deferring.depth = getattr(_deferring, "depth", 0) + 1
    try:
        yield
    finally:
        _deferring.depth -= 1
        if not _deferring.depth and _pending_signal is not None:
            os.kill(os.getpid(), _pending_signal)
