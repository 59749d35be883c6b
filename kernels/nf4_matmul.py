"""Fused NF4 matmul: ``x W^T`` read straight from bitsandbytes' packed 4-bit weights.

bitsandbytes' batched path dequantizes the whole weight to 16 bits before its matmul;
this kernel dequantizes tiles of the packed weight in registers and feeds them straight
into ``tl.dot`` (or a dot-free GEMV for one row), so a decode step costs one read of the
packed weights whatever the row count up to a few hundred; few programs are topped up
by a deterministic split-K. The layout it reads is validated in ``kernels/nf4_layout.py``.

* ``_nf4_matmul_kernel``, ``_nf4_gemv_kernel``, ``_nf4_splitk_reduce_kernel``: kernels.
* ``nf4_matmul_triton``: launcher; ``nf4_matmul_torch``: the twin (dequantize + matmul).
* ``nf4_matmul``: dispatch (``kernels/_runtime.py``'s ``use_kernel``, then supported
  shapes); ``nf4_linear(x, layer)`` for a ``bnb.nn.Linear4bit``.

Design, the layout read, what the kernel does not support and its GPU status:
docs/kernels.md, "Fused NF4 matmul".
"""

from __future__ import annotations

import math

import torch

from lowmem_es.kernels._runtime import (
    HAS_TRITON,
    INTERPRETED,
    check_kernel_usable,
    next_pow2,
    sm_count,
    use_kernel,  # the one dispatch rule shared by every kernel here
)
from lowmem_es.kernels.nf4_layout import NF4Layout, kernel_unsupported_reason, nf4_layout

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - Triton absent: only the twin exists
    triton = None
    tl = None

