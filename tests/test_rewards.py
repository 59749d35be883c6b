"""Tests of the reward contract (lowmem_es/rewards.py) against TRL's documented GRPO API.

Reward functions here are written exactly as TRL's docs show them (keyword arguments
``prompts``, ``completions``, ``completion_ids``, dataset columns, ``**kwargs``; returns
``list[float | None]``) so that a function written for TRL is known to work unchanged.
CPU only, no model.
"""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from lowmem_es.rewards import (
    BUILTIN_REWARDS,
    compute_rewards,
    exact_match,
    last_number,
    load_reward,
    target_fraction,
)

PROMPTS = ["Say hi", "Add 2 and 3", "Spell cat"]
COMPLETIONS = ["hi", "The answer is 5", "c-a-t is spelled with twenty chars"]
COMPLETION_IDS = [[104, 105], [84, 104, 101], [99, 45, 97]]


def _call(funcs, completions=COMPLETIONS, columns=None, weights=None):
    return compute_rewards(funcs, prompts=PROMPTS[:len(completions)], completions=completions,
                           completion_ids=COMPLETION_IDS[:len(completions)],
                           columns=columns or {}, weights=weights)


# --- TRL-style functions ---

def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def correct(prompts, completions, answer, **kwargs):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer, strict=True)]


def test_trl_length_reward():
    totals, per_func = _call([reward_len])
    expected = [-18.0, -5.0, -14.0]  # len 2, 15, 34 against 20
    assert totals == expected
    assert per_func == {"reward_len": expected}
    assert all(isinstance(v, float) for v in totals)


def test_trl_reward_reading_a_dataset_column():
    totals, per_func = _call([correct], columns={"answer": ["hi", "6", "cat"]})
    assert totals == [1.0, 0.0, 0.0]  # "cat" is not in "c-a-t ..."
    assert per_func["correct"] == [1.0, 0.0, 0.0]


def test_every_keyword_reaches_the_function():
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids,
                    **kwargs)
        return [0.0] * len(completions)

    columns = {"answer": ["a", "b", "c"], "difficulty": [1, 2, 3]}
    _call([spy], columns=columns)
    assert seen == {"prompts": PROMPTS, "completions": COMPLETIONS,
                    "completion_ids": COMPLETION_IDS, **columns}


def test_builtins_take_conversational_completions():
    conversational = [[{"role": "assistant", "content": "aaab"}],
                      [{"role": "assistant", "content": " 42 "}],
                      [{"role": "assistant", "content": "so it is 1,000"}]]
    totals, per_func = _call(
        [target_fraction, exact_match, last_number], completions=conversational,
        columns={"target": ["a", "a", "a"], "answer": ["aaab", "42", "1000"]})
    assert per_func["target_fraction"] == [0.75, 0.0, 0.0]
    assert per_func["exact_match"] == [1.0, 1.0, 0.0]
    assert per_func["last_number"] == [0.0, 1.0, 1.0]
    assert totals == [1.75, 2.0, 1.0]


def test_conversational_uses_last_message():
    chat = [[{"role": "user", "content": "zzz"}, {"role": "assistant", "content": "aa"}]]
    assert target_fraction(chat, target=["a"]) == [1.0]


# --- None, weights and errors ---

def test_none_entries_are_ignored():
    def sometimes(completions, **kwargs):
        return [None, 2.0, None]

    def other(completions, **kwargs):
        return [1.0, None, float("nan")]

    totals, per_func = _call([sometimes, other], weights=[3.0, 0.5])
    assert totals == [0.5, 6.0, 0.0]  # nan counts as None (TRL's nansum); all None -> 0
    assert per_func == {"sometimes": [None, 2.0, None], "other": [1.0, None, None]}


def test_all_none_gives_zero():
    totals, _ = _call([lambda completions, **kwargs: [None] * len(completions)])
    assert totals == [0.0, 0.0, 0.0]


def test_reward_weights_apply():
    def ones(completions, **kwargs):
        return [1.0] * len(completions)

    totals, _ = _call([reward_len, ones], weights=[0.5, -2.0])
    assert totals == [-9.0 - 2.0, -2.5 - 2.0, -7.0 - 2.0]
    unweighted, _ = _call([reward_len, ones])
    assert unweighted == [-17.0, -4.0, -13.0]


