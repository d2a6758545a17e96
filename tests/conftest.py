"""Fixtures: real memcached and Redis servers on free loopback ports, and fresh backends.

Nothing here mocks a store. Each server is a child process that the fixture starts and stops;
``scripts/test.sh`` installs the binaries on a fresh machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memoshare import DiskBackend, MemcachedBackend, MemoryBackend

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with code {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"server on port {port} did not listen within {timeout}s")


class ServerProcess:
    """A server binary on a fixed loopback port that can be stopped, killed and restarted."""

    def __init__(self, name: str, argv: list[str], port: int) -> None:
        binary = shutil.which(argv[0])
        if binary is None:
            pytest.fail(
                f"{argv[0]} is not installed: run `bash scripts/test.sh`, which installs it",
                pytrace=False,
            )
        self.name = name
        self.argv = [binary, *argv[1:]]
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_listening(self.port, self.proc)
        return self

    def kill(self) -> None:
        """Stop abruptly, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_memcached(
    port: int | None = None, memory_mb: int = 64, item_size: str = "1m"
) -> ServerProcess:
    port = port or free_port()
    argv = ["memcached", "-l", HOST, "-p", str(port), "-U", "0", "-m", str(memory_mb)]
    argv += ["-I", item_size, "-t", "2"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]  # memcached refuses to run as root without naming a user
    return ServerProcess("memcached", argv, port).start()


def start_redis(port: int | None = None, maxmemory: str | None = None) -> ServerProcess:
    port = port or free_port()
    argv = ["redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
    argv += ["--protected-mode", "no", "--loglevel", "warning"]
    if maxmemory:
        argv += ["--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]
    return ServerProcess("redis", argv, port).start()


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[ServerProcess]:
    """One memcached for the session; tests get it flushed through ``memcached_backend``."""
    server = start_memcached()
    yield server
    server.stop()


@pytest.fixture
def memcached_backend(memcached_server: ServerProcess) -> Iterator[MemcachedBackend]:
    backend = MemcachedBackend(memcached_server.address, retry_interval=0.05)
    backend.clear()
    yield backend
    backend.close()


@pytest.fixture
def own_memcached() -> Iterator[ServerProcess]:
    """A memcached of this test alone (to kill, restart, or fill)."""
    server = start_memcached()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ServerProcess]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_backend(redis_server: ServerProcess):  # type: ignore[no-untyped-def]
    from memoshare.backends.redis import RedisBackend

    backend = RedisBackend(host=HOST, port=redis_server.port)
    backend.clear()
    yield backend
    backend.close()


@pytest.fixture
def disk_backend(tmp_path: Path) -> DiskBackend:
    return DiskBackend(tmp_path / "store")


@pytest.fixture
def memory_backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture(params=["memory", "disk", "memcached", "redis"])
def any_backend(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Each backend in turn, empty."""
    return request.getfixturevalue(f"{request.param}_backend")


# Multi-process tests need a store that processes share.
SHARED = ["disk", "memcached", "redis"]


@pytest.fixture(params=SHARED)
def shared_backend(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(autouse=True)
def _isolated_default_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep the embedded default store of every test out of the user's cache folder."""
    import memoshare.backends as backends

    monkeypatch.setenv("MEMOSHARE_DIR", str(tmp_path_factory.mktemp("default-store")))
    monkeypatch.setattr(backends, "_default", None)
