"""Tests of lowmem_es/tasks: registry, arithmetic, countdown (generator, reward, parser), JSONL.

No model: everything here is data and reward functions, so it runs in well under a second.
"""

from __future__ import annotations

import builtins
import json
import time
from fractions import Fraction

import pytest

from lowmem_es.rewards import compute_rewards
from lowmem_es.tasks import (
    TASKS,
    arithmetic,
    countdown,
    get_task,
    jsonl_task,
    read_jsonl,
)
from lowmem_es.tasks.countdown import (
    UnsafeExpression,
    check_equation,
    countdown_answer,
    countdown_format,
    parse_expression,
)
from lowmem_es.tasks.jsonl import dataset_task

# --- registry ---


def test_registry_names_and_unknown_task():
    assert set(TASKS) == {"arithmetic", "countdown"}
    assert get_task("countdown") is TASKS["countdown"]
    with pytest.raises(ValueError, match=r"unknown task 'gsm8k'.*\['arithmetic', 'countdown'\]"):
        get_task("gsm8k")


def test_task_options_override_defaults():
    task = get_task("arithmetic")
    rows = task.splits(seed=0, levels=(2,), eval_size=5)
    assert len(rows["eval"]) == 5 and {r["difficulty"] for r in rows["eval"]} == {2}


# --- arithmetic ---


def test_arithmetic_rendered_prompt_is_pinned():
    """Changing templates, hashing or ordering changes these rows: that breaks old runs."""
    rows = arithmetic.splits(seed=0)
    assert rows["train"][0] == {"prompt": [{"role": "user", "content": "1 * 5 = ?"}],
                                "answer": "5", "difficulty": 1, "problem": "1 * 5"}
    assert rows["eval"][0] == {"prompt": [{"role": "user", "content": "10 + 1 = ?"}],
                               "answer": "11", "difficulty": 1, "problem": "10 + 1"}
    assert rows["transfer"][0]["prompt"] == [{"role": "user", "content": "Work out 2 plus 1."}]


