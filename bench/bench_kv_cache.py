"""What the int8 KV cache costs in accuracy and saves in memory, on the embedded default.

    python bench/bench_kv_cache.py --threads 1                      # base SmolLM2
    python bench/bench_kv_cache.py --threads 1 --adapter runs/x/adapter

Loads SmolLM2-135M-Instruct in NF4 (``ensure_default_model``; fp32 compute on CPU), with
the default ES-LoRA adapter (B = 0: the base model) or ``--adapter``, and generates the
default task's eval and transfer splits greedily (``EVAL_COMPLETION_LENGTH`` tokens, the
decode loop) with the KV cache in the compute dtype ("auto") and in int8
(``lowmem_es.kv_cache``), and, as the yardstick, a third time with the cache stored in
bfloat16 (what a bf16 GPU run keeps; attention still computes in fp32 here). Reports per
split: accuracy under each, the fraction of completions identical to the fp32 cache's,
wall time, and the KV cache bytes of one chunk as the decode loop measured them
(``DecodeStats.cache_bytes``). Prints a markdown table with the machine and command.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info

BF16 = "bf16-stored"  # the bench's yardstick: fp32 attention over a bfloat16-stored cache
LABELS = {"auto": "fp32 (compute dtype)", BF16: "bf16 stored", "int8": "int8"}


def _bf16_layer() -> type:
    """A StaticLayer that stores K/V in bfloat16 and hands attention fp32 copies."""
    from transformers.cache_utils import StaticLayer

    class Bf16StoredLayer(StaticLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states.to(torch.bfloat16),
                                        value_states.to(torch.bfloat16))

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states.to(torch.bfloat16),
                                          value_states.to(torch.bfloat16), *args, **kwargs)
            return keys.float(), values.float()

    return Bf16StoredLayer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="default_datasets seed")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory to load")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from lowmem_es import decode as decode_module
    from lowmem_es.data import render_prompt
    from lowmem_es.default_model import (
        DEFAULT_TASK,
        EVAL_COMPLETION_LENGTH,
        default_datasets,
        default_run_config,
        ensure_default_model,
    )
    from lowmem_es.evaluate import summarize
    from lowmem_es.generate import generate_population
    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model
    from lowmem_es.rewards import RewardScorer
    from lowmem_es.tasks import get_task

    config = default_run_config()
    task = get_task(DEFAULT_TASK)
    data = default_datasets(args.seed)
    model, tokenizer, device = load_model(ensure_default_model(), device="cpu")
    es_model = attach_es_lora(model, config.lora_target_modules, config.lora_rank,
                              config.lora_alpha, seed=config.seed)
    if args.adapter:
        es_model.load_adapter(args.adapter)
    scorer = RewardScorer(task.reward_funcs)
    cache_bytes: dict[str, int] = {}
    original_decode = decode_module.decode

    def measured_decode(*a, **k):  # record the cache size of every chunk the loop runs
        stats = decode_module.DecodeStats()
        out = original_decode(*a, **k, stats=stats)
        key = k.get("kv_cache_dtype", "auto")
        cache_bytes[key] = max(cache_bytes.get(key, 0), stats.cache_bytes)
        return out

    import lowmem_es.generate as generate_module
    import lowmem_es.kv_cache as kv_module

    generate_module.decode = measured_decode
    original_cache = kv_module.make_static_cache

    def cache_with_reference(config, length, kv_cache_dtype="auto"):
        if kv_cache_dtype != BF16:
            return original_cache(config, length, kv_cache_dtype)
        cache = original_cache(config, length, "auto")
        cache.layers = [_bf16_layer()(max_cache_len=length) for _ in cache.layers]
        return cache

    kv_module.make_static_cache = cache_with_reference
    results: dict = {}
    for split in ("eval", "transfer"):
        rows = data[split]
        prompts = [render_prompt(row["prompt"], tokenizer, i) for i, row in enumerate(rows)]
        texts = {}
        for dtype in ("auto", BF16, "int8"):
            started = time.perf_counter()
            completions = generate_population(
                es_model, tokenizer, prompts, [(None, i) for i in range(len(rows))],
                max_prompt_length=config.max_prompt_length,
                max_completion_length=EVAL_COMPLETION_LENGTH, device=device,
                kv_cache_dtype=dtype)
            seconds = time.perf_counter() - started
            totals, _ = scorer.score(rows, list(range(len(rows))), completions)
            texts[dtype] = [c.text for c in completions]
            metrics = summarize(totals, texts[dtype], task.well_formed,
                                config.correct_threshold)
            results[(split, dtype)] = {**metrics, "seconds": seconds}
        for dtype in (BF16, "int8"):
            same = sum(a == b for a, b in zip(texts["auto"], texts[dtype], strict=True))
            results[(split, f"identical_{dtype}")] = same / len(rows)

    print(f"## int8 KV cache vs {config.compute_dtype} (auto) on SmolLM2-135M-Instruct\n")
    print("\n".join(machine_info()) + f"\n\nCommand: `{command_line()}`\n")
    print("| split | rows | cache | accuracy | identical to fp32 cache | seconds |")
    print("|---|---:|---|---:|---:|---:|")
    for split in ("eval", "transfer"):
        for dtype in ("auto", BF16, "int8"):
            result = results[(split, dtype)]
            same = results.get((split, f"identical_{dtype}"), 1.0)
            print(f"| {split} | {result['count']} | {LABELS[dtype]} | {result['accuracy']:.3f} "
                  f"| {same:.3f} | {result['seconds']:.1f} |")
    ratio = cache_bytes["int8"] / cache_bytes["auto"]
    print(f"\nKV cache of the largest chunk: auto {cache_bytes['auto'] / 2**20:.1f} MiB, int8 "
          f"{cache_bytes['int8'] / 2**20:.1f} MiB ({ratio:.3f}x; fp32 compute here, so int8 "
          "is ~1/4 of it; ~1/2 of a bf16 cache on GPU)")
    return {"results": {f"{k[0]}/{k[1]}": v for k, v in results.items()},
            "cache_bytes": cache_bytes}


if __name__ == "__main__":
    main()
