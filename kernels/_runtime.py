"""What every kernel module shares: is Triton here, is it interpreted, kernel or twin.

* ``HAS_TRITON``: ``import triton`` worked (it is absent off Linux, or may be broken).
* ``INTERPRETED``: ``@triton.jit`` makes interpreter functions here (``TRITON_INTERPRET=1``
  was set before triton was first imported; Triton reads it once, at its import).
* ``use_kernel(device, force)``: the one rule for kernel or torch twin, used by every
  dispatch in ``lowmem_es.kernels``: ``force``, then ``LOWMEM_ES_FORCE_TORCH``, then the
  device (CUDA with compiled Triton).
* ``check_kernel_usable``: the error a launcher raises when its kernel cannot run.
* ``sm_count``, ``next_pow2``, ``INT32_LIMIT``: launch-configuration helpers.

Importing this module imports triton (``lowmem_es.kernels`` itself does not).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
except Exception:  # absent (off Linux) or broken: only the twins are available
    triton = None

__all__ = ["FORCE_CHOICES", "FORCE_TORCH_ENV", "HAS_TRITON", "INT32_LIMIT", "INTERPRETED",
           "check_kernel_usable", "next_pow2", "sm_count", "use_kernel"]

HAS_TRITON = triton is not None
FORCE_TORCH_ENV = "LOWMEM_ES_FORCE_TORCH"
FORCE_CHOICES = ("kernel", "torch")
# Element and row indices past this need int64 arithmetic in a kernel.
INT32_LIMIT = 1 << 31

if HAS_TRITON:

    @triton.jit
    def _probe():  # never launched: only its type says which backend @triton.jit chose
        pass

    # The interpreter is chosen when @triton.jit runs (from TRITON_INTERPRET at import).
    INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
else:
    INTERPRETED = False


def check_kernel_usable(device: torch.device, kernel: str = "the Triton noise kernel") -> None:
    """Raise a RuntimeError saying why ``kernel`` cannot run on ``device`` (shared by all
    kernels here): no triton, or a CPU tensor without the interpreter."""
    if not HAS_TRITON:
        raise RuntimeError(f"{kernel} needs `triton`, which cannot be imported here; use "
                           "force='torch' (the pure-torch twin) instead")
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"{kernel} needs CUDA tensors, got tensors on {device}; on a CPU machine set "
            "TRITON_INTERPRET=1 before triton is first imported to run it in the "
            "interpreter, or use force='torch'")


def use_kernel(device: torch.device | str, force: str | None = None) -> bool:
    """Whether a dispatch takes the kernel (not the torch twin) for tensors on ``device``.

    ``force="kernel"``/``"torch"`` decides outright. Otherwise the twin if
    ``LOWMEM_ES_FORCE_TORCH`` is set to anything but ``""``/``"0"``, else the kernel
    exactly for CUDA tensors with Triton compiled (not interpreted).
    """
    if force is not None:
        if force not in FORCE_CHOICES:
            raise ValueError(f"`force` must be one of {FORCE_CHOICES} or None, got {force!r}")
        return force == "kernel"
    if os.environ.get(FORCE_TORCH_ENV, "") not in ("", "0"):
        return False
    return torch.device(device).type == "cuda" and HAS_TRITON and not INTERPRETED


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (cached per device)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def next_pow2(value: int) -> int:
    """The smallest power of two >= ``value``, for ``value`` >= 1."""
    return 1 << max(0, (int(value) - 1).bit_length())
