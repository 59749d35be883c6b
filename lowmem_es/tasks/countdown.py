"""``countdown``: the ES paper's Countdown puzzles and reward, with a safe expression parser.

A puzzle gives 3-4 numbers and a target; the model must write an equation that uses each
number exactly once with + - * / and parentheses. Puzzles are generated from a seed: the
numbers are drawn, combined by a random expression tree, and the tree's value is the
target, so every puzzle is reachable (the row's ``solution`` column holds that witness).

Reward (as in the paper, following TinyZero): 0.1 for the format ``<think>...</think>``
followed by ``<answer>...</answer>``, plus 1.0 when the answer's equation is correct.
Answers are parsed with ``ast`` and evaluated exactly over fractions by walking the tree;
nothing is ever ``eval``-ed: names, calls, attributes, ``**``, float literals and huge
numbers are all rejected.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from lowmem_es.rewards.functions import completion_text
from lowmem_es.tasks._split import stable_int, stable_unit

MAX_NUMBER = 10**6  # a literal above this is not a Countdown number: reject, don't compute
MAX_EXPRESSION_CHARS = 200
TOLERANCE = 1e-5
EVAL_STREAM = 1 << 40  # eval puzzles are indices from here on; train's are 0, 1, 2, ...
FORMAT_REWARD = 0.1
ANSWER_REWARD = 1.0
PROMPT = ("Using the numbers {numbers}, create an equation that equals {target}. You can use "
          "basic arithmetic operations (+, -, *, /) and each number can only be used once. "
          "Show your work in <think> </think> tags. And return the final answer in <answer> "
          "</answer> tags, for example <answer> (1 + 2) / 3 </answer>.")

_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class UnsafeExpression(ValueError):
    """An answer that is not a plain arithmetic expression over integer literals."""


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """(exact value, integer literals used) of ``text``, or UnsafeExpression.

    Accepted: integer literals, binary + - * /, unary minus, parentheses. Everything
    else (names, calls, attributes, subscripts, ``**``, ``//``, floats, strings,
    comparisons) is rejected before any arithmetic happens.
    """
    if not isinstance(text, str) or not text.strip():
        raise UnsafeExpression("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise UnsafeExpression(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError) as error:
        raise UnsafeExpression(f"not an expression: {error}") from None
    numbers: list[int] = []
    return _value(tree.body, numbers), numbers


_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b}


def _value(node: ast.AST, numbers: list[int]) -> Fraction:
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:  # bool is an int subclass; floats/strings rejected
            raise UnsafeExpression(f"literal {node.value!r} is not an integer")
        if abs(node.value) > MAX_NUMBER:
            raise UnsafeExpression(f"number {node.value} is larger than {MAX_NUMBER}")
        numbers.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand, numbers)
    if isinstance(node, ast.BinOp):
        if type(node.op) in _BINARY:
            return _BINARY[type(node.op)](_value(node.left, numbers), _value(node.right, numbers))
        if isinstance(node.op, ast.Div):
            left, right = _value(node.left, numbers), _value(node.right, numbers)
            if right == 0:
                raise UnsafeExpression("division by zero")
            return left / right
        raise UnsafeExpression(f"operator {type(node.op).__name__} is not allowed (+ - * / only)")
    raise UnsafeExpression(f"{type(node).__name__} is not allowed (numbers, + - * / and "
                           "parentheses only)")


def extract_answer(text: str) -> str | None:
    """Contents of the last ``<answer>...</answer>``, or None."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def check_equation(expression: str, numbers: list[int], target: int | float) -> bool:
    """True when ``expression`` uses each of ``numbers`` exactly once and equals ``target``.

    A trailing ``= value`` (e.g. "(1 + 2) * 3 = 9") is allowed and ignored; the left side
    is what is checked.
    """
    expression = expression.split("=", 1)[0]
    try:
        value, used = parse_expression(expression)
    except UnsafeExpression:
        return False
    if Counter(used) != Counter(int(n) for n in numbers):
        return False
    return abs(float(value) - float(target)) <= TOLERANCE


def countdown_format(completions: list, **kwargs: Any) -> list[float]:
    """0.1 when the completion has ``<think>...</think>`` then ``<answer>...</answer>``."""
    return [FORMAT_REWARD if _FORMAT.search(completion_text(c)) else 0.0 for c in completions]


