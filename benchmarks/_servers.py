"""Start a throwaway memcached on a free loopback port for the benchmarks, and stop it.

Usage::

    with memcached_server() as (host, port):
        ...

The server listens on 127.0.0.1 only and is terminated (then killed, if it lingers) on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"memcached exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"memcached did not listen on {HOST}:{port} within {timeout}s")


@contextlib.contextmanager
def memcached_server(memory_mb: int = 256, threads: int = 1) -> Iterator[tuple[str, int]]:
    """Run ``memcached`` on a free loopback port for the duration of the block."""
    binary = shutil.which("memcached") or "/usr/bin/memcached"
    if not os.path.exists(binary):
        raise RuntimeError("memcached is not installed (apt-get install memcached)")
    port = free_port()
    argv = [binary, "-l", HOST, "-p", str(port), "-U", "0", "-m", str(memory_mb)]
    argv += ["-t", str(threads)]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv += ["-u", "root"]  # memcached refuses to run as root without it
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        yield HOST, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
