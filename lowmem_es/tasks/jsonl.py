"""JSONL datasets: one JSON object per line, mapped to rows ``{prompt, answer, ...}``.

``--dataset FILE.jsonl --prompt-field question --answer-field answer`` reads a GSM8K-style
file: the prompt field becomes one user chat message, the answer field the reference,
and a GSM8K solution ("... #### 72") is reduced to its final answer ("72") so the
last-number reward can compare it. Every other field is kept as a column for reward
functions. Errors name the file, the line and the field.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from lowmem_es.data import message_problem
from lowmem_es.rewards.functions import RESERVED_COLUMNS, last_number
from lowmem_es.tasks._split import stable_unit
from lowmem_es.tasks.base import Task

logger = logging.getLogger("lowmem_es")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped); errors name the file and line."""
    return [row for _, row in read_numbered(path)]


def read_numbered(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file.

    The file must be UTF-8; a byte-order mark at its start (Windows editors write one) is
    skipped. Text in another encoding is an error naming the file and the line.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist; pass a JSONL "
                                "file with one JSON object per line")
    rows = []
    try:
        with open(file, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON ({error.msg} at "
                                     f"column {error.colno}); each line must be one JSON "
                                     "object") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number} is a JSON {type(row).__name__}, not an "
                                     "object; each line must be one JSON object like "
                                     '{"prompt": "...", "answer": "..."}')
                rows.append((number, row))
    except UnicodeDecodeError as error:
        raise ValueError(_not_utf8(file, path, error)) from None
    if not rows:
        raise ValueError(f"dataset file {str(path)!r} has no rows")
    return rows


def _not_utf8(file: Path, path: str | os.PathLike, error: UnicodeDecodeError) -> str:
    """The message for a file that is not UTF-8, naming the first undecodable line.

    The text reader decodes in blocks, so its error does not say which line; the file is
    read again as bytes, line by line (a UTF-8 character never contains a newline byte).
    """
    fix = ("; save the file as UTF-8 (e.g. with iconv -f latin1 -t utf-8, or your editor's "
           "'save with encoding')")
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return (f"{path}:{number} is not UTF-8 text (byte 0x{raw[bad.start]:02x} at "
                        f"column {bad.start + 1}){fix}")
    return f"{path} is not UTF-8 text ({error}){fix}"


