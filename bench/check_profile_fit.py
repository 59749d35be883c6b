"""Does one ES iteration fit a VRAM profile? Planned vs measured peak, under a memory cap.

Issue 4, item 7: build a 7B/8B-shaped causal LM from its config with random weights in
NF4 (``bench_memory.build_model``: nothing is downloaded), cap what PyTorch may take from
the GPU at what an 8 GB (then a 12 GB) card leaves it, plan the run with the profile
(``lowmem_es.planner.plan``, as ``ESTrainer`` does), run one ES iteration
(``generate_population`` over the planned ``rows_per_chunk`` + ``es.es_update``) and
compare ``torch.cuda.max_memory_allocated`` with the plan's predicted peak.

The cap: ``torch.cuda.set_per_process_memory_fraction`` limits the memory PyTorch's
caching allocator reserves (allocated + its cached free blocks) to
``budget - context_gib`` of the profile, i.e. an ``memory_budget_gib`` card on which the
CUDA context and libraries took ``--context-gib`` (0.5 GiB by default, typical of a
consumer card; the profile's ``reserve_gib`` covers that plus fragmentation). The model
is built and quantized before the cap is set (its transient bf16 copy would not fit a
small card, but fits the big one this check runs on) and the cache emptied, so the cap
sees only the NF4 model. An out-of-memory error inside generation halves the chunk and
retries (lowmem_es.generate), each backoff is reported; one that escapes is reported as
an OOM of that run and the next profile still runs.

``--chunks N`` generates only the first N chunks of the iteration's rows (the others'
fitness is drawn at random, the update covers every member): every chunk has the same
shape and memory, so the peak is that of the full iteration, in a fraction of the time.
0 (the default) runs the whole iteration.

CPU dry path (``--device cpu --shape tiny --profiles cpu``): no cap; the peak is the
bytes of live tensor storages (``bench_memory.LiveTensors``), so the same code path and
the planner comparison run anywhere.

    python bench/check_profile_fit.py --device cuda --shape qwen7b --profiles 8gb 12gb \
        --chunks 2 --out-dir $OUT
    python bench/check_profile_fit.py --device cpu --shape tiny --profiles cpu \
        --population 4 --batch 2 --prompt 16 --completion 8

Writes ``profile_fit_<shape>.json`` and ``.md`` under ``--out-dir`` after every profile.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_memory, bench_population

GIB = 2**30
TARGET_8GB_PEAK_GIB = 7.2  # issue 4: 7B-class under the 8gb profile, peak allocated <= 7.2 GiB
TARGET_PLANNER_ERROR = 0.10  # issue 4: planner within 10% of the measured peak


def error_fraction(predicted: int, measured: int) -> float:
    """Planner error relative to the measurement: (predicted - measured) / measured."""
    if measured <= 0:
        raise ValueError(f"measured peak must be > 0 bytes, got {measured}")
    return (predicted - measured) / measured


def cap_fraction(cap_bytes: int, total_bytes: int) -> float:
    """The per-process memory fraction that caps the allocator at ``cap_bytes``."""
    if not 0 < cap_bytes <= total_bytes:
        raise ValueError(f"cannot cap at {cap_bytes / GIB:.2f} GiB on a device with "
                         f"{total_bytes / GIB:.2f} GiB")
    return cap_bytes / total_bytes


def rows_to_run(total_rows: int, rows_per_chunk: int, chunks: int) -> int:
    """How many of the iteration's rows the first ``chunks`` chunks hold (0 = all)."""
    if chunks <= 0:
        return total_rows
    return min(total_rows, chunks * rows_per_chunk)


def make_plan(args: argparse.Namespace, profile_name: str) -> tuple[Any, Any, Any]:
    """(profile, trainer's plan, as-run prediction at the plan's rows and lengths).

    The plan is what ``ESTrainer`` computes (``lora_kernel=False``: it also counts the
    per-member LoRA copies of the CPU path); the as-run prediction sets ``lora_kernel``
    to what the ES-LoRA layers will do on this device (the fused CUDA kernel keeps none).
    """
    from bench_memory import SHAPES

    from lowmem_es.planner import plan, predict
    from lowmem_es.profiles import load_profile

    profile = load_profile(profile_name)
    config = dict(SHAPES[args.shape])
    planned = plan(config, profile, args.rank, args.targets, args.population, args.batch,
                   max_prompt_length=args.prompt or profile.max_prompt_length,
                   max_completion_length=args.completion or profile.max_completion_length,
                   optimizer=args.optimizer, kv_cache_dtype=args.kv_cache_dtype)
    as_run = predict(config, profile, args.rank, args.targets, args.population, args.batch,
                     rows_per_chunk=planned.rows_per_chunk,
                     max_prompt_length=planned.max_prompt_length,
                     max_completion_length=planned.max_completion_length,
                     optimizer=args.optimizer, lora_kernel=args.device == "cuda",
                     prefill_chunk=planned.prefill_chunk, kv_cache_dtype=args.kv_cache_dtype)
    return profile, planned, as_run


