"""Reward functions under TRL's GRPO contract, and the few built-ins the examples use.

A reward function is called with keywords ``prompts``, ``completions``,
``completion_ids`` and every dataset column except ``prompt`` (each a list with one entry
per completion) and returns ``list[float | None]``; ``None`` means "not applicable" and
is ignored. So a reward function written for TRL works here unchanged.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

RewardFunc = Callable[..., list]


def target_fraction(completions: list, target: list[str], **kwargs: Any) -> list[float]:
    """Fraction of a completion's characters equal to the row's ``target`` character."""
    rewards = []
    for completion, wanted in zip(completions, target, strict=True):
        text = _text(completion)
        rewards.append(sum(ch == wanted for ch in text) / len(text) if text else 0.0)
    return rewards


def exact_match(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the stripped completion equals the row's ``answer``, else 0.0."""
    return [float(_text(c).strip() == str(a).strip())
            for c, a in zip(completions, answer, strict=True)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """1.0 when the last number in the completion equals ``answer`` (GSM8K style)."""
    rewards = []
    for completion, wanted in zip(completions, answer, strict=True):
        found = _NUMBER.findall(_text(completion))
        try:
            ok = bool(found) and math.isclose(float(found[-1].replace(",", "")),
                                              float(str(wanted).replace(",", "")), abs_tol=1e-6)
        except ValueError:
            ok = False
        rewards.append(float(ok))
    return rewards


BUILTIN_REWARDS: dict[str, RewardFunc] = {
    "target_fraction": target_fraction,
    "exact_match": exact_match,
    "last_number": last_number,
}


def _text(completion: Any) -> str:
    """Completion text for standard (str) and conversational ([{role, content}]) formats."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def load_reward(spec: str | RewardFunc) -> RewardFunc:
    """A reward function from a built-in name or a ``module:function`` import path."""
    if callable(spec):
        return spec
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}; use a built-in {sorted(BUILTIN_REWARDS)} "
                         "or an import path such as 'my_rewards:score'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({error}); "
                         "is it on PYTHONPATH?") from error
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return func


def reward_name(func: RewardFunc) -> str:
    return getattr(func, "__name__", type(func).__name__)


def compute_rewards(reward_funcs: Sequence[RewardFunc], *, prompts: list, completions: list,
                    completion_ids: list[list[int]], columns: dict[str, list],
                    weights: Sequence[float] | None = None
                    ) -> tuple[list[float], dict[str, list[float | None]]]:
    """Weighted total reward per completion, and each function's raw rewards by name.

    ``None`` entries are ignored (TRL's nansum); a completion no function scored gets 0.
    A function returning the wrong length or a non-number is an error naming it.
    """
    if weights is not None and len(weights) != len(reward_funcs):
        raise ValueError(f"`reward_weights` has {len(weights)} entries but there are "
                         f"{len(reward_funcs)} reward functions; give one weight per function")
    weights = list(weights) if weights is not None else [1.0] * len(reward_funcs)
    count = len(completions)
    totals = [0.0] * count
    per_func: dict[str, list[float | None]] = {}
    for func, weight in zip(reward_funcs, weights, strict=True):
        name = reward_name(func)
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                      **columns)
        if values is None or len(values) != count:
            got = "None" if values is None else f"{len(values)} values"
            raise ValueError(f"reward function {name!r} returned {got} for {count} "
                             "completions; it must return one float (or None) per completion")
        clean: list[float | None] = []
        for value in values:
            if value is None:
                clean.append(None)
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"reward function {name!r} returned {value!r}; rewards must "
                                 "be numbers or None")
            value = float(value)  # numpy / torch scalars too, as TRL accepts
            clean.append(None if math.isnan(value) else value)
        per_func[name] = clean
        for i, value in enumerate(clean):
            if value is not None:
                totals[i] += weight * value
    return totals, per_func
