"""Tune defaults: train with overrides and score held-out accuracy along the way.

    python bench/tune_default.py --seed 1 --eval-at 30 60 90 --set lr_schedule=cosine \
        --set learning_rate=0.02 --out /tmp/tune/cos02-s1.json
    python bench/tune_default.py --task yesno --seed 0 --eval-at 20 40 --out /tmp/tune/yn.json

``--task default`` runs ``default_model.default_run_config()`` (plus ``--set`` overrides)
on the default task's splits for ``--seed``, and after each iteration in ``--eval-at``
scores the unperturbed adapter on the eval and transfer splits exactly as ``run_default``
does at the end (greedy, ``EVAL_COMPLETION_LENGTH`` tokens).

``--task yesno`` / ``sentiment`` / ``antonym`` (bench/user_tasks.py) go through the user
path instead: JSONL files, ``dataset_task`` with ``--eval-dataset``, the
``user_tasks:first_word`` reward (or ``--reward answer_credit``) by its
``module:function`` name, and ESConfig's own defaults (what
``lowmem-es train --model M --dataset D --reward R`` uses) plus ``--set`` overrides. Their
eval split is scored greedy with ``--eval-tokens`` tokens; each point also reports the
share of eval completions that start with the most common first word (1.0: a constant
answer) and the best constant answer's accuracy.

The base model's accuracy is measured only with ``--base``. Results (config,
per-checkpoint metrics, seconds per iteration) go to ``--out`` as JSON, rewritten after
every evaluation.
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

import user_tasks  # bench/ is on sys.path when this script runs


def parse_value(text: str) -> object:
    """``0.02`` -> float, ``cosine`` -> str, ``[1, 2]`` -> list: a Python literal or a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def user_trainer(name: str, config: object, folder: Path, reward: str = "first_word"
                 ) -> tuple[object, dict]:
    """An ESTrainer on user task ``name`` built as ``lowmem-es train --model M --dataset
    TRAIN --eval-dataset EVAL --reward user_tasks:<reward>`` builds it."""
    from lowmem_es.data import fit_prompts
    from lowmem_es.default_model import ensure_default_model
    from lowmem_es.tasks.jsonl import dataset_task
    from lowmem_es.trainer import ESTrainer

    user_tasks.write(folder)
    task = dataset_task(folder / f"{name}-train.jsonl", has_reward=True,
                        eval_path=folder / f"{name}-eval.jsonl")
    splits = task.splits(seed=config.seed)
    trainer = ESTrainer(str(ensure_default_model()), [f"user_tasks:{reward}"],
                        train_dataset=splits["train"], eval_dataset=splits["eval"],
                        args=config, overwrite=True)
    trainer.train_dataset = fit_prompts(trainer.train_dataset, trainer.tokenizer)
    rows = fit_prompts(splits["eval"], trainer.tokenizer)
    return trainer, {"train": trainer.train_dataset, "eval": rows}


def score_user(trainer: object, rows: list[dict], tokens: int) -> dict:
    """Greedy eval accuracy of the centre and how constant its answers are."""
    from collections import Counter

    from lowmem_es.data import render_prompt
    from lowmem_es.evaluate import score_centre

    prompts = [render_prompt(row["prompt"], trainer.tokenizer, i) for i, row in enumerate(rows)]
    _, completions, totals, _ = score_centre(
        trainer.es_model, trainer.tokenizer, rows, prompts, trainer, sharded=False,
        max_prompt_length=trainer.args.max_prompt_length, max_completion_length=tokens)
    firsts = [(user_tasks.first_words(c.text) or [""])[0] for c in completions]
    top, count = Counter(firsts).most_common(1)[0]
    return {"accuracy": sum(t >= 1.0 for t in totals) / len(totals),
            "top_answer": top, "top_answer_share": count / len(firsts),
            "samples": [c.text for c in completions[:3]]}


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
    parser.add_argument("--task", default="default", choices=("default", *user_tasks.TASKS))
    parser.add_argument("--reward", default="first_word", choices=("first_word", "answer_credit"),
                        help="a user task's training reward (accuracy is always the first "
                        "word's exact match)")
    parser.add_argument("--eval-tokens", type=int, default=16,
                        help="completion tokens of a user task's evaluation")
    args = parser.parse_args(argv)

    import torch

    from lowmem_es.config import ESConfig
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
    run_dir = str(out.with_suffix("")) + "-run"
    if args.task == "default":
        config = default_run_config(run_dir, seed=args.seed, save_steps=0, **overrides)
        task = get_task(DEFAULT_TASK)
        data = default_datasets(args.seed)
        trainer = ESTrainer(str(ensure_default_model()), list(task.reward_funcs),
                            train_dataset=data["train"], args=config, overwrite=True)
    else:
        config = ESConfig(**dict(dict(output_dir=run_dir, seed=args.seed, save_steps=0),
                                 **overrides))
        trainer, data = user_trainer(args.task, config, Path(run_dir + "-data"), args.reward)
    eval_at = sorted(set(args.eval_at or [config.iterations]))
    results: dict = {"task": args.task, "seed": args.seed, "overrides": overrides,
                     "reward": args.reward if args.task != "default" else None,
                     "config": config.to_dict(), "host_threads": torch.get_num_threads(),
                     "points": []}
    if args.task != "default":
        results["best_constant"] = user_tasks.best_constant(data["eval"])

    def measure(label: object) -> None:
        point: dict = {"iteration": label}
        if args.task == "default":
            for split, metrics in score_splits(trainer, data, task).items():
                point[split] = {k: metrics[k] for k in ("accuracy", "accuracy_well_formed",
                                                        "well_formed")}
        else:
            point["eval"] = score_user(trainer, data["eval"], args.eval_tokens)
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
