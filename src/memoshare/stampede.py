"""Stampede protection: on a miss, one caller computes while the others wait for its entry.

A :class:`Lease` says who computes a key. :class:`StoreLease` keeps it in the store itself:
the caller that wins ``add(key + "~lease")`` computes and stores; the others poll the entry
with a growing pause (5 ms up to 200 ms). The lease expires after ``timeout`` seconds unless
its holder renews it (:class:`LeaseKeeper`, every third of the timeout while it computes), so
a crashed or hung worker blocks nobody for longer than one short timeout, and a computation may
take as long as it needs; a waiter that has waited ``wait_timeout`` seconds for a live holder
computes by itself.

A holder that does not store (its call was faster than ``time_threshold``, the value cannot be
pickled, or the function raised) leaves the "not stored" mark under the entry's key (see
:mod:`memoshare.storage`) for a few seconds, unless a value is there. The waiters then compute
at once, each for itself, instead of taking turns; and a later caller reading the mark computes
at once too, at the cost of its one lookup, without taking a lease.

:func:`compute_once` is the protocol; the lease is where it keeps its state, so the dataset
cache plugs in a lease whose release waits for its write buffer
(:class:`memoshare.datasets.buffer.BufferedLease`).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from typing import Any

from . import _process
from .backends.base import Backend
from .client import MISSING, NOT_STORED
from .errors import BackendError
from .storage import EntryStore

__all__ = [
    "COMPUTE",
    "LEASE_SUFFIX",
    "Lease",
    "LeaseKeeper",
    "StoreLease",
    "compute_once",
    "keeper",
    "protocol",
]

logger = logging.getLogger("memoshare")

LEASE_SUFFIX = "~lease"
#: How long a "not stored" mark lasts: long enough for the waiters of that call to see it,
#: short enough that one failure does not turn stampede protection off for long.
NOT_STORED_MARK_SECONDS = 5.0


class Lease(ABC):
    """Who computes a key: at most one holder at a time, for a bounded time."""

    @abstractmethod
    def acquire(self, key: str) -> bytes | None:
        """Try to become the holder of ``key``: our token if we are, ``None`` if another
        caller is. Raises :class:`~memoshare.BackendError`."""

    @abstractmethod
    def holder(self, key: str) -> bytes | None:
        """The current holder's token, or ``None`` (free). Raises
        :class:`~memoshare.BackendError`."""

    @abstractmethod
    def release(self, key: str, token: bytes, stored: bool) -> None:
        """End our hold on ``key`` (only if the lease still holds our ``token``): ``stored``
        says whether the value is now in the store (if not, the waiters are told to compute
        for themselves). Raises :class:`~memoshare.BackendError`."""


class LeaseKeeper:
    """Keeps the leases this process holds alive while it computes.

    A lease expires after its ``timeout``; a holder that is alive renews it every third of that
    (one compare-and-set, only while the lease still holds its token), from one daemon thread
    per process. So a short lease (a few seconds) is safe for computations of any length, and
    the work of a holder that died (SIGKILL, OOM) or hangs (SIGSTOP) is taken over within one
    short lease. A lease is renewed only when its third has passed: most computations end
    before that and cost the keeper nothing. A forked child holds none of its parent's leases.
    """

    def __init__(self) -> None:
        # (id(backend), lease) -> [backend, token, timeout, when it is next due]
        self._held: dict[tuple[int, str], list[Any]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_due = float("inf")  # when the thread wakes up next, as it planned
        # Leases let go without a round trip (their values are stored), until they expire:
        # (id(backend), lease) -> (our token, when it expires).
        self._let_go: dict[tuple[int, str], tuple[bytes, float]] = {}

    def let_go(self, backend: Backend, lease: str, token: bytes, timeout: float) -> None:
        """Stop renewing ``lease`` and remember it as ours until it expires, so that this
        process can take it back at once (:meth:`let_go_token`) if it needs the key again
        (cleared, evicted) before then."""
        self.drop(backend, lease, token)
        now = time.monotonic()
        with self._lock:
            if len(self._let_go) > 4096:  # forget the expired ones
                self._let_go = {k: v for k, v in self._let_go.items() if v[1] > now}
            self._let_go[id(backend), lease] = (token, now + timeout + 1.0)

    def let_go_token(self, backend: Backend, lease: str) -> bytes | None:
        """Our token of ``lease`` if this process let it go and it may not have expired."""
        with self._lock:
            found = self._let_go.pop((id(backend), lease), None)
        return found[0] if found is not None and found[1] > time.monotonic() else None

    def keep(self, backend: Backend, lease: str, token: bytes, timeout: float) -> None:
        """Renew ``lease`` (holding ``token``) every ``timeout / 3`` s until :meth:`drop`."""
        due = time.monotonic() + timeout / 3
        with self._lock:
            self._held[id(backend), lease] = [backend, token, timeout, due]
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="memoshare-leases", daemon=True
                )
                self._thread.start()
            wake = due < self._next_due  # due before the thread's planned wake-up
        if wake:
            self._wake.set()

    def drop(self, backend: Backend, lease: str, token: bytes) -> None:
        """Stop renewing ``lease`` (if it is still ours, as ``token`` says)."""
        with self._lock:
            held = self._held.get((id(backend), lease))
            if held is not None and held[1] == token:
                del self._held[id(backend), lease]

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                due = [(key, list(held)) for key, held in self._held.items() if held[3] <= now]
                later = [held[3] for held in self._held.values() if held[3] > now]
                self._next_due = min(later, default=now + 1.0)
            for (_, lease), (backend, token, timeout, _) in due:
                try:
                    self._renew(backend, lease, token, timeout)
                except Exception as exc:  # noqa: BLE001 - a failed renewal: the lease expires
                    logger.debug("memoshare: renewing %s failed: %s", lease, exc)
            with self._lock:
                for key, (_, token, timeout, _) in due:
                    held = self._held.get(key)
                    if held is not None and held[1] == token:
                        held[3] = time.monotonic() + timeout / 3
                        self._next_due = min(self._next_due, held[3])
                pause = max(self._next_due - time.monotonic(), 0.0)
            self._wake.wait(pause)
            self._wake.clear()

    def _renew(self, backend: Backend, lease: str, token: bytes, timeout: float) -> None:
        with self._lock:
            held = self._held.get((id(backend), lease))
            if held is None or held[1] != token:
                return  # released meanwhile
        current, cas = backend.gets(lease)
        if current == token:
            backend.cas(lease, token, cas, timeout)

    def after_fork_in_child(self) -> None:
        self._held = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._next_due = float("inf")
        self._let_go = {}


keeper = LeaseKeeper()
_process.after_fork_child(keeper.after_fork_in_child, _process.Order.CACHES)


def new_token() -> bytes:
    """A token no other holder has: process, time and randomness."""
    return f"{os.getpid()}:{time.time():.6f}:{os.urandom(4).hex()}".encode()


class StoreLease(Lease):
    """A lease kept in the store, under ``key + "~lease"``, expiring after ``timeout`` s."""

    __slots__ = ("entries", "backend", "timeout", "mark")

    def __init__(self, entries: EntryStore, timeout: float, *, mark: bool = True) -> None:
        self.entries = entries
        self.backend = entries.backend
        self.timeout = timeout
        self.mark = mark  # leave the "not stored" mark when releasing without a value

    def acquire(self, key: str) -> bytes | None:
        lease = key + LEASE_SUFFIX
        token = new_token()
        if not self.backend.add(lease, token, self.timeout) and not self._take_back(lease, token):
            return None
        keeper.keep(self.backend, lease, token, self.timeout)
        return token

    def _take_back(self, lease: str, token: bytes) -> bool:
        """Replace a lease this process let go (its value was stored, then cleared or
        evicted) with ``token``: waiting for our own lease to expire would stall us."""
        ours = keeper.let_go_token(self.backend, lease)
        if ours is None:
            return False
        current, cas = self.backend.gets(lease)
        return current == ours and bool(self.backend.cas(lease, token, cas, self.timeout))

    def holder(self, key: str) -> bytes | None:
        return self.backend.get(key + LEASE_SUFFIX)

    def release(self, key: str, token: bytes, stored: bool) -> None:
        keeper.drop(self.backend, key + LEASE_SUFFIX, token)
        if not stored and self.mark:
            self.entries.mark_not_stored(key, min(self.timeout, NOT_STORED_MARK_SECONDS))
        lease = key + LEASE_SUFFIX
        # Only our own lease: if it expired while we computed, another caller may hold it now,
        # and deleting that one would let a third caller compute.
        if self.backend.get(lease) == token:
            self.backend.delete(lease)

    def forget_many(self, tokens: dict[str, bytes]) -> None:
        """Let go of the leases of keys whose values are stored (key -> our token): no longer
        renewed, they expire by themselves. Costs no round trip."""
        for key, token in tokens.items():
            keeper.let_go(self.backend, key + LEASE_SUFFIX, token, self.timeout)

    def release_many(self, tokens: dict[str, bytes]) -> None:
        """Release the leases of several stored keys (key -> our token) in two round trips."""
        if not tokens:
            return
        leases = {key + LEASE_SUFFIX: token for key, token in tokens.items()}
        for lease, token in leases.items():
            keeper.drop(self.backend, lease, token)
        current = self.backend.get_many(list(leases))
        ours = [lease for lease, token in leases.items() if current.get(lease) == token]
        if ours:
            self.backend.delete_many(ours)


#: What the protocol asks of its driver: run ``compute`` and send back ``(value, stored)``.
COMPUTE = object()
Step = Generator[Any, Any, tuple[bool, Any]]


def protocol(
    lease: Lease,
    key: str,
    *,
    lookup: Callable[[], Any],
    on_error: Callable[[BackendError, str], None],
    wait_timeout: float | None,
) -> Step:
    """The stampede protocol as a generator, so that one protocol serves sync and async
    callers: it yields :data:`COMPUTE` (send back ``(value, stored)``) or a pause in seconds
    (send back ``None``), and returns ``(hit, value)``. Its driver runs the computation and
    the pauses (:func:`compute_once`; ``MemoizedFunction`` awaits them for coroutines). An
    exception of the computation is thrown into it: the lease is released, and it
    propagates.
    """
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    pause = 0.005
    while True:
        try:
            token = lease.acquire(key)
        except BackendError as exc:
            on_error(exc, "lease")
            return False, (yield COMPUTE)[0]
        if token is not None:
            stored = False
            try:
                value = lookup()  # stored between our miss and our lease?
                if value is not MISSING and value is not NOT_STORED:
                    stored = True
                    return True, value
                try:
                    value, stored = yield COMPUTE
                except Exception:
                    raise  # the function failed: the mark tells the waiters at once
                except BaseException:
                    # Cancelled (asyncio), interrupted: the function did not fail, so no mark;
                    # freeing the lease lets exactly one waiter take over.
                    stored = True
                    raise
                return False, value
            finally:
                try:
                    lease.release(key, token, stored)
                except BackendError as exc:
                    on_error(exc, "lease release")
        while True:  # another caller holds the lease: wait for its entry, or for it to go
            yield pause * (0.5 + random.random())
            pause = min(pause * 1.5, 0.2)
            value = lookup()
            if value is NOT_STORED:
                return False, (yield COMPUTE)[0]  # nothing is coming: no point in waiting
            if value is not MISSING:
                return True, value
            try:
                holder = lease.holder(key)
            except BackendError as exc:
                on_error(exc, "lease")
                return False, (yield COMPUTE)[0]
            if holder is None:
                # The holder crashed (its lease expired) or failed without a mark: compete
                # for the lease again, so that exactly one waiter takes over.
                break
            if deadline is not None and time.monotonic() >= deadline:
                logger.info(
                    "memoshare: waited %.1fs for another worker on %s; computing", wait_timeout, key
                )
                return False, (yield COMPUTE)[0]


def compute_once(
    lease: Lease,
    key: str,
    *,
    lookup: Callable[[], Any],
    compute: Callable[[], tuple[Any, bool]],
    on_error: Callable[[BackendError, str], None],
    wait_timeout: float | None,
) -> tuple[bool, Any]:
    """Return ``(hit, value)`` for ``key``, computing it in at most one caller at a time.

    Args:
        lease: who computes the key.
        key: the entry's key.
        lookup: reads the entry: its value, :data:`~memoshare.client.MISSING`, or
            :data:`~memoshare.client.NOT_STORED`; it handles store errors itself.
        compute: computes the value and stores it (or decides not to): ``(value, stored)``.
        on_error: called with a store error of the lease operations (it may re-raise); the
            caller then computes without protection.
        wait_timeout: the longest this caller waits for a holder that is alive (``None``: as
            long as the lease is held; a dead holder's lease expires, and then exactly one
            waiter takes over).
    """
    steps = protocol(lease, key, lookup=lookup, on_error=on_error, wait_timeout=wait_timeout)
    try:
        request = next(steps)
        while True:
            if request is COMPUTE:
                try:
                    reply = compute()
                except BaseException as exc:
                    request = steps.throw(exc)  # releases the lease, and raises exc
                    continue
            else:
                time.sleep(request)
                reply = None
            request = steps.send(reply)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
