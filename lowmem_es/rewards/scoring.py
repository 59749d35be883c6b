"""Loading, guarding and applying reward functions: the one scoring path of training and
evaluation.

``load_reward`` turns a name (a built-in of ``rewards.functions`` or a task's reward) or
a ``module:function`` path into a function; ``guard_reward`` wraps it so that a raise,
a wrong-length list, NaN or inf becomes an error naming the function and the completion;
``compute_rewards`` calls every function under TRL's keyword contract and combines the
weighted values (``None`` = "not applicable", ignored); ``RewardScorer`` holds a run's
loaded, guarded functions and weights. Functions needing the keywords only TRL's trainer
passes (``trainer_state``, ``log_metric``, ``log_extra``) or written as ``async def`` are
refused with that explanation.

Only this module imports ``lowmem_es.tasks`` (the tasks import the leaf
``rewards.functions``), and only inside ``_task_rewards``: importing a task imports the
``lowmem_es.rewards`` package, whose ``__init__`` imports this module.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from lowmem_es.errors import RewardFunctionError
from lowmem_es.rewards.functions import (
    BUILTIN_REWARDS,
    RESERVED_COLUMNS,
    RewardFunc,
)

# Keywords TRL's GRPOTrainer adds that have no meaning here (they are not passed).
TRL_TRAINER_KEYWORDS = ("trainer_state", "log_metric", "log_extra")


def load_reward(spec: str | RewardFunc) -> RewardFunc:
    """A reward function from a built-in name or a ``module:function`` import path."""
    if callable(spec):
        return spec
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    task_rewards = _task_rewards()
    if spec in task_rewards:
        return task_rewards[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}; use a built-in "
                         f"{sorted(BUILTIN_REWARDS) + sorted(task_rewards)} or an import path "
                         "such as 'my_rewards:score'")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r} is not a 'module:function' import path; give both, "
                         "such as 'my_rewards:score'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if _names_module(error.name, module_name):
            raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({error}); "
                             "is it on PYTHONPATH? Run from the directory that holds it, or "
                             "add that directory to PYTHONPATH") from error
        raise ValueError(f"reward {spec!r}: module {module_name!r} was found, but importing "
                         f"it failed: it imports {error.name!r}, which is not installed "
                         f"({error}){_raised_at(error)}; install {error.name!r} or fix the "
                         "module's imports") from error
    except Exception as error:  # any error in the user's module: name it, and where
        text = error.msg if isinstance(error, SyntaxError) else error
        raise ValueError(f"reward {spec!r}: module {module_name!r} was found, but importing "
                         f"it raised {type(error).__name__}: {text}{_raised_at(error)}; fix "
                         "the module so that it imports") from error
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return func


def _names_module(missing: str | None, module_name: str) -> bool:
    """Whether a ModuleNotFoundError for ``missing`` means ``module_name`` itself is absent.

    True when ``missing`` is the module or one of its parent packages (then it is not on
    the path); False when it is another module that ``module_name`` imports (a missing
    dependency of a module that was found, which PYTHONPATH advice would not fix).
    """
    if missing is None:
        return True
    return module_name == missing or module_name.startswith(missing + ".")


def _raised_at(error: BaseException) -> str:
    """" at FILE, line N" for where ``error`` was raised (for a syntax error: where the
    bad code is), skipping importlib's own frames; "" when there is no such place."""
    if isinstance(error, SyntaxError) and error.filename:
        return f" at {error.filename}, line {error.lineno}"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith("<frozen importlib")]
    if not frames:
        return ""
    return f" at {frames[-1].filename}, line {frames[-1].lineno}"


def _task_rewards() -> dict[str, RewardFunc]:
    """Reward functions of the built-in tasks by name (imported here, not at the top: see
    the module docstring)."""
    from lowmem_es.tasks import TASKS

    return {reward_name(func): func for task in TASKS.values() for func in task.reward_funcs
            if reward_name(func) not in BUILTIN_REWARDS}


