"""Tune the embedded default: train with overrides and score held-out accuracy along the way.

    python bench/tune_default.py --seed 1 --eval-at 30 60 90 --set lr_schedule=cosine \
        --set learning_rate=0.02 --out /tmp/tune/cos02-s1.json

Runs ``default_model.default_run_config()`` (plus ``--set`` overrides) on the default task's
splits for ``--seed``, and after each iteration in ``--eval-at`` scores the unperturbed
adapter on the eval and transfer splits exactly as ``run_default`` does at the end (greedy,
``EVAL_COMPLETION_LENGTH`` tokens). The base model's accuracy is measured only with
``--base`` (it depends on the seed alone). Results (config, per-checkpoint metrics, seconds
per iteration) go to ``--out`` as JSON, rewritten after every evaluation.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
import time
from pathlib import Path


def parse_value(text: str) -> object:
    """``0.02`` -> float, ``cosine`` -> str, ``[1, 2]`` -> list: a Python literal or a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-at", type=int, nargs="+", default=None,
                        help="iterations after which to evaluate (default: the last)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="ESConfig override, e.g. learning_rate=0.02 (repeatable)")
    parser.add_argument("--base", action="store_true", help="also score the base model")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)

    import torch

    from lowmem_es.default_model import (
        DEFAULT_TASK,
        default_datasets,
        default_run_config,
        ensure_default_model,
        score_splits,
    )
    from lowmem_es.tasks import get_task
    from lowmem_es.trainer import ESTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: use FIELD=VALUE")
        overrides[name] = parse_value(value)
    out = Path(args.out)
    config = default_run_config(str(out.with_suffix("")) + "-run", seed=args.seed,
                                save_steps=0, **overrides)
    eval_at = sorted(set(args.eval_at or [config.iterations]))
    task = get_task(DEFAULT_TASK)
    data = default_datasets(args.seed)
    trainer = ESTrainer(str(ensure_default_model()), list(task.reward_funcs),
                        train_dataset=data["train"], args=config, overwrite=True)
    results: dict = {"seed": args.seed, "overrides": overrides, "config": config.to_dict(),
                     "host_threads": torch.get_num_threads(), "points": []}

    def measure(label: object) -> None:
        point: dict = {"iteration": label}
        for split, metrics in score_splits(trainer, data, task).items():
            point[split] = {k: metrics[k] for k in ("accuracy", "accuracy_well_formed",
                                                    "well_formed")}
        norm = sum(float(t.float().pow(2).sum()) for t in trainer.es_model.parameters().values())
        point["param_norm"] = norm ** 0.5
        results["points"].append(point)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, out)
        print(json.dumps(point), flush=True)

    if args.base:
        measure("base")
    original = trainer.step
    seconds: list[float] = []

    def step(iteration: int) -> dict:
        started = time.perf_counter()
        record = original(iteration)
        seconds.append(time.perf_counter() - started)
        results["seconds_per_iteration"] = sum(seconds) / len(seconds)
        if iteration + 1 in eval_at:
            measure(iteration + 1)
        return record

    trainer.step = step  # type: ignore[method-assign]
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
