"""Rewards under TRL's GRPO contract: the built-in functions and the scoring path.

A reward function is called with keywords ``prompts``, ``completions``,
``completion_ids`` and every dataset column except ``prompt`` (each a list with one entry
per completion) and returns ``list[float | None]``; ``None`` means "not applicable" and
is ignored, so a reward function written for TRL works here unchanged.

- ``functions``: the built-ins (``exact_match``, ``last_number`` GSM8K style,
  ``think_answer_format``, ``length_penalty``, ``target_fraction``, the
  ``make_regex_reward`` / ``make_length_penalty`` factories); imports nothing of ours.
- ``scoring``: ``load_reward(name or "module:function")`` (names include the tasks' own
  rewards: ``countdown_format``, ``countdown_answer``, ``arithmetic_format``),
  ``guard_reward``, ``compute_rewards``, ``RewardScorer``.
"""

from lowmem_es.rewards.functions import (
    BUILTIN_REWARDS,
    NUMBER_PATTERN,
    RESERVED_COLUMNS,
    RewardFunc,
    completion_text,
    exact_match,
    last_number,
    length_penalty,
    make_length_penalty,
    make_regex_reward,
    target_fraction,
    think_answer_format,
)
from lowmem_es.rewards.scoring import (
    TRL_TRAINER_KEYWORDS,
    RewardScorer,
    compute_rewards,
    guard_reward,
    load_reward,
    reward_name,
    reward_path,
)

__all__ = [
    "BUILTIN_REWARDS", "NUMBER_PATTERN", "RESERVED_COLUMNS", "TRL_TRAINER_KEYWORDS",
    "RewardFunc", "RewardScorer", "completion_text", "compute_rewards", "exact_match",
    "guard_reward", "last_number", "length_penalty", "load_reward", "make_length_penalty",
    "make_regex_reward", "reward_name", "reward_path", "target_fraction",
    "think_answer_format",
]
