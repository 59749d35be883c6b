"""Test-wide setup. Runs before any test module imports torch, triton or lowmem_es."""

import os

# Triton reads TRITON_INTERPRET once, when it is first imported: set it before anything
# imports triton so that kernels run on CPU in the interpreter. On a GPU machine, run
# pytest with TRITON_INTERPRET=0 to test the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
# lowmem_es.noise reads its default backend at import; eager needs no compiler and no warmup.
os.environ.setdefault("LOWMEM_ES_NOISE_BACKEND", "eager")
# torch's OpenMP threads spin between ops by default. On the 2-core dev/CI machines, with
# other processes busy, the spinning thread steals the core from the working one: the
# eager noise twin measured 1.65 s per 1e5 elements instead of 0.013 s (2 threads, load
# average 5). Sleeping threads remove that; read by OpenMP when torch starts, so set here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random-init tiny Llama + character tokenizer saved as safetensors (built once)."""
    from lowmem_es.example import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """The same for a tiny Qwen2 (q/k/v biases, a different attention layout)."""
    from lowmem_es.example import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture
def lock_holder(tmp_path):
    """``lock_holder(out)``: another process holding ``out``'s run lock (as a run training
    there does) until the test ends; returns that process (its ``pid`` is in the refusal)."""
    import subprocess
    import sys

    holders = []

    def hold(out):
        holder = subprocess.Popen(
            [sys.executable, "-c", "import time; from lowmem_es import run_dir; "
             f"run_dir.lock_run({str(out)!r}); print('locked', flush=True); "
             "time.sleep(120)"], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        holders.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()
