"""memcached through pymemcache: one server, or many with consistent (rendezvous) hashing.

With several servers each key belongs to exactly one of them (highest random weight over the
server names). Failures are handled per server: a server that fails is given its own back-off
interval, the keys it owns fail fast (:class:`BackendUnavailable`) meanwhile, and the keys of the
other servers keep working. Keys are never moved to another server while theirs is down: two
processes that disagree on whether a server is up would otherwise read and write one key in two
places (a counter or a compare-and-set entry split in two, a stale value read back later).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)
from pymemcache.serde import PickleSerde

from ..errors import BackendError, BackendRefused, BackendTimeout
from .base import Backend, CasToken, RetryGate

__all__ = ["MemcachedBackend", "MemcachedClientConfig", "Server"]

T = TypeVar("T")
Server = tuple[str, int]

#: memcached takes expiries up to this many seconds as relative, longer ones as Unix times.
_RELATIVE_EXPIRY_LIMIT = 30 * 24 * 3600

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


_SERVER_FORM = "'host:port', 'memcached://host:port' or (host, port)"


def _parse_server(server: Server | str) -> Server:
    """``(host, port)`` of one server, or ``ValueError`` saying what is wrong with it."""
    if isinstance(server, str):
        text = server.strip()
        if text.startswith("memcached://"):
            text = text[len("memcached://") :].rstrip("/")
        host, sep, port = text.rpartition(":")
        if "," in text or " " in text:
            raise ValueError(
                f"{server!r} names several memcached servers: pass a list, "
                "e.g. ['a:11211', 'b:11211']"
            )
        if not sep or "://" in host or "/" in host:
            raise ValueError(f"a memcached server is {_SERVER_FORM}, got {server!r}")
        return _checked(host.strip("[]"), port, server)
    if not isinstance(server, tuple | list) or len(server) != 2:
        raise ValueError(f"a memcached server is {_SERVER_FORM}, got {server!r}")
    host, port = server
    return _checked(host, port, server)


def _checked(host: object, port: object, given: object) -> Server:
    if not isinstance(host, str) or not host or any(c in host for c in " /,"):
        raise ValueError(f"bad memcached host {host!r} in {given!r} ({_SERVER_FORM})")
    # Ports as strings are accepted (Bagua's docs write them so).
    if isinstance(port, bool) or not (isinstance(port, int) or str(port).isdigit()):
        raise ValueError(f"bad memcached port {port!r} in {given!r} ({_SERVER_FORM})")
    number = int(port)  # type: ignore[call-overload]
    if not 0 <= number <= 65535:
        raise ValueError(f"memcached port {number} of {given!r} is not in 0..65535")
    return host, number


def _parse_servers(servers: Server | str | Sequence[Server | str]) -> list[Server]:
    if isinstance(servers, str) or (
        isinstance(servers, tuple)
        and len(servers) == 2
        and isinstance(servers[0], str)
        and not isinstance(servers[1], tuple | list)
    ):
        return [_parse_server(servers)]  # type: ignore[arg-type]
    parsed = [_parse_server(s) for s in servers]
    if not parsed:
        raise ValueError("at least one memcached server is needed")
    return parsed


@dataclass(frozen=True)
class MemcachedClientConfig:
    """pyDVL's ``MemcachedClientConfig``: the same fields, defaults and frozen dataclass.

    ``pymemcache.Client(**dataclasses.asdict(config))`` builds a raw client from it, as pyDVL
    code and test fixtures do. memoshare's own settings (item size, retry interval, ...) are
    arguments of :class:`MemcachedBackend` instead; :meth:`MemcachedBackend.from_config`
    combines the two.

    Args:
        server: ``(host, port)`` of the server. memoshare also takes ``"host:port"`` or a list
            of servers here (several servers share the keys); pymemcache's ``Client`` takes
            only the tuple.
        connect_timeout: seconds to wait for a connection.
        timeout: seconds to wait for each socket read or write.
        no_delay: disable Nagle's algorithm (``TCP_NODELAY``): small requests go out at once.
        serde: pymemcache's serializer, used by a raw ``Client`` built from this config.
            memoshare stores its own framed bytes and does not use it.
    """

    server: Any = ("localhost", 11211)
    connect_timeout: float = 1.0
    timeout: float = 1.0
    no_delay: bool = True
    serde: Any = PickleSerde(pickle_version=5)


class _Node:
    """One memcached server: its back-off gate, each thread's connection, its hash seed."""

    __slots__ = ("server", "where", "gate", "local", "seed")

    def __init__(self, server: Server, retry_interval: float) -> None:
        self.server = server
        self.where = f"{server[0]}:{server[1]}"
        self.gate = RetryGate(retry_interval)
        self.local = threading.local()
        # Rendezvous hashing: a key belongs to the server whose blake2b(name, key) is highest.
        # (hashlib is C: under 1 us a server, against about 20 us for pymemcache's pure-Python
        # murmur3.) The name is "host:port" as given: every process must list the servers alike.
        self.seed = hashlib.blake2b(self.where.encode() + b"\0", digest_size=8)


