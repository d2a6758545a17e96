"""The ``memoshare`` command, run as a user runs it: a subprocess against real stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from memoshare import DiskBackend, memoize


def memoshare(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memoshare", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_clear_removes_one_namespace_of_the_disk_store(tmp_path: Path) -> None:
    store = DiskBackend(tmp_path / "store")
    keep = memoize(store, namespace="keep", shared_stats=False)(lambda x: x)
    drop = memoize(store, namespace="drop", shared_stats=False)(lambda x: x + 1)
    for i in range(3):
        keep(i), drop(i)
    store.close()
    done = memoshare("clear", "--path", str(tmp_path / "store"), "--namespace", "drop")
    assert done.returncode == 0, done.stderr
    assert "removed 3 entries of namespace 'drop'" in done.stdout
    store = DiskBackend(tmp_path / "store")
    assert all(store.get(keep.cache_key(i)) is not None for i in range(3))
    assert all(store.get(drop.cache_key(i)) is None for i in range(3))


def test_clearing_a_whole_store_needs_yes(tmp_path: Path) -> None:
    done = memoshare("clear", "--path", str(tmp_path / "store"))
    assert done.returncode == 2 and "--yes" in done.stderr


def test_clear_of_a_namespace_on_memcached_says_it_cannot_list(memcached_server) -> None:  # type: ignore[no-untyped-def]
    server = f"{memcached_server.address[0]}:{memcached_server.port}"
    done = memoshare("clear", "--backend", "memcached", "--server", server, "--namespace", "x")
    assert done.returncode == 2 and "cannot list its keys" in done.stderr
    assert "Traceback" not in done.stderr


def test_info_and_stats_of_the_disk_store_as_json(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    code = (
        "from memoshare import DiskBackend, memoize, flush_stats\n"
        f"f = memoize(DiskBackend({path!r}))(lambda x: x)\n"
        "f(1); f(1); f(2)\n"
        "flush_stats()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    info = memoshare("info", "--path", path, "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["items"] >= 2
    stats = memoshare("stats", "--path", path, "--json")
    assert stats.returncode == 0, stats.stderr
    [row] = json.loads(stats.stdout)
    assert (row["hits"], row["misses"], row["sets"]) == (1, 2, 2)
