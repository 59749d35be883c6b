"""Per-row keyed Gumbel noise for temperature sampling: one launch for every row of a step.

Population sampling keys each row's noise (``lowmem_es.generate``: the key follows the
row's prompt and generation index, never its position in a chunk), so completions do not
depend on chunking and rows of different members share their noise. Drawing that noise
with one seeded ``torch.Generator`` per row costs a Python iteration, a reseed and a
launch per row and step: at 128 rows ~1 ms of host time per step on a GPU, as much as
the captured 7B decode step itself. Here the noise is counter-based instead:

    u[r, c] = uniform from word 0 of Philox4x32-10, key ``keys[r]``,
              counter ``(c, step, 0, 0)`` (the column and the decode step)
    scores[r, c] = logits[r, c] / T - log(-log(u[r, c]))

and ``argmax(scores)`` is an exact draw from ``softmax(logits / T)`` (the Gumbel-max
trick). ``u`` is ``((word >> 9) + 0.5) / 2**23``, in [2**-24, 1 - 2**-24] exactly in
float32, so neither log sees 0 or 1 (``tl.rand``'s uniform can round to 1.0, whose
Gumbel value is +inf: a uniformly random token once in ~1/3e-8 draws). ``-log(u)`` is
then at least 5.96e-8; both paths clamp it at 2**-25 as well, a no-op for an accurate log
(sm_90's ``tl.log`` is libdevice's polynomial, not ``lg2.approx``: checked in the PTX),
so that no approximation can ever make the outer log see a value <= 0.

* ``_gumbel_scores_kernel``: the ``@triton.jit`` kernel, grid (rows, column blocks).
* ``gumbel_scores_triton`` / ``gumbel_scores_torch``: the kernel's launcher and its twin
  (same signature, the same uniforms bit for bit; the logs may differ by an ulp on GPU).
* ``gumbel_scores``: dispatch, like the other kernels (CUDA -> kernel, else twin;
  ``force=``; ``LOWMEM_ES_FORCE_TORCH``).

The twin on CPU costs 2.4-11x the per-row ``torch.Generator`` (bench/bench_sampling.py,
bench/RESULTS.md), so the CPU sampler keeps its generators; the twin is the kernel's
reference and the fallback on CUDA.
"""

from __future__ import annotations

import torch

from lowmem_es import noise as _noise
from lowmem_es.config import MIN_TEMPERATURE
from lowmem_es.kernels._runtime import HAS_TRITON, INTERPRETED, check_kernel_usable, use_kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

# Columns per program. GPU: a 152k vocabulary is ~150 programs per row; not yet tuned on a
# GPU. Interpreter: its cost is per program, so wide tiles.
BLOCK_GPU = 1024
NUM_WARPS_GPU = 4
BLOCK_INTERPRETER = 1 << 14
# Elements (rows x columns) per pass of the twin. CPU: ~10 live int64 temporaries of a
# pass stay cache-sized (~20 MiB). CUDA, where the twin is the fallback when the kernel is
# off: each of a pass's ~170 operations is a launch, so wider passes (~160 MiB of
# temporaries, inside the 16 bytes per logit the memory plan counts at 128 rows x 152k
# vocabulary); even so ~10 passes, ~1,700 launches, per step there.
TWIN_ELEMENTS = 1 << 18
TWIN_ELEMENTS_CUDA = 1 << 21
_UNIFORM_STEP = 1.0 / (1 << 23)

