"""Which path each op takes (lowmem_es/backends.py): one table of switches, one rule.

tests/conftest.py restores the table after every test.
"""

from __future__ import annotations

import sys

import pytest

from lowmem_es import backends, noise


def test_defaults_and_validation():
    assert all(backends.force(op) is None for op in backends.OPS)
    with pytest.raises(ValueError, match="unknown op 'lora'"):
        backends.force("lora")
    with pytest.raises(ValueError, match=r"`force\('es_update'\)` must be one of"):
        backends.set_force(backends.ES_UPDATE, "gpu")
    with pytest.raises(ValueError, match="sampler must be one of"):
        backends.set_sampler("numpy")


def test_use_kernel_rule(monkeypatch):
    """The switch first ("torch" never; None never off CUDA, without importing Triton),
    then the kernels' own rule (a forced kernel always; else not under
    LOWMEM_ES_FORCE_TORCH; else CUDA with compiled Triton)."""
    from lowmem_es.kernels import _runtime

    monkeypatch.delenv(_runtime.FORCE_TORCH_ENV, raising=False)
    for op in backends.OPS:
        assert not backends.use_kernel(op, "cpu")
        assert backends.use_kernel(op, "cuda") == (_runtime.HAS_TRITON
                                                   and not _runtime.INTERPRETED)
        backends.set_force(op, "torch")
        assert not backends.use_kernel(op, "cuda")
        assert backends.use_kernel(op, "cuda", force="kernel")  # a caller's own choice wins
        backends.set_force(op, "kernel")
        assert backends.use_kernel(op, "cpu")
        monkeypatch.setenv(_runtime.FORCE_TORCH_ENV, "1")
        assert backends.use_kernel(op, "cpu")  # forced outright: the variable does not rule
        backends.set_force(op, None)
        assert not backends.use_kernel(op, "cuda")  # the variable rules the default out
        monkeypatch.delenv(_runtime.FORCE_TORCH_ENV)


def test_off_cuda_the_rule_never_imports_triton(monkeypatch):
    monkeypatch.delitem(sys.modules, "lowmem_es.kernels._runtime", raising=False)
    assert not backends.use_kernel(backends.NOISY_LORA, "cpu")
    assert "lowmem_es.kernels._runtime" not in sys.modules


def test_switch_off_pins_the_philox_source_for_sampling():
    """With the source left to the device, the torch path on CPU would be the per-row
    generators (other draws): a sampling kernel switched off keeps Philox."""
    backends.set_force(backends.SAMPLING, "kernel")
    assert backends.sampling_source("cpu") == "philox"
    backends.switch_off(backends.SAMPLING)
    assert backends.force(backends.SAMPLING) == "torch"
    assert backends.sampler() == "philox" and backends.sampling_source("cpu") == "philox"
    backends.switch_off(backends.ES_UPDATE)
    assert backends.force(backends.ES_UPDATE) == "torch"
    backends.set_sampler("generator")
    backends.switch_off(backends.SAMPLING)
    assert backends.sampler() == "generator"  # an explicit source is kept


def test_sampling_source_defaults_by_device():
    assert backends.sampling_source("cpu") == "generator"
    assert backends.sampling_source("cuda") == "philox"
    backends.set_sampler("generator")
    assert backends.sampling_source("cuda") == "generator"


def test_scoped_applies_and_restores_a_trainers_settings():
    backends.set_force(backends.NF4_MATMUL, "kernel")
    before = backends.snapshot()
    with backends.scoped("eager", "torch"):
        assert backends.force(backends.NF4_MATMUL) == "torch"
        assert noise.get_backend() == "eager"
    assert backends.snapshot() == before
    with pytest.raises(RuntimeError), backends.scoped("eager", None):
        raise RuntimeError("a failing step")
    assert backends.snapshot() == before
