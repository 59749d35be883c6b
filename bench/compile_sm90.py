"""Compile every Triton kernel variant the launchers pick on an H200 (sm_90), without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs Triton's whole
sm_90 pipeline on the CPU (TTIR, TTGIR with Hopper's layouts and pipelining, LLVM, PTX,
and a cubin from the ``ptxas`` that Triton bundles), so a kernel that the GPU compiler
rejects, or one that needs more shared memory than an H200 block may use, shows up here,
before a GPU is lent. It says nothing about speed or numerical results.

Variants are those the launchers would choose: the fused noisy LoRA's stage 1 and 2 from
``noisy_lora._launch_config`` over 7B-class shapes (ranks 1-64, decode and prefill row
counts, 8-64 members, paired and unpaired plans, bf16/fp16/fp32 activations, the H200's
132 SMs); the NF4 matmul's tile table and GEMV; the ES update, the noise kernel and the
sampling kernel.

    python bench/compile_sm90.py            # every distinct variant (a few minutes)
    python bench/compile_sm90.py --quick    # one variant per code path (tests/test_compile_sm90.py)

Prints a markdown table (variant, result, shared memory bytes) and exits 1 if any variant
fails to compile or exceeds ``SHARED_LIMIT``; 2 if this Triton cannot compile for CUDA.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the kernels must be JIT functions, not interpreted

import argparse
import itertools
import sys
import time
from collections.abc import Callable

import torch

SM_COUNT = 132  # the H200's multiprocessors (bench/RESULTS.md, device KINDS.md)
SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (227 KiB)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _cuda_compiler() -> tuple[Callable[..., object], object] | None:
    """(triton.compile, the sm_90 target), or None if this Triton has no CUDA backend."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        return None

    def compile_one(fn: object, signature: dict[str, str], constants: dict[str, object],
                    num_warps: int, num_stages: int) -> object:
        names = fn.arg_names
        for name in constants:
            signature[name] = "constexpr"
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(names.index(k),): v for k, v in constants.items()})
        return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))

    return compile_one, triton.__version__


# ----------------------------------------------------------------------------- variants


