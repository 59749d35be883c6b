"""Triton noise kernel: ``tl.randn(key, offset)`` for a flat range or for given offsets.

The noise contract (``lowmem_es/noise.py``, DESIGN.md "Noise addressing"): element ``i`` of
the perturbation with key ``key`` is ``tl.randn(key, i)``, Philox4x32-10 keyed by ``key``
with the element index as counter. The fused ES-LoRA kernels call ``tl.randn`` inline;
this standalone kernel writes the same values to memory, for the update step on CUDA and
as the kernel that tests hold against the pure-torch twin ``lowmem_es.noise.randn``.

* ``_randn_kernel``: the ``@triton.jit`` kernel.
* ``randn_triton`` / ``noise_triton``: launchers (flatten, pick the block, launch).
* ``randn`` / ``noise``: dispatch. CUDA tensors run the kernel, CPU tensors the twin
  (``lowmem_es.noise``); ``force="kernel"|"torch"`` picks one, and the environment
  variable ``LOWMEM_ES_FORCE_TORCH=1`` makes the default the twin everywhere (to rule the
  kernel out when debugging). An explicit ``force`` wins over the variable: the rule
  ``use_kernel`` of ``kernels/_runtime.py``, shared by every kernel here.

On a CPU-only machine the kernel runs only under the Triton interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before anything imports triton.
"""

from __future__ import annotations

import torch

from lowmem_es import noise as _twin
from lowmem_es import noise_batch as _noise_batch
from lowmem_es.kernels._runtime import (
    HAS_TRITON,
    INT32_LIMIT,
    INTERPRETED,
    check_kernel_usable,
    use_kernel,
)

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - Triton absent: only the twin exists
    triton = None
    tl = None

# Elements per program. GPU: Triton's own elementwise default (1024 elements, 4 warps);
# not yet tuned on a GPU. Interpreter: its cost is per program, not per element (~0.05 s
# per launch with one big tile, ENVIRONMENT.md), so one tile of up to 64 Ki elements.
BLOCK_GPU = 1024
NUM_WARPS_GPU = 4
BLOCK_INTERPRETER = 1 << 16

if HAS_TRITON:

    @triton.jit(do_not_specialize=["key", "start"])
    def _randn_kernel(out_ptr, offsets_ptr, key, start, numel,
                      HAS_OFFSETS: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        """out[i] = tl.randn(key, offsets[i]) if HAS_OFFSETS else tl.randn(key, start + i).

        WIDE: index and offset arithmetic in int64 (needed once start + numel passes 2**31).
        With HAS_OFFSETS the offsets keep their stored dtype (int32 or int64): tl.randn
        puts the high 32 bits of an int64 offset in the second Philox counter word, and 0
        for an int32 one, so both give the same value for the same index.
        """
        pid = tl.program_id(0)
        if WIDE:
            idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        else:
            idx = pid * BLOCK + tl.arange(0, BLOCK)
        mask = idx < numel
        if HAS_OFFSETS:
            offsets = tl.load(offsets_ptr + idx, mask=mask, other=0)
        else:
            offsets = start + idx
        tl.store(out_ptr + idx, tl.randn(key, offsets), mask=mask)
else:
    _randn_kernel = None


def _launch_config(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for ``numel`` elements."""
    if INTERPRETED:
        return min(BLOCK_INTERPRETER, triton.next_power_of_2(max(numel, 1))), 1
    return BLOCK_GPU, NUM_WARPS_GPU


def _launch(out: torch.Tensor, offsets: torch.Tensor | None, key: int, start: int,
            numel: int) -> None:
    block, num_warps = _launch_config(numel)
    wide = start + numel + block >= INT32_LIMIT
    grid = (triton.cdiv(numel, block),)
    # Without offsets the pointer is never read; `out` stands in for it.
    _randn_kernel[grid](out, out if offsets is None else offsets, key & _twin.MASK63, start,
                        numel, HAS_OFFSETS=offsets is not None, WIDE=wide, BLOCK=block,
                        num_warps=num_warps)


def _check_integer(offsets: torch.Tensor) -> None:
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise TypeError(f"noise offsets must be an integer tensor, got dtype {offsets.dtype}")


def randn_triton(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randn(key, offsets)`` by the Triton kernel: float32, same shape/device as offsets.

    ``offsets`` are non-negative element indices of any integer dtype; int32 and int64
    go to the kernel as they are (int64 is needed for indices >= 2**31), others are
    widened to int64. ``key`` is taken modulo 2**63, as the twin takes it.
    """
    check_kernel_usable(offsets.device)
    _check_integer(offsets)
    flat = offsets.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int64)
    flat = flat.contiguous()
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    numel = flat.numel()
    if numel:
        if int(flat.min()) < 0:  # one device sync; the twin raises the same error
            raise ValueError("noise offsets must be non-negative element indices")
        _launch(out, flat, key, 0, numel)
    return out.reshape(offsets.shape)


def noise_triton(key: int, shape: tuple[int, ...] | torch.Size,
                 device: torch.device | str = "cuda", start: int = 0) -> torch.Tensor:
    """A noise tensor by the Triton kernel: element ``i`` (row-major) is ``tl.randn(key, start+i)``.

    The offsets are generated in the kernel, so no index tensor is materialised.
    """
    device = torch.device(device)
    check_kernel_usable(device)
    if start < 0:
        raise ValueError(f"`start` must be a non-negative element index, got {start}")
    numel = 1
    for size in shape:
        numel *= int(size)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        _launch(out, None, key, start, numel)
    return out.reshape(tuple(shape))


def randn(key: int, offsets: torch.Tensor, force: str | None = None) -> torch.Tensor:
    """``tl.randn(key, offsets)``: float32, same shape/device as ``offsets``.

    CUDA tensors use the Triton kernel, CPU tensors the twin ``lowmem_es.noise.randn``
    (with the backend chosen by ``lowmem_es.noise.set_backend``); see
    ``_runtime.use_kernel``.
    Both paths reject non-integer offsets (the twin alone would truncate floats).
    """
    _check_integer(offsets)
    if use_kernel(offsets.device, force):
        return randn_triton(key, offsets)
    return _twin.randn(key, offsets)


def noise(key: int, shape: tuple[int, ...] | torch.Size, device: torch.device | str = "cpu",
          force: str | None = None) -> torch.Tensor:
    """The whole noise tensor of ``key``: element ``i`` (row-major) is ``tl.randn(key, i)``.

    Dispatches like ``randn``: the kernel on CUDA, the twin ``lowmem_es.noise_batch.noise`` on CPU.
    """
    if use_kernel(device, force):
        return noise_triton(key, shape, device)
    return _noise_batch.noise(key, shape, device=device)