def test_weights_count_mismatch_names_field():
    with pytest.raises(ValueError, match=r"`reward_weights` has 1 entries.*2 reward functions"):
        _call([reward_len, correct], columns={"answer": ["", "", ""]}, weights=[1.0])


def test_wrong_length_names_function():
    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match=r"'short' returned 1 values for 3 completions"):
        _call([short])


def test_none_return_names_function():
    def forgot_return(completions, **kwargs):
        pass

    with pytest.raises(ValueError, match=r"'forgot_return' returned None for 3 completions"):
        _call([forgot_return])


def test_non_number_names_function_and_value():
    def textual(completions, **kwargs):
        return ["1.0"] * len(completions)

    with pytest.raises(ValueError, match=r"'textual' returned '1.0'.*numbers or None"):
        _call([textual])


def test_numpy_scalar_rewards_are_numbers():
    def numpy_rewards(completions, **kwargs):
        return list(np.array([len(c) for c in completions], dtype=np.float32))

    totals, _ = _call([numpy_rewards])
    assert totals == [2.0, 15.0, 34.0]


# --- load_reward ---

def test_load_builtin_names():
    assert set(BUILTIN_REWARDS) == {"target_fraction", "exact_match", "last_number"}
    for name, func in BUILTIN_REWARDS.items():
        assert load_reward(name) is func
    assert load_reward(reward_len) is reward_len


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    name = "lowmem_test_user_rewards"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        def score(completions, **kwargs):
            return [float(len(c)) for c in completions]

        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_load_module_function(reward_module):
    func = load_reward(f"{reward_module}:score")
    assert func.__module__ == reward_module
    totals, per_func = _call([func])
    assert totals == [2.0, 15.0, 34.0] and "score" in per_func


def test_unknown_name_lists_builtins():
    with pytest.raises(ValueError) as caught:
        load_reward("accuracy")
    message = str(caught.value)
    assert "'accuracy'" in message
    assert all(name in message for name in BUILTIN_REWARDS)
    assert "module:function" in message or "my_rewards:score" in message


def test_missing_module_names_it():
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module_xyz'") as caught:
        load_reward("no_such_module_xyz:score")
    assert isinstance(caught.value.__cause__, ImportError)


@pytest.mark.parametrize("attr", ["nope", "NOT_A_FUNCTION"])
def test_missing_function_names_it(reward_module, attr):
    with pytest.raises(ValueError, match=rf"module '{reward_module}' has no function '{attr}'"):
        load_reward(f"{reward_module}:{attr}")


# --- built-ins ---

def test_target_fraction():
    completions = ["aaaa", "abab", "", "bbb", "AaA"]
    assert target_fraction(completions, target=["a", "a", "a", "a", "a"]) == [
        1.0, 0.5, 0.0, 0.0, 1 / 3]
    assert target_fraction(["xyz"], target=["z"]) == [1 / 3]
    with pytest.raises(ValueError):  # one target per completion
        target_fraction(["aa", "bb"], target=["a"])


def test_exact_match():
    completions = ["Paris", "  Paris\n", "paris", "Paris.", "42"]
    answers = ["Paris", "Paris", "Paris", "Paris", 42]
    assert exact_match(completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(("completion", "answer", "expected"), [
    ("The total is 1,234 apples", "1234", 1.0),
    ("The total is 1,234.", 1234, 1.0),
    ("so 1,234,567", "1,234,567", 1.0),
    ("it dropped to -7 degrees", "-7", 1.0),
    ("it dropped to -7 degrees", "7", 0.0),
    ("pi is about 3.14", "3.14", 1.0),
    ("pi is about 3.14", 3.14159, 0.0),
    ("half: 0.50", "0.5", 1.0),
    ("first 12 then 7", "12", 0.0),  # the last number counts
    ("first 12 then 7", "7", 1.0),
    ("no digits here", "0", 0.0),
    ("", "0", 0.0),
    ("answer: 72", "#### 72", 0.0),  # an unparseable answer scores 0, never raises
    ("answer: 8.0", 8, 1.0),
])
def test_last_number(completion, answer, expected):
    assert last_number([completion], answer=[answer]) == [expected]
