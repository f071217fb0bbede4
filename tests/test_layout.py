"""The layering the design note (docs/design.md) describes: an algorithm core without Flower, apps on top, no import cycle."""

from __future__ import annotations

import ast
import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).parents[1]
PACKAGES = ("fedpipe_core", "fedpipe_flower", "fedpipe_tools", "server_app", "client_app")
MAY_IMPORT = {
    "fedpipe_core": set(),
    "fedpipe_flower": {"fedpipe_core"},
    "server_app": {"fedpipe_core", "fedpipe_flower"},
    "client_app": {"fedpipe_core", "fedpipe_flower"},
    "fedpipe_tools": {"fedpipe_core"},
}
"""Which of the project's packages each package may import (besides itself)."""


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_core_has_no_flower_import():
    offenders = {
        name: sorted(i for i in _imports(path) if i == "flwr" or i.startswith("flwr."))
        for name, path in _modules().items()
        if name.startswith("fedpipe_core")
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_packages_import_only_downwards():
    for name, path in _modules().items():
        package = name.split(".")[0]
        used = {i.split(".")[0] for i in _imports(path)} & set(PACKAGES)
        assert used <= MAY_IMPORT[package] | {package}, (name, sorted(used - MAY_IMPORT[package] - {package}))


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {name: {i for i in _imports(path) if i in modules and i != name} for name, path in modules.items()}
    for name in graph:  # a package's __init__ re-exports its modules; importing one of them is not upward
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*trail, node, dep])}"
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")
def test_the_app_package_holds_the_apps_and_their_data_not_the_docs_or_benchmark_records():
    """``flwr run .`` ships a FAB (10 MB at most): the code and the shipped data, never docs/ (the benchmark's run records)."""
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    assert {"server_app/server_app.py", "client_app/client_app.py", "fedpipe_core/datasets/e2e/devset.jsonl"} <= set(names)
    assert not [n for n in names if n.startswith("docs/")] and any((ROOT / "docs").rglob("*.md"))
    shipped = {str(f.relative_to(ROOT)) for f in (ROOT / "fedpipe_core" / "datasets").rglob("*") if f.is_file()}
    assert shipped <= set(names)  # each dataset travels with its README and licence (DATA_LICENSE.md)
