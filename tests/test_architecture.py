"""The package's shape: no import cycles, no private names shared between modules, and the
process hooks in their declared order (see docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import memoshare
from memoshare import _process

PACKAGE = Path(memoshare.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in ``module`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    return isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test)


def _imports() -> list[tuple[str, str, str, bool]]:
    """(importing module, imported module, imported name or "", at import time) for every
    import of a memoshare module by a memoshare module. "At import time" includes imports for
    type checking only: a cycle hidden behind ``TYPE_CHECKING`` is still a coupling both ways."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            top = parents.get(node) is tree or _type_checking_only(node, parents)
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                if not target.startswith("memoshare"):
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if (PACKAGE.parent / (submodule.replace(".", "/") + ".py")).exists() or (
                        _is_package(submodule)
                    ):
                        found.append((module, submodule, "", top))
                    else:
                        found.append((module, target, alias.name, top))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("memoshare"):
                        found.append((module, alias.name, "", top))
    return found


def test_the_module_import_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for importer, imported, _, top in _imports():
        if top and importer != imported:
            graph.setdefault(importer, set()).add(imported)
    # Importing a submodule runs its package first: that edge is Python's, not a coupling.
    for node in list(graph):
        graph[node] = {m for m in graph[node] if not node.startswith(m + ".")}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join(
            [*visiting[visiting.index(node) :], node]
        )
        visiting.append(node)
        for child in sorted(graph.get(node, ())):
            visit(child)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert "memoshare.memoize" in graph and "memoshare.datasets.dataset" in graph  # walked


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [
        f"{importer} imports {name} from {imported}"
        for importer, imported, name, _ in _imports()
        if name.startswith("_") and name != "__version__"
    ]
    assert private == []


def test_the_package_imports_in_a_fresh_interpreter_in_any_module_order() -> None:
    # A cycle that the static graph missed would fail here for some first module.
    modules = sorted({importer for importer, *_ in _imports()})
    for module in modules:
        if module.endswith((".redis", ".__main__")):
            continue  # an optional dependency (covered by the Redis tests); the CLI entry
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=60)


def test_process_hooks_run_in_their_declared_order() -> None:
    for phase in ("after_fork_child", "at_exit"):
        hooks = _process.hooks(phase)
        owners = [hook.__module__ for hook in hooks]
        # Stores before caches before statistics: statistics count what the caches wrote.
        order = ["memoshare.backends", "memoshare.datasets", "memoshare.shared_stats"]
        ranks = [
            next(i for i, prefix in enumerate(order) if owner.startswith(prefix))
            for owner in owners
            if owner.startswith(tuple(order))
        ]
        assert ranks == sorted(ranks), (phase, owners)
    at_exit = [hook.__qualname__ for hook in _process.hooks("at_exit")]
    assert at_exit.index("_flush_all") < at_exit.index("_StatsFlusher.flush_at_exit")


def test_process_hooks_run_by_order_then_registration(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ran: list[str] = []
    monkeypatch.setitem(_process._hooks, "on_sigterm", [])  # a scratch phase for this test
    _process.on_sigterm(lambda: ran.append("stats"), _process.Order.STATS)
    _process.on_sigterm(lambda: ran.append("locks"), _process.Order.LOCKS)
    _process.on_sigterm(lambda: 1 / 0, _process.Order.CACHES)  # a failing hook is logged
    _process.on_sigterm(lambda: ran.append("caches"), _process.Order.CACHES)
    _process._run("on_sigterm")
    assert ran == ["locks", "caches", "stats"]