def reward_name(func: RewardFunc) -> str:
    """The name a reward's values are reported under: its ``__name__``, that of the
    function a ``functools.partial`` wraps, or a callable object's class name."""
    func = _unpartial(func)
    return getattr(func, "__name__", type(func).__name__)


def reward_path(func: RewardFunc) -> str:
    """``module:qualified_name`` of a reward function (what a run's identity records): of
    the function a guard or a ``functools.partial`` wraps, or of a callable object's
    class."""
    func = _unpartial(func)
    while hasattr(func, "__wrapped__"):
        func = _unpartial(func.__wrapped__)
    named = func if hasattr(func, "__qualname__") else type(func)
    return f"{_public_module(named)}:{named.__qualname__}"


def _public_module(named: Any) -> str:
    """The module a reward is recorded under: where it is defined, except that one of ours
    is named by the shortest lowmem_es package that exports it (``lowmem_es.rewards``, not
    ``lowmem_es.rewards.functions``), so moving code inside the package never changes a
    run's identity (a resume compares it)."""
    module = getattr(named, "__module__", None) or "?"
    if not module.startswith("lowmem_es."):
        return module
    parts = module.split(".")
    for end in range(1, len(parts)):
        parent = sys.modules.get(".".join(parts[:end]))
        if parent is not None and getattr(parent, named.__qualname__, None) is named:
            return parent.__name__
    return module


def _unpartial(func: RewardFunc) -> RewardFunc:
    while isinstance(func, functools.partial):
        func = func.func
    return func


def compute_rewards(reward_funcs: Sequence[RewardFunc], *, prompts: list, completions: list,
                    completion_ids: list[list[int]], columns: dict[str, list],
                    weights: Sequence[float] | None = None
                    ) -> tuple[list[float], dict[str, list[float | None]]]:
    """Weighted total reward per completion, and each function's raw rewards by name.

    ``None`` entries are ignored (TRL's nansum); a completion no function scored gets 0.
    A function returning anything but one finite number (or None) per completion, in a
    list, tuple or 1-d array / tensor, is an error naming it. A column named like one of
    the keywords (``RESERVED_COLUMNS``) is an error naming the column.
    """
    clashing = sorted(set(columns) & set(RESERVED_COLUMNS))
    if clashing:
        raise ValueError(f"dataset column(s) {clashing} have the names of the keyword "
                         f"arguments {list(RESERVED_COLUMNS)} every reward function is "
                         "called with; rename the column(s) in the dataset")
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
        _check_reward_list(values, name, count)
        if len(values) != count:
            raise ValueError(f"reward function {name!r} returned {len(values)} values for "
                             f"{count} completions; it must return one float (or None) per "
                             "completion")
        clean = [_reward_value(value, name, i) for i, value in enumerate(values)]
        per_func[name] = clean
        for i, value in enumerate(clean):
            if value is not None:
                totals[i] += weight * value
    return totals, per_func


def _check_reward_list(values: Any, name: str, count: int) -> None:
    """Refuse a reward function's return value unless it is one reward per completion.

    A list or a tuple is accepted, and a 1-d numpy array or torch tensor (TRL builds a
    tensor from what is returned). Anything else would fail with a bare ``TypeError``
    (a float has no ``len``), or worse be read wrongly: a dict's keys, a set in no order,
    a string's characters. The error names the function and what it returned.
    """
    if isinstance(values, (list, tuple)):
        return
    shape = getattr(values, "shape", None)
    if shape is not None and hasattr(values, "__len__") and not isinstance(values, (str, bytes)):
        if len(tuple(shape)) == 1:
            return
        raise ValueError(f"reward function {name!r} returned a {type(values).__name__} of "
                         f"shape {tuple(shape)} for {count} completions; it must return a "
                         "list (or a 1-d array or tensor) with one float (or None) per "
                         "completion")
    if values is None:
        got = "None"
    else:
        text = repr(values)
        got = f"a {type(values).__name__} ({text[:60] + '...' if len(text) > 60 else text})"
    hint = ""
    if inspect.iscoroutine(values):
        values.close()  # never awaited: close it, or Python warns at exit
        hint = "; an `async def` reward function is not supported: make it a plain function"
    elif isinstance(values, dict):
        hint = "; a dict is not read by its keys or values: return them in completion order"
    elif values is not None and hasattr(values, "__next__"):
        hint = "; build a list from it, e.g. list(...)"
    raise ValueError(f"reward function {name!r} returned {got} for {count} completions; it "
                     "must return a list with one float (or None) per completion, e.g. "
                     f"[1.0, 0.0, None]{hint}")


