"""Tests of the reward contract (lowmem_es/rewards/) against TRL's documented GRPO API.

Reward functions here are written exactly as TRL's docs show them (keyword arguments
``prompts``, ``completions``, ``completion_ids``, dataset columns, ``**kwargs``; returns
``list[float | None]``) so that a function written for TRL is known to work unchanged.
CPU only, no model.
"""

from __future__ import annotations

import re
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from lowmem_es.errors import RewardFunctionError
from lowmem_es.rewards import (
    BUILTIN_REWARDS,
    RewardScorer,
    compute_rewards,
    exact_match,
    last_number,
    length_penalty,
    load_reward,
    make_length_penalty,
    make_regex_reward,
    reward_name,
    target_fraction,
    think_answer_format,
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


def test_zero_d_tensor_and_array_rewards_are_numbers():
    """TRL accepts a list of 0-d tensors (it builds one tensor from the list); so do we."""
    def tensor_rewards(completions, **kwargs):
        return [torch.tensor(1.0), torch.tensor(2, dtype=torch.int64), np.array(0.5)]

    def nan_tensor(completions, **kwargs):
        return [torch.tensor(float("nan")), np.array(float("nan")), torch.tensor(3.0)]

    totals, per_func = _call([tensor_rewards, nan_tensor], weights=[1.0, 0.0])
    assert per_func["tensor_rewards"] == [1.0, 2.0, 0.5]
    assert all(type(v) is float for v in per_func["tensor_rewards"])
    # NaN is "not applicable" whatever its type (TRL's nansum).
    assert per_func["nan_tensor"] == [None, None, 3.0]
    assert totals[:2] == [1.0, 2.0]


@pytest.mark.parametrize("infinite", [float("inf"), -float("inf"), torch.tensor(float("inf")),
                                      np.float64(-np.inf)], ids=["inf", "-inf", "tensor", "numpy"])
def test_infinite_reward_names_function_and_completion(infinite):
    """+-inf would make the ES shaping fail later, naming no function: refused here."""
    def unbounded(completions, **kwargs):
        return [1.0, infinite, 0.0]

    with pytest.raises(ValueError, match=r"'unbounded' returned -?inf for completion 1; "
                                         r"rewards must be finite numbers \(or None or NaN"):
        _call([unbounded])


def _returning(value):
    def returns_it(completions, **kwargs):
        return value
    return returns_it


@pytest.mark.parametrize(("value", "what"), [
    (1.0, r"a float \(1.0\)"),
    ((x for x in [1.0, 2.0, 3.0]), r"a generator .*list\(\.\.\.\)"),
    ({0: 1.0, 1: 1.0, 2: 1.0}, r"a dict .*completion order"),  # was read by its keys
    ({1.0, 2.0, 3.0}, r"a set "),  # was read in no order
    ("abc", r"a str \('abc'\)"),
    (np.ones((3, 1)), r"a ndarray of shape \(3, 1\) for 3 completions"),
    (np.array(1.0), r"a ndarray of shape \(\) for 3 completions"),
    (torch.ones(3, 2), r"a Tensor of shape \(3, 2\) for 3 completions"),
], ids=["scalar", "generator", "dict", "set", "str", "2d-array", "0d-array", "2d-tensor"])
def test_non_list_return_names_function(value, what):
    """Anything but one reward per completion in a list, tuple or 1-d array/tensor is an
    error naming the function, not a bare TypeError or rewards read from the wrong thing."""
    with pytest.raises(ValueError, match=rf"reward function 'returns_it' returned {what}"):
        _call([_returning(value)])


@pytest.mark.parametrize("value", [(1.0, 2.0, 3.0), np.array([1.0, 2.0, 3.0]),
                                   torch.tensor([1.0, 2.0, 3.0])], ids=["tuple", "numpy", "torch"])
def test_tuple_and_one_d_array_returns_are_accepted(value):
    totals, per_func = _call([_returning(value)])
    assert totals == [1.0, 2.0, 3.0] and per_func["returns_it"] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("column", ["prompts", "completions", "completion_ids"])
def test_column_named_like_a_keyword_is_refused(column):
    """It would collide with the keyword: 'got multiple values for keyword argument'."""
    with pytest.raises(ValueError, match=rf"dataset column\(s\) \['{column}'\] have the "
                                         r"names of the keyword arguments.*rename"):
        _call([reward_len], columns={column: [1, 2, 3]})


def test_multi_element_tensor_names_function_and_completion():
    def batched(completions, **kwargs):
        return [1.0, torch.tensor([1.0, 2.0]), 0.0]

    with pytest.raises(ValueError, match=r"'batched' returned a Tensor of shape \(2,\) for "
                                         r"completion 1; each reward must be one number"):
        _call([batched])

    def array_of_one(completions, **kwargs):
        return [np.array([1.0])] * len(completions)

    with pytest.raises(ValueError, match=r"'array_of_one' returned a ndarray of shape \(1,\) "
                                         r"for completion 0"):
        _call([array_of_one])


def test_bool_rewards_in_any_form_count_one_or_zero():
    def flags(completions, **kwargs):
        return [True, np.False_, torch.tensor(True)]

    assert _call([flags])[0] == [1.0, 0.0, 1.0]


# --- load_reward ---

def test_load_builtin_names():
    assert set(BUILTIN_REWARDS) == {"target_fraction", "exact_match", "last_number",
                                    "think_answer_format", "length_penalty"}
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


def test_missing_parent_package_advises_pythonpath():
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_pkg_xyz\.sub'.*"
                                         r"PYTHONPATH"):
        load_reward("no_such_pkg_xyz.sub:score")
    with pytest.raises(ValueError, match=r"cannot import module 'json\.no_such_sub_xyz'.*"
                                         r"PYTHONPATH"):
        load_reward("json.no_such_sub_xyz:score")


