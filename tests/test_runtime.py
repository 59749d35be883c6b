"""The kernels' shared runtime (kernels/_runtime.py): the one kernel-or-twin rule.

``use_kernel`` decides in this order: ``force``, then ``LOWMEM_ES_FORCE_TORCH``, then the
device (CUDA with compiled Triton). ``HAS_TRITON``/``INTERPRETED`` are patched where a
test needs the device rule to say "kernel" on this machine, so that every step of the
order can fail here, without a GPU.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import lowmem_es.kernels
from lowmem_es.kernels import _runtime

KERNEL_MODULES = ("noise", "noisy_lora", "nf4_matmul", "es_update", "sampling")


@pytest.fixture
def compiled_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend Triton is installed and compiled (not interpreted), with no env override."""
    monkeypatch.setattr(_runtime, "HAS_TRITON", True)
    monkeypatch.setattr(_runtime, "INTERPRETED", False)
    monkeypatch.delenv(_runtime.FORCE_TORCH_ENV, raising=False)


def test_device_rule_kernel_exactly_for_cuda_with_compiled_triton(
        compiled_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _runtime.use_kernel("cuda")
    assert _runtime.use_kernel(torch.device("cuda", 1))
    assert not _runtime.use_kernel("cpu")
    monkeypatch.setattr(_runtime, "INTERPRETED", True)  # the interpreter: twin by default
    assert not _runtime.use_kernel("cuda")
    monkeypatch.setattr(_runtime, "INTERPRETED", False)
    monkeypatch.setattr(_runtime, "HAS_TRITON", False)  # no triton: twin
    assert not _runtime.use_kernel("cuda")


def test_this_machine_follows_the_device_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_runtime.FORCE_TORCH_ENV, raising=False)
    assert not _runtime.use_kernel("cpu")
    assert _runtime.use_kernel("cuda") == (_runtime.HAS_TRITON and not _runtime.INTERPRETED)


@pytest.mark.parametrize(("value", "kernel"), [("1", False), ("yes", False), ("0", True),
                                                ("", True)])
def test_env_variable_comes_before_the_device(compiled_triton: None,
                                              monkeypatch: pytest.MonkeyPatch, value: str,
                                              kernel: bool) -> None:
    monkeypatch.setenv(_runtime.FORCE_TORCH_ENV, value)
    assert _runtime.use_kernel("cuda") is kernel


def test_force_comes_before_env_and_device(compiled_triton: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert _runtime.use_kernel("cpu", force="kernel")
    assert not _runtime.use_kernel("cuda", force="torch")
    monkeypatch.setenv(_runtime.FORCE_TORCH_ENV, "1")
    assert _runtime.use_kernel("cuda", force="kernel")  # an explicit choice wins
    assert _runtime.use_kernel("cpu", force="kernel")


def test_bad_force_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"`force` must be one of \('kernel', 'torch'\) or "
                                         r"None, got 'triton'"):
        _runtime.use_kernel("cpu", force="triton")


def test_every_kernel_module_dispatches_by_the_one_rule() -> None:
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"lowmem_es.kernels.{name}")
        assert module.use_kernel is _runtime.use_kernel, name


def test_check_kernel_usable_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runtime, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="the X kernel needs `triton`"):
        _runtime.check_kernel_usable(torch.device("cuda"), "the X kernel")
    monkeypatch.setattr(_runtime, "HAS_TRITON", True)
    monkeypatch.setattr(_runtime, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, got tensors on cpu"):
        _runtime.check_kernel_usable(torch.device("cpu"))
    _runtime.check_kernel_usable(torch.device("cuda"))
    monkeypatch.setattr(_runtime, "INTERPRETED", True)
    _runtime.check_kernel_usable(torch.device("cpu"))  # the interpreter runs CPU tensors


@pytest.mark.skipif(not _runtime.HAS_TRITON, reason="needs triton")
def test_interpreted_matches_the_kernels_own_type() -> None:
    """The probe sees what every ``@triton.jit`` here sees (a real kernel's type)."""
    from lowmem_es.kernels import noise as knoise

    assert _runtime.INTERPRETED == (type(knoise._randn_kernel).__name__
                                    == "InterpretedFunction")


def test_without_triton_everything_falls_back_to_the_twins() -> None:
    """With ``import triton`` failing, the package, the runtime and a dispatch agree."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import lowmem_es.kernels as package\n"
            "from lowmem_es.kernels import _runtime, noise\n"
            "print(package.HAS_TRITON, _runtime.HAS_TRITON, _runtime.INTERPRETED,"
            " noise.use_kernel('cuda'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False", "False"]


def test_package_has_triton_is_the_runtimes() -> None:
    assert lowmem_es.kernels.HAS_TRITON is _runtime.HAS_TRITON


@pytest.mark.parametrize(("value", "power"), [(1, 1), (2, 2), (3, 4), (16, 16),
                                              (17, 32), (1000, 1024)])
def test_next_pow2(value: int, power: int) -> None:
    assert _runtime.next_pow2(value) == power
