"""Every error memoshare raises, under one root: :class:`MemoshareError`.

``except memoshare.MemoshareError`` catches all of them. Each also derives from the built-in
exception a caller would expect (:class:`CorruptEntry` is a ``ValueError``,
:class:`UnpicklableValue` a ``TypeError``, :class:`IncompleteCacheError` a ``LookupError``), so
code written against those keeps working.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

__all__ = [
    "BackendError",
    "BackendRefused",
    "BackendTimeout",
    "BackendUnavailable",
    "ContendedUpdate",
    "CorruptEntry",
    "IncompleteCacheError",
    "MemoshareError",
    "UnpicklableValue",
]


class MemoshareError(Exception):
    """The root of memoshare's errors."""


class BackendError(MemoshareError):
    """The store failed to answer (connection refused, protocol error, disk full, ...).

    Attributes:
        server: the server that failed, for stores of several servers (memcached's
            ``(host, port)``); ``None`` when the store failed as a whole.
        found: for a batch read (``get_many``) over several servers, what the servers that
            answered returned; ``None`` for other operations.
    """

    def __init__(
        self,
        message: str = "",
        *,
        server: Hashable | None = None,
        found: dict[str, bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.server = server
        self.found = found

    def __reduce__(self) -> Any:
        # Exceptions pickle their args only; keep the declared attributes across processes.
        return _rebuild_error, (type(self), str(self), self.server, self.found)


def _rebuild_error(
    cls: type[BackendError], message: str, server: Hashable | None, found: Any
) -> BackendError:
    return cls(message, server=server, found=found)


class BackendTimeout(BackendError):
    """The store did not answer in time."""


class BackendRefused(BackendError):
    """The store is up but refused this operation (value too large, out of memory, ...)."""


class BackendUnavailable(BackendError):
    """The store failed recently and is not retried until its back-off interval has passed."""


class ContendedUpdate(MemoshareError):
    """A read-modify-write of one entry lost the compare-and-set race too many times in a row."""


class CorruptEntry(MemoshareError, ValueError):
    """Stored bytes that are not a valid entry of this format version (read as a miss)."""


class UnpicklableValue(MemoshareError, TypeError):
    """The function's return value cannot be serialized, so it cannot be cached."""


class IncompleteCacheError(MemoshareError, LookupError):
    """A cache opened without its dataset lacks samples (never stored, or evicted since)."""
