"""In-kernel ES update: ``out += alpha * sum_p c_p * eps_p`` with eps regenerated per element.

The ES step of ``lowmem_es/es.py`` for one LoRA tensor is

    d = sum_k coef_k * noise(key_k, shape)        coef_k = (1/N) sum_{m in pair k} f_m s_m
    theta += learning_rate * d                    (or Adam on d)

``_es_direction_kernel`` computes it element by element: each program owns a block of
elements, loops over the pairs in the order given, regenerates ``tl.randn(key_k, i)``
for its elements and accumulates in fp32 registers. Nothing of size pairs x numel
exists, not even one pair's noise tensor; the only memory traffic is one write (or one
read-modify-write) of the output. ``es.estimate_direction`` uses it for CUDA tensors.

* ``es_direction_triton``: the launcher; ``es_direction_torch``: the twin with the same
  signature, the same math as ``es.estimate_direction``'s CPU loop (one noise tensor at a
  time, ``add_(noise, alpha=coef)`` in pair order, skipping zero coefficients), so it is
  bitwise equal to it; ``es_direction``: dispatch by ``kernels/_runtime.py``'s
  ``use_kernel`` (CUDA -> kernel, CPU -> twin, ``force=`` or ``LOWMEM_ES_FORCE_TORCH``).

With ``accumulate=True`` and ``out=theta``, ``alpha=learning_rate``, and ``coefficients``
= pair coefficients over N, one launch is the whole SGD step ``theta += lr/N sum f s eps``
with no buffer at all.
"""

from __future__ import annotations

import torch

from lowmem_es import noise as _noise
from lowmem_es import noise_batch as _noise_batch
from lowmem_es.kernels._runtime import HAS_TRITON, INT32_LIMIT, INTERPRETED, use_kernel

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - Triton absent: only the twin exists
    triton = None
    tl = None

__all__ = ["es_direction", "es_direction_torch", "es_direction_triton", "use_kernel"]

# Elements per program. GPU: 1024 elements at 4 warps = 8 Philox chains per thread (the
# same register budget as kernels/noisy_lora.py's NOISE_TILE); untuned (no GPU when
# written). The loop over pairs makes each program long, so small blocks cost nothing in
# launch overhead. Interpreter: cost per program x pair, so one tile of up to 64 Ki.
BLOCK_GPU = 1024
NUM_WARPS_GPU = 4
BLOCK_INTERPRETER = 1 << 16

if HAS_TRITON:

    @triton.jit(do_not_specialize=["alpha"])
    def _es_direction_kernel(out_ptr, keys_ptr, coef_ptr, num_pairs, numel, alpha,
                             ACCUMULATE: tl.constexpr, WIDE: tl.constexpr,
                             BLOCK: tl.constexpr):
        """out[i] = (out[i] if ACCUMULATE else 0) + alpha * sum_p coef[p] tl.randn(key[p], i).

        Pairs are summed in the order given (fp32, like the twin), so the result does not
        depend on the block size. WIDE: int64 element indices (numel >= 2**31).
        """
        pid = tl.program_id(0)
        if WIDE:
            idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        else:
            idx = pid * BLOCK + tl.arange(0, BLOCK)
        mask = idx < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for pair in range(num_pairs):
            key = tl.load(keys_ptr + pair) & 0x7FFFFFFFFFFFFFFF  # keys mod 2**63, as the twin
            coef = tl.load(coef_ptr + pair)
            acc += coef * tl.randn(key, idx)
        result = alpha * acc
        if ACCUMULATE:
            result = tl.load(out_ptr + idx, mask=mask, other=0.0) + result
        tl.store(out_ptr + idx, result, mask=mask)
else:  # pragma: no cover
    _es_direction_kernel = None


