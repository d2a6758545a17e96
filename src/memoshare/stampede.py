"""Stampede protection: on a miss, one caller computes while the others wait for its entry.

The caller that wins ``add(key + "~lease")`` computes and stores; the others poll the entry with
a growing pause (5 ms up to 200 ms). The lease expires after ``lease_timeout`` seconds, so a
crashed worker blocks nobody for longer than that; a waiter that has waited ``wait_timeout``
seconds computes by itself. A holder that does not store (its call was faster than
``time_threshold``, or the value cannot be pickled) leaves a mark in the lease for a few
seconds: the waiters then compute at once, each for itself, instead of taking turns.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from .backends.base import Backend, BackendError

__all__ = ["LEASE_SUFFIX", "compute_once"]

logger = logging.getLogger("memoshare")

LEASE_SUFFIX = "~lease"
# What a holder that did not store leaves in the lease (for UNCACHED_MARK_SECONDS at most).
UNCACHED = b"uncached"
UNCACHED_MARK_SECONDS = 5.0


def _lease_token() -> bytes:
    return f"{os.getpid()}:{time.time():.6f}:{os.urandom(4).hex()}".encode()


def compute_once(
    backend: Backend,
    key: str,
    *,
    lookup: Callable[[], tuple[bool, Any]],
    compute: Callable[[], Any],
    on_error: Callable[[BackendError, str], None],
    lease_timeout: float,
    wait_timeout: float,
    stored: Callable[[], bool] | None = None,
) -> tuple[bool, Any]:
    """Return ``(hit, value)`` for ``key``, computing it in at most one caller at a time.

    Args:
        backend: the store holding the entry and its lease.
        key: the entry's key.
        lookup: reads the entry: ``(found, value)``; it handles store errors itself.
        compute: computes the value, stores it (or decides not to) and returns it.
        on_error: called with a store error of the lease operations (it may re-raise);
            the caller then computes without protection.
        lease_timeout: seconds after which a lease expires.
        wait_timeout: the longest this caller waits for another one.
        stored: tells, after ``compute``, whether it stored the value (None: it always does).
    """
    lease = key + LEASE_SUFFIX
    deadline = time.monotonic() + wait_timeout
    pause = 0.005
    while True:
        try:
            token = _lease_token()
            leased = backend.add(lease, token, expire=lease_timeout)
        except BackendError as exc:
            on_error(exc, "lease")
            return False, compute()
        if leased:
            uncached = False
            try:
                found, value = lookup()  # stored between our miss and our lease?
                if found:
                    return True, value
                value = compute()
                uncached = stored is not None and not stored()
                return False, value
            finally:
                _release(backend, lease, token, uncached, lease_timeout, on_error)
        while True:  # another caller holds the lease: wait for its entry, or for it to go
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 1.5, 0.2)
            found, value = lookup()
            if found:
                return True, value
            if time.monotonic() >= deadline:
                logger.info(
                    "memoshare: waited %.1fs for another worker on %s; computing", wait_timeout, key
                )
                return False, compute()
            try:
                holder = backend.get(lease)
            except BackendError as exc:
                on_error(exc, "lease")
                return False, compute()
            if holder == UNCACHED:
                return False, compute()  # nothing is coming: no point in taking turns
            if holder is None:
                break  # the holder failed or crashed: compete for the lease again


def _release(
    backend: Backend,
    lease: str,
    token: bytes,
    uncached: bool,
    lease_timeout: float,
    on_error: Callable[[BackendError, str], None],
) -> None:
    try:
        # Only our own lease: if it expired while we computed, another caller may hold it
        # now, and deleting that one would let a third caller compute.
        if backend.get(lease) != token:
            return
        if uncached:
            backend.set(lease, UNCACHED, expire=min(lease_timeout, UNCACHED_MARK_SECONDS))
        else:
            backend.delete(lease)
    except BackendError as exc:
        on_error(exc, "lease release")