def noisy_lora_variants(quick: bool) -> list[tuple[str, Callable[[Callable], object]]]:
    """Distinct (stage, constexprs, dtype, warps, stages) the fused LoRA launcher picks."""
    from lowmem_es.kernels import noisy_lora as nl
    from lowmem_es.kernels.row_plan import RowPlan

    shapes = [(3584, 512), (4096, 14336)] if quick else [
        (d_in, d_out) for d_in in (512, 3584, 4096, 14336, 18944)
        for d_out in (512, 3584, 4096, 14336, 18944)]
    ranks = (8, 64) if quick else (1, 4, 8, 16, 32, 64)
    layouts = ((64, 8, 1), (8, 8, 300)) if quick else tuple(itertools.product(
        (16, 64, 512), (8, 32, 64), (1, 7, 300)))  # rows, members, tokens per row
    dtypes = ("bf16", "fp32") if quick else ("bf16", "fp16", "fp32")
    shrink, expand = {}, {}
    for (d_in, d_out), rank, (rows, members, tokens), paired in itertools.product(
            shapes, ranks, layouts, (False, True)):
        if members > rows:
            continue
        member_index = [row % members for row in range(rows)]
        plan = RowPlan(member_index, members, tokens, "cpu",
                       pairs=[m // 2 for m in range(members)] if paired else None)
        cfg = nl._launch_config(plan, d_in, d_out, rank, torch.device("cpu"),
                                sm_count=SM_COUNT, interpreted=False)
        # The launch arithmetic the kernels rely on: every split and group non-empty.
        assert (cfg["splits"] - 1) * cfg["k_per_split"] < d_in <= cfg["splits"] * cfg[
            "k_per_split"], cfg
        assert (cfg["groups"] - 1) * cfg["n_per_group"] < d_out <= cfg["groups"] * cfg[
            "n_per_group"], cfg
        assert cfg["splits"] < 65536 and cfg["groups"] < 65536, cfg
        for dtype in dtypes:
            precision = "ieee" if dtype == "fp32" else "tf32"
            common = dict(R_P2=cfg["r_p2"], R_PAD=cfg["r_pad"], BLOCK_M=cfg["block_m"],
                          PRECISION=precision, PAIRED=plan.paired)
            shrink[(dtype, cfg["num_warps"], nl.SHRINK_STAGES[precision],
                    tuple(sorted({**common, "BLOCK_K": cfg["block_k"]}.items())))] = None
            expand[(dtype, cfg["num_warps"], 3, tuple(sorted(
                {**common, "BLOCK_N": cfg["block_n"],
                 "SUB_BLOCKS": cfg["sub_blocks"]}.items())))] = None

    def shrink_job(dtype: str, warps: int, stages: int, constants: tuple) -> Callable:
        signature = {"x_ptr": "*" + dtype, "a_ptr": "*fp32", "keys_ptr": "*i64",
                     "steps_ptr": "*fp32", "row_order_ptr": "*i32", "blocks_ptr": "*i32",
                     "partial_ptr": "*fp32", "n_rows": "i32", "n_blocks": "i32",
                     "d_in": "i32", "rank": "i32", "stride_x": "i32", "k_per_split": "i32"}
        return lambda compile_one: compile_one(nl._noisy_lora_shrink_kernel, signature,
                                               dict(constants), warps, stages)

    def expand_job(dtype: str, warps: int, stages: int, constants: tuple) -> Callable:
        signature = {"b_ptr": "*fp32", "keys_ptr": "*i64", "steps_ptr": "*fp32",
                     "row_order_ptr": "*i32", "blocks_ptr": "*i32", "partial_ptr": "*fp32",
                     "out_ptr": "*" + dtype, "n_rows": "i32", "n_blocks": "i32",
                     "d_out": "i32", "rank": "i32", "stride_out": "i32", "n_splits": "i32",
                     "n_per_group": "i32", "scale": "fp32"}
        return lambda compile_one: compile_one(nl._noisy_lora_expand_kernel, signature,
                                               dict(constants), warps, stages)

    def label(stage: str, key: tuple) -> str:
        dtype, warps, stages, constants = key
        text = " ".join(f"{k}={v}" for k, v in constants)
        return f"noisy_lora {stage} x={dtype} warps={warps} stages={stages} {text}"

    return ([(label("shrink", key), shrink_job(*key)) for key in shrink]
            + [(label("expand", key), expand_job(*key)) for key in expand])


def nf4_variants(quick: bool) -> list[tuple[str, Callable[[Callable], object]]]:
    """The NF4 matmul's dot tiles (and BLOCK_N halved to its floor), GEMV and reduce."""
    from lowmem_es.kernels import nf4_matmul as nf

    def signature(dtype: str) -> dict[str, str]:
        return {"x_ptr": "*" + dtype, "w_ptr": "*u8", "absmax_ptr": "*u8",
                "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32",
                "code_ptr": "*fp32", "bias_ptr": "*" + dtype, "out_ptr": "*" + dtype,
                "partial_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                "stride_xm": "i32", "stride_om": "i32", "k_per_split": "i32"}

    flags = dict(BS=64, NESTED=True, NESTED_BS=256, TABLE=nf.DEQUANT_GPU == "table",
                 HAS_BIAS=False, SPLIT=True)
    jobs = []
    tiles = nf.DOT_TILES[::3] if quick else nf.DOT_TILES
    for (_, block_m, block_n, block_k, warps), dtype in itertools.product(
            tiles, ("bf16", "fp32") if quick else ("bf16", "fp16", "fp32")):
        for width in sorted({block_n, nf.MIN_BLOCK_N}):
            constants = dict(BLOCK_M=block_m, BLOCK_N=width, BLOCK_K=block_k,
                             PRECISION="ieee" if dtype == "fp32" else "tf32", **flags)
            types = signature(dtype)
            jobs.append((f"nf4 dot x={dtype} warps={warps} BLOCK_M={block_m} "
                         f"BLOCK_N={width} BLOCK_K={block_k}",
                         lambda c, s=types, k=constants, w=warps: c(
                             nf._nf4_matmul_kernel, dict(s), k, w, nf.NUM_STAGES)))
    for dtype in ("bf16",) if quick else ("bf16", "fp16", "fp32"):
        constants = dict(BLOCK_N=nf.GEMV_BLOCK_N, BLOCK_K=nf.GEMV_BLOCK_K, **flags)
        types = signature(dtype)
        jobs.append((f"nf4 gemv x={dtype}", lambda c, s=types, k=constants: c(
            nf._nf4_gemv_kernel, dict(s), k, nf.GEMV_NUM_WARPS, 3)))
    reduce_signature = {"partial_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                        "M": "i32", "N": "i32", "splits": "i32", "stride_om": "i32"}
    jobs.append(("nf4 split-K reduce", lambda c: c(
        nf._nf4_splitk_reduce_kernel, dict(reduce_signature),
        dict(HAS_BIAS=True, BLOCK=1024), 4, 3)))
    return jobs


def noise_and_update_variants(quick: bool) -> list[tuple[str, Callable[[Callable], object]]]:
    """``tl.randn`` over ranges or offsets, narrow and wide indices; the ES update; the
    sampling noise."""
    from lowmem_es.kernels import es_update, noise, sampling

    jobs = []
    for wide, offsets in itertools.product((False, True), (False, True)):
        if quick and wide != offsets:
            continue
        signature = {"out_ptr": "*fp32", "offsets_ptr": "*i64" if offsets else "*fp32",
                     "key": "i64", "start": "i64", "numel": "i64" if wide else "i32"}
        jobs.append((f"noise randn offsets={offsets} wide={wide}",
                     lambda c, s=signature, w=wide, o=offsets: c(
                         noise._randn_kernel, dict(s),
                         dict(HAS_OFFSETS=o, WIDE=w, BLOCK=1024), 4, 3)))
    for accumulate, wide in itertools.product((False, True), (False, True)):
        if quick and accumulate != wide:
            continue
        signature = {"out_ptr": "*fp32", "keys_ptr": "*i64", "coef_ptr": "*fp32",
                     "num_pairs": "i32", "numel": "i64" if wide else "i32", "alpha": "fp32"}
        jobs.append((f"es_update accumulate={accumulate} wide={wide}",
                     lambda c, s=signature, a=accumulate, w=wide: c(
                         es_update._es_direction_kernel, dict(s),
                         dict(ACCUMULATE=a, WIDE=w, BLOCK=1024), 4, 3)))
    for dtype in ("bf16",) if quick else ("bf16", "fp16", "fp32"):
        signature = {"logits_ptr": f"*{dtype}", "keys_ptr": "*i64", "out_ptr": "*fp32",
                     "vocab": "i32", "stride_logits": "i32", "stride_out": "i32",
                     "step": "i32", "inv_temperature": "fp32"}
        jobs.append((f"sampling gumbel_scores logits={dtype}",
                     lambda c, s=signature: c(
                         sampling._gumbel_scores_kernel, dict(s),
                         dict(BLOCK=sampling.BLOCK_GPU), sampling.NUM_WARPS_GPU, 3)))
    return jobs


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one variant per code path instead of every distinct one")
    args = parser.parse_args(argv)
    compiler = _cuda_compiler()
    if compiler is None:
        print("this Triton has no CUDA backend: nothing compiled")
        return 2
    compile_one, version = compiler
    jobs = (noisy_lora_variants(args.quick) + nf4_variants(args.quick)
            + noise_and_update_variants(args.quick))
    print(f"### Triton {version} kernels compiled for sm_90 (H200) offline, "
          f"{len(jobs)} variants{' (quick)' if args.quick else ''}\n")
    print(f"Command: `python bench/compile_sm90.py{' --quick' if args.quick else ''}`; "
          f"shared memory limit {SHARED_LIMIT} bytes a block.\n")
    print("| variant | result | shared bytes |")
    print("|---|---|---:|")
    failures, started = 0, time.perf_counter()
    for label, job in jobs:
        try:
            kernel = job(compile_one)
        except Exception as error:  # the point: report every failure, then go on
            failures += 1
            first = next((line for line in str(error).splitlines() if line.strip()), "")
            print(f"| {label} | FAIL {type(error).__name__}: {first[:160]} | - |", flush=True)
            continue
        shared = int(getattr(kernel.metadata, "shared", 0))
        over = shared > SHARED_LIMIT
        failures += over
        print(f"| {label} | {'OVER SHARED LIMIT' if over else 'ok'} | {shared} |", flush=True)
    print(f"\n{len(jobs) - failures} of {len(jobs)} ok in "
          f"{time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