def final_answer(answer: object) -> str:
    """GSM8K's "reasoning #### 1,234" -> "1234"; any other answer as a stripped string."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip().replace(",", "")


def _reference_answer(answer: object, path: str | os.PathLike, line: int, field: str,
                      numeric: bool = True) -> str:
    """The row's reference answer (see ``final_answer``); a null or empty one is an error.

    Either would silently score 0 on every completion (``str(None)`` is "None"), so the
    row could never be learnt from, and the run would not say why. With ``numeric`` (the
    answer is scored by ``last_number``) the answer must also be a finite number after
    ``final_answer`` (42, "-3.5", "1,234", "... #### 72"): ``last_number`` compares a
    completion's last number with ``float(answer)``, so NaN, a list, an object, a boolean
    or text like "x" would score 0 forever too.
    """
    if answer is None:
        raise ValueError(f"{path}:{line}: field {field!r} is null; give the row a reference "
                         "answer, or drop the row, or set --answer-field to the field that "
                         "holds the reference answer")
    text = final_answer(answer)
    if not text:
        where = " after '####'" if "####" in str(answer) else ""
        raise ValueError(f"{path}:{line}: field {field!r} is empty{where}; give the row a "
                         "reference answer, or drop the row, or set --answer-field to the "
                         "field that holds the reference answer")
    if numeric and not _is_number(answer, text):
        shown = json.dumps(answer, ensure_ascii=False)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(f"{path}:{line}: field {field!r} is {shown}, which is not a number; "
                         "the default last_number reward compares the last number in each "
                         "completion with it, so the row would score 0 on every completion. "
                         "The answer must contain a number (42, -3.5, \"1,234\" or a GSM8K "
                         "solution ending \"#### 42\"); fix or drop the row, or set "
                         "--answer-field to the field that holds it, or give --reward to "
                         "score the rows differently")
    return text


def _is_number(answer: object, text: str) -> bool:
    """Whether ``last_number`` can compare completions with ``answer`` (as ``text``).

    A JSON boolean, list or object never can (``str(True)`` is "True"); a number or a
    string can when ``text`` reads as a finite float, as ``last_number`` reads it.
    """
    if isinstance(answer, (bool, list, dict)):
        return False
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def map_rows(raw: list[tuple[int, dict]], path: str | os.PathLike, prompt_field: str = "prompt",
             answer_field: str | None = "answer", chat: bool = True,
             numeric_answer: bool = True) -> list[dict]:
    """Rows ``{prompt, answer, ...}`` from numbered JSONL objects (see ``read_numbered``).

    A string prompt becomes ``[{"role": "user", "content": ...}]`` when ``chat``; a
    prompt that already is a list of chat messages is kept as it is (each message must
    be an object with a string ``role`` and a string ``content``). A null or empty answer
    is an error naming the file, the line and the field (it could never score), and so is
    one that is not a number when ``numeric_answer`` (the last-number reward scores it).
    A field named like a reward keyword (``RESERVED_COLUMNS``) is an error too: as a
    column it would clash with that keyword in every reward function call.
    """
    rows = []
    for line, raw_row in raw:
        row = dict(raw_row)
        if prompt_field not in row:
            raise ValueError(f"{path}:{line} has no field {prompt_field!r} (fields: "
                             f"{sorted(row)}); set --prompt-field to the field that holds "
                             "the prompt")
        prompt = row.pop(prompt_field)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"{path}:{line}: field {prompt_field!r} is empty")
            prompt = [{"role": "user", "content": prompt}] if chat else prompt
        elif not (isinstance(prompt, list) and prompt):
            raise ValueError(f"{path}:{line}: field {prompt_field!r} must be a string or a "
                             "list of chat messages {'role': ..., 'content': ...}, got "
                             f"{'an empty list' if prompt == [] else type(prompt).__name__}")
        else:
            _check_messages(prompt, path, line, prompt_field)
        mapped = {"prompt": prompt, **{k: v for k, v in row.items() if k != "prompt"}}
        clashing = sorted(set(mapped) & set(RESERVED_COLUMNS))
        if clashing:
            raise ValueError(f"{path}:{line}: field {clashing[0]!r} has the name of a keyword "
                             "argument every reward function is called with "
                             f"({', '.join(RESERVED_COLUMNS)}); rename the field in the "
                             "dataset")
        if answer_field is not None:
            if answer_field not in row:
                raise ValueError(f"{path}:{line} has no field {answer_field!r} (fields: "
                                 f"{sorted(row)}); set --answer-field to the field that "
                                 "holds the reference answer")
            mapped["answer"] = _reference_answer(row[answer_field], path, line, answer_field,
                                                 numeric_answer)
        rows.append(mapped)
    return rows


def _check_messages(messages: list, path: str | os.PathLike, line: int, field: str) -> None:
    """Refuse a chat prompt unless every message is ``{"role": str, "content": str, ...}``.

    Checked here, while the file and line are known: a bad message found later (by the
    chat template or the trainer) could only be named by its row in a split.
    """
    for index, message in enumerate(messages):
        problem = message_problem(message)
        if problem is not None:
            raise ValueError(f"{path}:{line}: field {field!r} message {index} {problem}; "
                             "each chat message must be an object with a string 'role' and a "
                             "string 'content', like {\"role\": \"user\", \"content\": "
                             "\"...\"}")


EVAL_FRACTION = 0.2  # of a --dataset file's rows held out for evaluation (without --eval-dataset)


def jsonl_task(path: str | os.PathLike, prompt_field: str = "prompt",
               answer_field: str | None = "answer", eval_path: str | os.PathLike | None = None,
               eval_fraction: float = EVAL_FRACTION, chat: bool = True,
               numeric_answer: bool = True):
    """A Task over a JSONL file (GSM8K-style last-number reward).

    With ``eval_path`` the two files are the train and eval splits; otherwise rows are
    split by a seeded hash of their line content (``eval_fraction`` to eval), so the
    split is stable when lines are added or reordered. ``numeric_answer`` requires each
    answer to be a number, as the task's last-number reward needs; pass False when the
    rows are scored by other reward functions.
    """

    if not 0 <= eval_fraction < 1:
        raise ValueError(f"`eval_fraction` must be in [0, 1), got {eval_fraction!r}")
    train_rows = map_rows(read_numbered(path), path, prompt_field, answer_field, chat,
                          numeric_answer)
    eval_rows = (map_rows(read_numbered(eval_path), eval_path, prompt_field, answer_field, chat,
                          numeric_answer)
                 if eval_path is not None else None)

    def make_splits(seed: int = 0) -> dict[str, list[dict]]:
        if eval_rows is not None:
            return {"train": list(train_rows), "eval": list(eval_rows)}
        train, held = [], []
        for row in train_rows:
            key = json.dumps(row, sort_keys=True, default=str)
            (held if stable_unit("jsonl", seed, key) < eval_fraction else train).append(row)
        return {"train": train, "eval": held}

    return Task(f"jsonl:{Path(path).name}", f"rows of {path} (last-number reward)",
                make_splits, (last_number,), _well_formed)


def _well_formed(text: str) -> bool:
    from lowmem_es.tasks.arithmetic import well_formed

    return well_formed(text)


def dataset_task(path: str | os.PathLike, *, prompt_field: str | None = None,
                 answer_field: str | None = None, has_reward: bool = False,
                 eval_path: str | os.PathLike | None = None):
    """The Task ``--dataset FILE.jsonl`` means, the same for ``train`` and ``eval``.

    Both commands must build it identically: the held-out split hashes each mapped row,
    so another prompt format (chat messages or plain text) or another answer column
    would move rows between train and eval, and an evaluation would score training rows.
    ``prompt_field`` defaults to "prompt"; ``answer_field`` to "answer" unless the run
    has its own reward functions (``has_reward``: --reward), which may not need one.
    Answers must be numbers only without ``has_reward``: then the last-number reward
    scores them; a run's own reward may compare text (``exact_match``).
    String prompts stay plain text (``fit_prompts`` and ``render_prompt`` format them).
    """
    answer = answer_field or (None if has_reward else "answer")
    return jsonl_task(path, prompt_field or "prompt", answer, eval_path=eval_path, chat=False,
                      numeric_answer=not has_reward)


def check_dataset_splits(splits: dict[str, list[dict]], dataset: str,
                         eval_dataset: str | None, command: str,
                         needed: Sequence[str] = ("train",)) -> None:
    """Say why a split of ``--dataset`` is empty, which the hashed hold-out makes likely
    for a small file: a ``needed`` split that is empty is an error naming the file, the
    split and the fix; an empty held-out split for ``train`` is a warning (evaluations
    then score the training rows)."""
    total = sum(len(rows) for rows in splits.values())
    hint = (f"about {EVAL_FRACTION:.0%} of the rows are held out for evaluation, chosen by "
            "a hash of each row and --seed")
    for name in needed:
        if splits.get(name):
            continue
        if eval_dataset is not None:
            source = dataset if name == "train" else eval_dataset
            raise ValueError(f"the {name} split ({source!r}) has no rows")
        raise ValueError(f"the {name} split of {dataset!r} is empty ({total} rows in all; "
                         f"{hint}); add rows to the file, pass --eval-dataset FILE to "
                         "give the held-out rows separately, or try another --seed")
    if command == "train" and not splits.get("eval") and eval_dataset is None:
        logger.warning("the held-out split of %r is empty (%d rows in all; %s): evaluations "
                       "will score the training rows; add rows or pass --eval-dataset FILE",
                       dataset, total, hint)
