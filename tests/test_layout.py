"""The package's layers are its folders, and imports flow one way down them.

    raven/            the method core (config, options, data, models, objectives, train, packs; methods/)
    raven/eval/       probe, attacks, protocols, metrics, FID, results, plots
    raven/record/     the MLflow record, its write queue, provenance
    raven/sweep/      spec, study, Tune, selection, clock, report, driver, cluster
    raven/reproduce/  grid, runners, report
    raven/cli.py, raven/bench.py   entry points: may import any layer

A module imports only from its own layer or the ones above it, at the top of the file;
a function-local import is for a heavy optional dependency, or a subcommand of an entry point.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raven"
LAYERS = ("core", "eval", "record", "sweep", "reproduce")
ENTRY_POINTS = {"raven.cli", "raven.bench"}
MAX_LINES = 520


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """raven.x -> core; raven.eval.x -> eval; raven.sweep -> sweep."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS[1:] and (PACKAGE / parts[1]).is_dir() else "core"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(raven modules imported anywhere in the file, every function-local import as source text)."""
    tree = ast.parse(path.read_text())
    found, local = set(), []
    top = set(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raven":
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names if a.name.split(".")[0] == "raven"}
        else:
            continue
        found.update(n for n in names if n in modules())
        if node not in top and not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            local.append(ast.unparse(node))
    return found, local


def test_the_layers_are_folders():
    for name in LAYERS[1:]:
        assert (PACKAGE / name / "__init__.py").is_file(), f"raven/{name}/ is not a package"
    flat = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert flat <= {"config", "data", "gaussians", "pgd", "models", "objectives", "step", "train", "pack",
                    "checkpoints", "cuda_graphs", "progress", "methods", "options", "cli", "bench"}, \
        f"tooling at the top of raven/: {sorted(flat)}"


def test_imports_flow_one_way_down_the_layers():
    for module, path in modules().items():
        if module in ENTRY_POINTS:
            continue
        own = LAYERS.index(layer(module))
        for dependency in imports(path)[0]:
            assert dependency not in ENTRY_POINTS, f"{module} imports the entry point {dependency}"
            assert LAYERS.index(layer(dependency)) <= own, (
                f"{module} ({layer(module)} layer) imports {dependency} ({layer(dependency)} layer), "
                f"a layer below it; imports flow {' -> '.join(LAYERS)}")


def test_no_import_cycle():
    graph = {m: imports(p)[0] - {m} for m, p in modules().items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join((*path[path.index(module):], module))
        if module not in done:
            for dependency in sorted(graph.get(module, ())):
                visit(dependency, (*path, module))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_tooling_modules_import_at_the_top_and_stay_small():
    for module, path in modules().items():
        if layer(module) in ("record", "sweep", "reproduce"):
            _, local = imports(path)
            assert not local, f"{module} imports inside functions: {local}"
            assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} is over ~500 lines"


def check_fails_on(tmp_path: Path, monkeypatch, module: str, added: str, check, expected: str) -> None:
    """Run `check` on a copy of raven/ whose `module` (a path under raven/) has `added` appended, and
    assert it fails with `expected` in its message: the check is live."""
    fake = tmp_path / "raven"
    for path in PACKAGE.rglob("*.py"):
        target = fake / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (fake / module).write_text((fake / module).read_text() + added)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError) as caught:
        check()
    assert expected in str(caught.value)


def test_the_layer_test_catches_a_core_module_importing_from_a_sweep_module(tmp_path, monkeypatch):
    """The check above is live: a core module that imports raven.sweep.spec fails it."""
    check_fails_on(tmp_path, monkeypatch, "config.py", "\nfrom raven.sweep.spec import SweepSpec\n",
                   test_imports_flow_one_way_down_the_layers, "raven.config (core layer) imports raven.sweep.spec")


# Modules outside raven/record/ that may import mlflow: they only read the record back.
MLFLOW_READERS = {
    "raven.reproduce.report": "reads a reproduction's runs back for `raven report`",
    "raven.reproduce.figures": "downloads a reproduction's artifacts (checkpoints, t-SNE) to draw the figures",
    "raven.sweep.report": "reads a sweep's runs back for its summary",
    "raven.reproduce.sweep_report": "reads sweeps' runs back for `raven sweep-report`",
}


def mlflow_importers(package: Path) -> set[str]:
    """The modules of `package` and of sweeps/ beside it that import mlflow, at the top or in a function."""
    files = {module_name(p): p for p in package.rglob("*.py")}
    files.update({f"sweeps.{p.stem}": p for p in (package.parent / "sweeps").glob("*.py")})
    found = set()
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "mlflow" for name in names):
                found.add(module)
    return found


def test_only_the_record_writes_mlflow():
    """raven/record/ is the one MLflow writer; the CLI, the runners and the entry scripts go through it."""
    outside = {m for m in mlflow_importers(PACKAGE) if layer(m) != "record"}
    assert outside <= set(MLFLOW_READERS), (
        f"{sorted(outside - set(MLFLOW_READERS))} import mlflow: write through raven.record (or, for a module "
        f"that only reads runs back, add it to MLFLOW_READERS with the reason)")


def test_the_mlflow_check_catches_an_import_in_the_cli(tmp_path, monkeypatch):
    """The check above is live: `import mlflow` added to raven/cli.py (even inside a function) fails it."""
    check_fails_on(tmp_path, monkeypatch, "cli.py", "\n\ndef _log():\n    import mlflow.tracking\n",
                   test_only_the_record_writes_mlflow, "['raven.cli'] import mlflow")