__all__ = ["DISPATCH_MAX_ROWS", "nf4_linear", "nf4_matmul", "nf4_matmul_torch",
           "nf4_matmul_triton", "use_kernel"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---- launch constants. GPU values are NOT tuned (no GPU was available when written):
# first-principles defaults, to be replaced by the numbers of
# `bench/bench_nf4_matmul.py --sweep` on the first GPU session.
#
# Rows up to which the dispatch uses the kernel; above, the twin (dequantize once +
# cuBLAS). Past a few hundred rows the weight read is amortised and the matmul is
# compute-bound, where cuBLAS on the dequantized weight is the stronger kernel (the
# issue's range is 1..512; bitsandbytes 0.50 switches on sm90 at a similar scale).
DISPATCH_MAX_ROWS = 512
# Rows up to which the dot-free GEMV kernel runs: with one row a 16-row tl.dot tile
# wastes 15/16 of its work and routes the weight tile through shared memory; the GEMV
# keeps it in registers.
GEMV_MAX_ROWS = 1
# GEMV tile: 32 features x 256 k = 64 weight values + 32 accumulators per thread at 4
# warps; a 32 x 128-byte packed tile per step (8 threads x 16 bytes per feature row).
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_NUM_WARPS = 32, 256, 4
# tl.dot tiles by row count: (max rows, BLOCK_M, BLOCK_N, BLOCK_K, num_warps). BLOCK_M
# covers the rows of a decode chunk in one tile (the weight tile is dequantized once per
# M-tile); BLOCK_N x BLOCK_K = 64 x 128 keeps the dequantized tile at 64 fp32 values per
# thread at 4 warps; above 64 rows the tile grows towards the usual 128 x 128 x 64 GEMM.
DOT_TILES = ((16, 16, 64, 128, 4), (32, 32, 64, 128, 4), (64, 64, 64, 128, 4),
             (None, 128, 128, 64, 8))
NUM_STAGES = 3  # Triton's default software-pipelining depth on sm80+
# Programs to aim for: 2 per SM so that every SM has a second program's loads in flight.
PROGRAMS_PER_SM = 2
MIN_BLOCK_N = 32  # BLOCK_N is halved down to this before split-K is used
MAX_SPLITS = 16
# Split-K partials cost 8 bytes per (split, row, feature) (fp32 write + read) against
# K/2 bytes of packed weight per feature: keep them under this fraction of the weight.
SPLIT_TRAFFIC_CAP = 0.25
# Nibble -> value on the GPU: "tree" (15 selects on fp32 constants; what bitsandbytes'
# own Triton backend uses, backends/triton/kernels_4bit.py) or "table" (a gather from
# the 16-entry code in global memory, L1-resident). Untuned: the sweep measures both.
DEQUANT_GPU = "tree"
# Interpreter: its cost is per program and per loop step (ENVIRONMENT.md), so one tile
# covers everything up to these sizes.
INTERPRETER_MAX_BLOCK_M = 512
INTERPRETER_MAX_BLOCK_N = 1024
INTERPRETER_MAX_BLOCK_K = 2048
# Keys: kernel ("gemv"|"dot"), block_m, block_n, block_k, num_warps, splits, dequant
# ("tree"|"table"). Replaces the computed choice; tests and the sweep set it.
LAUNCH_OVERRIDES: dict[str, int | str] = {}


# ----------------------------------------------------------------------------- checks


def _check_inputs(x: torch.Tensor, layout: NF4Layout, bias: torch.Tensor | None) -> None:
    """The contract shared by kernel and twin: errors name the offending tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`x` has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if x.dim() < 1 or x.shape[-1] != layout.in_features:
        raise ValueError(f"`x` has shape {tuple(x.shape)}; its last dimension must be "
                         f"in_features={layout.in_features} of `weight` (quant_state.shape "
                         f"{(layout.out_features, layout.in_features)})")
    if x.device != layout.packed.device:
        raise ValueError(f"`x` is on {x.device} but `weight` is on {layout.packed.device}; "
                         "move them to one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES:
            got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise TypeError(f"`bias` must be a float16/bfloat16/float32 tensor, got {got}")
        if tuple(bias.shape) != (layout.out_features,):
            raise ValueError(f"`bias` has shape {tuple(bias.shape)}; expected "
                             f"(out_features,) = ({layout.out_features},)")
        if bias.device != x.device:
            raise ValueError(f"`bias` is on {bias.device} but `x` is on {x.device}")


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _nf4_value(q, code_ptr, TABLE: tl.constexpr):
        """fp32 NF4 value of each 4-bit index in ``q`` (int32).

        TABLE: gather from the 16-entry code. Else a select tree on the bits of q with
        bitsandbytes' NF4 constants (exact fp32 values, the same as its code table).
        """
        if TABLE:
            value = tl.load(code_ptr + q)
        else:
            b2 = (q & 4) != 0
            b1 = (q & 2) != 0
            b0 = (q & 1) != 0
            pos = tl.where(
                b2,
                tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023),
                         tl.where(b0, 0.5626170039176941, 0.44070982933044434)),
                tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634),
                         tl.where(b0, 0.16093020141124725, 0.07958029955625534)))
            neg = tl.where(
                b2,
                tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495),
                         tl.where(b0, -0.18477343022823334, -0.28444138169288635)),
                tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367),
                         tl.where(b0, -0.6961928009986877, -1.0)))
            value = tl.where((q & 8) != 0, pos, neg)
        return value

    @triton.jit
    def _nf4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                  feats, feat_mask, k0, K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BS: tl.constexpr,
                  NESTED: tl.constexpr, NESTED_BS: tl.constexpr, TABLE: tl.constexpr):
        """Dequantized weights of features ``feats`` at k in [k0, k0 + BLOCK_K), fp32.

        Returns (w_even, w_odd), each (BLOCK_N, BLOCK_K // 2): the weights at k0 + 2j
        (high nibble of byte j) and k0 + 2j + 1 (low nibble). Masked entries are 0.
        Requires K % BS == 0 and k0 % BLOCK_K == 0, so no quantization block crosses a
        row and a tile holds whole blocks (BLOCK_K >= BS) or lies in one (BLOCK_K < BS).
        """
        KH: tl.constexpr = BLOCK_K // 2
        half_k = K // 2
        byte_cols = k0 // 2 + tl.arange(0, KH)
        mask = feat_mask[:, None] & (byte_cols < half_k)[None, :]
        packed = tl.load(w_ptr + feats[:, None] * half_k + byte_cols[None, :], mask=mask,
                         other=0).to(tl.int32)
        w_even = _nf4_value(packed >> 4, code_ptr, TABLE)
        w_odd = _nf4_value(packed & 15, code_ptr, TABLE)
        blocks_per_row = K // BS
        # Scales per tile row: BLOCK_K // BS when BLOCK_K >= BS, else 1 (both powers of 2).
        GROUPS: tl.constexpr = (BLOCK_K + BS - 1) // BS
        if BLOCK_K > BS:
            group = k0 // BS + tl.arange(0, GROUPS)
            g_mask = feat_mask[:, None] & (group < blocks_per_row)[None, :]
            block = feats[:, None] * blocks_per_row + group[None, :]  # (BLOCK_N, GROUPS)
        else:
            g_mask = feat_mask
            block = feats * blocks_per_row + k0 // BS  # (BLOCK_N,)
        if NESTED:
            index = tl.load(absmax_ptr + block, mask=g_mask, other=0).to(tl.int32)
            scale = (tl.load(code2_ptr + index)
                     * tl.load(absmax2_ptr + block // NESTED_BS, mask=g_mask, other=0.0)
                     + tl.load(offset_ptr))
        else:
            scale = tl.load(absmax_ptr + block, mask=g_mask, other=0.0)
        if BLOCK_K > BS:
            w_even = tl.reshape(tl.reshape(w_even, (BLOCK_N, GROUPS, BS // 2))
                                * scale[:, :, None], (BLOCK_N, KH))
            w_odd = tl.reshape(tl.reshape(w_odd, (BLOCK_N, GROUPS, BS // 2))
                               * scale[:, :, None], (BLOCK_N, KH))
        else:
            w_even = w_even * scale[:, None]
            w_odd = w_odd * scale[:, None]
        return w_even, w_odd

    @triton.jit
    def _store_result(acc, rows, row_mask, feats, feat_mask, split, M, N, stride_om,
                      bias_ptr, out_ptr, partial_ptr,
                      HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        """out = acc + bias rounded once to out's dtype; with SPLIT, fp32 partials instead."""
        mask = row_mask[:, None] & feat_mask[None, :]
        if SPLIT:
            offsets = (split * M + rows.to(tl.int64))[:, None] * N + feats[None, :]
            tl.store(partial_ptr + offsets, acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + feats, mask=feat_mask, other=0.0).to(
                    tl.float32)[None, :]
            offsets = rows.to(tl.int64)[:, None] * stride_om + feats[None, :]
            tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _nf4_matmul_kernel(
            x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
            bias_ptr, out_ptr, partial_ptr, M, N, K, stride_xm, stride_om, k_per_split,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            BS: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
            TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
            PRECISION: tl.constexpr):
        """out[rows, feats] = x[rows] W[feats]^T (+ bias) over one K-slice, by tl.dot.

        Program (m-block, n-block, split); the m-block is the fastest grid axis so that
        programs sharing a weight tile run together and the second read hits L2.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        KH: tl.constexpr = BLOCK_K // 2
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        feats = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        feat_mask = feats < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :],
                         other=0.0)
            x_even, x_odd = tl.split(tl.reshape(xt, (BLOCK_M, KH, 2)))
            w_even, w_odd = _nf4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                      code_ptr, feats, feat_mask, k0, K, BLOCK_N, BLOCK_K, BS,
                                      NESTED, NESTED_BS, TABLE)
            w_even = w_even.to(x_ptr.dtype.element_ty)
            w_odd = w_odd.to(x_ptr.dtype.element_ty)
            acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision=PRECISION)
            acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision=PRECISION)
        _store_result(acc, rows, row_mask, feats, feat_mask, split, M, N, stride_om,
                      bias_ptr, out_ptr, partial_ptr, HAS_BIAS, SPLIT)

    @triton.jit
    def _nf4_gemv_kernel(
            x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
            bias_ptr, out_ptr, partial_ptr, M, N, K, stride_xm, stride_om, k_per_split,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BS: tl.constexpr,
            NESTED: tl.constexpr, NESTED_BS: tl.constexpr, TABLE: tl.constexpr,
            HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        """out[row, feats] = x[row] W[feats]^T (+ bias) without tl.dot, one row per program.

        Program (row, n-block, split). Products accumulate elementwise in a
        (BLOCK_N, BLOCK_K/2) fp32 tile and are reduced over k once at the end, so the
        loop has no cross-thread reduction. The weight stays fp32 (not rounded to x's
        dtype): a hair more exact than the twin, within the tests' tolerance.
        """
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        KH: tl.constexpr = BLOCK_K // 2
        feats = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        feat_mask = feats < N
        x_row = x_ptr + row.to(tl.int64) * stride_xm
        acc2 = tl.zeros((BLOCK_N, KH), dtype=tl.float32)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(xt, (KH, 2)))
            w_even, w_odd = _nf4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                      code_ptr, feats, feat_mask, k0, K, BLOCK_N, BLOCK_K, BS,
                                      NESTED, NESTED_BS, TABLE)
            acc2 += w_even * x_even[None, :] + w_odd * x_odd[None, :]
        acc = tl.sum(acc2, axis=1)  # (BLOCK_N,)
        if SPLIT:
            tl.store(partial_ptr + (split * M + row.to(tl.int64)) * N + feats, acc,
                     mask=feat_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + feats, mask=feat_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + row.to(tl.int64) * stride_om + feats,
                     acc.to(out_ptr.dtype.element_ty), mask=feat_mask)

    @triton.jit
    def _nf4_splitk_reduce_kernel(partial_ptr, bias_ptr, out_ptr, M, N, splits, stride_om,
                                  HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """out[m, n] = sum over splits of partial[s, m, n] (fixed order) + bias, rounded once."""
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < M * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(splits):
            acc += tl.load(partial_ptr + split * M * N + idx, mask=mask, other=0.0)
        feats = idx % N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + feats, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + (idx // N) * stride_om + feats, acc.to(out_ptr.dtype.element_ty),
                 mask=mask)
else:  # pragma: no cover
    _nf4_matmul_kernel = _nf4_gemv_kernel = _nf4_splitk_reduce_kernel = None


# ----------------------------------------------------------------------------- launcher


def _launch_config(rows: int, n: int, k: int, blocksize: int, sms: int) -> dict:
    """Kernel, tiles, warps and K-splits for an (rows x k) @ (k x n) launch.

    Interpreter: one tile over everything (its cost is per program). GPU: the tables
    above; BLOCK_N is halved (not below MIN_BLOCK_N) while there are fewer programs than
    PROGRAMS_PER_SM * sms, then K is split while the partials stay under
    SPLIT_TRAFFIC_CAP of the weight bytes. ``LAUNCH_OVERRIDES`` replaces any choice.
    """
    over = LAUNCH_OVERRIDES
    kernel = over.get("kernel", "gemv" if rows <= GEMV_MAX_ROWS else "dot")
    if INTERPRETED:
        cfg = dict(block_m=min(max(16, next_pow2(rows)), INTERPRETER_MAX_BLOCK_M),
                   block_n=min(max(16, next_pow2(n)), INTERPRETER_MAX_BLOCK_N),
                   block_k=min(max(32, next_pow2(k)), INTERPRETER_MAX_BLOCK_K),
                   num_warps=1, splits=1, dequant="table")
    elif kernel == "gemv":
        cfg = dict(block_m=1, block_n=GEMV_BLOCK_N, block_k=GEMV_BLOCK_K,
                   num_warps=GEMV_NUM_WARPS, dequant=DEQUANT_GPU)
    else:
        tile = next(t for t in DOT_TILES if t[0] is None or rows <= t[0])
        cfg = dict(block_m=tile[1], block_n=tile[2], block_k=tile[3], num_warps=tile[4],
                   dequant=DEQUANT_GPU)
    cfg["kernel"] = kernel
    cfg.update({key: over[key] for key in ("block_m", "block_n", "block_k", "num_warps",
                                            "dequant") if key in over})
    if kernel == "gemv":
        cfg["block_m"] = 1
    m_blocks = -(-rows // cfg["block_m"])
    if not INTERPRETED:
        target = PROGRAMS_PER_SM * sms
        if "block_n" not in over:
            while cfg["block_n"] > MIN_BLOCK_N and m_blocks * -(-n // cfg["block_n"]) < target:
                cfg["block_n"] //= 2
        base = m_blocks * -(-n // cfg["block_n"])
        traffic_cap = max(1, int(SPLIT_TRAFFIC_CAP * k / (16 * rows)))
        cfg["splits"] = max(1, min(-(-target // base), MAX_SPLITS, traffic_cap))
    if "splits" in over:
        cfg["splits"] = int(over["splits"])
    k_tiles = -(-k // cfg["block_k"])
    tiles_per_split = -(-k_tiles // max(1, min(cfg["splits"], k_tiles)))
    cfg["k_per_split"] = tiles_per_split * cfg["block_k"]
    cfg["splits"] = -(-k_tiles // tiles_per_split)
    cfg["grid"] = (rows if kernel == "gemv" else m_blocks, -(-n // cfg["block_n"]),
                   cfg["splits"])
    return cfg


def _check_kernel_usable(device: torch.device) -> None:
    check_kernel_usable(device, "the NF4 matmul kernel")


def nf4_matmul_triton(x: torch.Tensor, weight: torch.Tensor, quant_state,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + bias`` by the Triton kernels, W read from its packed NF4 form.

    ``x`` (..., K) fp16/bf16/fp32 (fp32 only in the interpreter's tests: bf16 ``tl.dot``
    is wrong there); ``weight`` the packed tensor of a bitsandbytes ``Params4bit`` and
    ``quant_state`` its ``QuantState`` (nested or not, any power-of-two blocksize with
    K % blocksize == 0); ``bias`` (N,) or None. Returns (..., N) in x's dtype, fp32
    accumulation, one rounding. No autograd: the result never requires grad.
    """
    layout = nf4_layout(weight, quant_state)
    _check_inputs(x, layout, bias)
    reason = kernel_unsupported_reason(layout)
    if reason is not None:
        raise ValueError(reason + "; use force='torch' (the dequantize + matmul twin)")
    _check_kernel_usable(x.device)
    n, k = layout.out_features, layout.in_features
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    rows = out.numel() // n
    if rows == 0:
        return out
    x_flat = x.reshape(rows, k)
    if x_flat.stride(-1) != 1:
        x_flat = x_flat.contiguous()
    out_flat = out.view(rows, n)
    sms = 1 if INTERPRETED else sm_count(x.device.index if x.device.index is not None
                                          else torch.cuda.current_device())
    cfg = _launch_config(rows, n, k, layout.blocksize, sms)
    splits = cfg["splits"]
    partial = (torch.empty((splits, rows, n), dtype=torch.float32, device=x.device)
               if splits > 1 else out_flat)  # unused pointer when not split
    dummy = layout.absmax
    bias_arg = bias if bias is not None else out_flat
    common = (x_flat, layout.packed, layout.absmax,
              layout.absmax2 if layout.nested else dummy,
              layout.code2 if layout.nested else dummy,
              layout.offset if layout.nested else dummy,
              layout.code, bias_arg, out_flat, partial, rows, n, k, x_flat.stride(0),
              out_flat.stride(0), cfg["k_per_split"])
    flags = dict(BS=layout.blocksize, NESTED=layout.nested,
                 NESTED_BS=layout.nested_blocksize,
                 TABLE=cfg["dequant"] == "table" or not layout.standard_code,
                 HAS_BIAS=bias is not None, SPLIT=splits > 1, num_warps=cfg["num_warps"])
    if cfg["kernel"] == "gemv":
        _nf4_gemv_kernel[cfg["grid"]](*common, BLOCK_N=cfg["block_n"],
                                      BLOCK_K=cfg["block_k"], **flags)
    else:
        if not INTERPRETED:
            flags["num_stages"] = NUM_STAGES
        _nf4_matmul_kernel[cfg["grid"]](
            *common, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **flags)
    if splits > 1:
        block = min(INTERPRETER_MAX_BLOCK_K * 8, next_pow2(rows * n)) if INTERPRETED \
            else 1024
        _nf4_splitk_reduce_kernel[(triton.cdiv(rows * n, block),)](
            partial, bias_arg, out_flat, rows, n, splits, out_flat.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=1 if INTERPRETED else 4)
    return out


# ----------------------------------------------------------------------------- torch twin


def nf4_matmul_torch(x: torch.Tensor, weight: torch.Tensor, quant_state,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The twin of ``nf4_matmul_triton`` (same signature): bitsandbytes' dequantize + matmul.

    ``bitsandbytes.functional.dequantize_4bit`` rebuilds W (fp32 scale arithmetic, then
    rounded to x's dtype, as bitsandbytes' own batched path does) and ``F.linear``
    multiplies. Reads any layout bitsandbytes reads, including in_features not a multiple
    of blocksize; a state repacked for bitsandbytes' AVX512 CPU kernel goes through
    ``bnb.matmul_4bit``, which alone understands that packing.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    if getattr(quant_state, "packing_format_for_cpu", False):
        if x.dtype not in FLOAT_DTYPES or x.shape[-1] != quant_state.shape[1]:
            raise ValueError(f"`x` of dtype {x.dtype} and shape {tuple(x.shape)} does not fit "
                             f"`weight` of shape {tuple(quant_state.shape)}")
        return bnb.matmul_4bit(x, weight, quant_state=quant_state,
                               bias=None if bias is None else bias.to(x.dtype))
    layout = nf4_layout(weight, quant_state)
    _check_inputs(x, layout, bias)
    dense = bnb_functional.dequantize_4bit(weight.reshape(-1, 1), quant_state)
    dense = dense.reshape(layout.out_features, layout.in_features).to(x.dtype)
    return torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------- dispatch


def _kernel_fits(x: torch.Tensor, weight: torch.Tensor, quant_state,
                 bias: torch.Tensor | None) -> bool:
    """Whether the default dispatch sends this call to the kernel (device already chosen)."""
    if getattr(quant_state, "packing_format_for_cpu", False):
        return False
    if torch.is_grad_enabled() and (x.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False  # the kernel has no backward
    if x.dim() == 0 or math.prod(x.shape[:-1]) > DISPATCH_MAX_ROWS:
        return False
    layout = nf4_layout(weight, quant_state)
    return kernel_unsupported_reason(layout) is None


def nf4_matmul(x: torch.Tensor, weight: torch.Tensor, quant_state,
               bias: torch.Tensor | None = None, force: str | None = None) -> torch.Tensor:
    """``x W^T + bias`` from a packed NF4 weight: the kernel or the twin.

    Default: the kernel for CUDA tensors with at most ``DISPATCH_MAX_ROWS`` rows, a
    layout it reads and no autograd; the twin otherwise. ``force="kernel"`` runs the
    kernel (raising for what it cannot read), ``force="torch"`` the twin;
    ``LOWMEM_ES_FORCE_TORCH=1`` makes the twin the default everywhere.
    """
    if use_kernel(x.device, force) and (force == "kernel"
                                        or _kernel_fits(x, weight, quant_state, bias)):
        return nf4_matmul_triton(x, weight, quant_state, bias)
    return nf4_matmul_torch(x, weight, quant_state, bias)


def nf4_linear(x: torch.Tensor, layer: torch.nn.Module, force: str | None = None
               ) -> torch.Tensor:
    """``layer(x)`` for a ``bnb.nn.Linear4bit``, through the kernel where it applies.

    The kernel computes in the layer's ``compute_dtype`` (x's dtype if unset), adds the
    bias cast to it, and returns x's dtype, as ``Linear4bit.forward`` does. Where the
    dispatch rule of ``nf4_matmul`` says twin (CPU, too many rows, autograd, a layout
    the kernel does not read) or ``layer`` is not 4-bit at all, this is ``layer(x)``
    itself: bitsandbytes' own path. ``force="kernel"`` insists on the kernel,
    ``force="torch"`` uses the twin ``nf4_matmul_torch`` with the same casts.
    """
    weight = getattr(layer, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:  # bitsandbytes may keep it on the module only
        quant_state = getattr(layer, "quant_state", None)
    if quant_state is None:
        if force == "kernel":
            raise ValueError(f"`layer` ({type(layer).__name__}) has no 4-bit quant state; "
                             "nf4_linear's kernel needs a bitsandbytes Linear4bit")
        return layer(x)
    bias = getattr(layer, "bias", None)
    compute_dtype = getattr(layer, "compute_dtype", None)
    if compute_dtype is None:
        compute_dtype = x.dtype
    if force == "torch":
        fn = nf4_matmul_torch
    elif use_kernel(x.device, force) and (
            force == "kernel" or _kernel_fits(x, weight, quant_state, bias)):
        fn = nf4_matmul_triton
    else:
        return layer(x)
    x_compute = x.to(compute_dtype)
    bias_compute = None if bias is None else bias.detach().to(compute_dtype)
    return fn(x_compute, weight, quant_state, bias_compute).to(x.dtype)