def test_arithmetic_level_sizes_and_disjoint_splits():
    expected = {1: 366, 2: 1620, 4: 2139}
    for level, total in expected.items():
        rows = arithmetic.splits(seed=3, levels=(level,))
        problems = [{r["problem"] for r in rows[name]} for name in ("train", "eval", "transfer")]
        assert sum(len(p) for p in problems) == total
        assert not (problems[0] & problems[1] or problems[0] & problems[2]
                    or problems[1] & problems[2])
        assert all(len(rows[name]) > total // 4 for name in rows)  # ~40/30/30


def test_arithmetic_answers_are_right():
    rows = arithmetic.splits(seed=0, levels=(1, 4))
    for row in rows["train"] + rows["eval"] + rows["transfer"]:
        value, _ = parse_expression(row["problem"])  # an independent evaluator
        assert Fraction(int(row["answer"])) == value, row
        assert int(row["answer"]) >= 0


def test_arithmetic_seeds_and_phrasings():
    first, again, other = (arithmetic.splits(seed=s) for s in (0, 0, 1))
    assert first == again
    assert {r["problem"] for r in first["eval"]} != {r["problem"] for r in other["eval"]}
    transfer_text = [r["prompt"][0]["content"] for r in first["transfer"]]
    train_text = [r["prompt"][0]["content"] for r in first["train"] + first["eval"]]
    assert all(any(w in t for w in ("plus", "minus", "times")) for t in transfer_text)
    assert not any(any(w in t for w in ("plus", "minus", "times")) for t in train_text)


def test_arithmetic_sizes_cap_and_bad_level():
    rows = arithmetic.splits(seed=0, train_size=4, eval_size=2, transfer_size=0)
    assert [len(rows[n]) for n in ("train", "eval", "transfer")] == [4, 2, 0]
    assert rows["train"] == arithmetic.splits(seed=0)["train"][:4]
    with pytest.raises(ValueError, match=r"`level` must be one of \[1, 2, 3, 4\], got 7"):
        arithmetic.splits(levels=(7,))


@pytest.mark.parametrize(("text", "expected"), [
    ("56", True), ("7 * 8 = 56.", True), ("The answer is 1,024.\n", True), ("-3", True),
    ("To solve this, we multiply 7 by", False), ("56 apples", False), ("", False),
    ("The primes are 2,3,5.", True),
    ("It is 56,", True),  # lenient on purpose: unchanged since the README figures
])
def test_arithmetic_well_formed(text, expected):
    assert arithmetic.well_formed(text) is expected


def test_arithmetic_reward_literals():
    """1.0 for the right last number + 0.1 for stopping on it, through the TRL contract."""
    completions = ["56", "7 * 8 = 56.", "56\n\nI can't believe it!", "It is 54.",
                   "To multiply 7 by 8, we", [{"role": "assistant", "content": "56"}]]
    totals, per_func = compute_rewards(
        arithmetic.REWARD_FUNCS, prompts=["p"] * 6, completions=completions,
        completion_ids=[[1]] * 6, columns={"answer": ["56"] * 6})
    assert per_func["last_number"] == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert per_func["arithmetic_format"] == [0.1, 0.1, 0.0, 0.1, 0.0, 0.1]
    assert totals == pytest.approx([1.1, 1.1, 1.0, 0.1, 0.0, 1.1])


# --- countdown: generator ---


def test_countdown_generator_is_deterministic_and_solvable():
    rows = countdown.splits(seed=5, train_size=60, eval_size=20)
    assert rows == countdown.splits(seed=5, train_size=60, eval_size=20)
    assert rows["train"] != countdown.splits(seed=6, train_size=60, eval_size=20)["train"]
    for row in rows["train"] + rows["eval"]:
        assert 3 <= len(row["numbers"]) <= 4
        assert all(1 <= n <= 100 for n in row["numbers"])
        assert isinstance(row["target"], int) and 1 <= row["target"] <= 1000
        assert check_equation(row["solution"], row["numbers"], row["target"]), row
    train_keys = {(tuple(sorted(r["numbers"])), r["target"]) for r in rows["train"]}
    assert not any((tuple(sorted(r["numbers"])), r["target"]) in train_keys
                   for r in rows["eval"])
    assert {len(r["numbers"]) for r in rows["train"]} == {3, 4}


def test_countdown_prompt_is_pinned():
    row = countdown.splits(seed=0, train_size=1, eval_size=0)["train"][0]
    assert row["numbers"] == [85, 97, 45] and row["target"] == 57
    assert row["prompt"] == [{"role": "user", "content": (
        "Using the numbers [85, 97, 45], create an equation that equals 57. You can use basic "
        "arithmetic operations (+, -, *, /) and each number can only be used once. Show your "
        "work in <think> </think> tags. And return the final answer in <answer> </answer> "
        "tags, for example <answer> (1 + 2) / 3 </answer>.")}]


# --- countdown: reward ---

NUMBERS = [[3, 7, 2]] * 8
TARGET = [17] * 8


@pytest.mark.parametrize(("completion", "fmt", "answer"), [
    ("<think>3*7=21, 21-2=19? no: 7*2=14, +3</think><answer>7 * 2 + 3</answer>", 0.1, 1.0),
    ("<think>x</think>\n<answer> (7*2)+3 = 17 </answer>", 0.1, 1.0),  # "= target" allowed
    ("<answer>3 + 7 * 2</answer>", 0.0, 1.0),  # correct without the think block
    ("<think>x</think><answer>7 * 2 + 3 + 0</answer>", 0.1, 0.0),  # 0 is not a given number
    ("<think>x</think><answer>7 * 3 - 2 - 2</answer>", 0.1, 0.0),  # 2 used twice, 3 unused
    ("<think>x</think><answer>7 + 3 + 2</answer>", 0.1, 0.0),  # uses all, equals 12
    ("<think>x</think><answer>7 * 2</answer>", 0.1, 0.0),  # 3 unused
    ("<think>17</think> The answer is 7 * 2 + 3", 0.0, 0.0),  # no answer tags
    ("<think>x</think><answer>__import__('os')</answer>", 0.1, 0.0),
])
def test_countdown_reward_literals(completion, fmt, answer):
    assert countdown_format([completion]) == [fmt]
    assert countdown_answer([completion], numbers=[[3, 7, 2]], target=[17]) == [answer]


def test_countdown_reward_under_trl_contract():
    """The paper's total: 0.1 x format + 1.0 x answer, through compute_rewards."""
    completions = ["<think>a</think><answer>7*2+3</answer>", "<answer>7*2+3</answer>",
                   "<think>a</think><answer>1</answer>", "nothing"]
    totals, per_func = compute_rewards(
        countdown.REWARD_FUNCS, prompts=["p"] * 4, completions=completions,
        completion_ids=[[1]] * 4, columns={"numbers": NUMBERS[:4], "target": TARGET[:4],
                                           "solution": ["7 * 2 + 3"] * 4})
    assert totals == pytest.approx([1.1, 1.0, 0.1, 0.0])
    assert per_func["countdown_format"] == [0.1, 0.0, 0.1, 0.0]


def test_countdown_last_answer_counts_and_tolerance():
    two = "<answer>1</answer> wait <answer>7 * 2 + 3</answer>"
    assert countdown_answer([two], numbers=[[3, 7, 2]], target=[17]) == [1.0]
    # 100 / 3 * 3 is exactly 100 in fractions; a target off by 2e-5 is not reached.
    assert check_equation("100 / 3 * 3", [100, 3, 3], 100)
    assert check_equation("100 / 3", [100, 3], 33.333334)  # within 1e-5
    assert not check_equation("100 / 3", [100, 3], 33.33335)


def test_countdown_conversational_completion():
    chat = [[{"role": "assistant", "content": "<think>t</think><answer>7*2+3</answer>"}]]
    assert countdown_answer(chat, numbers=[[3, 7, 2]], target=[17]) == [1.0]
    assert countdown_format(chat) == [0.1]


def test_countdown_well_formed():
    assert countdown.well_formed("<think>t</think><answer>(1 + 2) / 3</answer>")
    assert not countdown.well_formed("<think>t</think><answer>one plus two</answer>")
    assert not countdown.well_formed("<answer>1 + 2</answer>")


# --- countdown: the safe parser ---


@pytest.mark.parametrize("text", [
    "x + 1",                        # name
    "__import__('os').system('true')",  # call + attribute
    "abs(-3)",                      # call
    "(1).real",                     # attribute
    "2 ** 3",                       # power
    "9 ** 9 ** 9",                  # huge exponent: rejected before computing anything
    "1000001 * 2",                  # literal above MAX_NUMBER
    "1.5 * 2",                      # float literal
    "True + 1",                     # bool is an int subclass
    "7 // 2", "7 % 2", "1 << 40", "3 & 1",  # operators beyond + - * /
    "[1][0]", "'1' + '2'", "lambda: 1", "1 < 2", "+3",
    "", "   ", "1 +", "(" * 150 + "1" + ")" * 150,   # empty, syntax error, too long
    "3 / (2 - 2)",                  # division by zero
])
def test_parser_rejects(text):
    with pytest.raises(UnsafeExpression):
        parse_expression(text)
    assert not check_equation(text, [1, 2, 3], 6)


def test_parser_never_evals(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert parse_expression("(1 + 2) * -3 / 4") == (Fraction(-9, 4), [1, 2, 3, 4])
    started = time.perf_counter()
    with pytest.raises(UnsafeExpression, match=r"Pow is not allowed"):
        parse_expression("9 ** 9 ** 9 ** 9")
    assert time.perf_counter() - started < 0.1


# --- JSONL ---


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_gsm8k_style(tmp_path):
    path = _write(tmp_path / "gsm.jsonl", [
        json.dumps({"question": "2 + 2?", "answer": "Two and two.\n#### 4"}),
        "",
        json.dumps({"question": "Big?", "answer": "It is #### 1,234", "id": 7}),
    ])
    task = jsonl_task(path, prompt_field="question", answer_field="answer", eval_fraction=0.0)
    rows = task.splits(seed=0)["train"]
    assert rows == [
        {"prompt": [{"role": "user", "content": "2 + 2?"}], "answer": "4"},
        {"prompt": [{"role": "user", "content": "Big?"}], "answer": "1234", "id": 7},
    ]
    totals, _ = compute_rewards(task.reward_funcs, prompts=["a", "b"],
                                completions=["so 4", "1,234 total? no: 1,234"],
                                completion_ids=[[1], [1]], columns={"answer": ["4", "1234"]})
    assert totals == [1.0, 1.0]


def test_jsonl_split_by_seed(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(200)]
    path = _write(tmp_path / "d.jsonl", lines)
    task = jsonl_task(path, eval_fraction=0.25, chat=False)
    first, again, other = task.splits(seed=0), task.splits(seed=0), task.splits(seed=1)
    assert first == again and first != other
    assert len(first["train"]) + len(first["eval"]) == 200
    assert 30 <= len(first["eval"]) <= 70
    assert not {r["prompt"] for r in first["train"]} & {r["prompt"] for r in first["eval"]}
    assert isinstance(first["train"][0]["prompt"], str)  # chat=False keeps plain text


def test_jsonl_separate_eval_file(tmp_path):
    train = _write(tmp_path / "t.jsonl", [json.dumps({"prompt": "a", "answer": 1})])
    held = _write(tmp_path / "e.jsonl", [json.dumps({"prompt": "b", "answer": 2})])
    rows = jsonl_task(train, eval_path=held).splits(seed=0)
    assert [r["answer"] for r in rows["train"]] == ["1"]
    assert [r["answer"] for r in rows["eval"]] == ["2"]


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*missing.jsonl' does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    good = _write(tmp_path / "good.jsonl", ['{"prompt": "a", "n": 1}', "", '{"prompt": "b"}'])
    assert read_jsonl(good) == [{"prompt": "a", "n": 1}, {"prompt": "b"}]
    bad = _write(tmp_path / "bad.jsonl", ['{"prompt": "a"}', "", '{"prompt": "b",'])
    with pytest.raises(ValueError, match=r"bad.jsonl:3 is not valid JSON"):
        read_jsonl(bad)
    listed = _write(tmp_path / "list.jsonl", ['{"prompt": "a"}', "[1, 2]"])
    with pytest.raises(ValueError, match=r"list.jsonl:2 is a JSON list, not an object"):
        read_jsonl(listed)
    fields = _write(tmp_path / "f.jsonl", ['{"question": "a", "answer": 1}',
                                           '{"question": "b", "solution": 2}'])
    with pytest.raises(ValueError, match=r"f.jsonl:1 has no field 'prompt'.*--prompt-field"):
        jsonl_task(fields)
    with pytest.raises(ValueError, match=r"f.jsonl:2 has no field 'answer'.*--answer-field"):
        jsonl_task(fields, prompt_field="question")
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match=r"has no rows"):
        read_jsonl(empty)
    typed = _write(tmp_path / "typed.jsonl", ['{"prompt": 5, "answer": 1}'])
    with pytest.raises(ValueError, match=r"typed.jsonl:1: field 'prompt' must be a string"):
        jsonl_task(typed)


def test_jsonl_null_or_empty_answer_is_an_error(tmp_path):
    """A null or empty reference would score 0 on every completion, silently."""
    null = _write(tmp_path / "null.jsonl", [json.dumps({"question": "q0", "answer": "1"}),
                                            json.dumps({"question": "q1", "answer": None})])
    with pytest.raises(ValueError, match=r"null.jsonl:2: field 'answer' is null; give the row "
                                         r"a reference answer, or drop the row, or set "
                                         r"--answer-field"):
        jsonl_task(null, prompt_field="question")
    named = _write(tmp_path / "named.jsonl", [json.dumps({"prompt": "q", "sol": None})])
    with pytest.raises(ValueError, match=r"named.jsonl:1: field 'sol' is null"):
        jsonl_task(named, answer_field="sol")
    for answer in ("", "   "):
        blank = _write(tmp_path / "blank.jsonl", [json.dumps({"prompt": "q", "answer": answer})])
        with pytest.raises(ValueError, match=r"blank.jsonl:1: field 'answer' is empty; give "
                                             r"the row a reference answer"):
            jsonl_task(blank)
    cut = _write(tmp_path / "cut.jsonl", [json.dumps({"prompt": "q", "answer": "so ####  "})])
    with pytest.raises(ValueError, match=r"cut.jsonl:1: field 'answer' is empty after '####'"):
        jsonl_task(cut)
    held = _write(tmp_path / "held.jsonl", [json.dumps({"prompt": "q", "answer": None})])
    good = _write(tmp_path / "good.jsonl", [json.dumps({"prompt": "q", "answer": 0})])
    with pytest.raises(ValueError, match=r"held.jsonl:1: field 'answer' is null"):
        jsonl_task(good, eval_path=held)
    # a falsy but real answer is fine; without an answer field, nothing is checked
    assert jsonl_task(good, eval_fraction=0).splits()["train"][0]["answer"] == "0"
    assert jsonl_task(held, answer_field=None, eval_fraction=0).splits()["train"] == [
        {"prompt": [{"role": "user", "content": "q"}], "answer": None}]


@pytest.mark.parametrize(("answer", "shown"), [
    ("NaN", "NaN"), ("[1, 2]", r"\[1, 2\]"), ('{"a": 1}', r'\{"a": 1\}'), ("true", "true"),
    ('"x"', '"x"'), ('"the answer is 42"', '"the answer is 42"'), ('"inf"', '"inf"'),
], ids=["nan", "list", "object", "bool", "text", "sentence", "inf"])
def test_jsonl_answer_must_be_a_number_for_last_number(tmp_path, answer, shown):
    """last_number compares float(answer): any of these would score 0 forever, silently."""
    path = tmp_path / "n.jsonl"
    path.write_text('{"prompt": "q", "answer": 1}\n{"prompt": "q", "answer": ' + answer + "}\n")
    with pytest.raises(ValueError, match=rf"n.jsonl:2: field 'answer' is {shown}, which is not "
                                         r"a number.*last_number.*--reward"):
        jsonl_task(path)
    with pytest.raises(ValueError, match=r"n.jsonl:2: field 'answer'.*not a number"):
        dataset_task(path)  # train/eval without --reward: the last-number reward scores it
    # A run with its own reward (exact_match, say) may compare any answer.
    assert len(dataset_task(path, has_reward=True, answer_field="answer").splits()["train"]
               + dataset_task(path, has_reward=True, answer_field="answer").splits()["eval"]) == 2


def test_jsonl_numeric_answers_in_every_form_are_accepted(tmp_path):
    answers = [42, 3.5, -7, "1,234", " 8 ", "Add them.\n#### 1,024", "1e3", 0]
    path = _write(tmp_path / "ok.jsonl", [json.dumps({"prompt": f"q{i}", "answer": a})
                                          for i, a in enumerate(answers)])
    rows = jsonl_task(path, eval_fraction=0).splits()["train"]
    assert [r["answer"] for r in rows] == ["42", "3.5", "-7", "1234", "8", "1024", "1e3", "0"]


@pytest.mark.parametrize("field", ["prompts", "completions", "completion_ids"])
def test_jsonl_field_named_like_a_reward_keyword_is_refused(tmp_path, field):
    """As a column it would clash with the keyword in every reward function call."""
    path = _write(tmp_path / "k.jsonl", [json.dumps({"prompt": "a", "answer": 1}),
                                         json.dumps({"prompt": "b", "answer": 2, field: "x"})])
    with pytest.raises(ValueError, match=rf"k.jsonl:2: field '{field}' has the name of a "
                                         r"keyword argument.*rename the field"):
        jsonl_task(path)


def test_jsonl_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": 1}\n\n{"prompt": "caf\xe9", "answer": 2}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:3 is not UTF-8 text \(byte 0xe9 at "
                                         r"column 16\); save the file as UTF-8"):
        read_jsonl(path)