class MemcachedBackend(Backend):
    """memcached, shared by every machine that reaches the servers.

    Args:
        servers: ``(host, port)``, ``"host:port"`` or a list of them; several servers share
            the keys by rendezvous hashing (adding a server moves only the keys that now
            belong to it). Every process must list the same servers, spelled the same way.
        connect_timeout, timeout, no_delay: see :class:`MemcachedClientConfig`.
        max_item_size: values larger than this are split into chunks; keep it below the
            server's ``-I`` item limit (1 MiB by default).
        retry_interval: after a failure the server is not asked again for this many seconds,
            so a dead cache does not add a timeout to every call. With several servers, only
            the keys of the server that failed wait.
        **client_options: passed on to pymemcache's ``Client`` (one per server and thread).

    Each thread gets its own connections (pymemcache clients are not thread-safe), and every
    write waits for the server's answer: a refused value raises instead of vanishing.

    With several servers a failure is per server: while one is down (or in its back-off
    interval), its keys raise :class:`BackendError` (at once, as :class:`BackendUnavailable`,
    after the first failure) and the other servers' keys keep working; its keys are *not* moved
    to the others. A batch (``get_many``, ``set_many``, ``clear``) still serves every server
    that answers and then raises the first error; a ``get_many`` error carries what was read in
    its ``found`` attribute. Every error names the ``(host, port)`` that failed in its
    ``server`` attribute.
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
        if retry_interval < 0:
            raise ValueError(f"retry_interval must be >= 0 seconds, got {retry_interval!r}")
        super().__init__()
        self.servers = _parse_servers(servers)
        if len(set(self.servers)) != len(self.servers):
            raise ValueError(f"a memcached server is listed twice in {self.servers}")
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.no_delay = no_delay
        self.max_item_size = max_item_size
        self.retry_interval = retry_interval
        self.client_options = client_options
        self._new_client(self.servers[0])  # a wrong option fails here, not at the first call
        self._reset_nodes()

    def _reset_nodes(self) -> None:
        self._nodes = [_Node(server, self.retry_interval) for server in self.servers]
        # The server of every key when there is one: the fast path of get() skips routing.
        self._single: _Node | None = self._nodes[0] if len(self._nodes) == 1 else None

    @classmethod
    def from_config(
        cls, config: MemcachedClientConfig | Mapping[str, Any], **options: Any
    ) -> MemcachedBackend:
        """Build a backend from a pyDVL-style :class:`MemcachedClientConfig` (or the dict
        ``dataclasses.asdict`` makes of one), with memoshare's own ``options``
        (``max_item_size=``, ``retry_interval=``, ...)."""
        if isinstance(config, Mapping):
            config = MemcachedClientConfig(**config)
        return cls(
            config.server,
            connect_timeout=config.connect_timeout,
            timeout=config.timeout,
            no_delay=config.no_delay,
            **options,
        )

    def check(self) -> None:
        """Connect to every server now and ask its version.

        Raises:
            OSError: a server cannot be reached, as the operating system reports it
                (``ConnectionRefusedError``, a timeout, an unknown host). Calls never raise
                this (an outage is counted and survived); this is for failing fast at
                start-up, as pyDVL's ``memcached`` does.
        """
        for server in self.servers:
            client = self._new_client(server)
            try:
                client.version()
            except MemcacheError as exc:
                raise ConnectionError(f"memcached at {server[0]}:{server[1]}: {exc}") from exc
            finally:
                client.close()

    # -- connections ---------------------------------------------------------------------------
    def _new_client(self, server: Server) -> Client:
        options = dict(
            connect_timeout=self.connect_timeout,
            timeout=self.timeout,
            no_delay=self.no_delay,
            allow_unicode_keys=False,
            default_noreply=False,
            socket_module=_SOCKET_MODULE,
        )
        options.update(self.client_options)
        return Client(server, **options)

    def _client(self, node: _Node) -> Client:
        client = getattr(node.local, "client", None)
        if client is None:
            client = node.local.client = self._new_client(node.server)
        return client

    @property
    def client(self) -> Client:
        """This thread's pymemcache client of the (single) server; see :meth:`client_for`."""
        if len(self._nodes) != 1:
            raise TypeError(
                f"{self!r} has several servers: use client_for(key) for the one owning a key"
            )
        return self._client(self._nodes[0])

    def client_for(self, key: str) -> Client:
        """This thread's pymemcache client of the server that owns ``key``."""
        return self._client(self._route(key))

    def server_for(self, key: str) -> Server:
        """The ``(host, port)`` of the server that owns ``key``."""
        return self._route(key).server

    def _route(self, key: str) -> _Node:
        nodes = self._nodes
        if len(nodes) == 1:
            return nodes[0]
        bkey = key.encode()
        best = nodes[0]
        best_score = b""
        for node in nodes:
            hasher = node.seed.copy()
            hasher.update(bkey)
            score = hasher.digest()
            if score > best_score:  # equal 8-byte digests: keep the first server listed
                best, best_score = node, score
        return best

    def _by_node(self, keys: Iterable[str]) -> dict[_Node, list[str]]:
        batches: dict[_Node, list[str]] = {}
        for key in keys:
            batches.setdefault(self._route(key), []).append(key)
        return batches

    def _call(self, key: str | None, op: Callable[[Any], T]) -> T:
        """``op(client)`` on the server owning ``key`` (``None``: the single server)."""
        nodes = self._nodes
        node = nodes[0] if len(nodes) == 1 or key is None else self._route(key)
        return self._call_node(node, op)

    def _call_node(self, node: _Node, op: Callable[[Any], T]) -> T:
        # No message formatted, no property called unless needed (~1 us a call).
        gate = node.gate
        if gate._closed_until:
            gate.check(f"memcached at {node.where}", node.server)
        client = getattr(node.local, "client", None)
        try:
            result = op(self._client(node) if client is None else client)
        except Exception as exc:
            error = self._translate(exc, node)
            if error is exc:
                raise
            raise error from exc
        if gate._closed_until:
            gate.succeeded()
        return result

    def _translate(self, exc: Exception, node: _Node) -> Exception:
        """The memoshare error for what pymemcache raised (or ``exc`` itself if it is a bug).

        The error's ``server`` attribute is the ``(host, port)`` that failed.
        """
        where, server = node.where, node.server
        if isinstance(exc, TimeoutError | BlockingIOError):  # Python's or the kernel's timeout
            self._failed(node)
            return BackendTimeout(f"memcached at {where} timed out: {exc}", server=server)
        if isinstance(exc, MemcacheClientError | MemcacheServerError):
            if isinstance(exc, MemcacheUnexpectedCloseError):  # the server went away
                self._failed(node)
                return BackendError(f"memcached at {where}: {exc}", server=server)
            # The server answered (it refused this item: too large, out of memory, ...): it is
            # up, so its retry gate stays open.
            return BackendRefused(f"memcached at {where}: {exc}", server=server)
        if isinstance(exc, OSError | MemcacheError):
            self._failed(node)
            return BackendError(f"memcached at {where}: {exc}", server=server)
        return exc

    def _failed(self, node: _Node) -> None:
        """Close this server's gate (for every thread) and drop this thread's connection."""
        node.gate.failed()
        client = getattr(node.local, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):  # the socket is already broken
                client.close()
            node.local.client = None

    def _where(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.servers)

    def _each_node(self, op: Callable[[_Node], None]) -> None:
        """``op`` on every server; the first error is raised after all were tried."""
        failure: BackendError | None = None
        for node in self._nodes:
            try:
                op(node)
            except BackendError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    # -- the interface -------------------------------------------------------------------------
    @staticmethod
    def _exptime(expire: float | None) -> int:
        if not expire:
            return 0
        # memcached's clock ticks in whole seconds: an item set to expire in n seconds may
        # go at the next tick after n - 1. One second more makes it last at least `expire`
        # (a lease renewed every third of its life must not lapse in between).
        seconds = math.ceil(expire) + 1
        # memcached reads an expiry over 30 days as a Unix time (so a long lease would expire
        # at once): give those as the time they end.
        return seconds if seconds <= _RELATIVE_EXPIRY_LIMIT else int(time.time()) + seconds

    def get(self, key: str) -> bytes | None:
        # _call's body, inlined for the hit path on one server (no closure, no extra frame).
        node = self._single
        if node is None or node.gate._closed_until:
            return self._call(key, lambda c: c.get(key))
        client = getattr(node.local, "client", None) or self._client(node)
        try:
            return client.get(key)
        except Exception as exc:
            error = self._translate(exc, node)
            if error is exc:
                raise
            raise error from exc

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        if not keys:
            return {}
        if len(self._nodes) == 1:
            return self._call(None, lambda c: c.get_many(keys))
        found: dict[str, bytes] = {}

        def read(node: _Node, batch: list[str]) -> None:
            found.update(self._call_node(node, lambda c: c.get_many(batch)))

        batches = self._by_node(keys)
        try:
            self._each_node(lambda node: read(node, batches[node]) if node in batches else None)
        except BackendError as exc:
            exc.found = found  # what the other servers returned
            raise
        return found

    def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        stored = self._call(
            key, lambda c: c.set(key, value, expire=self._exptime(expire), noreply=False)
        )
        if not stored:
            raise BackendRefused(f"memcached refused to store {key!r} ({len(value)} bytes)")

    def set_many(self, items: Mapping[str, bytes], expire: float | None = None) -> None:
        if not items:
            return
        exptime = self._exptime(expire)
        if len(self._nodes) == 1:
            failed = self._call(
                None, lambda c: c.set_many(dict(items), expire=exptime, noreply=False)
            )
        else:
            failed = []
            batches = self._by_node(items)

            def write(node: _Node) -> None:
                if node in batches:
                    batch = {key: items[key] for key in batches[node]}
                    failed.extend(
                        self._call_node(
                            node, lambda c: c.set_many(batch, expire=exptime, noreply=False)
                        )
                    )

            self._each_node(write)
        if failed:
            raise BackendRefused(f"memcached refused to store {len(failed)} of {len(items)} items")

    def add(self, key: str, value: bytes, expire: float | None = None) -> bool:
        return bool(
            self._call(
                key, lambda c: c.add(key, value, expire=self._exptime(expire), noreply=False)
            )
        )

    def gets(self, key: str) -> tuple[bytes | None, CasToken]:
        value, token = self._call(key, lambda c: c.gets(key))
        return (None, None) if value is None else (value, token)

    def cas(self, key: str, value: bytes, token: CasToken, expire: float | None = None) -> bool:
        if token is None:
            return False
        stored = self._call(
            key, lambda c: c.cas(key, value, token, expire=self._exptime(expire), noreply=False)
        )
        return bool(stored)

    def delete(self, key: str) -> bool:
        return bool(self._call(key, lambda c: c.delete(key, noreply=False)))

    def delete_many(self, keys: Iterable[str]) -> int:
        # One delete per key (pymemcache's delete_many does not say which keys existed), in
        # one pass without downloading the values.
        return sum(self.delete(key) for key in keys)

    def incr(self, key: str, delta: int = 1) -> int:
        for _ in range(10):
            value = self._call(key, lambda c: c.incr(key, delta, noreply=False))
            if value is not None:
                return int(value)
            if self.add(key, str(delta).encode()):
                return delta
        raise BackendError(f"memcached could not increment {key!r}")

    def clear(self) -> None:
        self._each_node(lambda node: self._call_node(node, lambda c: c.flush_all(noreply=False)))

    def info(self) -> dict[str, Any]:
        totals: dict[str, Any] = {"items": 0, "bytes": 0, "evictions": 0, "limit_maxbytes": 0}
        names = {"curr_items": "items", "bytes": "bytes", "evictions": "evictions"}
        names["limit_maxbytes"] = "limit_maxbytes"

        def add_stats(node: _Node) -> None:
            stats = self._call_node(node, lambda c: c.stats())
            for raw, name in names.items():
                totals[name] += int(stats.get(raw.encode(), 0))

        self._each_node(add_stats)
        return totals

    def close(self) -> None:
        for node in self._nodes:
            client = getattr(node.local, "client", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._reset_nodes()

    def _after_fork(self) -> None:
        self._reset_nodes()  # never write to the parent's sockets; gates start open

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