@pytest.fixture
def broken_module(tmp_path, monkeypatch):
    """Writes a module ``lowmem_test_broken`` with the given source; yields the writer."""
    name = "lowmem_test_broken"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)

    def write(source: str):
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return name, path

    yield write
    sys.modules.pop(name, None)


def test_module_with_missing_dependency_names_the_dependency(broken_module):
    """The module was found: PYTHONPATH advice would send the user the wrong way."""
    name, path = broken_module("""
        import lowmem_no_such_dependency_xyz

        def score(completions, **kwargs):
            return [0.0] * len(completions)
    """)
    with pytest.raises(ValueError) as caught:
        load_reward(f"{name}:score")
    message = str(caught.value)
    assert f"module '{name}' was found" in message
    assert "imports 'lowmem_no_such_dependency_xyz', which is not installed" in message
    assert f"{path}, line 2" in message and "PYTHONPATH" not in message
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize(("source", "raised", "line"), [
    ("def score(completions, **kwargs)\n    return []\n", "SyntaxError", 1),
    ("x = 1\nraise RuntimeError('no config')\n", "RuntimeError: no config", 2),
    ("from os import no_such_name_xyz\n", "ImportError: cannot import name", 1),
], ids=["syntax", "raises", "bad-name"])
def test_module_raising_on_import_names_module_file_and_line(broken_module, source, raised,
                                                             line):
    name, path = broken_module(source)
    with pytest.raises(ValueError, match=rf"module '{name}' was found, but importing it raised "
                                         rf"{raised}.* at {re.escape(str(path))}, line {line}; "
                                         r"fix the module"):
        load_reward(f"{name}:score")


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
    # commas are thousands separators only: a comma-separated list is several numbers
    ("primes: 2,3,5", "5", 1.0),
    ("primes: 2,3,5", "235", 0.0),
    ("scores 10,20,30", "30", 1.0),
    ("1,2345", "2345", 1.0),        # not "1,234" then "5"
    ("it is 56, not 65", "65", 1.0),
    ("it is 56, then", "56", 1.0),
    ("total: -12,000.5", "-12000.5", 1.0),
])
def test_last_number(completion, answer, expected):
    assert last_number([completion], answer=[answer]) == [expected]


# --- format and length rewards ---

@pytest.mark.parametrize(("completion", "expected"), [
    ("<think>2+2</think><answer>4</answer>", 1.0),
    ("<think>\nadd them\n</think>\n<answer> 4 </answer>", 1.0),  # newlines inside tags
    ("I think <think>x</think> <answer>4</answer> done", 1.0),  # a match anywhere
    ("<think>x</think> so <answer>4</answer>", 0.0),  # words between the blocks
    ("<answer>4</answer><think>x</think>", 0.0),  # wrong order
    ("<think>x</think>", 0.0),
    ("<think>x<answer>4</answer>", 0.0),  # think never closed
    ("", 0.0),
])
def test_think_answer_format(completion, expected):
    assert think_answer_format([completion]) == [expected]
    assert load_reward("think_answer_format") is think_answer_format


