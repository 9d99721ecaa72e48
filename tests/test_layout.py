"""The layout tells the architecture (DESIGN.md "Layout"), and this keeps it true.

Imports are read from the source (every `import` statement, those inside functions too), so a
lazy import cannot hide an arrow: `service` -> `runtime`, `exporters` -> `models` -> `runtime`,
never the other way, no torch on the serving path, and no import circle anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "models", "exporters", "service", "loadtest", "slatectr")
MAX_MODULES_PER_DIRECTORY = 15


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imported(path: Path) -> Iterator[str]:
    """Every absolute module name an import statement in `path` names."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _project_module(name: str) -> str | None:
    """The project module `name` refers to (a `from pkg import module` names the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for imported in _imported(path):
            target = _project_module(imported)
            if target is not None and target != name and not name.startswith(f"{target}."):
                graph[name].add(target)  # a module importing its own package is no arrow
    return graph


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("runtime", {"torch", "models", "exporters", "service", "loadtest", "slatectr"}),
        ("service", {"torch", "models", "exporters", "loadtest", "slatectr"}),
        ("models", {"exporters", "service", "loadtest", "slatectr"}),
        ("exporters", {"service", "loadtest", "slatectr"}),
    ],
)
def test_imports_run_one_way(package: str, forbidden: set[str]) -> None:
    wrong = sorted(
        f"{name} imports {imported}"
        for name, path in MODULES.items()
        if _top(name) == package
        for imported in _imported(path)
        if _top(imported) in forbidden
    )
    assert not wrong, wrong


def test_no_import_circle_among_source_files() -> None:
    graph = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_every_runtime_and_service_module_imports_without_torch() -> None:
    names = sorted(name for name in MODULES if _top(name) in {"runtime", "service"})
    code = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(len(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_source_directory_holds_more_than_fifteen_modules() -> None:
    crowded = {
        str(directory.relative_to(ROOT)): count
        for package in PACKAGES
        for directory in [ROOT / package, *(p for p in (ROOT / package).rglob("*") if p.is_dir())]
        if (count := len([p for p in directory.glob("*.py") if p.name != "__init__.py"]))
        > MAX_MODULES_PER_DIRECTORY
    }
    assert not crowded, crowded


def test_the_scan_sees_the_arrows_it_checks() -> None:
    """The checks above would pass vacuously if the scan found nothing."""
    graph = _edges()
    assert "runtime.loader" in graph["service.engine"]
    assert "runtime.features" in graph["models.training.behavior_task"]
    assert "models.training.run" in graph["slatectr.cli"]  # a lazy import inside a command
