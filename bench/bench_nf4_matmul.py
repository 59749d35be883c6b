"""Speed of the fused NF4 matmul against bitsandbytes, with the device's copy bandwidth.

Providers (same packed weights, same activations):
- ``kernel``: ``nf4_matmul_triton`` (CUDA; under ``TRITON_INTERPRET=1`` on CPU it runs in
  the interpreter, timed only to exercise the script).
- ``twin``: ``nf4_matmul_torch`` = bitsandbytes ``dequantize_4bit`` + ``F.linear``, the
  batched path older bitsandbytes always takes and 0.50 takes on sm90 past its thresholds.
- ``bnb.matmul_4bit``: what ``Linear4bit.forward`` calls, whichever path bitsandbytes'
  own dispatch picks for that shape (0.50: a fused gemm for small M on some GPUs).
- ``bnb.gemv_4bit``: bitsandbytes' single-row kernel (CUDA, rows == 1 only; its CPU op
  reads a different, AVX512-repacked layout).

For each (shape, rows): median time, effective GB/s (bytes every provider must move at
least: packed weight + absmax + x + out) and that as a fraction of the device copy
bandwidth measured in the same run (``torch.Tensor.copy_`` of 1 GiB; reads + writes).
``floor us`` is those bytes at the copy bandwidth. On CUDA, times come from
``triton.testing.do_bench`` (CUDA events; it clears a 256 MB buffer before every call, so
the weight is read from HBM, not L2). Every provider's output is also compared with the
twin's (``max |diff|``), so a wrong kernel cannot post a good time.

    python bench/bench_nf4_matmul.py                     # CUDA: 7B shapes; CPU: small ones
    python bench/bench_nf4_matmul.py --rows 1 8 --shapes 4096x4096 --json out.json
    python bench/bench_nf4_matmul.py --sweep             # CUDA: search launch constants

``--shapes`` are ``out_features x in_features``. Prints markdown with the machine and the
exact command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, copy_bandwidth, device_seconds, machine_info

from lowmem_es.kernels import nf4_matmul as knf
from lowmem_es.kernels._runtime import INTERPRETED, sm_count

ENV_SHOWN = ("TRITON_INTERPRET", "OMP_NUM_THREADS", "LOWMEM_ES_FORCE_TORCH")
# (out_features, in_features) of every 4-bit linear of Qwen2.5-7B (q, k=v, gate=up, down;
# o = q) and Llama-3.1-8B (q=o, k=v, gate=up, down).
SHAPES_7B = {
    "qwen2.5-7b": [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)],
    "llama-3.1-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
}
# How often each shape occurs in one decoder layer (for the per-layer summary).
LAYER_COUNTS = {(3584, 3584): 2, (512, 3584): 2, (18944, 3584): 2, (3584, 18944): 1,
                (4096, 4096): 2, (1024, 4096): 2, (14336, 4096): 2, (4096, 14336): 1}
SHAPES_CPU = [(256, 512), (512, 256)]
ROWS_GPU = [1, 8, 32, 128, 512]
ROWS_CPU = [1, 8, 32]
# --sweep: grids of LAUNCH_OVERRIDES tried per (shape, rows); splits stay automatic.
SWEEP_SHAPES = [(4096, 4096), (3584, 18944), (18944, 3584)]
SWEEP_ROWS = [1, 8, 32, 128]
SWEEP_GEMV = dict(kernel=["gemv"], block_n=[16, 32, 64], block_k=[128, 256, 512],
                  num_warps=[4], dequant=["tree", "table"])
SWEEP_DOT = dict(kernel=["dot"], block_n=[32, 64, 128], block_k=[64, 128, 256],
                 num_warps=[4, 8], dequant=["tree", "table"])


# ----------------------------------------------------------------------------- cases


def quantized(out_features: int, in_features: int, device: str):
    """NF4 (blocksize 64, double quant), as transformers' BitsAndBytesConfig builds it."""
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16
                         if device == "cuda" else torch.float32)
    return bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                        quant_type="nf4")


def moved_bytes(out_features: int, in_features: int, rows: int, dtype: torch.dtype) -> int:
    """Bytes a matmul from the packed weight must move at least."""
    weights = out_features * in_features
    element = torch.finfo(dtype).bits // 8
    absmax = weights // 64 + 4 * -(-weights // (64 * 256))  # uint8 + fp32 second level
    return weights // 2 + absmax + element * rows * (in_features + out_features)


