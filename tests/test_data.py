"""Dataset rows on their way to the model (lowmem_es/data.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lowmem_es import data
from lowmem_es.example import char_tokenizer


@pytest.mark.parametrize(("rows", "message"), [
    ([], "empty"),
    ([{"text": "no prompt"}], "row 0 has no 'prompt'"),
    ("prompts.jsonl", "list of dicts"),
    ([{"prompt": "ok"}, {"prompt": 7}], "row 1: field 'prompt' must be"),
    ([{"prompt": ""}], "row 0: field 'prompt'"),
    ([{"prompt": [{"role": "user"}]}], "row 0: field 'prompt'"),
])
def test_validate_rows_names_the_row_and_the_fix(rows, message):
    with pytest.raises(ValueError, match=message):
        data.validate_rows(rows, "train_dataset")


def test_validate_rows_keeps_good_rows_as_a_list():
    rows = ({"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}], "answer": "1"})
    assert data.validate_rows(rows, "rows") == list(rows)


def test_render_prompt():
    tokenizer = char_tokenizer()  # no chat template
    assert data.render_prompt("hello", tokenizer, 0) == "hello"
    with pytest.raises(ValueError, match=r"row 3.*chat template"):
        data.render_prompt([{"role": "user", "content": "hi"}], tokenizer, 3)
    with pytest.raises(ValueError, match=r"row 1.*string or a list of chat messages"):
        data.render_prompt(42, tokenizer, 1)


@pytest.mark.parametrize(("message", "problem"), [
    ({"role": "user", "content": "hi"}, None),
    ("hi", "is a JSON str, not an object"),
    ({"content": "hi"}, "has no 'role'"),
    ({"role": "user", "content": 3}, "has 'content' = 3, not a string"),
])
def test_message_problem(message, problem):
    assert data.message_problem(message) == problem


def test_epoch_order_is_a_seeded_permutation():
    order = data.epoch_order(0, 0, 10)
    assert sorted(order) == list(range(10))
    assert order == data.epoch_order(0, 0, 10)  # a pure function
    assert order != data.epoch_order(0, 1, 10) and order != data.epoch_order(1, 0, 10)


def test_long_prompts_warn_with_the_fix(caplog):
    from lowmem_es.data import warn_long_prompts
    from lowmem_es.example import char_tokenizer

    tokenizer = char_tokenizer()  # one token per character
    with caplog.at_level("WARNING", logger="lowmem_es"):
        assert warn_long_prompts(["abc", "abcdefgh", "ab"], tokenizer, 4) == 1
    assert "1 of 3 prompts are longer than max_prompt_length=4 tokens (longest 8)" in caplog.text
    assert "--max-prompt-length" in caplog.text
    assert warn_long_prompts(["abc"], tokenizer, 4) == 0


def test_fit_prompts():
    rows = [{"prompt": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "What is 2 + 2?"}], "answer": "4"},
            {"prompt": "plain", "answer": "1"}]
    with_template = SimpleNamespace(chat_template="{{ messages }}")
    assert data.fit_prompts(rows, with_template) == rows
    flat = data.fit_prompts(rows, SimpleNamespace(chat_template=None))
    assert flat == [{"prompt": "Be brief.\n\nWhat is 2 + 2?", "answer": "4"},
                    {"prompt": "plain", "answer": "1"}]
    assert isinstance(rows[0]["prompt"], list)  # the input rows are not modified