def _reward_value(value: Any, name: str, index: int) -> float | None:
    """One returned reward as a float, or None for "not applicable" (None or NaN).

    Python, numpy and torch numbers are accepted, as TRL accepts them (it builds a tensor
    from the list): a numpy scalar, a 0-d numpy array or a 0-d torch tensor is read with
    ``.item()``; a bool (Python, numpy or torch) counts 1.0 or 0.0, as in TRL's float
    tensor. A string, a tensor of several elements or +-inf is an error naming the
    function and the completion. NaN counts as None (TRL's nansum). An
    infinite reward would make every member's fitness infinite or NaN, which the ES
    update cannot rank; it is refused here, where the function can still be named.
    """
    if value is None:
        return None
    shape = getattr(value, "shape", None)
    if not isinstance(value, numbers.Real) and shape is not None and callable(
            getattr(value, "item", None)):
        if tuple(shape) != ():
            raise ValueError(f"reward function {name!r} returned a {type(value).__name__} of "
                             f"shape {tuple(shape)} for completion {index}; each reward must "
                             "be one number (a 0-d tensor or array is fine) or None")
        value = value.item()
    if isinstance(value, bool):  # `[c == answer for c in completions]`, TRL-style
        return float(value)
    if not isinstance(value, numbers.Real):
        raise ValueError(f"reward function {name!r} returned {value!r} for completion "
                         f"{index}; rewards must be numbers or None")
    value = float(value)
    if math.isinf(value):
        raise ValueError(f"reward function {name!r} returned {value!r} for completion "
                         f"{index}; rewards must be finite numbers (or None or NaN for "
                         "\"not applicable\")")
    return None if math.isnan(value) else value


def guard_reward(func: RewardFunc) -> RewardFunc:
    """Wrap a reward function so that an exception names the function and the completion.

    On failure the batch is re-scored one completion at a time to find the first one that
    raises, so the user sees the offending text, not just a traceback from deep inside.
    Nothing has been written for the iteration yet, so the last checkpoint is intact. A
    function that needs a dataset column the rows lack (``exact_match`` without an
    ``answer``) is a data problem, not a bug in the function: that error names the column.
    """
    @functools.wraps(func)
    def guarded(**kwargs: Any) -> list:
        try:
            return func(**kwargs)
        except Exception as error:
            name = reward_name(func)
            missing = _missing_arguments(func, kwargs) if isinstance(error, TypeError) else []
            trl_only = [k for k in missing if k in TRL_TRAINER_KEYWORDS]
            if trl_only:
                raise RewardFunctionError(
                    f"reward function {name!r} needs {trl_only}, keyword(s) that only TRL's "
                    "trainer passes (lowmem-es has no TRL trainer state or metric logger); "
                    f"give the parameter(s) a default (e.g. {trl_only[0]}=None) and let the "
                    "function work without them") from error
            if missing:
                have = sorted(k for k in kwargs if k not in RESERVED_COLUMNS)
                raise RewardFunctionError(
                    f"reward function {name!r} needs the dataset column(s) {missing}, which "
                    f"the rows lack (their columns: {have}); add the column(s) to every row "
                    "of the dataset (for --dataset, --answer-field FIELD makes FIELD the "
                    "'answer' column), or choose a reward function that does not need them. "
                    "If a run was started, continue it with --resume: the last checkpoint "
                    "and the journal are intact") from error
            culprit = None
            for i in range(len(kwargs.get("completions", []))):
                single = {k: v[i:i + 1] if isinstance(v, list) else v for k, v in kwargs.items()}
                try:
                    func(**single)
                except Exception:
                    culprit = (i, kwargs["completions"][i])
                    break
            where = (f" on completion {culprit[0]}: {str(culprit[1])[:200]!r}" if culprit
                     else " on the batch (no single completion fails alone)")
            raise RewardFunctionError(f"reward function {name!r} raised "
                                      f"{type(error).__name__}: {error}{where}. Fix the "
                                      "function; if a run was started, continue it with "
                                      "--resume: the last checkpoint and the journal are "
                                      "intact") from error

    # functools.wraps copies no name from a callable object or a partial: name it as
    # reward_name does, or every such function would report as "guarded".
    guarded.__name__ = reward_name(func)
    return guarded


