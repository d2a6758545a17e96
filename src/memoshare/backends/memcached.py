"""memcached through pymemcache: one server, or many with consistent (rendezvous) hashing."""

from __future__ import annotations

import contextlib
import math
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from .base import Backend, BackendError, BackendRefused, BackendTimeout, CasToken, RetryGate

__all__ = ["MemcachedBackend", "MemcachedClientConfig", "Server"]

T = TypeVar("T")
Server = tuple[str, int]

#: memcached's default item limit is 1 MiB including the item header and key; values are
#: chunked well below it.
DEFAULT_MAX_ITEM_SIZE = 1_000_000


class _KernelTimeoutSocket(socket.socket):
    """A socket whose read/write timeout, once connected, is enforced by the kernel.

    Python implements a socket timeout by polling before every ``recv``; pymemcache reads
    values 4 KiB at a time, so a batch of samples paid a poll per 4 KiB (about 3 us per 12 KiB
    sample, measured in docs/benchmarks.md). Here the connected socket is blocking with
    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` set: the same timeout, no poll. A timeout then surfaces as
    ``BlockingIOError``, which the backend reports as :class:`BackendTimeout`.
    """

    _connected = False

    def connect(self, address: Any) -> None:
        super().connect(address)
        self._connected = True

    def settimeout(self, value: float | None) -> None:
        if not self._connected or value is None:
            super().settimeout(value)  # the connect timeout stays Python's
            return
        super().settimeout(None)
        seconds = int(value)
        timeval = struct.pack("ll", seconds, int((value - seconds) * 1_000_000))
        self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class _SocketModule:
    """The ``socket`` module, but making :class:`_KernelTimeoutSocket` (pymemcache takes a
    ``socket_module``)."""

    socket = _KernelTimeoutSocket

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


# Linux and macOS take a struct timeval for SO_RCVTIMEO; elsewhere keep Python's timeouts.
_SOCKET_MODULE: Any = _SocketModule() if sys.platform in ("linux", "darwin") else socket


def _parse_server(server: Server | str) -> Server:
    if isinstance(server, str):
        host, sep, port = server.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"a memcached server is 'host:port' or (host, port), got {server!r}")
        return host.strip("[]"), int(port)
    host, port = server
    return str(host), int(port)


def _parse_servers(servers: Server | str | Sequence[Server | str]) -> list[Server]:
    if isinstance(servers, str) or (
        isinstance(servers, tuple) and len(servers) == 2 and isinstance(servers[1], int)
    ):
        return [_parse_server(servers)]  # type: ignore[arg-type]
    parsed = [_parse_server(s) for s in servers]
    if not parsed:
        raise ValueError("at least one memcached server is needed")
    return parsed


@dataclass
class MemcachedClientConfig:
    """Connection settings, spelled as in pyDVL's ``MemcachedClientConfig``.

    Args:
        server: ``(host, port)``, ``"host:port"`` or a list of them (several servers share the
            keys by consistent hashing).
        connect_timeout: seconds to wait for a connection.
        timeout: seconds to wait for each socket read or write.
        no_delay: disable Nagle's algorithm (``TCP_NODELAY``): small requests go out at once.
        max_item_size: values larger than this are split into chunks; keep it below the
            server's ``-I`` item limit (1 MiB by default).
        retry_interval: after a failure the server is not asked again for this many seconds,
            so a dead cache does not add a timeout to every call.
    """

    server: Server | str | Sequence[Server | str] = ("localhost", 11211)
    connect_timeout: float = 1.0
    timeout: float = 1.0
    no_delay: bool = True
    max_item_size: int = DEFAULT_MAX_ITEM_SIZE
    retry_interval: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