if HAS_TRITON:

    @triton.jit(do_not_specialize=["step"])
    def _gumbel_scores_kernel(logits_ptr, keys_ptr, out_ptr, vocab, stride_logits,
                              stride_out, step, inv_temperature, BLOCK: tl.constexpr):
        """out[r, c] = logits[r, c] * inv_temperature + Gumbel(keys[r], step, c)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        key = tl.load(keys_ptr + row) & 0x7FFFFFFFFFFFFFFF  # mod 2**63, as the twin
        counters = cols.to(tl.int64) + (step.to(tl.int64) << 32)
        word = tl.randint(key, counters)  # uint32: word 0 of Philox4x32-10
        u = ((word >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        gumbel = -tl.log(tl.maximum(-tl.log(u), 2.9802322387695312e-08))  # >= 2**-25
        x = tl.load(logits_ptr + row * stride_logits + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_out + cols,
                 x.to(tl.float32) * inv_temperature + gumbel, mask=mask)


def _check(logits: torch.Tensor, keys: torch.Tensor, step: int, temperature: float) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 \
            or not logits.is_floating_point():
        raise ValueError("`logits` must be a floating-point tensor of shape (rows, vocab), "
                         f"got {getattr(logits, 'shape', type(logits).__name__)}")
    if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 \
            or tuple(keys.shape) != (logits.shape[0],):
        raise ValueError(f"`keys` must be an int64 tensor of shape (rows,) = "
                         f"({logits.shape[0]},), one Philox key per row, got "
                         f"{getattr(keys, 'dtype', None)} {tuple(getattr(keys, 'shape', ()))}")
    if keys.device != logits.device:
        raise ValueError(f"`keys` is on {keys.device} but `logits` on {logits.device}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < (1 << 31):
        raise ValueError(f"`step` must be an integer in [0, 2**31), got {step!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not MIN_TEMPERATURE <= temperature < float("inf"):
        raise ValueError(f"`temperature` must be a finite number >= {MIN_TEMPERATURE:g} "
                         f"(1 / T must fit a float32; 0 means greedy, which does not "
                         f"sample), got {temperature!r}")


def uniform24(word: torch.Tensor) -> torch.Tensor:
    """uint32 words (held in int64) -> float32 ``((word >> 9) + 0.5) / 2**23``: the top 23
    bits, centred, so every value lies in [2**-24, 1 - 2**-24] and is exact in float32."""
    return ((word >> 9).to(torch.float32) + 0.5) * _UNIFORM_STEP


def gumbel_scores_torch(logits: torch.Tensor, keys: torch.Tensor, step: int,
                        temperature: float) -> torch.Tensor:
    """The twin of ``gumbel_scores_triton``: float32 (rows, vocab) scores, in torch."""
    _check(logits, keys, step, temperature)
    rows, vocab = logits.shape
    out = torch.empty((rows, vocab), dtype=torch.float32, device=logits.device)
    row_keys = (keys & _noise.MASK63)[:, None]
    budget = TWIN_ELEMENTS_CUDA if logits.device.type == "cuda" else TWIN_ELEMENTS
    width = max(64, budget // max(rows, 1))
    for start in range(0, vocab, width):
        stop = min(start + width, vocab)
        counters = torch.arange(start, stop, dtype=torch.int64, device=logits.device)
        counters |= step << 32
        word, _ = _noise.philox4x32(row_keys, counters[None, :])
        gumbel = uniform24(word).log_().neg_().clamp_min_(2.0 ** -25).log_().neg_()
        torch.add(gumbel, logits[:, start:stop].to(torch.float32), alpha=1.0 / temperature,
                  out=out[:, start:stop])
    return out


def gumbel_scores_triton(logits: torch.Tensor, keys: torch.Tensor, step: int,
                         temperature: float) -> torch.Tensor:
    """``logits / T + Gumbel(keys[r], step, c)`` by the kernel: float32 (rows, vocab).

    ``logits`` (rows, vocab) fp16/bf16/fp32, last dimension contiguous; ``keys`` int64
    (rows,) (taken mod 2**63); ``step`` the decode step (the counter's high word).
    """
    _check(logits, keys, step, temperature)
    check_kernel_usable(logits.device, "the Gumbel sampling kernel")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty((rows, vocab), dtype=torch.float32, device=logits.device)
    if out.numel() == 0:
        return out
    if INTERPRETED:
        block, warps = min(BLOCK_INTERPRETER, triton.next_power_of_2(vocab)), 1
    else:
        block, warps = BLOCK_GPU, NUM_WARPS_GPU
    _gumbel_scores_kernel[(rows, triton.cdiv(vocab, block))](
        logits, keys.contiguous(), out, vocab, logits.stride(0),
        out.stride(0), step, 1.0 / temperature, BLOCK=block, num_warps=warps)
    return out


def gumbel_scores(logits: torch.Tensor, keys: torch.Tensor, step: int, temperature: float,
                  force: str | None = None) -> torch.Tensor:
    """Per-row keyed Gumbel scores: the kernel on CUDA, the twin elsewhere (``force``:
    "kernel" or "torch"; ``LOWMEM_ES_FORCE_TORCH=1`` makes the twin the default). The
    sampler passes ``backends.force(SAMPLING)``."""
    if use_kernel(logits.device, force):
        return gumbel_scores_triton(logits, keys, step, temperature)
    return gumbel_scores_torch(logits, keys, step, temperature)
