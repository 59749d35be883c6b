"""Tasks: seeded train / eval (/ transfer) splits plus the reward functions that score them.

A task is data and a verifiable reward, nothing else: rows are dicts ``{prompt, answer,
...}`` whose ``prompt`` is a list of chat messages (the trainer applies the tokenizer's
chat template; ``lowmem_es.data.fit_prompts`` flattens them for tokenizers without one), and the
reward functions follow TRL's contract (lowmem_es.rewards). Built-in tasks:

- ``arithmetic``: graded arithmetic questions, last-number reward (+0.1 for stopping on
  the answer), with a transfer split of unseen phrasings (the embedded default's task);
- ``countdown``: the ES paper's Countdown puzzles and its 0.1 x format + 1.0 x answer reward;
- JSONL files: ``jsonl_task(path, prompt_field=..., answer_field=...)``, GSM8K-style.
"""

from __future__ import annotations

from lowmem_es.tasks import arithmetic, countdown
from lowmem_es.tasks.base import Task
from lowmem_es.tasks.jsonl import jsonl_task, read_jsonl

__all__ = ["TASKS", "Task", "get_task", "jsonl_task", "read_jsonl"]


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        "arithmetic", "arithmetic questions in 4 difficulty levels; transfer split uses "
        "unseen phrasings; reward: 1.0 x last number equals the answer + 0.1 x well-formed",
        arithmetic.splits, arithmetic.REWARD_FUNCS, arithmetic.well_formed),
    "countdown": Task(
        "countdown", "Countdown puzzles (3-4 numbers, reachable target); reward 0.1 x "
        "<think>/<answer> format + 1.0 x correct equation",
        countdown.splits, countdown.REWARD_FUNCS, countdown.well_formed),
}


def get_task(name: str) -> Task:
    """The registered task ``name``; an unknown name is an error listing the tasks."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; available tasks are {sorted(TASKS)} (or "
                         "pass --dataset FILE.jsonl)") from None