def providers(device: str, rows: int) -> dict[str, Callable]:
    """name -> fn(x, packed, state) for this device and row count."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    table: dict[str, Callable] = {}
    if device == "cuda" or INTERPRETED:
        table["kernel"] = knf.nf4_matmul_triton
    table["twin"] = knf.nf4_matmul_torch
    table["bnb.matmul_4bit"] = lambda x, packed, state: bnb.matmul_4bit(
        x, packed, quant_state=state)
    if device == "cuda" and rows == 1:
        table["bnb.gemv_4bit"] = lambda x, packed, state: bnb_functional.gemv_4bit(
            x, packed.t(), state=state)
    return table


def run_case(out_features: int, in_features: int, rows: int, device: str,
             dtype: torch.dtype, repeats: int, bandwidth: float, weights) -> list[dict]:
    packed, state = weights
    x = torch.randn(rows, in_features, device=device, dtype=dtype) / in_features ** 0.5
    nbytes = moved_bytes(out_features, in_features, rows, dtype)
    with torch.no_grad():
        reference = knf.nf4_matmul_torch(x, packed, state).float()
        results = []
        for name, fn in providers(device, rows).items():
            try:
                out = fn(x, packed, state)
                error = float((out.float() - reference).abs().max())
                seconds = device_seconds(lambda fn=fn: fn(x, packed, state), device, repeats)
            except Exception as exc:  # a provider that cannot run here is reported, not fatal
                results.append(dict(shape=[out_features, in_features], rows=rows,
                                    provider=name, error=f"{type(exc).__name__}: {exc}"))
                continue
            results.append(dict(shape=[out_features, in_features], rows=rows, provider=name,
                                us=seconds * 1e6, gbps=nbytes / seconds / 1e9,
                                roofline=nbytes / bandwidth / seconds,
                                floor_us=nbytes / bandwidth * 1e6, max_abs_diff=error))
    return results


# ----------------------------------------------------------------------------- sweep


def sweep(device: str, dtype: torch.dtype, repeats: int, budget_s: float) -> list[dict]:
    """Time every LAUNCH_OVERRIDES combination of the grids on SWEEP_SHAPES x SWEEP_ROWS."""
    started = time.perf_counter()
    found = []
    for shape in SWEEP_SHAPES:
        weights = quantized(*shape, device)
        for rows in SWEEP_ROWS:
            x = torch.randn(rows, shape[1], device=device, dtype=dtype) / shape[1] ** 0.5
            reference = knf.nf4_matmul_torch(x, *weights).float()
            grids = [SWEEP_GEMV, SWEEP_DOT] if rows <= 8 else [SWEEP_DOT]
            configs = [{}] + [dict(zip(grid, values, strict=True)) for grid in grids
                              for values in itertools.product(*grid.values())]
            for config in configs:  # {} first: the computed default, for comparison
                if time.perf_counter() - started > budget_s:
                    print(f"sweep stopped at its {budget_s:.0f} s budget", file=sys.stderr)
                    return found
                knf.LAUNCH_OVERRIDES.clear()
                knf.LAUNCH_OVERRIDES.update(config)
                row = dict(shape=list(shape), rows=rows, config=config or "default")
                try:
                    out = knf.nf4_matmul_triton(x, *weights)
                    row["max_abs_diff"] = float((out.float() - reference).abs().max())
                    row["us"] = device_seconds(
                        lambda x=x, weights=weights: knf.nf4_matmul_triton(x, *weights),
                        device, repeats) * 1e6
                except Exception as exc:  # e.g. out of shared memory for that tile
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                found.append(row)
                knf.LAUNCH_OVERRIDES.clear()
    return found


def sweep_table(found: list[dict]) -> list[str]:
    lines = ["| shape (out x in) | rows | default us | best us | best config |",
             "|---|---:|---:|---:|---|"]
    cases = sorted({(tuple(r["shape"]), r["rows"]) for r in found})
    for shape, rows in cases:
        ok = [r for r in found if tuple(r["shape"]) == shape and r["rows"] == rows
              and "us" in r and r["max_abs_diff"] < 0.1]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["us"])
        default = [r["us"] for r in ok if r["config"] == "default"]
        chosen = knf._launch_config(rows, shape[0], shape[1], 64,
                                    sm_count(torch.cuda.current_device()))
        lines.append(f"| {shape[0]}x{shape[1]} | {rows} | "
                     f"{f'{default[0]:.1f}' if default else 'failed'} | {best['us']:.1f} | "
                     f"{best['config']} (default: {chosen['kernel']}, block_n="
                     f"{chosen['block_n']}, block_k={chosen['block_k']}, splits="
                     f"{chosen['splits']}, {chosen['dequant']}) |")
    return lines


# ----------------------------------------------------------------------------- report


def results_table(results: list[dict]) -> list[str]:
    lines = ["| shape (out x in) | rows | provider | us | GB/s | x copy bw | floor us | "
             "x kernel time | max abs diff |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    kernel_us = {(tuple(r["shape"]), r["rows"]): r["us"] for r in results
                 if r["provider"] == "kernel" and "us" in r}
    for r in results:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        if "error" in r:
            lines.append(f"| {shape} | {r['rows']} | {r['provider']} | failed: "
                         f"{r['error'][:80]} | | | | | |")
            continue
        ratio = kernel_us.get((tuple(r["shape"]), r["rows"]))
        ratio_text = f"{r['us'] / ratio:.2f}" if ratio else "n/a"
        lines.append(f"| {shape} | {r['rows']} | {r['provider']} | {r['us']:.1f} | "
                     f"{r['gbps']:.0f} | {r['roofline']:.2f} | {r['floor_us']:.1f} | "
                     f"{ratio_text} | {r['max_abs_diff']:.2e} |")
    return lines


def layer_summary(results: list[dict]) -> list[str]:
    """Sum over one decoder layer's seven linears, per model, provider and row count."""
    lines = ["| model | rows | provider | layer us | floor us | x floor |",
             "|---|---:|---|---:|---:|---:|"]
    for model, shapes in SHAPES_7B.items():
        for rows in sorted({r["rows"] for r in results}):
            for provider in dict.fromkeys(r["provider"] for r in results):
                picked = {tuple(r["shape"]): r for r in results if r["rows"] == rows
                          and r["provider"] == provider and "us" in r}
                if not all(shape in picked for shape in shapes):
                    continue
                total = sum(LAYER_COUNTS[s] * picked[s]["us"] for s in shapes)
                floor = sum(LAYER_COUNTS[s] * picked[s]["floor_us"] for s in shapes)
                lines.append(f"| {model} | {rows} | {provider} | {total:.1f} | {floor:.1f} "
                             f"| {total / floor:.2f} |")
    return lines if len(lines) > 2 else []


