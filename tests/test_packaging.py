"""Packaging: kernels install as lowmem_es.kernels, never as a top-level `kernels` module."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                         "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_installed_package_layout(tmp_path):
    """From outside the repo: lowmem_es.kernels maps to kernels/, `kernels` is not ours."""
    out = _run("import importlib.util, lowmem_es.kernels as k, lowmem_es as p;"
               "spec = importlib.util.find_spec('kernels');"
               "print(k.__file__); print(p.__file__);"
               "print(spec.origin if spec else 'none')", tmp_path)
    kernels_file, package_file, top_level = out.splitlines()
    assert Path(kernels_file).resolve().parent.name == "kernels"
    assert Path(package_file).resolve().parent.name == "lowmem_es"
    if top_level != "none":  # a PyPI `kernels` may be installed; it must not be our folder
        assert not Path(top_level).resolve().is_relative_to(ROOT)


def test_wheel_has_no_top_level_kernels(tmp_path):
    """The built wheel maps kernels/ into lowmem_es/kernels/ and ships no top-level module."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # build from a copy: setuptools writes build/ into the tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "runs", "*.egg-info", "__pycache__", ".*_cache"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "-w", str(tmp_path), str(source)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {result.stderr[-300:]}")
    import zipfile

    (wheel,) = tmp_path.glob("lowmem_es-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lowmem_es/kernels/__init__.py" in names
    assert "lowmem_es/kernels/noise.py" in names
    assert "lowmem_es/planner/__init__.py" in names  # a listed subpackage
    assert "lowmem_es/profiles/8gb.toml" in names  # profiles ship as package data
    assert not any(n.startswith("kernels/") for n in names)
    # pyproject lists the packages by hand: a new subpackage left off would be missing.
    for module, path in _module_files().items():
        parts = module.split(".")
        wanted = "/".join(parts) + ("/__init__.py" if path.name == "__init__.py" else ".py")
        assert wanted in names, f"{wanted} is not in the wheel: add its package to pyproject"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lowmem-es = lowmem_es.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# --- the import graph: the house has no circles, and the library never calls the CLI ---

def _module_files() -> dict[str, Path]:
    """Every module of the installed package by dotted name (kernels/ is lowmem_es.kernels)."""
    files = {}
    roots = ((ROOT / "lowmem_es", "lowmem_es"), (ROOT / "kernels", "lowmem_es.kernels"))
    for root, package in roots:
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def _runtime_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules ``module`` imports when it runs: module-level and function-local
    imports alike (a cycle hidden in a function is still a cycle), but not imports under
    ``if TYPE_CHECKING:`` (they never run). ``from P import N`` is an edge to ``P.N`` when
    that is a module, else to ``P``."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for child in ast.walk(node))
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        edges.update(name for name in names if name in known and name != module)
    return edges


def _import_graph() -> dict[str, set[str]]:
    files = _module_files()
    return {module: _runtime_imports(path, module, set(files)) for module, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_hidden_cycle():
    """The guard below can fail: a cycle through a function-local import is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycles():
    """No two modules import each other, directly or around a circle, even through imports
    inside functions: each concern has one home and the dependencies point one way."""
    graph = _import_graph()
    assert "lowmem_es.trainer" in graph and "lowmem_es.kernels.noise" in graph
    assert "lowmem_es.journal" in graph["lowmem_es.trainer"]  # edges are read
    assert _cycles(graph) == []


def test_library_modules_never_import_the_cli():
    """The command line sits on top: no module outside lowmem_es.cli imports it."""
    graph = _import_graph()
    offenders = sorted(f"{module} -> {target}" for module, targets in graph.items()
                       if not module.startswith("lowmem_es.cli") for target in targets
                       if target == "lowmem_es.cli" or target.startswith("lowmem_es.cli."))
    assert offenders == []