def countdown_answer(completions: list, numbers: list, target: list, **kwargs: Any
                     ) -> list[float]:
    """1.0 when the last ``<answer>`` is an equation over the row's numbers equal to target."""
    rewards = []
    for completion, row_numbers, row_target in zip(completions, numbers, target, strict=True):
        answer = extract_answer(completion_text(completion))
        ok = answer is not None and check_equation(answer, list(row_numbers), row_target)
        rewards.append(ANSWER_REWARD if ok else 0.0)
    return rewards


REWARD_FUNCS = (countdown_format, countdown_answer)


def well_formed(text: str) -> bool:
    """The completion has the think/answer format and its answer parses as an expression."""
    answer = extract_answer(text)
    if not _FORMAT.search(text) or answer is None:
        return False
    try:
        parse_expression(answer.split("=", 1)[0])
    except UnsafeExpression:
        return False
    return True


# --- the generator ---------------------------------------------------------------------------

def make_puzzle(seed: int, index: int, min_numbers: int = 3, max_numbers: int = 4,
                max_value: int = 100, max_target: int = 1000) -> dict:
    """Puzzle ``index`` of ``seed``: a pure function of its arguments.

    Draws numbers in 1..max_value, folds them in a random order with random operators
    into one expression, and keeps the first attempt whose value is a whole number in
    1..max_target (a division is used only when exact). Returns ``{numbers, target,
    solution}``; ``solution`` is the witness that the target is reachable.
    """
    for attempt in range(10_000):
        puzzle = _attempt(seed, index, attempt, min_numbers, max_numbers, max_value)
        if puzzle is not None and 1 <= puzzle["target"] <= max_target:
            return puzzle
    raise RuntimeError(f"no countdown puzzle found for seed {seed}, index {index}")


def _attempt(seed: int, index: int, attempt: int, min_numbers: int, max_numbers: int,
             max_value: int) -> dict | None:
    """One random expression over fresh numbers; None when its value is not a whole number."""
    key = ("countdown", seed, index, attempt)
    count = stable_int(min_numbers, max_numbers, *key, "count")
    numbers = [stable_int(1, max_value, *key, "number", i) for i in range(count)]
    order = sorted(range(count), key=lambda i: stable_unit(*key, "order", i))
    value = Fraction(numbers[order[0]])
    expression = str(numbers[order[0]])
    for step, i in enumerate(order[1:]):
        op = "+-*/"[stable_int(0, 3, *key, "op", step)]
        number = numbers[i]
        if op == "/" and (value / number).denominator != 1:
            op = "+"
        value = {"+": value + number, "-": value - number, "*": value * number,
                 "/": value / number}[op]
        last = step == count - 2
        expression = f"{expression} {op} {number}" if last else f"({expression} {op} {number})"
    if value.denominator != 1:
        return None
    return {"numbers": numbers, "target": int(value), "solution": expression}


def render(numbers: list[int], target: int) -> list[dict]:
    """The chat prompt of a puzzle (TinyZero's wording, as one user message)."""
    return [{"role": "user", "content": PROMPT.format(numbers=numbers, target=target)}]


def splits(seed: int = 0, train_size: int = 1000, eval_size: int = 200,
           min_numbers: int = 3, max_numbers: int = 4) -> dict[str, list[dict]]:
    """Rows ``{prompt, numbers, target, solution}`` of disjoint train and eval splits.

    Train and eval draw from separate index streams; an eval puzzle that happens to
    repeat a train puzzle (same numbers and target) is skipped.
    """
    def row(index: int) -> dict:
        puzzle = make_puzzle(seed, index, min_numbers, max_numbers)
        return {"prompt": render(puzzle["numbers"], puzzle["target"]), **puzzle}

    train = [row(index) for index in range(train_size)]
    seen = {(tuple(sorted(r["numbers"])), r["target"]) for r in train}
    held: list[dict] = []
    index = EVAL_STREAM
    while len(held) < eval_size:
        candidate = row(index)
        if (tuple(sorted(candidate["numbers"])), candidate["target"]) not in seen:
            held.append(candidate)
        index += 1
    return {"train": train, "eval": held}
