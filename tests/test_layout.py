"""The package's imports flow one way: no cycle, and the tooling modules import at their top only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raven"
# Modules of the sweep and reproduction tooling (raven/cli.py imports per subcommand on purpose).
TOOLING = ("write_queue", "cluster", "selection", "provenance", "tracking", "sweep_spec", "progress", "sweep_clock",
           "study", "tune", "sweep_report", "sweep", "reproduce_grid", "reproduce_offline", "reproduce")


def imports(path: Path) -> tuple[set[str], set[str], list[str]]:
    """(raven modules imported at the top, raven modules imported inside functions, every function-local import)."""
    tree = ast.parse(path.read_text())
    top, local, anything_local = set(), set(), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names] if node.module == "raven" else \
                [node.module.split(".")[1]] if node.module and node.module.startswith("raven.") else []
        else:
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("raven.")]
        at_top = node in tree.body
        (top if at_top else local).update(n for n in names if (PACKAGE / f"{n}.py").is_file())
        if not at_top:
            anything_local.append(ast.unparse(node))
    return top, local, anything_local


def test_no_import_cycle():
    graph = {p.stem: set.union(*imports(p)[:2]) - {p.stem} for p in PACKAGE.glob("*.py")}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join((*path[path.index(module):], module))
        if module not in done:
            for dependency in sorted(graph[module]):
                visit(dependency, (*path, module))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_tooling_modules_import_at_the_top_and_stay_small():
    for name in TOOLING:
        path = PACKAGE / f"{name}.py"
        _, _, local = imports(path)
        assert not local, f"raven/{name}.py imports inside functions: {local}"
        assert len(path.read_text().splitlines()) <= 520, f"raven/{name}.py is over ~500 lines"
