"""Fused noisy LoRA: each row's member perturbation regenerated inside the LoRA matmul.

For rows ``x_i`` of population member ``m(i)``: ``out_i += scale * (x_i (A + s_m sigma
epsA_m)^T) (B + s_m sigma epsB_m)^T``, with ``epsA_m[j] = tl.randn(keys_A[m], j)`` over
A's flat index (likewise B): the noise contract of ``lowmem_es/noise.py``; no noise
tensor is ever stored. Two stages (shrink: ``x (A + s sigma epsA)^T`` partials per row
block and K-split; expand: ``+ scale * h (B + s sigma epsB)^T``), antithetic partners
side by side so their shared noise is generated once, ranks 1-64 padded to 16 for
``tl.dot``. Rows are grouped by member in ``kernels/row_plan.py``.

* ``_noisy_lora_shrink_kernel`` / ``_noisy_lora_expand_kernel``: the ``@triton.jit`` kernels.
* ``noisy_lora_triton``: launcher; ``noisy_lora_torch``: the twin (CPU path, reference).
* ``noisy_lora``: dispatch by ``kernels/_runtime.py``'s ``use_kernel``.

Design, with the instruction-count evidence: docs/kernels.md, "Fused noisy LoRA".
"""

from __future__ import annotations

import math

import torch

from lowmem_es import noise as _noise
from lowmem_es import noise_batch as _noise_batch
from lowmem_es.kernels._runtime import (
    HAS_TRITON,
    INT32_LIMIT,
    INTERPRETED,
    check_kernel_usable,
    next_pow2,
    use_kernel,
)
from lowmem_es.kernels._runtime import sm_count as _device_sm_count  # `sm_count` is an argument
from lowmem_es.kernels.row_plan import RowPlan

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - Triton absent: only the twin exists
    triton = None
    tl = None

__all__ = ["MAX_RANK", "noisy_lora", "noisy_lora_torch", "noisy_lora_triton", "use_kernel"]

MAX_RANK = 64
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# GPU launch constants. NOT tuned on a GPU (none was available): chosen from register and
# occupancy arithmetic, to be swept by bench/bench_noisy_lora.py --sweep on the first GPU.
# NOISE_TILE: noise elements per program per loop step; 1024 = 8 Philox chains per thread
# at 4 warps (each chain holds ~6 live 32-bit registers), enough ILP without spilling.
NOISE_TILE = 1024
NUM_WARPS = 4
# Programs to aim for per launch: 4 per SM keeps every SM busy through the tail wave.
PROGRAMS_PER_SM = 4
# Stage 2 re-reads the partials of stage 1 once per program: with at most 16 splits that
# is <= 16 * BLOCK_M * r * 4 bytes per program, ~10 % of the noise work it sits next to.
MAX_SPLITS = 16
# Rows per block: the accumulator is BLOCK_M x R_PAD fp32 in registers (64 x 64 = 32 regs
# per thread at 4 warps); noise is regenerated once per block, so bigger is cheaper.
BLOCK_M_MAX_GPU = {16: 128, 32: 64, 64: 64}
# Stage 2 walks up to this many row blocks of one member per program, sharing each eps_B
# tile between them: in prefill (thousands of rows per member) eps_B is then generated
# once per 8 * BLOCK_M rows, not once per BLOCK_M, for one re-read of h (r * 4 bytes per
# row, from L2) per column tile. Decode (a run fits one block) is unaffected.
EXPAND_SUB_BLOCKS = 8
# Software-pipelining stages of the stage-1 loop: Triton's default (3) for TF32 dots; 2
# for fp32 inputs (IEEE dots), whose x tiles are twice as large: a paired rank-8 program
# with BLOCK_M = 128 needs 278,528 bytes of shared memory at 3 stages, over the H200's
# 232,448 per block, and 143,360 at 2 (offline sm_90 compile, triton 3.6).
SHRINK_STAGES = {"tf32": 3, "ieee": 2}
# Interpreter: cost is per program and per loop step, not per element (ENVIRONMENT.md),
# so one program per block and one loop step per matrix whenever the tile fits.
BLOCK_M_MAX_INTERPRETER = 512
BLOCK_INTERPRETER = 2048
# Launch settings that replace the computed ones (keys of _launch_config); empty normally.
LAUNCH_OVERRIDES: dict[str, int] = {}


