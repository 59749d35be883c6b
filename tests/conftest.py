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


@pytest.fixture(autouse=True)
def _restore_backends():
    """Each test leaves the kernel switches, the sampler and the noise backend as it found
    them (``lowmem_es.backends`` holds them process-wide, as a run's kernels are)."""
    from lowmem_es import backends

    saved = backends.snapshot()
    yield
    backends.restore(saved)


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


LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture()
def es_model(tiny_llama_dir):
    """(ES-LoRA model on LORA_LORA_TARGETS, tokenizer): rank 4, masters nudged off zero."""
    import torch

    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    model, tokenizer, _ = load_model(tiny_llama_dir)
    es_model = attach_es_lora(model, LORA_TARGETS, rank=4, alpha=8.0, seed=0,
                              base_model_name_or_path=str(tiny_llama_dir))
    # B starts at zero; give the adapter some weight so LoRA changes the output.
    generator = torch.Generator().manual_seed(123)
    for tensor in es_model.parameters().values():
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return es_model, tokenizer
