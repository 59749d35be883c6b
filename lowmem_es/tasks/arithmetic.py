"""``arithmetic``: procedurally generated arithmetic questions in graded difficulty levels.

Each level is a finite space of problems, enumerated and assigned to a split by a seeded
hash of the problem (``_split.split_of``), so train, eval and transfer never share a
problem. Train and eval use the same phrasings ("What is 7 * 8?"); the transfer split
uses phrasings that never appear in training ("What is 7 times 8?"), so a gain there
is a capability on new problems, not memorised answers or one memorised template.

Levels (``difficulty`` column):
    1: a + b, a - b (a >= b), a * b with a, b in 1..12            (366 problems)
    2: two-digit +/- one-digit                                       (1,620 problems)
    3: two-digit +/- two-digit (non-negative), two-digit * one-digit (12,915 problems)
    4: three one-digit operands with + and -, non-negative result   (2,139 problems)
Reward: 1.0 when the last number of the completion equals the answer (GSM8K style), plus
0.1 when the completion is well-formed (ends on its final number).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from lowmem_es.rewards.functions import completion_text, last_number
from lowmem_es.tasks._split import split_of, stable_int, stable_unit

LEVELS = (1, 2, 3, 4)
# Held-out splits get 30% each: ES learns from ~150 level-1 problems, but a held-out set of
# ~60 rows measured accuracy only to +-6 points (one standard error), too coarse for a +10 goal.
FRACTIONS = {"train": 0.4, "eval": 0.3, "transfer": 0.3}
TRAIN_TEMPLATES = ("What is {expr}?", "Calculate {expr}.", "{expr} = ?")
TRANSFER_TEMPLATES = ("What is {words}?", "Work out {words}.")
_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def _problems(level: int) -> Iterator[tuple[list[int], list[str]]]:
    """Every problem of a level as (operands, operators)."""
    if level == 1:
        for a in range(1, 13):
            for b in range(1, 13):
                yield [a, b], ["+"]
                if a >= b:
                    yield [a, b], ["-"]
                yield [a, b], ["*"]
    elif level == 2:
        for a in range(10, 100):
            for b in range(1, 10):
                yield [a, b], ["+"]
                yield [a, b], ["-"]
    elif level == 3:
        for a in range(10, 100):
            for b in range(10, 100):
                yield [a, b], ["+"]
                if a >= b:
                    yield [a, b], ["-"]
            for b in range(2, 10):
                yield [a, b], ["*"]
    elif level == 4:
        for a in range(1, 10):
            for b in range(1, 10):
                for c in range(1, 10):
                    for ops in (["+", "+"], ["+", "-"], ["-", "+"], ["-", "-"]):
                        if _evaluate([a, b, c], ops) >= 0:
                            yield [a, b, c], ops
    else:
        raise ValueError(f"arithmetic `level` must be one of {list(LEVELS)}, got {level!r}")


def _evaluate(operands: Sequence[int], operators: Sequence[str]) -> int:
    """Value with the usual precedence (* before + and -)."""
    terms = [operands[0]]
    signs = [1]
    for op, value in zip(operators, operands[1:], strict=True):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def _expression(operands: Sequence[int], operators: Sequence[str], words: bool = False) -> str:
    parts = [str(operands[0])]
    for op, value in zip(operators, operands[1:], strict=True):
        parts += [_WORDS[op] if words else op, str(value)]
    return " ".join(parts)


def render(operands: Sequence[int], operators: Sequence[str], template: str) -> list[dict]:
    """The chat prompt of one problem (one user message; the chat template adds the rest)."""
    text = template.format(expr=_expression(operands, operators),
                           words=_expression(operands, operators, words=True))
    return [{"role": "user", "content": text}]


def splits(seed: int = 0, levels: Sequence[int] = (1,), train_size: int | None = None,
           eval_size: int | None = None, transfer_size: int | None = None
           ) -> dict[str, list[dict]]:
    """Rows ``{prompt, answer, difficulty, problem}`` of the train, eval and transfer splits.

    A problem's split, phrasing and position are pure functions of (seed, problem), so a
    given seed always renders the same rows. ``*_size`` caps a split (None: all of it).
    """
    if isinstance(levels, int):
        levels = (levels,)
    out: dict[str, list[tuple[float, dict]]] = {name: [] for name in FRACTIONS}
    for level in levels:
        for operands, operators in _problems(level):
            key = _expression(operands, operators)
            split = split_of(key, seed, FRACTIONS)
            templates = TRANSFER_TEMPLATES if split == "transfer" else TRAIN_TEMPLATES
            template = templates[stable_int(0, len(templates) - 1, "template", seed, key)]
            row = {"prompt": render(operands, operators, template),
                   "answer": str(_evaluate(operands, operators)), "difficulty": level,
                   "problem": key}
            out[split].append((stable_unit("order", seed, key), row))
    sizes = {"train": train_size, "eval": eval_size, "transfer": transfer_size}
    result = {}
    for name, keyed in out.items():
        rows = [row for _, row in sorted(keyed, key=lambda item: item[0])]
        result[name] = rows[:sizes[name]] if sizes[name] is not None else rows
    return result


# Deliberately lenient, and unchanged since the embedded default was measured: a final
# number may carry commas anywhere ("56," or "1,2" still end in a number here), unlike
# rewards.functions.NUMBER_PATTERN, which reads commas only as thousands separators. Changing it
# changes the default's format reward and its README figures.
_FINAL_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?\s*\.?\s*$")


def well_formed(text: str) -> bool:
    """The completion ends on its final number ("56", "7 * 8 = 56.", "It is 56.").

    A completion cut off mid-sentence, or ending in words, has no well-defined answer;
    accuracy among well-formed completions separates knowing the answer from format.
    """
    return bool(_FINAL_NUMBER.search(text.strip()))


FORMAT_REWARD = 0.1


def arithmetic_format(completions: list, **kwargs: Any) -> list[float]:
    """0.1 when the completion is well-formed: it stops on its final number.

    Without it, training with a short completion budget never sees what follows the
    answer, and the model learns to answer and then ramble ("56\n\nI can't believe
    it!..."), which a longer evaluation budget scores as a wrong last number. Small
    next to the 1.0 for a correct answer, like the Countdown paper's format term.
    """
    return [FORMAT_REWARD if well_formed(completion_text(c)) else 0.0 for c in completions]


REWARD_FUNCS = (last_number, arithmetic_format)