class MemcachedBackend(Backend):
    """memcached, shared by every machine that reaches the servers.

    Args:
        servers: ``(host, port)``, ``"host:port"`` or a list of them; several servers use
            pymemcache's ``HashClient`` (rendezvous hashing: adding a server moves only the
            keys that now belong to it).
        connect_timeout, timeout, no_delay, max_item_size, retry_interval: see
            :class:`MemcachedClientConfig`.
        **client_options: passed on to pymemcache's ``Client``/``HashClient``.

    Each thread gets its own connection (pymemcache clients are not thread-safe), and every
    write waits for the server's answer: a refused value raises instead of vanishing.
    """

    scope = "network"

    def __init__(
        self,
        servers: Server | str | Sequence[Server | str] = ("localhost", 11211),
        *,
        connect_timeout: float = 1.0,
        timeout: float = 1.0,
        no_delay: bool = True,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        retry_interval: float = 1.0,
        **client_options: Any,
    ) -> None:
        if max_item_size < 1024:
            raise ValueError(f"max_item_size must be at least 1024 bytes, got {max_item_size}")
        super().__init__()
        self.servers = _parse_servers(servers)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.no_delay = no_delay
        self.max_item_size = max_item_size
        self.retry_interval = retry_interval
        self.client_options = client_options
        self._local = threading.local()
        self._gate = RetryGate(retry_interval)

    @classmethod
    def from_config(cls, config: MemcachedClientConfig) -> MemcachedBackend:
        """Build a backend from a pyDVL-style :class:`MemcachedClientConfig`."""
        return cls(
            config.server,
            connect_timeout=config.connect_timeout,
            timeout=config.timeout,
            no_delay=config.no_delay,
            max_item_size=config.max_item_size,
            retry_interval=config.retry_interval,
            **config.extra,
        )

    # -- connections ---------------------------------------------------------------------------
    def _new_client(self) -> Client | HashClient:
        options = dict(
            connect_timeout=self.connect_timeout,
            timeout=self.timeout,
            no_delay=self.no_delay,
            allow_unicode_keys=False,
            default_noreply=False,
            socket_module=_SOCKET_MODULE,
        )
        options.update(self.client_options)
        if len(self.servers) == 1:
            return Client(self.servers[0], **options)
        return HashClient(self.servers, ignore_exc=False, **options)

    @property
    def client(self) -> Client | HashClient:
        """This thread's pymemcache client (created on first use)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
        return client

    def _call(self, op: Callable[[Any], T]) -> T:
        # The hit path: no message formatted, no property called unless needed (~1 us a call).
        gate = self._gate
        if gate._closed_until:
            gate.check(f"memcached at {self._where()}")
        client = getattr(self._local, "client", None)
        try:
            result = op(self.client if client is None else client)
        except Exception as exc:
            error = self._translate(exc)
            if error is exc:
                raise
            raise error from exc
        if gate._closed_until:
            gate.succeeded()
        return result

    def _translate(self, exc: Exception) -> Exception:
        """The memoshare error for what pymemcache raised (or ``exc`` itself if it is a bug)."""
        if isinstance(exc, TimeoutError | BlockingIOError):  # Python's or the kernel's timeout
            self._failed()
            return BackendTimeout(f"memcached at {self._where()} timed out: {exc}")
        if isinstance(exc, MemcacheClientError | MemcacheServerError):
            if isinstance(exc, MemcacheUnexpectedCloseError):  # the server went away
                self._failed()
                return BackendError(f"memcached at {self._where()}: {exc}")
            # Otherwise the server answered (it refused this item: too large, out of memory,
            # ...): the store is up, so the retry gate stays open.
            return BackendRefused(f"memcached at {self._where()}: {exc}")
        if isinstance(exc, OSError | MemcacheError):
            self._failed()
            return BackendError(f"memcached at {self._where()}: {exc}")
        return exc

    def _failed(self) -> None:
        self._gate.failed()
        client = getattr(self._local, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):  # the socket is already broken
                client.close()
            self._local.client = None

    def _where(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.servers)

    # -- the interface -------------------------------------------------------------------------
    @staticmethod
    def _exptime(expire: float | None) -> int:
        return max(1, math.ceil(expire)) if expire else 0

    def get(self, key: str) -> bytes | None:
        # _call's body, inlined for the hit path (no closure, no extra frame).
        if self._gate._closed_until:
            return self._call(lambda c: c.get(key))
        client = getattr(self._local, "client", None) or self.client
        try:
            return client.get(key)
        except Exception as exc:
            error = self._translate(exc)
            if error is exc:
                raise
            raise error from exc

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        if not keys:
            return {}
        return self._call(lambda c: c.get_many(keys))

    def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        if not self._call(lambda c: c.set(key, value, expire=self._exptime(expire), noreply=False)):
            raise BackendRefused(f"memcached refused to store {key!r} ({len(value)} bytes)")

    def set_many(self, items: Mapping[str, bytes], expire: float | None = None) -> None:
        if not items:
            return
        failed = self._call(
            lambda c: c.set_many(dict(items), expire=self._exptime(expire), noreply=False)
        )
        if failed:
            raise BackendRefused(f"memcached refused to store {len(failed)} of {len(items)} items")

    def add(self, key: str, value: bytes, expire: float | None = None) -> bool:
        return bool(
            self._call(lambda c: c.add(key, value, expire=self._exptime(expire), noreply=False))
        )

    def gets(self, key: str) -> tuple[bytes | None, CasToken]:
        value, token = self._call(lambda c: c.gets(key))
        return (None, None) if value is None else (value, token)

    def cas(self, key: str, value: bytes, token: CasToken, expire: float | None = None) -> bool:
        if token is None:
            return False
        stored = self._call(
            lambda c: c.cas(key, value, token, expire=self._exptime(expire), noreply=False)
        )
        return bool(stored)

    def delete(self, key: str) -> bool:
        return bool(self._call(lambda c: c.delete(key, noreply=False)))

    def delete_many(self, keys: Iterable[str]) -> int:
        # One delete per key (pymemcache's delete_many does not say which keys existed), in
        # one pass without downloading the values.
        return sum(self.delete(key) for key in keys)

    def incr(self, key: str, delta: int = 1) -> int:
        for _ in range(10):
            value = self._call(lambda c: c.incr(key, delta, noreply=False))
            if value is not None:
                return int(value)
            if self.add(key, str(delta).encode()):
                return delta
        raise BackendError(f"memcached could not increment {key!r}")

    def clear(self) -> None:
        self._call(lambda c: c.flush_all(noreply=False))

    def info(self) -> dict[str, Any]:
        client = self.client
        clients = list(client.clients.values()) if isinstance(client, HashClient) else [client]
        totals: dict[str, Any] = {"items": 0, "bytes": 0, "evictions": 0, "limit_maxbytes": 0}
        names = {"curr_items": "items", "bytes": "bytes", "evictions": "evictions"}
        names["limit_maxbytes"] = "limit_maxbytes"
        for one in clients:
            stats = self._call(lambda _c, one=one: one.stats())
            for raw, name in names.items():
                totals[name] += int(stats.get(raw.encode(), 0))
        return totals

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
        self._local = threading.local()

    def _after_fork(self) -> None:
        self._local = threading.local()  # never write to the parent's socket
        self._gate.succeeded()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "servers": self.servers,
            "connect_timeout": self.connect_timeout,
            "timeout": self.timeout,
            "no_delay": self.no_delay,
            "max_item_size": self.max_item_size,
            "retry_interval": self.retry_interval,
            **self.client_options,
        }

    def __repr__(self) -> str:
        return f"MemcachedBackend({self._where()!r})"