def _check(keys: torch.Tensor, coefficients: torch.Tensor, out: torch.Tensor) -> None:
    """The contract both paths enforce, with errors naming the tensor and what it must be."""
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"`out` must be a float32 tensor (the fp32 master or direction "
                        f"buffer), got {got}")
    if not out.is_contiguous():
        raise ValueError(f"`out` must be contiguous (noise offsets are its flat row-major "
                         f"indices), got strides {tuple(out.stride())}")
    for name, tensor, dtype in (("keys", keys, torch.int64),
                                ("coefficients", coefficients, torch.float32)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype:
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"`{name}` must be a {dtype} tensor of shape (pairs,), got {got}")
        if tensor.dim() != 1 or not tensor.is_contiguous():
            raise ValueError(f"`{name}` must be a contiguous 1-D tensor of shape (pairs,), "
                             f"got shape {tuple(tensor.shape)}")
        if tensor.device != out.device:
            raise ValueError(f"`{name}` is on {tensor.device} but `out` is on {out.device}")
    if keys.shape != coefficients.shape:
        raise ValueError(f"`keys` has shape {tuple(keys.shape)} but `coefficients` has "
                         f"{tuple(coefficients.shape)}; expected one coefficient per key")


def es_direction_triton(keys: torch.Tensor, coefficients: torch.Tensor, out: torch.Tensor,
                        alpha: float = 1.0, accumulate: bool = False,
                        noise_backend: str | None = None) -> torch.Tensor:
    """``out = [out +] alpha * sum_p coefficients[p] * noise(keys[p], out.shape)`` in-kernel.

    ``keys`` int64 (P,) Philox keys (mod 2**63), ``coefficients`` fp32 (P,), both on
    out's device; ``out`` a contiguous fp32 tensor, written in place and returned.
    ``noise_backend`` is ignored (the kernel always uses ``tl.randn``); it is there so the
    launcher and the twin share one signature.
    """
    del noise_backend
    _check(keys, coefficients, out)
    if not HAS_TRITON:
        raise RuntimeError("the ES update kernel needs `triton`, which cannot be imported "
                           "here; use force='torch' (the pure-torch twin)")
    if out.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"the ES update kernel needs CUDA tensors, got {out.device}; set "
                           "TRITON_INTERPRET=1 before triton is imported, or force='torch'")
    numel = out.numel()
    if numel == 0:
        return out
    if INTERPRETED:
        block, num_warps = min(BLOCK_INTERPRETER, triton.next_power_of_2(numel)), 1
    else:
        block, num_warps = BLOCK_GPU, NUM_WARPS_GPU
    _es_direction_kernel[(triton.cdiv(numel, block),)](
        out, keys, coefficients, keys.shape[0], numel, float(alpha),
        ACCUMULATE=bool(accumulate), WIDE=numel + block >= INT32_LIMIT, BLOCK=block,
        num_warps=num_warps)
    return out


def es_direction_torch(keys: torch.Tensor, coefficients: torch.Tensor, out: torch.Tensor,
                       alpha: float = 1.0, accumulate: bool = False,
                       noise_backend: str | None = None) -> torch.Tensor:
    """The twin of ``es_direction_triton``: one noise tensor at a time, fp32.

    The sum is built exactly as ``es.estimate_direction`` does on CPU (zeros, then
    ``add_(noise(key), alpha=coef)`` per pair in the order given, zero coefficients
    skipped), then scaled by ``alpha`` and written or added to ``out``. Memory: one
    buffer and one noise tensor of out's size (none extra when ``alpha == 1`` and not
    accumulating). Reads keys/coefficients on the host.
    """
    _check(keys, coefficients, out)
    direction = out if not accumulate else torch.empty_like(out)
    direction.zero_()
    for key, coef in zip(keys.tolist(), coefficients.tolist(), strict=True):
        if coef == 0.0:
            continue
        direction.add_(_noise_batch.noise(key & _noise.MASK63, out.shape, device=out.device,
                                          backend=noise_backend), alpha=coef)
    if alpha != 1.0:
        direction.mul_(alpha)
    if accumulate:
        out.add_(direction)
    return out


def es_direction(keys: torch.Tensor, coefficients: torch.Tensor, out: torch.Tensor,
                 alpha: float = 1.0, accumulate: bool = False,
                 noise_backend: str | None = None, force: str | None = None) -> torch.Tensor:
    """The ES direction (or a whole SGD step) for one tensor: kernel on CUDA, twin on CPU.

    Arguments as in ``es_direction_triton``; ``force="kernel"|"torch"`` picks a path and
    ``LOWMEM_ES_FORCE_TORCH=1`` makes the twin the default.
    """
    fn = es_direction_triton if use_kernel(out.device, force) else es_direction_torch
    return fn(keys, coefficients, out, alpha, accumulate, noise_backend)