def _missing_arguments(func: RewardFunc, kwargs: dict[str, Any]) -> list[str]:
    """The required parameters of ``func`` that ``kwargs`` does not give (sorted).

    Read from the signature, not from the error text, so a TypeError raised inside the
    function is not mistaken for a missing column. [] when there is no signature to read.
    """
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return []
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted(p.name for p in parameters if p.kind in keyword
                  and p.default is inspect.Parameter.empty and p.name not in kwargs)


class RewardScorer:
    """Reward functions (loaded by name or import path, guarded) with their weights.

    The one place completions of dataset rows become rewards: training (``ESTrainer``) and
    evaluation (``evaluate_rows``) both score through it, so evaluation measures exactly
    what training optimises, with the same checks and error messages.
    """

    def __init__(self, reward_funcs: Sequence[RewardFunc | str] | RewardFunc | str,
                 weights: Sequence[float] | None = None) -> None:
        if callable(reward_funcs) or isinstance(reward_funcs, str):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ValueError("`reward_funcs` is empty; pass at least one reward function")
        self.reward_funcs = [guard_reward(load_reward(f)) for f in reward_funcs]
        # Each function's values are reported under its name: two of one name (two
        # make_regex_reward's, one function twice) get _2, _3 ... instead of colliding.
        seen: dict[str, int] = {}
        for func in self.reward_funcs:
            name = reward_name(func)
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                func.__name__ = f"{name}_{seen[name]}"
        if weights is not None and len(weights) != len(self.reward_funcs):
            raise ValueError(f"`reward_weights` has {len(weights)} entries for "
                             f"{len(self.reward_funcs)} reward functions; give one per function")
        self.weights = list(weights) if weights is not None else None

    def score(self, rows: Sequence[dict], prompt_index: Sequence[int], completions: Sequence[Any]
              ) -> tuple[list[float], dict[str, list]]:
        """Total reward per completion (and each function's values by name).

        Completion ``i`` answers ``rows[prompt_index[i]]``; it has ``.text`` and ``.ids``.
        Rows with chat prompts get conversational completions, as in TRL; every column but
        ``prompt`` is passed to the functions as a keyword list.
        """
        conversational = [not isinstance(rows[p]["prompt"], str) for p in prompt_index]
        texts = [[{"role": "assistant", "content": c.text}] if conv else c.text
                 for c, conv in zip(completions, conversational, strict=True)]
        keys = sorted({k for row in rows for k in row if k != "prompt"})
        columns = {key: [rows[p].get(key) for p in prompt_index] for key in keys}
        return compute_rewards(self.reward_funcs, prompts=[rows[p]["prompt"] for p in prompt_index],
                               completions=texts, completion_ids=[c.ids for c in completions],
                               columns=columns, weights=self.weights)