def test_regex_reward_search_and_full_match():
    search = make_regex_reward(r"Answer: \d+", reward=0.5, name="has_answer")
    full = make_regex_reward(r"Answer: \d+", full_match=True)
    completions = ["Answer: 12", "so... Answer: 7 ok", "  Answer: 3\n", "answer: 3"]
    assert search(completions) == [0.5, 0.5, 0.5, 0.0]
    assert full(completions) == [1.0, 0.0, 1.0, 0.0]  # full match ignores outer whitespace
    assert search.__name__ == "has_answer" and full.__name__ == "regex_reward"
    totals, per_func = _call([search], completions=["Answer: 1", "no", "Answer: 2"])
    assert totals == [0.5, 0.0, 0.5] and "has_answer" in per_func


def test_regex_reward_bad_pattern_fails_when_built():
    with pytest.raises(ValueError, match=r"pattern '\(unclosed' does not compile"):
        make_regex_reward("(unclosed")


def test_length_penalty_counts_tokens():
    ids = [[1] * 10, [], [1] * 3]
    assert length_penalty(["a", "b", "c"], completion_ids=ids) == pytest.approx(
        [-0.010, 0.0, -0.003])
    free = make_length_penalty(per_token=0.5, free_tokens=4)
    assert free(["a", "b", "c"], completion_ids=ids) == [-3.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"per_token=-1"):
        make_length_penalty(per_token=-1)


def test_task_rewards_load_by_name():
    from lowmem_es.tasks.countdown import countdown_answer, countdown_format

    assert load_reward("countdown_answer") is countdown_answer
    assert load_reward("countdown_format") is countdown_format
    with pytest.raises(ValueError, match=r"countdown_answer"):  # listed among the names
        load_reward("countdown")


# --- member fitness (pass@k) ---

# --- RewardScorer: the scoring path shared by training and evaluation ---

def test_reward_scorer_passes_columns_and_conversational_completions():
    from types import SimpleNamespace

    from lowmem_es.rewards import RewardScorer, completion_text

    seen = {}

    def spy(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, answer=answer)
        return [1.0 if completion_text(c) == a else 0.0 for c, a in zip(completions, answer,
                                                                          strict=True)]

    rows = [{"prompt": "2+2=", "answer": "4"},
            {"prompt": [{"role": "user", "content": "3+3="}], "answer": "6"}]
    done = [SimpleNamespace(text="4", ids=[7]), SimpleNamespace(text="5", ids=[8]),
            SimpleNamespace(text="6", ids=[9])]
    scorer = RewardScorer([spy, "exact_match"], weights=[1.0, 0.5])
    totals, per_func = scorer.score(rows, [0, 0, 1], done)
    assert totals == [1.5, 0.0, 1.5]
    assert per_func == {"spy": [1.0, 0.0, 1.0], "exact_match": [1.0, 0.0, 1.0]}
    assert seen["answer"] == ["4", "4", "6"] and seen["ids"] == [[7], [8], [9]]
    assert seen["completions"][:2] == ["4", "5"]  # standard prompt: plain text
    assert seen["completions"][2] == [{"role": "assistant", "content": "6"}]  # chat: messages


def test_reward_scorer_errors_name_the_problem():
    from types import SimpleNamespace

    from lowmem_es.errors import RewardFunctionError
    from lowmem_es.rewards import RewardScorer

    with pytest.raises(ValueError, match="is empty"):
        RewardScorer([])
    with pytest.raises(ValueError, match="2 entries for 1 reward functions"):
        RewardScorer(["exact_match"], weights=[1.0, 2.0])

    def picky(completions, **kwargs):
        return [1.0 / len(c) for c in completions]

    rows = [{"prompt": "x"}]
    done = [SimpleNamespace(text="ok", ids=[1]), SimpleNamespace(text="", ids=[])]
    with pytest.raises(RewardFunctionError, match=r"'picky' raised ZeroDivisionError.*"
                                                  r"on completion 1: ''.*Fix the function; if "
                                                  r"a run was started, continue it with "
                                                  r"--resume"):
        RewardScorer(picky).score(rows, [0, 0], done)


