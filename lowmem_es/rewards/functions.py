"""Built-in reward functions under TRL's GRPO contract (a leaf: imports nothing of ours).

A reward function is called with keywords ``prompts``, ``completions``,
``completion_ids`` and every dataset column except ``prompt`` (one entry per
completion each) and returns ``list[float | None]``. The tasks build their rewards from
these; ``lowmem_es.rewards.scoring`` loads, guards and applies them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

RewardFunc = Callable[..., list]

# The keywords every reward function is called with; a dataset column of the same name
# would collide with them (TypeError: got multiple values for keyword argument).
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")


def target_fraction(completions: list, target: list[str], **kwargs: Any) -> list[float]:
    """Fraction of a completion's characters equal to the row's ``target`` character."""
    rewards = []
    for completion, wanted in zip(completions, target, strict=True):
        text = completion_text(completion)
        rewards.append(sum(ch == wanted for ch in text) / len(text) if text else 0.0)
    return rewards


def exact_match(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the stripped completion equals the row's ``answer``, else 0.0."""
    return [float(completion_text(c).strip() == str(a).strip())
            for c, a in zip(completions, answer, strict=True)]


# A number, with commas only as thousands separators: "1,234,567" is one number, while
# "2,3,5" (a list) is three. (?!\d) keeps "1,2345" from reading as "1,234" then "5".
NUMBER_PATTERN = r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER = re.compile(NUMBER_PATTERN)


def last_number(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """1.0 when the last number in the completion equals ``answer`` (GSM8K style)."""
    rewards = []
    for completion, wanted in zip(completions, answer, strict=True):
        found = _NUMBER.findall(completion_text(completion))
        try:
            ok = bool(found) and math.isclose(float(found[-1].replace(",", "")),
                                              float(str(wanted).replace(",", "")), abs_tol=1e-6)
        except ValueError:
            ok = False
        rewards.append(float(ok))
    return rewards


def make_regex_reward(pattern: str, *, reward: float = 1.0, name: str | None = None,
                      full_match: bool = False, flags: int = re.DOTALL) -> RewardFunc:
    """A TRL-style format reward: ``reward`` when the completion matches ``pattern``, else 0.

    ``full_match`` requires the whole stripped completion to match (``re.fullmatch``);
    otherwise a match anywhere counts (``re.search``). The pattern is compiled once here,
    so a bad pattern fails when the reward is built, not mid-run.
    """
    try:
        compiled = re.compile(pattern, flags)
    except re.error as error:
        raise ValueError(f"regex reward pattern {pattern!r} does not compile: {error}") from None
    test = compiled.fullmatch if full_match else compiled.search

    def regex_reward(completions: list, **kwargs: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        return [float(reward) if test(t.strip() if full_match else t) else 0.0 for t in texts]

    regex_reward.__name__ = name or "regex_reward"
    regex_reward.__doc__ = f"{reward} when the completion matches {pattern!r}, else 0.0."
    return regex_reward


# <think>reasoning</think> then <answer>final</answer>: the R1 / TinyZero format.
think_answer_format = make_regex_reward(r"<think>.*?</think>\s*<answer>.*?</answer>",
                                        name="think_answer_format")


def make_length_penalty(per_token: float = 0.001, free_tokens: int = 0,
                        name: str | None = None) -> RewardFunc:
    """A reward of ``-per_token`` for each completion token beyond ``free_tokens``.

    Counts ``completion_ids`` (tokens, what generation costs), not characters. Keep
    ``per_token`` small next to the task reward, or ES learns to say nothing.
    """
    if per_token < 0 or free_tokens < 0:
        raise ValueError(f"length penalty needs per_token >= 0 and free_tokens >= 0, got "
                         f"per_token={per_token!r}, free_tokens={free_tokens!r}")

    def length_penalty(completions: list, completion_ids: list, **kwargs: Any) -> list[float]:
        return [-per_token * max(0, len(ids) - free_tokens) for ids in completion_ids]

    length_penalty.__name__ = name or "length_penalty"
    length_penalty.__doc__ = (f"-{per_token} per completion token beyond {free_tokens}.")
    return length_penalty


length_penalty = make_length_penalty(0.001, name="length_penalty")


BUILTIN_REWARDS: dict[str, RewardFunc] = {
    "target_fraction": target_fraction,
    "exact_match": exact_match,
    "last_number": last_number,
    "think_answer_format": think_answer_format,
    "length_penalty": length_penalty,
}


def completion_text(completion: Any) -> str:
    """Completion text for standard (str) and conversational ([{role, content}]) formats."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)
