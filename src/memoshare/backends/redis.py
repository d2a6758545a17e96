"""Redis through redis-py (``pip install memoshare[redis]``)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from ..errors import BackendError, BackendRefused, BackendTimeout
from .base import Backend, CasToken, RetryGate

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised only without redis-py
    raise ImportError("RedisBackend needs redis-py: pip install 'memoshare[redis]'") from exc

__all__ = ["RedisBackend"]

T = TypeVar("T")

_URL_SCHEMES = ("redis://", "rediss://", "unix://")

# Compare-and-set: the token is the SHA-1 of the value read by gets(), checked inside Redis.
_CAS = """
local current = redis.call('GET', KEYS[1])
if not current or redis.sha1hex(current) ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"""


class RedisBackend(Backend):
    """Redis, shared by every machine that reaches the server.

    Args:
        host, port, db, password: where the server is.
        url: a ``redis://`` URL instead of host/port/db/password.
        socket_timeout, socket_connect_timeout: seconds, as in redis-py.
        max_item_size: values larger than this are split into chunks (Redis takes values up
            to 512 MiB; smaller chunks keep the server's memory spikes down).
        retry_interval: after a failure the server is not asked again for this many seconds.
        **options: passed on to ``redis.Redis``.

    redis-py's connection pool is thread-safe and reopens its connections after ``fork``.
    """

    scope = "network"
    can_list_keys = True

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        *,
        url: str | None = None,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 1.0,
        max_item_size: int = 64 << 20,
        retry_interval: float = 1.0,
        **options: Any,
    ) -> None:
        if url is not None and not url.startswith(_URL_SCHEMES):
            raise ValueError(
                f"a Redis URL starts with one of {', '.join(_URL_SCHEMES)}, got {url!r} "
                "(for example redis://127.0.0.1:6379/0)"
            )
        if isinstance(port, bool) or not (isinstance(port, int) or str(port).isdigit()):
            raise ValueError(f"bad Redis port {port!r}: a number from 0 to 65535")
        port = int(port)
        super().__init__()
        self.host, self.port, self.db, self.password, self.url = host, port, db, password, url
        self.socket_timeout = socket_timeout
        self.socket_connect_timeout = socket_connect_timeout
        self.max_item_size = max_item_size
        self.retry_interval = retry_interval
        self.options = options
        self._gate = RetryGate(retry_interval)
        self._client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        """The redis-py client (created on first use)."""
        if self._client is None:
            options = dict(self.options)
            # redis-py retries a failed connection with exponential back-off (4 s to find a
            # server down). The back-off across calls is the retry gate's job: retry once at
            # once, and only a broken connection (a pooled one the server closed). A timeout
            # is not retried: a hung server would cost twice socket_timeout per operation.
            options.setdefault(
                "retry", Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
            )
            common = dict(
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_connect_timeout,
                **options,
            )
            if self.url:
                self._client = redis.Redis.from_url(self.url, **common)
            else:
                self._client = redis.Redis(
                    host=self.host, port=self.port, db=self.db, password=self.password, **common
                )
            self._cas_script = self._client.register_script(_CAS)
        return self._client

    def _where(self) -> str:
        return self.url or f"redis://{self.host}:{self.port}/{self.db}"

    def _call(self, op: Callable[[redis.Redis], T]) -> T:
        self._gate.check(f"Redis at {self._where()}")
        try:
            result = op(self.client)
        except redis.exceptions.TimeoutError as exc:
            self._gate.failed()
            raise BackendTimeout(f"Redis at {self._where()} timed out: {exc}") from exc
        except redis.exceptions.ResponseError as exc:  # the server answered: it is up
            raise BackendRefused(f"Redis at {self._where()} refused: {exc}") from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            self._gate.failed()
            raise BackendError(f"Redis at {self._where()}: {exc}") from exc
        self._gate.succeeded()
        return result

    @staticmethod
    def _px(expire: float | None) -> int | None:
        return max(1, math.ceil(expire * 1000)) if expire else None

    def get(self, key: str) -> bytes | None:
        return self._call(lambda c: c.get(key))

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        if not keys:
            return {}
        values = self._call(lambda c: c.mget(keys))
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    def exists_many(self, keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        if not keys:
            return set()

        def pipelined(c: redis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return pipe.execute()

        return {k for k, n in zip(keys, self._call(pipelined), strict=True) if n}

    def set(self, key: str, value: bytes, expire: float | None = None) -> None:
        if not self._call(lambda c: c.set(key, value, px=self._px(expire))):
            raise BackendRefused(f"Redis refused to store {key!r} ({len(value)} bytes)")

    def set_many(self, items: Mapping[str, bytes], expire: float | None = None) -> None:
        if not items:
            return

        def pipelined(c: redis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, value, px=self._px(expire))
            return pipe.execute(raise_on_error=True)

        results = self._call(pipelined)
        refused = sum(1 for r in results if not r)
        if refused:
            raise BackendRefused(f"Redis refused to store {refused} of {len(items)} items")

    def add(self, key: str, value: bytes, expire: float | None = None) -> bool:
        return bool(self._call(lambda c: c.set(key, value, px=self._px(expire), nx=True)))

    def gets(self, key: str) -> tuple[bytes | None, CasToken]:
        value = self.get(key)
        if value is None:
            return None, None
        return value, hashlib.sha1(value, usedforsecurity=False).hexdigest()

    def cas(self, key: str, value: bytes, token: CasToken, expire: float | None = None) -> bool:
        if token is None:
            return False
        px = self._px(expire) or 0
        self.client  # noqa: B018 - makes sure the script is registered
        return bool(self._call(lambda c: self._cas_script(keys=[key], args=[token, value, px])))

    def delete(self, key: str) -> bool:
        return bool(self._call(lambda c: c.delete(key)))

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        return int(self._call(lambda c: c.delete(*keys))) if keys else 0

    def incr(self, key: str, delta: int = 1) -> int:
        return int(self._call(lambda c: c.incrby(key, delta)))

    def clear(self) -> None:
        self._call(lambda c: c.flushdb())

    def keys(self, prefix: str = "") -> list[str]:
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + "*"
        return sorted(
            k.decode() for k in self._call(lambda c: list(c.scan_iter(match=pattern, count=1000)))
        )

    def info(self) -> dict[str, Any]:
        info = self._call(lambda c: c.info())
        items = self._call(lambda c: c.dbsize())
        return {
            "items": int(items),
            "bytes": int(info.get("used_memory", 0)),
            "evictions": int(info.get("evicted_keys", 0)),
            "limit_maxbytes": int(info.get("maxmemory", 0)),
        }

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _after_fork(self) -> None:
        self._client = None
        self._gate.succeeded()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "password": self.password,
            "url": self.url,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "max_item_size": self.max_item_size,
            "retry_interval": self.retry_interval,
            **self.options,
        }

    def __repr__(self) -> str:
        return f"RedisBackend({self._where()!r})"