def test_reward_needing_a_missing_column_names_the_column():
    """exact_match on rows without an answer: the fix is the data, not the function."""
    from types import SimpleNamespace

    from lowmem_es.errors import RewardFunctionError
    from lowmem_es.rewards import RewardScorer

    rows = [{"prompt": "2+2=", "solution": "4"}]
    done = [SimpleNamespace(text="4", ids=[1])]
    with pytest.raises(RewardFunctionError) as caught:
        RewardScorer("exact_match").score(rows, [0], done)
    message = str(caught.value)
    assert ("'exact_match' needs the dataset column(s) ['answer'], which the rows lack "
            "(their columns: ['solution'])") in message
    assert "--answer-field" in message and "Fix the function" not in message

    def typo(completions, answer, **kwargs):  # a TypeError of its own is the function's
        return [len(answer) + None for _ in completions]

    with pytest.raises(RewardFunctionError, match=r"'typo' raised TypeError.*Fix the function"):
        RewardScorer(typo).score([{"prompt": "x", "answer": "4"}], [0], done)


def test_trl_style_bool_rewards_count_one_or_zero():
    """TRL turns `[c == answer for c in completions]` into 1.0 / 0.0; so does lowmem-es
    (bools were refused as "not numbers")."""
    import numpy as np
    import torch

    def exact(completions, answer, **kwargs):
        return [c == a for c, a in zip(completions, answer, strict=True)]

    for convert in (list, np.array, torch.tensor):
        def func(completions, answer, convert=convert, **kwargs):
            return convert(exact(completions, answer))

        totals, _ = compute_rewards([func], prompts=["p", "p"], completions=["1", "2"],
                                    completion_ids=[[1], [2]], columns={"answer": ["1", "1"]})
        assert totals == [1.0, 0.0]


def test_callable_objects_and_partials_keep_their_names_and_never_collide():
    """A callable object or a partial used to report (and be recorded in the run identity)
    as "guarded"; two functions of one name overwrote each other's values."""
    import functools

    from lowmem_es.rewards import reward_path

    class LenReward:
        def __call__(self, completions, **kwargs):
            return [float(len(c)) for c in completions]

    def scaled(completions, factor=1.0, **kwargs):
        return [factor * len(c) for c in completions]

    scorer = RewardScorer([LenReward(), functools.partial(scaled, factor=2.0),
                           make_regex_reward("a"), make_regex_reward("z")])
    names = [reward_name(f) for f in scorer.reward_funcs]
    assert names == ["LenReward", "scaled", "regex_reward", "regex_reward_2"]
    assert reward_path(scorer.reward_funcs[0]).endswith(":test_callable_objects_and_partials"
                                                        "_keep_their_names_and_never_collide"
                                                        ".<locals>.LenReward")
    assert reward_path(scorer.reward_funcs[1]).endswith(".<locals>.scaled")
    rows = [{"prompt": "p"}]
    _, per_func = scorer.score(rows, [0], [types.SimpleNamespace(text="ab", ids=[1, 2])])
    assert per_func == {"LenReward": [2.0], "scaled": [4.0], "regex_reward": [1.0],
                        "regex_reward_2": [0.0]}


def test_trl_trainer_keywords_and_async_functions_are_explained():
    def needs_state(completions, trainer_state, **kwargs):
        return [0.0 for _ in completions]

    async def asynchronous(completions, **kwargs):
        return [0.0 for _ in completions]

    scorer = RewardScorer([needs_state])
    done = types.SimpleNamespace(text="x", ids=[1])
    with pytest.raises(RewardFunctionError, match=r"needs \['trainer_state'\].*only TRL's "
                       r"trainer passes.*trainer_state=None"):
        scorer.score([{"prompt": "p"}], [0], [done])
    with pytest.raises(ValueError, match=r"async def.*plain function"):
        RewardScorer([asynchronous]).score([{"prompt": "p"}], [0], [done])


def test_reward_path_of_builtins_is_their_public_package():
    """A run's identity records the built-ins as ``lowmem_es.rewards:NAME`` wherever inside
    the package they are defined, so that a resume of a run written before a code move is
    not refused as "reward functions changed"; a user's function keeps its own module."""
    from lowmem_es.rewards import reward_path

    assert exact_match.__module__ == "lowmem_es.rewards.functions"
    assert reward_path(exact_match) == "lowmem_es.rewards:exact_match"
    assert reward_path(load_reward("last_number")) == "lowmem_es.rewards:last_number"
    assert reward_path(load_reward("countdown_answer")) == (
        "lowmem_es.tasks.countdown:countdown_answer")

    def mine(completions, **kwargs):
        return [0.0] * len(completions)

    assert reward_path(mine) == f"{__name__}:{mine.__qualname__}"
