"""The ``memoshare`` command: read shared statistics, inspect and clear a store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .backends import Backend, BackendError, make_backend
from .shared_stats import format_table, stats

__all__ = ["main"]


def _backend(args: argparse.Namespace) -> Backend:
    if args.backend == "disk":
        return make_backend(None, path=args.path) if args.path else make_backend(None)
    if args.backend == "memcached":
        return make_backend("memcached", servers=args.server or ["127.0.0.1:11211"])
    if args.backend == "redis":
        return make_backend("redis", url=args.redis_url)
    raise SystemExit(f"memoshare: unknown backend {args.backend!r}")


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=["disk", "memcached", "redis"],
        default="disk",
        help="the store to read (default: the embedded disk store)",
    )
    parser.add_argument(
        "--path", help="disk store directory (default: $MEMOSHARE_DIR or the platform cache folder)"
    )
    parser.add_argument(
        "--server",
        action="append",
        metavar="HOST:PORT",
        help="memcached server; repeat for several (default 127.0.0.1:11211)",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="Redis URL (default redis://127.0.0.1:6379/0)",
    )


def _cmd_stats(args: argparse.Namespace) -> int:
    rows = stats(_backend(args), namespace=args.namespace)
    if args.json:
        print(json.dumps([r.asdict() for r in rows], indent=2))
    elif not rows:
        print(
            "no shared statistics in this store yet (they are flushed every few seconds "
            "and when a process exits)"
        )
    else:
        print(format_table(rows))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info: dict[str, Any] = _backend(args).info()
    print(
        json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items())
    )
    return 0


def _cmd_clear(args: argparse.Namespace) -> int:
    store = _backend(args)
    if args.namespace is None:
        if not args.yes:
            print(
                "memoshare: clearing the whole store needs --yes (or pass --namespace)",
                file=sys.stderr,
            )
            return 2
        store.clear()
        print("cleared the whole store")
        return 0
    if not store.can_list_keys:
        print(
            f"memoshare: {store!r} cannot list its keys; clear a whole server with --yes instead",
            file=sys.stderr,
        )
        return 2
    keys = store.keys(args.namespace + ":")
    print(f"removed {store.delete_many(keys)} entries of namespace {args.namespace!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memoshare`` command."""
    parser = argparse.ArgumentParser(prog="memoshare", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p_stats = commands.add_parser(
        "stats", help="hits, misses and hit rate per function, totalled over every worker"
    )
    _add_store_options(p_stats)
    p_stats.add_argument("--namespace", help="only this namespace (default: all)")
    p_stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_stats.set_defaults(run=_cmd_stats)

    p_info = commands.add_parser("info", help="size, items and evictions of the store")
    _add_store_options(p_info)
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.set_defaults(run=_cmd_info)

    p_clear = commands.add_parser("clear", help="remove the entries of a namespace (or all)")
    _add_store_options(p_clear)
    p_clear.add_argument("--namespace", help="remove only this namespace's entries")
    p_clear.add_argument("--yes", action="store_true", help="confirm clearing the whole store")
    p_clear.set_defaults(run=_cmd_clear)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except BackendError as exc:
        print(f"memoshare: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
