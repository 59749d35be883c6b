"""Tasks: seeded train / eval (/ transfer) splits plus the reward functions that score them.

A task is data and a verifiable reward, nothing else: rows are dicts ``{prompt, answer,
...}`` whose ``prompt`` is a list of chat messages (the trainer applies the tokenizer's
chat template; ``fit_prompts`` flattens them for tokenizers without one), and the
reward functions follow TRL's contract (lowmem_es.rewards). Built-in tasks:

- ``arithmetic``: graded arithmetic questions, last-number reward (+0.1 for stopping on
  the answer), with a transfer split of unseen phrasings (the embedded default's task);
- ``countdown``: the ES paper's Countdown puzzles and its 0.1 x format + 1.0 x answer reward;
- JSONL files: ``jsonl_task(path, prompt_field=..., answer_field=...)``, GSM8K-style.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lowmem_es.rewards import RewardFunc
from lowmem_es.tasks import arithmetic, countdown
from lowmem_es.tasks.jsonl import jsonl_task, read_jsonl

logger = logging.getLogger("lowmem_es")

__all__ = ["TASKS", "Task", "fit_prompts", "get_task", "jsonl_task", "read_jsonl"]


@dataclass(frozen=True)
class Task:
    """A named task: how to build its splits, how to score them, what "well-formed" means.

    ``make_splits(seed=..., **options)`` returns ``{"train": rows, "eval": rows[,
    "transfer": rows]}``. ``well_formed(text)`` says whether a completion states an answer
    in the expected form (used to report accuracy among well-formed answers, which
    separates a learned format from a learned capability). A completion counts as correct
    when its total reward is >= ``correct_threshold``.
    """

    name: str
    description: str
    make_splits: Callable[..., dict[str, list[dict]]]
    reward_funcs: tuple[RewardFunc, ...]
    well_formed: Callable[[str], bool]
    correct_threshold: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # defaults for make_splits

    def splits(self, seed: int = 0, **options: Any) -> dict[str, list[dict]]:
        """The task's splits for ``seed``; ``options`` override the task's defaults."""
        values = dict(self.options)
        values.update(options)
        return self.make_splits(seed=seed, **values)


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


def fit_prompts(rows: Sequence[dict], tokenizer: object) -> list[dict]:
    """Rows whose chat-message prompts become plain text when ``tokenizer`` has no chat template.

    Base (non-instruct) models have no template; their prompt is then the messages'
    contents joined by blank lines. Rows with string prompts pass through unchanged.
    """
    if getattr(tokenizer, "chat_template", None) is not None:
        return list(rows)
    out = []
    flattened = False
    for row in rows:
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            flattened = True
            row = dict(row, prompt="\n\n".join(str(m.get("content", "")) for m in prompt
                                               if isinstance(m, dict)))
        out.append(row)
    if flattened:
        logger.warning("the tokenizer has no chat template: chat prompts are given as plain "
                       "text (message contents joined by blank lines)")
    return out
