"""The ``Task`` record: a task's splits, its reward functions and its well-formed test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowmem_es.rewards.functions import RewardFunc


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
