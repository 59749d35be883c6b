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
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lowmem-es = lowmem_es.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