def parse_shape(text: str) -> tuple[int, int]:
    try:
        out_features, in_features = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not OUTxIN, e.g. 4096x14336"
                                         ) from error
    return out_features, in_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+",
                        help="out_features x in_features (default: 7B shapes on CUDA, "
                             "small ones on CPU)")
    parser.add_argument("--rows", type=int, nargs="+", help="row counts M")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="activation dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--repeats", type=int, default=25, help="timed calls per case")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--sweep", action="store_true",
                        help="CUDA: time the LAUNCH_OVERRIDES grids (SWEEP_* constants)")
    parser.add_argument("--sweep-budget", type=float, default=240.0,
                        help="seconds the sweep may take (it stops early, keeping results)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device == "cuda" else torch.float32)
    if device == "cuda":
        shapes = args.shapes or [s for group in SHAPES_7B.values() for s in group]
    else:
        shapes = args.shapes or SHAPES_CPU
    rows_list = args.rows or (ROWS_GPU if device == "cuda" else ROWS_CPU)

    started = time.perf_counter()
    bandwidth = copy_bandwidth(device, args.repeats)
    results: list[dict] = []
    for shape in shapes:
        weights = quantized(*shape, device)
        for rows in rows_list:
            results.extend(run_case(*shape, rows, device, dtype, args.repeats, bandwidth,
                                    weights))
        del weights
    found = sweep(device, dtype, args.repeats, args.sweep_budget) \
        if args.sweep and device == "cuda" else []

    print(f"Command: `{command_line(ENV_SHOWN)}`\n")
    print("\n".join(machine_info(device, packages=("bitsandbytes",))))
    print(f"- device copy bandwidth (measured here): {bandwidth / 1e9:.0f} GB/s; "
          f"activations {str(dtype).removeprefix('torch.')}; NF4 blocksize 64, double quant; "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("\n".join(results_table(results)))
    summary = layer_summary(results)
    if summary:
        print("\nOne decoder layer (sum of its seven linears):\n")
        print("\n".join(summary))
    if found:
        print("\nSweep (best launch per case):\n")
        print("\n".join(sweep_table(found)))
    if device == "cpu":
        print("\n- CPU: the twin is the real CPU path; kernel times (interpreter) say "
              "nothing about GPU speed.")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(command=command_line(ENV_SHOWN), device=device, dtype=str(dtype),
                           copy_bandwidth=bandwidth, results=results, sweep=found),
                      handle, indent=1)


if __name__ == "__main__":
    main()