# ----------------------------------------------------------------------------- checks


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` has dtype {tensor.dtype}; expected one of float16, "
                        "bfloat16, float32")


def _flat_rows(name: str, tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` viewed as (flat rows, width) without a copy, or a clear error."""
    if tensor.stride(-1) != 1:
        raise ValueError(f"`{name}` must be contiguous along its last dimension (strides "
                         f"{tuple(tensor.stride())}); call .contiguous() first")
    try:
        return tensor.view(-1, width)
    except RuntimeError as error:
        raise ValueError(f"`{name}` of shape {tuple(tensor.shape)} and strides "
                         f"{tuple(tensor.stride())} cannot be viewed as (rows, {width}) "
                         "without a copy; call .contiguous() first") from error


def _prepare(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
             keys_A: torch.Tensor, keys_B: torch.Tensor, steps: torch.Tensor,
             rows: torch.Tensor | RowPlan, out: torch.Tensor | None,
             steps_B: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RowPlan]:
    """Validate the shared contract; return (out, x as (n, d_in), out as (n, d_out), plan).

    Both the kernel and the twin go through here, so a bad input raises the same error on
    either path instead of a crash in the kernel or a silently broadcast result.
    """
    _check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"`x` must have shape (rows, ..., d_in), got {tuple(x.shape)}")
    d_in = x.shape[-1]
    device = x.device
    _check_float("lora_A", lora_A)
    _check_float("lora_B", lora_B)
    if lora_A.dim() != 2 or lora_A.shape[1] != d_in:
        raise ValueError(f"`lora_A` has shape {tuple(lora_A.shape)}; expected (r, d_in) = "
                         f"(r, {d_in}) to match `x`")
    rank = lora_A.shape[0]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"`lora_A` has rank r={rank}; the kernel supports 1 <= r <= "
                         f"{MAX_RANK}")
    if lora_B.dim() != 2 or lora_B.shape[1] != rank or lora_B.shape[0] < 1:
        raise ValueError(f"`lora_B` has shape {tuple(lora_B.shape)}; expected (d_out, r) = "
                         f"(d_out, {rank}) to match `lora_A`")
    d_out = lora_B.shape[0]
    if d_in < 1:
        raise ValueError(f"`x` has d_in = {d_in}; expected at least 1")
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not tensor.is_contiguous():
            raise ValueError(f"`{name}` must be contiguous (noise offsets are its flat "
                             f"row-major indices), got strides {tuple(tensor.stride())}; "
                             "call .contiguous() first")
    checked = [("keys_A", keys_A, torch.int64), ("keys_B", keys_B, torch.int64),
               ("steps", steps, torch.float32)]
    if steps_B is not None:
        checked.append(("steps_B", steps_B, torch.float32))
    for name, tensor, dtype in checked:
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype:
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"`{name}` must be a {dtype} tensor of shape (members,), got {got}")
        if tensor.dim() != 1 or tensor.shape[0] != keys_A.shape[0] or tensor.shape[0] < 1:
            raise ValueError(f"`{name}` has shape {tuple(tensor.shape)}; expected (members,) "
                             f"= ({keys_A.shape[0] if keys_A.dim() == 1 else 'M'},), one "
                             "entry per member, the same for keys_A, keys_B and steps")
        if not tensor.is_contiguous():
            raise ValueError(f"`{name}` must be contiguous, got stride {tensor.stride()}")
    for name, tensor, _ in [("lora_A", lora_A, None), ("lora_B", lora_B, None), *checked]:
        if tensor.device != device:
            raise ValueError(f"`{name}` is on {tensor.device} but `x` is on {device}; move "
                             "them to one device")
    num_members = keys_A.shape[0]
    if rank * max(d_in, d_out) >= INT32_LIMIT:
        raise ValueError(f"LoRA matrices of {rank} x {max(d_in, d_out)} elements exceed the "
                         "kernel's int32 noise offsets")
    if isinstance(rows, RowPlan):
        plan = rows
        if plan.rows != x.shape[0] or plan.num_rows != x.numel() // d_in:
            raise ValueError(f"the RowPlan describes {plan.rows} rows x {plan.tokens_per_row} "
                             f"tokens but `x` has shape {tuple(x.shape)}")
        if plan.num_members != num_members:
            raise ValueError(f"the RowPlan was built for {plan.num_members} members but "
                             f"`keys_A`/`keys_B`/`steps` have {num_members} entries")
        if plan.device != device:
            raise ValueError(f"the RowPlan lives on {plan.device} but `x` is on {device}")
    else:
        if not isinstance(rows, torch.Tensor):
            raise TypeError("`member_index` must be an integer tensor of shape (rows,) or a "
                            f"RowPlan, got {type(rows).__name__}")
        if rows.dim() != 1 or rows.shape[0] != x.shape[0]:
            raise ValueError(f"`member_index` has shape {tuple(rows.shape)}; expected "
                             f"(rows,) = ({x.shape[0]},), one member per row of `x`")
        tokens = math.prod(x.shape[1:-1])
        plan = RowPlan(rows, num_members, tokens, device)
    x_flat = _flat_rows("x", x, d_in)
    expected = (*x.shape[:-1], d_out)
    if out is None:
        out = torch.zeros(expected, dtype=x.dtype, device=device)
    else:
        _check_float("out", out)
        if tuple(out.shape) != expected:
            raise ValueError(f"`out` has shape {tuple(out.shape)}; expected (*x.shape[:-1], "
                             f"d_out) = {expected}")
        if out.device != device:
            raise ValueError(f"`out` is on {out.device} but `x` is on {device}")
    out_flat = _flat_rows("out", out, d_out)
    return out, x_flat, out_flat, plan


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _pad_rank(t, ROWS: tl.constexpr, R_P2: tl.constexpr, R_PAD: tl.constexpr):
        """(ROWS, R_P2) -> (ROWS, R_PAD) for tl.dot: column j goes to j * (R_PAD // R_P2).

        Each join puts a zero column after every column, so rank 8 becomes 16 columns
        without generating noise for the 8 padding ones.
        """
        if R_PAD >= 2 * R_P2:
            t = tl.reshape(tl.join(t, tl.zeros_like(t)), (ROWS, 2 * R_P2))
        if R_PAD >= 4 * R_P2:
            t = tl.reshape(tl.join(t, tl.zeros_like(t)), (ROWS, 4 * R_P2))
        if R_PAD >= 8 * R_P2:
            t = tl.reshape(tl.join(t, tl.zeros_like(t)), (ROWS, 8 * R_P2))
        if R_PAD >= 16 * R_P2:
            t = tl.reshape(tl.join(t, tl.zeros_like(t)), (ROWS, 16 * R_P2))
        return t

    @triton.jit
    def _block_rows(blocks_ptr, n_blocks, block, first_row: tl.constexpr,
                    BLOCK_M: tl.constexpr):
        """Member, first and end position, positions, mask and rows of x of a block side."""
        member = tl.load(blocks_ptr + first_row * n_blocks + block)
        start = tl.load(blocks_ptr + (first_row + 1) * n_blocks + block)
        stop = tl.load(blocks_ptr + (first_row + 2) * n_blocks + block)
        pos = start + tl.arange(0, BLOCK_M)
        row_mask = pos < stop
        return member, start, stop, pos, row_mask

    @triton.jit
    def _shared_randn(key, key2, eps, offsets):
        """The partner's noise: ``eps`` itself when the keys agree (an antithetic pair)."""
        if key2 == key:
            eps2 = eps
        else:  # the pairing was only a hint: keys that differ get their own noise
            eps2 = tl.randn(key2, offsets)
        return eps2

    @triton.jit
    def _noisy_lora_shrink_kernel(
            x_ptr, a_ptr, keys_ptr, steps_ptr, row_order_ptr, blocks_ptr, partial_ptr,
            n_rows, n_blocks, d_in, rank, stride_x, k_per_split,
            R_P2: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PAIRED: tl.constexpr):
        """partial[split, p, :] = x[row_order[p]] (A + step eps_A)^T over one K-slice.

        Program (block, split): rows of one member (``PAIRED``: and rows of its partner),
        columns [split * k_per_split, +k_per_split) of A. eps_A of that slice is generated
        once, as a (BLOCK_K, R_P2) tile per step, and serves both members of a pair:
        element (k, j) is A's flat index j * d_in + k.
        """
        block = tl.program_id(0)
        split = tl.program_id(1)
        member, _start, _stop, pos, row_mask = _block_rows(blocks_ptr, n_blocks, block, 0,
                                                           BLOCK_M)
        rows = tl.load(row_order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
        key = tl.load(keys_ptr + member) & 0x7FFFFFFFFFFFFFFF  # the twin takes keys mod 2**63
        step = tl.load(steps_ptr + member)
        ranks = tl.arange(0, R_P2)
        rank_mask = ranks < rank
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        if PAIRED:
            member2, _start2, _stop2, pos2, row_mask2 = _block_rows(blocks_ptr, n_blocks,
                                                                    block, 3, BLOCK_M)
            rows2 = tl.load(row_order_ptr + pos2, mask=row_mask2, other=0).to(tl.int64)
            key2 = tl.load(keys_ptr + member2) & 0x7FFFFFFFFFFFFFFF
            step2 = tl.load(steps_ptr + member2)
            acc2 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, d_in)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < k_hi
            xt = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            offsets = ranks[None, :] * d_in + cols[:, None]  # (BLOCK_K, R_P2) into A
            a_mask = col_mask[:, None] & rank_mask[None, :]
            a = tl.load(a_ptr + offsets, mask=a_mask, other=0.0).to(tl.float32)
            eps = tl.randn(key, offsets)
            # A and eps are padded to R_PAD columns separately and combined after the
            # padding: a reshape feeding tl.dot directly made Hopper's TF32 path reject
            # the shared layout (rank <= 8, BLOCK_M >= 64; "Illegal shared layout" in
            # TritonGPUOptimizeDotOperands, triton 3.6 and 3.9, sm_90). Same values.
            a_pad = _pad_rank(a, BLOCK_K, R_P2, R_PAD)
            eps_pad = _pad_rank(tl.where(a_mask, eps, 0.0), BLOCK_K, R_P2, R_PAD)
            acc = tl.dot(xt, a_pad + step * eps_pad, acc, input_precision=PRECISION)
            if PAIRED:
                xt2 = tl.load(x_ptr + rows2[:, None] * stride_x + cols[None, :],
                              mask=row_mask2[:, None] & col_mask[None, :],
                              other=0.0).to(tl.float32)
                eps2 = _shared_randn(key, key2, eps, offsets)
                eps2_pad = _pad_rank(tl.where(a_mask, eps2, 0.0), BLOCK_K, R_P2, R_PAD)
                acc2 = tl.dot(xt2, a_pad + step2 * eps2_pad, acc2, input_precision=PRECISION)
        r_cols = tl.arange(0, R_PAD)
        out_offsets = (split * n_rows + pos.to(tl.int64))[:, None] * R_PAD + r_cols[None, :]
        tl.store(partial_ptr + out_offsets, acc, mask=row_mask[:, None])
        if PAIRED:
            out_offsets2 = ((split * n_rows + pos2.to(tl.int64))[:, None] * R_PAD
                            + r_cols[None, :])
            tl.store(partial_ptr + out_offsets2, acc2, mask=row_mask2[:, None])

    @triton.jit
    def _partial_sum(partial_ptr, pos, row_mask, n_rows, n_splits, BLOCK_M: tl.constexpr,
                     R_PAD: tl.constexpr):
        """h = the sum of a block's stage-1 partials over the splits, in a fixed order."""
        r_cols = tl.arange(0, R_PAD)
        h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for split in range(n_splits):  # fixed order: the same sum on every run
            h += tl.load(partial_ptr + (split * n_rows + pos.to(tl.int64))[:, None] * R_PAD
                         + r_cols[None, :], mask=row_mask[:, None], other=0.0)
        return h

    @triton.jit
    def _expand_run(b_t, start, stop, row_order_ptr, partial_ptr, n_rows, n_splits, cols,
                    col_mask, out_ptr, stride_out, scale, BLOCK_M: tl.constexpr,
                    R_PAD: tl.constexpr, PRECISION: tl.constexpr):
        """A long run's rows [start, stop) against one column tile, BLOCK_M at a time."""
        for m0 in range(start, stop, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_mask = pos < stop
            rows = tl.load(row_order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
            h = _partial_sum(partial_ptr, pos, row_mask, n_rows, n_splits, BLOCK_M, R_PAD)
            _expand_rows(h, b_t, rows, row_mask, cols, col_mask, out_ptr, stride_out, scale,
                         PRECISION)

    @triton.jit
    def _noisy_lora_expand_kernel(
            b_ptr, keys_ptr, steps_ptr, row_order_ptr, blocks_ptr, partial_ptr, out_ptr,
            n_rows, n_blocks, d_out, rank, stride_out, n_splits, n_per_group, scale,
            R_P2: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, SUB_BLOCKS: tl.constexpr, PRECISION: tl.constexpr,
            PAIRED: tl.constexpr):
        """out[row_order[p], cols] += scale * h[p] (B + step eps_B)[cols]^T.

        Program (block, group): columns [group * n_per_group, +n_per_group) in BLOCK_N
        steps, for a block of up to SUB_BLOCKS * BLOCK_M rows of one member (``PAIRED``:
        and a block of its partner's rows, from the same eps_B tiles); h is the sum of the
        rows' stage-1 partials. eps_B element (n, j) is B's flat index n * r + j,
        generated once per block and column tile: with SUB_BLOCKS > 1 (long runs, e.g.
        prefill) the rows are walked inside the column loop, so the noise is shared by
        up to SUB_BLOCKS * BLOCK_M rows at the price of re-reading h per column tile.
        """
        block = tl.program_id(0)
        group = tl.program_id(1)
        member, start, stop, pos, row_mask = _block_rows(blocks_ptr, n_blocks, block, 0,
                                                         BLOCK_M)
        key = tl.load(keys_ptr + member) & 0x7FFFFFFFFFFFFFFF
        step = tl.load(steps_ptr + member)
        ranks = tl.arange(0, R_P2)
        rank_mask = ranks < rank
        n_lo = group * n_per_group
        n_hi = tl.minimum(n_lo + n_per_group, d_out)
        if SUB_BLOCKS == 1:  # decode: h once, then every column tile
            rows = tl.load(row_order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
            h = _partial_sum(partial_ptr, pos, row_mask, n_rows, n_splits, BLOCK_M, R_PAD)
        if PAIRED:
            member2, start2, stop2, pos2, row_mask2 = _block_rows(blocks_ptr, n_blocks, block,
                                                                  3, BLOCK_M)
            key2 = tl.load(keys_ptr + member2) & 0x7FFFFFFFFFFFFFFF
            step2 = tl.load(steps_ptr + member2)
            if SUB_BLOCKS == 1:
                rows2 = tl.load(row_order_ptr + pos2, mask=row_mask2, other=0).to(tl.int64)
                h2 = _partial_sum(partial_ptr, pos2, row_mask2, n_rows, n_splits, BLOCK_M,
                                  R_PAD)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < n_hi
            offsets = cols[:, None] * rank + ranks[None, :]  # (BLOCK_N, R_P2) into B
            b_mask = col_mask[:, None] & rank_mask[None, :]
            b = tl.load(b_ptr + offsets, mask=b_mask, other=0.0).to(tl.float32)
            eps = tl.randn(key, offsets)
            b_t = tl.trans(_pad_rank(tl.where(b_mask, b + step * eps, 0.0), BLOCK_N, R_P2,
                                     R_PAD))  # (R_PAD, BLOCK_N)
            if SUB_BLOCKS == 1:
                _expand_rows(h, b_t, rows, row_mask, cols, col_mask, out_ptr, stride_out,
                             scale, PRECISION)
            else:
                _expand_run(b_t, start, stop, row_order_ptr, partial_ptr, n_rows, n_splits,
                            cols, col_mask, out_ptr, stride_out, scale, BLOCK_M, R_PAD,
                            PRECISION)
            if PAIRED:
                eps2 = _shared_randn(key, key2, eps, offsets)
                b2_t = tl.trans(_pad_rank(tl.where(b_mask, b + step2 * eps2, 0.0), BLOCK_N,
                                          R_P2, R_PAD))
                if SUB_BLOCKS == 1:
                    _expand_rows(h2, b2_t, rows2, row_mask2, cols, col_mask, out_ptr,
                                 stride_out, scale, PRECISION)
                else:
                    _expand_run(b2_t, start2, stop2, row_order_ptr, partial_ptr, n_rows,
                                n_splits, cols, col_mask, out_ptr, stride_out, scale,
                                BLOCK_M, R_PAD, PRECISION)

    @triton.jit
    def _expand_rows(h, b_t, rows, row_mask, cols, col_mask, out_ptr, stride_out, scale,
                     PRECISION: tl.constexpr):
        """out[rows, cols] = out + scale * h @ b_t, accumulated in fp32, rounded once."""
        lora = tl.dot(h, b_t, input_precision=PRECISION)
        out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        current = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (current + scale * lora).to(out_ptr.dtype.element_ty),
                 mask=out_mask)
else:  # pragma: no cover
    _noisy_lora_shrink_kernel = _noisy_lora_expand_kernel = None


# ----------------------------------------------------------------------------- launcher


def _launch_config(plan: RowPlan, d_in: int, d_out: int, rank: int, device: torch.device,
                   sm_count: int | None = None, interpreted: bool | None = None
                   ) -> dict[str, int]:
    """Tile sizes, K-splits, column groups and stage-2 row blocks for one launch pair.

    ``LAUNCH_OVERRIDES`` replaces any of block_m, block_k, block_n, num_warps, sub_blocks,
    splits, groups (tests use it to run the GPU's multi-split paths in the interpreter,
    the benchmark to sweep); the derived slice widths are recomputed from what is set.
    ``sm_count`` and ``interpreted`` (default: the device's, and whether Triton runs in
    its interpreter) let bench/compile_sm90.py enumerate a GPU's launches without one.
    """
    interpreted = INTERPRETED if interpreted is None else interpreted
    r_p2 = next_pow2(rank)
    r_pad = max(16, r_p2)
    rows_pow2 = max(16, next_pow2(plan.max_run))
    if interpreted:
        cfg = dict(block_m=min(rows_pow2, BLOCK_M_MAX_INTERPRETER),
                   block_k=min(max(16, next_pow2(d_in)), BLOCK_INTERPRETER),
                   block_n=min(max(16, next_pow2(d_out)), BLOCK_INTERPRETER),
                   num_warps=1, sub_blocks=1)
    else:
        tile = min(128, max(16, NOISE_TILE // r_p2))
        cfg = dict(block_m=min(rows_pow2, BLOCK_M_MAX_GPU[r_pad]), block_k=tile,
                   block_n=tile, num_warps=NUM_WARPS)
        cfg["sub_blocks"] = min(EXPAND_SUB_BLOCKS, -(-plan.max_run // cfg["block_m"]))
    overrides = LAUNCH_OVERRIDES
    cfg.update({k: v for k, v in overrides.items()
                if k in ("block_m", "block_k", "block_n", "num_warps", "sub_blocks")})
    _, n_blocks = plan.blocks(cfg["block_m"])
    _, n_blocks_2 = plan.blocks(cfg["block_m"] * cfg["sub_blocks"])
    if interpreted:
        cfg.update(splits=1, groups=1)
    else:
        if sm_count is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            sm_count = _device_sm_count(index)
        target = PROGRAMS_PER_SM * sm_count
        cfg.update(splits=min(-(-target // n_blocks), MAX_SPLITS),
                   groups=-(-target // n_blocks_2))
    cfg.update({k: v for k, v in overrides.items() if k in ("splits", "groups")})
    k_tiles = -(-d_in // cfg["block_k"])
    k_per_split = -(-k_tiles // max(1, min(cfg["splits"], k_tiles))) * cfg["block_k"]
    n_tiles = -(-d_out // cfg["block_n"])
    n_per_group = -(-n_tiles // max(1, min(cfg["groups"], n_tiles))) * cfg["block_n"]
    cfg.update(r_p2=r_p2, r_pad=r_pad, n_blocks=n_blocks, k_per_split=k_per_split,
               splits=-(-d_in // k_per_split), n_per_group=n_per_group,
               groups=-(-d_out // n_per_group))
    return cfg


def _check_kernel_usable(device: torch.device) -> None:
    check_kernel_usable(device, "the fused noisy LoRA kernel")


def noisy_lora_triton(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      keys_A: torch.Tensor, keys_B: torch.Tensor, steps: torch.Tensor,
                      member_index: torch.Tensor | RowPlan, scale: float,
                      out: torch.Tensor | None = None, *,
                      steps_B: torch.Tensor | None = None) -> torch.Tensor:
    """``out += scale * (x (A + s sigma epsA_m)^T)(B + s sigma epsB_m)^T`` by the kernels.

    ``x`` (rows, ..., d_in) fp16/bf16/fp32; ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r)
    contiguous (fp32 masters in this project); ``keys_A``/``keys_B`` int64 (M,) Philox
    keys (taken mod 2**63); ``steps`` fp32 (M,) = sign * sigma, the step of A's noise and,
    unless ``steps_B`` (M,) gives B its own (per-tensor noise scaling), of B's;
    ``member_index`` int (rows,) member of each row, or a prebuilt ``RowPlan`` (the fast
    path: no host work, no sync).
    ``out`` (rows, ..., d_out) is updated in place (fp32 accumulation, one rounding to
    its dtype) and returned; ``None`` starts from zeros in x's dtype.
    """
    out, x_flat, out_flat, plan = _prepare(x, lora_A, lora_B, keys_A, keys_B, steps,
                                           member_index, out, steps_B)
    steps_B = steps if steps_B is None else steps_B
    _check_kernel_usable(x.device)
    if plan.num_rows == 0:
        return out
    rank, d_in = lora_A.shape
    d_out = lora_B.shape[0]
    cfg = _launch_config(plan, d_in, d_out, rank, x.device)
    blocks, n_blocks = plan.blocks(cfg["block_m"])
    partial = torch.empty((cfg["splits"], plan.num_rows, cfg["r_pad"]), dtype=torch.float32,
                          device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _noisy_lora_shrink_kernel[(n_blocks, cfg["splits"])](
        x_flat, lora_A, keys_A, steps, plan.row_order, blocks, partial,
        plan.num_rows, n_blocks, d_in, rank, x_flat.stride(0), cfg["k_per_split"],
        R_P2=cfg["r_p2"], R_PAD=cfg["r_pad"], BLOCK_M=cfg["block_m"],
        BLOCK_K=cfg["block_k"], PRECISION=precision, PAIRED=plan.paired,
        num_warps=cfg["num_warps"], num_stages=SHRINK_STAGES[precision])
    blocks_2, n_blocks_2 = plan.blocks(cfg["block_m"] * cfg["sub_blocks"])
    _noisy_lora_expand_kernel[(n_blocks_2, cfg["groups"])](
        lora_B, keys_B, steps_B, plan.row_order, blocks_2, partial, out_flat,
        plan.num_rows, n_blocks_2, d_out, rank, out_flat.stride(0), cfg["splits"],
        cfg["n_per_group"], float(scale),
        R_P2=cfg["r_p2"], R_PAD=cfg["r_pad"], BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"], SUB_BLOCKS=cfg["sub_blocks"], PRECISION=precision,
        PAIRED=plan.paired, num_warps=cfg["num_warps"])
    return out


# ----------------------------------------------------------------------------- torch twin


def noisy_lora_torch(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     keys_A: torch.Tensor, keys_B: torch.Tensor, steps: torch.Tensor,
                     member_index: torch.Tensor | RowPlan, scale: float,
                     out: torch.Tensor | None = None, *,
                     steps_B: torch.Tensor | None = None) -> torch.Tensor:
    """The twin of ``noisy_lora_triton`` (same signature and contract), in torch.

    The math of the ES-LoRA layer's CPU path (``lowmem_es/lora.py``): the perturbed
    ``A_m = A + s_m eps_m``, ``B_m`` of the members present are built in fp32 per call,
    each member's rows go through ``(x A_m^T) B_m^T`` in fp32, and
    ``out = (out + scale * lora)`` is rounded once to out's dtype. Reads keys and steps
    on the host (a device sync on CUDA): this is the reference, not the GPU path.

    Speed (the CPU path regenerates the noise every call, so that is the bill): the
    perturbed weights come from ``noise_batch.perturbed_rows``, which fuses ``A + s eps`` into
    the generator pass (compiled backend: fixed blocks of tiles, no per-key padding) and
    never holds the noise and the perturbed weights at once, and each run of rows updates
    its rows of ``out`` directly (no (rows, d_out) fp32 buffer, no final copy). Values
    are those of the plain formulation (per-member ``noise``, ``A + s * eps``, two
    matmuls) bit for bit (tests/test_noisy_lora.py).
    """
    out, x_flat, out_flat, plan = _prepare(x, lora_A, lora_B, keys_A, keys_B, steps,
                                           member_index, out, steps_B)
    steps_B = steps if steps_B is None else steps_B
    if plan.num_rows == 0:
        return out
    device = x.device
    present = sorted(set(plan.run_members))
    slot = {m: i for i, m in enumerate(present)}
    keys_a, keys_b = keys_A.tolist(), keys_B.tolist()
    index = torch.tensor(present, device=device)
    step, step_b = steps[index], steps_B[index]  # (P,) fp32 each
    rank, d_in = lora_A.shape
    d_out = lora_B.shape[0]
    # (P, r * d_in) and (P, d_out * r): row i is member present[i]'s A_m / B_m, flat.
    rows_a = _noise_batch.perturbed_rows([keys_a[m] & _noise.MASK63 for m in present], lora_A, step)
    rows_b = _noise_batch.perturbed_rows([keys_b[m] & _noise.MASK63 for m in present], lora_B,
                                         step_b)
    # Per-member views, made in one call each: (d_in, r) and (r, d_out), transposed views.
    a_t = rows_a.view(-1, rank, d_in).transpose(1, 2).unbind(0)
    b_t = rows_b.view(-1, d_out, rank).transpose(1, 2).unbind(0)
    x32 = x_flat.to(torch.float32)
    members = [slot[m] for m in plan.run_members]
    if plan.identity:  # runs are consecutive row ranges: views, split in one call each
        for i, x_run, out_run in zip(members, x32.split(plan.run_lengths),
                                     out_flat.split(plan.run_lengths), strict=True):
            _add_scaled(out_run, (x_run @ a_t[i]) @ b_t[i], scale)
        return out
    order = plan.row_order_cpu.to(device)
    for i, first, length in zip(members, plan.run_starts, plan.run_lengths, strict=True):
        rows = order[first:first + length]
        lora = (x32[rows] @ a_t[i]) @ b_t[i]
        out_flat[rows] = _add_scaled(out_flat[rows], lora, scale)
    return out


def _add_scaled(out_rows: torch.Tensor, lora: torch.Tensor, scale: float) -> torch.Tensor:
    """``out_rows = (out_rows + scale * lora)`` rounded once to out's dtype; returns it.

    One run of rows at a time, so the twin never holds a (rows, d_out) fp32 copy of the
    whole output; ``lora`` (fp32, a temporary) is scaled in place. The arithmetic per
    element is the reference's ``(out.float() + lora * scale).to(out.dtype)``. ``out_rows``
    is updated in place (a view of ``out`` for sorted rows; a gathered copy otherwise,
    which the caller scatters back).
    """
    lora.mul_(scale)
    if out_rows.dtype == torch.float32:
        return out_rows.add_(lora)
    return out_rows.copy_((out_rows.to(torch.float32) + lora).to(out_rows.dtype))


# ----------------------------------------------------------------------------- dispatch


def noisy_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               keys_A: torch.Tensor, keys_B: torch.Tensor, steps: torch.Tensor,
               member_index: torch.Tensor | RowPlan, scale: float,
               out: torch.Tensor | None = None, force: str | None = None, *,
               steps_B: torch.Tensor | None = None) -> torch.Tensor:
    """Fused noisy LoRA: the kernel for CUDA tensors, the twin for CPU tensors.

    ``force="kernel"|"torch"`` picks one; ``LOWMEM_ES_FORCE_TORCH=1`` makes the twin the
    default everywhere. Arguments as in ``noisy_lora_triton``.
    """
    fn = noisy_lora_triton if use_kernel(x.device, force) else noisy_lora_torch
    return fn(x, lora_A, lora_B, keys_A, keys_B, steps, member_index, scale, out,
              steps_B=steps_B)