def test_jsonl_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"prompt": "a", "answer": 1}\r\n{"prompt": "b"}\r\n')
    assert read_jsonl(path) == [{"prompt": "a", "answer": 1}, {"prompt": "b"}]


def test_jsonl_keeps_chat_prompts(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = _write(tmp_path / "c.jsonl", [json.dumps({"prompt": chat, "answer": "1"})])
    assert jsonl_task(path, eval_fraction=0).splits()["train"][0]["prompt"] == chat


@pytest.mark.parametrize(("messages", "problem"), [
    ([{"role": "system", "content": "x"}, {"role": "user", "content": 5}],
     "message 1 has 'content' = 5, not a string"),
    ([{"role": "user", "content": "x"}, {"role": None, "content": "y"}],
     "message 1 has 'role' = null, not a string"),
    ([{"role": "user", "content": "x"}, {"content": "y"}], "message 1 has no 'role'"),
    ([{"role": "user", "content": "x"}, "y"], "message 1 is a JSON str, not an object"),
], ids=["content", "role", "no-role", "not-object"])
def test_jsonl_chat_messages_are_checked_by_file_line(tmp_path, messages, problem):
    """Checked when read, by file:line (later, only a split's row index could be named)."""
    lines = [json.dumps({"prompt": f"q{i}", "answer": i}) for i in range(6)]
    lines.insert(3, "")
    lines.append(json.dumps({"prompt": messages, "answer": 1}))
    path = _write(tmp_path / "m.jsonl", lines)
    with pytest.raises(ValueError, match=rf"m.jsonl:8: field 'prompt' {problem}; each chat "
                                         r"message must be an object with a string 'role'"):
        jsonl_task(path)


# --- prompts for tokenizers without a chat template ---