def run_iteration(es_model: Any, tokenizer: object, args: argparse.Namespace, planned: Any,
                  device: torch.device, events: list[dict[str, Any]],
                  kv_cache_dtype: str = "auto") -> dict[str, Any]:
    """One ES iteration at the plan's rows per chunk, lengths and KV-cache dtype; returns
    what it did."""
    from bench_memory import prompts_for

    from lowmem_es import es
    from lowmem_es.es import Member
    from lowmem_es.generate import generate_population

    schedule = es.member_schedule(args.population, True)
    members = [Member(pair, sign) for pair, sign in schedule]
    prompts = prompts_for(args.batch, planned.max_prompt_length, seed=1)
    rows = [(m, p) for m in range(args.population) for p in range(args.batch)]
    run_rows = rows_to_run(len(rows), planned.rows_per_chunk, args.chunks)
    started = time.perf_counter()
    completions = generate_population(
        es_model, tokenizer, prompts, rows[:run_rows], members=members, run_seed=0,
        iteration=0, sigma=0.01, max_prompt_length=planned.max_prompt_length,
        max_completion_length=planned.max_completion_length,
        rows_per_chunk=planned.rows_per_chunk, device=device, events=events,
        prefill_chunk=planned.prefill_chunk, kv_cache_dtype=kv_cache_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    generated = time.perf_counter() - started
    fitness = torch.randn(args.population, generator=torch.Generator().manual_seed(2))
    norms = es.es_update(es_model.parameters(), es_model.tensor_ids(), run_seed=0,
                         iteration=0, shaped_fitness=es.shape_fitness(fitness.tolist()),
                         schedule=schedule, learning_rate=1e-3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"rows_run": run_rows, "rows_total": len(rows),
            "completion_tokens": sum(len(c.ids) for c in completions),
            "generate_s": generated, "update_s": time.perf_counter() - started - generated,
            "update_norm": norms.get("update_norm")}


def measure_cuda(step: Any, device: torch.device) -> dict[str, Any]:
    """Run ``step`` with fresh peak statistics: allocated / reserved before and at peak."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = step()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"resident_bytes": before, "peak_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "device_used_bytes": total - free, "step": result}


def measure_cpu(step: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Run ``step`` under bench_memory's live-storage tracker (the CPU analogue)."""
    from bench_memory import LiveTensors, model_tensors

    gc.collect()
    tracker = LiveTensors()
    tracker.register(model_tensors(model))
    before = tracker.current
    with tracker:
        result = step()
    return {"resident_bytes": before, "peak_bytes": tracker.peak, "step": result}


def check_profile(es_model: Any, tokenizer: object, args: argparse.Namespace,
                  profile_name: str, device: torch.device) -> dict[str, Any]:
    """Plan, cap, run and compare for one profile; never raises for an OOM."""
    profile, planned, as_run = make_plan(args, profile_name)
    print(f"\nplan ({profile_name}, as ESTrainer makes it):\n{planned.format()}\nas-run "
          f"prediction (lora_kernel={args.device == 'cuda'}): "
          f"{as_run.predicted_peak_bytes / GIB:.3f} GiB", flush=True)
    record: dict[str, Any] = {
        "shape": args.shape, "profile": profile_name, "device": str(device),
        "rows_per_chunk": planned.rows_per_chunk, "num_chunks": planned.num_chunks,
        "members_per_chunk": planned.members_per_chunk,
        "prompt": planned.max_prompt_length, "completion": planned.max_completion_length,
        "limited_by": planned.limited_by, "plan_peak_bytes": planned.predicted_peak_bytes,
        "plan_peak_phase": planned.peak_phase, "plan_breakdown": planned.breakdown,
        "as_run_peak_bytes": as_run.predicted_peak_bytes,
        "usable_bytes": profile.usable_bytes, "target_bytes": profile.target_bytes,
        "events": [], "oom": None}
    for layer in es_model.layers.values():
        layer.clear_cache()
    if device.type == "cuda":  # place the input embedding as the trainer would
        from lowmem_es.model import (
            offload_input_embedding,
            offloaded_embedding,
            restore_input_embedding,
        )

        if profile.embedding_on_cpu:
            offload_input_embedding(es_model.model, device)
        else:
            restore_input_embedding(es_model.model)
        record["embedding_on_cpu"] = offloaded_embedding(es_model.model) is not None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        cap = int((profile.memory_budget_gib - args.context_gib) * GIB)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap_fraction(cap, total), device)
        record["cap_bytes"] = cap
        print(f"allocator capped at {cap / GIB:.2f} GiB ({profile.memory_budget_gib} GiB card "
              f"- {args.context_gib} GiB context)", flush=True)
    events: list[dict[str, Any]] = record["events"]

    def step() -> dict[str, Any]:
        return run_iteration(es_model, tokenizer, args, planned, device, events,
                             args.kv_cache_dtype or profile.run_kv_cache_dtype)

    started = time.perf_counter()
    try:
        measured = (measure_cuda(step, device) if device.type == "cuda"
                    else measure_cpu(step, es_model.model))
    except torch.cuda.OutOfMemoryError as error:
        record["oom"] = (str(error).splitlines() or ["out of memory"])[0][:300]
        if device.type == "cuda":
            record["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        measured = None
    finally:
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    record["seconds"] = time.perf_counter() - started
    if measured is not None:
        record.update({k: v for k, v in measured.items() if k != "step"}, **measured["step"])
        peak = measured["peak_bytes"]
        record["plan_error"] = error_fraction(planned.predicted_peak_bytes, peak)
        record["as_run_error"] = error_fraction(as_run.predicted_peak_bytes, peak)
        # The workspace allowance is a flat guess; without it, the modelled terms alone.
        record["plan_error_no_workspace"] = error_fraction(
            planned.predicted_peak_bytes - planned.static["workspace"], peak)
        record["peak_within_usable"] = peak <= profile.usable_bytes
    return record


def format_records(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the checked (shape, profile) pairs and the verdicts."""
    lines = ["| shape | profile | rows/chunk (chunks run/total) | prompt+completion | cap GiB "
             "| measured peak GiB | reserved GiB | plan GiB (err) | as-run GiB (err) "
             "| peak <= usable | OOM backoffs | OOM | s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in records:
        peak = r.get("peak_bytes")
        chunks_run = -(-r.get("rows_run", 0) // r["rows_per_chunk"]) if "rows_run" in r else "-"
        cap = f"{r['cap_bytes'] / GIB:.2f}" if "cap_bytes" in r else "none"
        reserved = (f"{r['peak_reserved_bytes'] / GIB:.3f}" if "peak_reserved_bytes" in r
                    else "-")
        plan_err = f" ({r['plan_error']:+.1%})" if "plan_error" in r else ""
        as_run_err = f" ({r['as_run_error']:+.1%})" if "as_run_error" in r else ""
        within = r.get("peak_within_usable")
        lines.append(
            f"| {r['shape']} | {r['profile']} | {r['rows_per_chunk']} ({chunks_run}/"
            f"{r['num_chunks']}) | {r['prompt']}+{r['completion']} | {cap} | "
            f"{peak / GIB:.3f} | {reserved} | {r['plan_peak_bytes'] / GIB:.3f}{plan_err} | "
            f"{r['as_run_peak_bytes'] / GIB:.3f}{as_run_err} | "
            f"{'-' if within is None else ('yes' if within else 'NO')} "
            f"(usable {r['usable_bytes'] / GIB:.2f}) | {len(r['events'])} | "
            f"{r['oom'] or 'no'} | {r['seconds']:.0f} |"
            if peak is not None else
            f"| {r['shape']} | {r['profile']} | {r['rows_per_chunk']} | {r['prompt']}+"
            f"{r['completion']} | {cap} | - | - | {r['plan_peak_bytes'] / GIB:.3f} | - | - | "
            f"{len(r['events'])} | {r.get('oom') or r.get('error', '?')} | "
            f"{r.get('seconds', 0):.0f} |")
    lines.append("")
    for r in records:
        if "plan_error" not in r:
            continue
        verdicts = [f"planner error {r['plan_error']:+.1%} "
                    f"({'within' if abs(r['plan_error']) <= TARGET_PLANNER_ERROR else 'OUTSIDE'}"
                    f" {TARGET_PLANNER_ERROR:.0%}; {r['plan_error_no_workspace']:+.1%} without "
                    "the workspace allowance)"]
        if r["profile"] == "8gb":
            ok = r["peak_bytes"] <= TARGET_8GB_PEAK_GIB * GIB and not r["oom"]
            verdicts.append(f"peak <= {TARGET_8GB_PEAK_GIB} GiB and completed: "
                            f"{'yes' if ok else 'NO'}")
        lines.append(f"- {r['shape']} / {r['profile']}: " + "; ".join(verdicts))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from bench_memory import SHAPES

    from lowmem_es.config import ESConfig

    defaults = ESConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", default="qwen7b", choices=sorted(SHAPES),
                        help="random-weight model built from this config (bench_memory.SHAPES)")
    parser.add_argument("--profiles", nargs="+", default=["8gb", "12gb"],
                        help="profile names or TOML paths, checked in this order")
    parser.add_argument("--population", type=int, default=defaults.population_size,
                        help="members (ESConfig default)")
    parser.add_argument("--batch", type=int, default=defaults.batch_size,
                        help="prompts per iteration (ESConfig default)")
    parser.add_argument("--prompt", type=int, default=0,
                        help="max prompt tokens (0 = the profile's)")
    parser.add_argument("--completion", type=int, default=0,
                        help="max completion tokens (0 = the profile's)")
    parser.add_argument("--rank", type=int, default=defaults.lora_rank, help="LoRA rank")
    parser.add_argument("--targets", nargs="+", default=list(defaults.lora_target_modules),
                        help="LoRA target modules")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                        help="ES optimizer the plan counts state for (the update runs SGD)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=("auto", "int8"),
                        help="KV cache of the decode loop (default: each profile's)")
    parser.add_argument("--chunks", type=int, default=0,
                        help="generate only the first N chunks of rows (0 = the whole iteration)")
    parser.add_argument("--context-gib", type=float, default=0.5,
                        help="GiB of the card taken outside PyTorch's allocator (CUDA context, "
                             "libraries): the cap is memory_budget_gib minus this")
    parser.add_argument("--out-dir", default=None,
                        help="write profile_fit_<shape>.json/.md here ($OUT if set)")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Build the model once, check every profile, print and write the results."""
    args = build_parser().parse_args(argv)
    if args.population < 2 or args.population % 2:
        raise SystemExit(f"check_profile_fit: --population must be even and >= 2, got "
                         f"{args.population}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("check_profile_fit: --device cuda but torch sees no CUDA device")
    out_dir = Path(args.out_dir or os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    from bench_memory import build_model
    from bench_population import NoEosTokenizer

    from lowmem_es import backends
    from lowmem_es.config import ESConfig
    from lowmem_es.example import char_tokenizer
    from lowmem_es.lora import attach_es_lora

    backends.set_force(backends.NF4_MATMUL,  # as the trainer does
                       None if ESConfig().nf4_kernel else "torch")
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    command = shlex.join(["python", "bench/check_profile_fit.py", *(argv or sys.argv[1:])])
    print(f"command: {command}", flush=True)
    started = time.perf_counter()
    model, _ = build_model(args.shape, device, dtype)
    es_model = attach_es_lora(model, args.targets, args.rank, 2.0 * args.rank, seed=0)
    build_s = time.perf_counter() - started
    info = {"command": command, "torch": torch.__version__, "build_s": build_s,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        info["model_allocated_bytes"] = torch.cuda.memory_allocated(device)
        free, total = torch.cuda.mem_get_info(device)
        info["outside_allocator_bytes"] = total - free - torch.cuda.memory_reserved(device)
    print(f"built {args.shape} in {build_s:.0f} s: {json.dumps(info, default=str)}", flush=True)
    tokenizer = NoEosTokenizer(char_tokenizer())  # every row runs its full length
    records: list[dict[str, Any]] = []
    for name in args.profiles:
        try:
            record = check_profile(es_model, tokenizer, args, name, device)
        except Exception as error:  # report and go on to the next profile
            traceback.print_exc()
            record = {"shape": args.shape, "profile": name, "error":
                      f"{type(error).__name__}: {str(error)[:300]}"}
        records.append(record)
        table = format_records([r for r in records if "plan_peak_bytes" in r])
        print(f"\n{args.shape} / {name}:\n{table}\n", flush=True)
        (out_dir / f"profile_fit_{args.shape}.json").write_text(
            json.dumps({"info": info, "records": records}, indent=2, default=str))
        (out_dir / f"profile_fit_{args.shape}.md").write_text(
            f"command: `{command}`\n\n{table}\n\n"
            + "".join(f"- {r['profile']}: {r['error']}\n" for r in records if "error" in r))
    return records


if __name__ == "__main__":
    main()
