"""The Triton kernels compile for an H200 (sm_90), checked offline by bench/compile_sm90.py.

The kernel tests run in Triton's CPU interpreter, which accepts constructs the GPU
compiler rejects (a reshape feeding ``tl.dot`` broke Hopper's TF32 layout for rank 8
with 64+ rows per member) and knows nothing of shared-memory limits. Triton's own sm_90
pipeline, with the ``ptxas`` it bundles, runs on the CPU, so every code path's variant is
compiled here: a kernel change that no longer compiles for the GPU fails CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compile_sm90.py"


def test_every_kernel_code_path_compiles_for_sm90(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode == 2:
        pytest.skip(f"no CUDA backend in this Triton: {result.stdout.strip()}")
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| noisy_lora")]
    assert any("shrink" in row and "PAIRED=True" in row for row in rows), report[-2000:]
    assert any("expand" in row and "SUB_BLOCKS=1 " not in row for row in rows)
    assert "FAIL" not in result.stdout and "OVER SHARED LIMIT" not in result.stdout
