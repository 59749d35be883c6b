"""Held-out evaluation: accuracy, mean reward and accuracy among well-formed answers.

``evaluate(model, adapter=..., task=...)`` loads the model once (NF4), scores the base
model (LoRA B = 0 is exactly the base) and then the adapter on the same rows with greedy
decoding, split by split (eval and, where the task has one, transfer), side by side.

Three numbers per split, because a probe on SmolLM2 saw ES learn answer *format* first:
- ``accuracy``: fraction of completions whose total reward is >= ``correct_threshold``;
- ``mean_reward``: mean total reward (partial credit such as a format bonus shows here);
- ``accuracy_well_formed``: accuracy among completions the task calls well-formed
  (``well_formed`` the fraction of those). A gain in ``accuracy`` with a flat
  ``accuracy_well_formed`` is a format gain; a gain in both is a capability gain.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lowmem_es.adapter_io import adapter_settings
from lowmem_es.data import fit_prompts, render_prompt, validate_rows, warn_long_rows
from lowmem_es.rewards.functions import RewardFunc
from lowmem_es.rewards.scoring import RewardScorer, load_reward

logger = logging.getLogger("lowmem_es")


def summarize(totals: Sequence[float], texts: Sequence[str],
              well_formed: Callable[[str], bool] | None, correct_threshold: float
              ) -> dict[str, Any]:
    """The split metrics from per-completion total rewards and completion texts.

    ``accuracy_well_formed`` is None when no completion is well-formed (undefined, not 0).
    """
    if len(totals) != len(texts):
        raise ValueError(f"{len(totals)} rewards for {len(texts)} completions")
    formed = None if well_formed is None else [bool(well_formed(text)) for text in texts]
    return _summary(totals, formed, correct_threshold)


def _summary(totals: Sequence[float], formed: Sequence[bool] | None, correct_threshold: float
             ) -> dict[str, Any]:
    """``summarize`` from per-completion rewards and well-formed flags (None: not judged)."""
    count = len(totals)
    correct = [t >= correct_threshold for t in totals]
    result: dict[str, Any] = {
        "count": count,
        "accuracy": sum(correct) / count if count else 0.0,
        "mean_reward": sum(totals) / count if count else 0.0,
    }
    if formed is not None:
        formed_correct = sum(c for c, f in zip(correct, formed, strict=True) if f)
        result["well_formed"] = sum(formed) / count if count else 0.0
        result["accuracy_well_formed"] = (formed_correct / sum(formed) if any(formed)
                                          else None)
    return result


def make_scorer(tokenizer: Any, rows: Sequence[dict],
                reward_funcs: Sequence[RewardFunc | str], *, max_prompt_length: int = 256,
                reward_weights: Sequence[float] | None = None) -> RewardScorer:
    """The ``RewardScorer`` training would use for ``reward_funcs``, for evaluating ``rows``.

    Also warns once about prompts of ``rows`` longer than ``max_prompt_length`` (they are
    left-truncated, never a crash).
    """
    scorer = RewardScorer(list(reward_funcs), reward_weights)
    warn_long_rows(rows, tokenizer, max_prompt_length)
    return scorer


def evaluate_rows(es_model: Any, tokenizer: Any, rows: Sequence[dict],
                  reward_funcs: Sequence[RewardFunc | str] = (), *, scorer: Any = None,
                  well_formed: Callable[[str], bool] | None = None,
                  correct_threshold: float = 1.0, max_prompt_length: int = 256,
                  max_completion_length: int = 64, rows_per_chunk: int = 0,
                  reward_weights: Sequence[float] | None = None, samples: int = 0,
                  kv_cache_dtype: str = "auto", prefill_chunk: int = 0,
                  sharded: bool = False, label: str = "evaluation") -> dict[str, Any]:
    """Greedy completions of the current (unperturbed) adapter on ``rows``, scored.

    ``scorer`` is the ``RewardScorer`` (or ESTrainer) whose ``score`` to use, e.g. the
    training run's own; without one, ``make_scorer`` builds one from
    ``reward_funcs``. ``samples`` > 0 adds the first few (prompt, completion, reward)
    triples, which is the quickest way to see *what* a model learned.
    ``kv_cache_dtype``: the decode loop's KV cache ("auto" or "int8", lowmem_es.kv_cache).
    ``prefill_chunk``: prompt tokens per prefill pass (0: whole prompts), as the memory
    plan that sized ``rows_per_chunk`` assumed. ``sharded`` (under torchrun; every rank
    must call it then): rank r generates and scores rows r, r + world, ..., and the
    per-row rewards, well-formed flags and samples are gathered, so every rank returns
    what one process would (but ``seconds``). A long evaluation logs its progress
    (``label``: N/M rows) every ``PROGRESS_SECONDS``.
    """
    from lowmem_es import distributed

    rows = validate_rows(rows, "dataset")
    if scorer is None:
        if not reward_funcs:
            raise ValueError("evaluate_rows needs `reward_funcs` or a `scorer`")
        scorer = make_scorer(tokenizer, rows, reward_funcs,
                             max_prompt_length=max_prompt_length, reward_weights=reward_weights)
    prompts = [render_prompt(row["prompt"], tokenizer, i) for i, row in enumerate(rows)]
    started = time.perf_counter()
    mine, completions, totals, _ = score_centre(
        es_model, tokenizer, rows, prompts, scorer, sharded=sharded,
        max_prompt_length=max_prompt_length, max_completion_length=max_completion_length,
        rows_per_chunk=rows_per_chunk, kv_cache_dtype=kv_cache_dtype,
        prefill_chunk=prefill_chunk, progress=_ProgressLog(label))
    texts = [c.text for c in completions]
    columns = [totals]
    if well_formed is not None:
        columns.append([float(bool(well_formed(text))) for text in texts])
    if sharded:
        columns = distributed.gather_rows(mine, columns, len(rows))
    formed = None if well_formed is None else [flag == 1.0 for flag in columns[1]]
    result = _summary(columns[0], formed, correct_threshold)
    result["seconds"] = round(time.perf_counter() - started, 2)
    if samples:
        # The first ``samples`` rows, wherever they were generated: the same as alone.
        shown = [(row, texts[k], totals[k]) for k, row in enumerate(mine) if row < samples]
        if sharded:
            shown = sorted(distributed.gather_json(shown))
        result["samples"] = [{"prompt": prompts[row], "completion": text, "reward": reward}
                             for row, text, reward in shown]
    return result


def score_centre(es_model: Any, tokenizer: Any, rows: Sequence[dict], prompts: Sequence[str],
                 scorer: Any, *, sharded: bool, device: Any = None, **generation: Any
                 ) -> tuple[list[int], list[Any], list[float], dict[str, list]]:
    """Greedy completions of the unperturbed adapter (the centre) on this rank's rows,
    scored: the core of every evaluation (``evaluate_rows`` and ``ESTrainer.evaluate``).

    ``sharded``: rank r takes rows r, r + world, ... (else every row). All prompts go
    into ``generate_population``, so a row gets the same left padding, and so the same
    tokens, as in one process. ``generation`` passes on (lengths, rows per chunk, KV
    cache, prefill chunk, backend, progress). Returns this rank's row indices, their
    completions, total rewards and per-function rewards (``scorer.score``'s).
    """
    from lowmem_es import distributed
    from lowmem_es.generate import generate_population

    mine = distributed.shard_rows(len(rows)) if sharded else list(range(len(rows)))
    if not mine:
        return mine, [], [], {}
    if device is None:
        device = next(es_model.model.parameters()).device
    completions = generate_population(es_model, tokenizer, prompts, [(None, i) for i in mine],
                                      temperature=0.0, device=device, **generation)
    totals, per_func = scorer.score(rows, mine, completions)
    return mine, completions, totals, per_func


PROGRESS_SECONDS = 30.0  # how often a long evaluation says how far it is


class _ProgressLog:
    """``generate_population``'s progress callback: "LABEL: N/M rows (T s)" at most every
    ``PROGRESS_SECONDS``, so an evaluation of minutes does not look hung."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.last >= PROGRESS_SECONDS:
            self.last = now
            logger.info("%s: %d/%d rows (%.0f s)", self.label, done, total, now - self.started)


def _same_model(trained_on: str, model: str | os.PathLike) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names ``model`` (paths resolved,
    so ``runs/m`` and ``./runs/m/`` or a symlink to it are the same model)."""
    if str(trained_on) == str(model):
        return True
    first, second = Path(trained_on).expanduser(), Path(model).expanduser()
    if first.exists() and second.exists():
        return first.resolve() == second.resolve()
    return False


def evaluate(model: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
             task: Any = None, splits: dict[str, list[dict]] | None = None,
             split_names: Sequence[str] = ("eval", "transfer"), seed: int = 0,
             reward_funcs: Sequence[RewardFunc | str] | None = None,
             correct_threshold: float | None = None, include_base: bool = True,
             max_prompt_length: int = 256, max_completion_length: int = 64,
             rows_per_chunk: int = 0, limit: int | None = None, samples: int = 0,
             device: str = "auto", profile: str | None = None,
             kv_cache_dtype: str | None = None, sharded: bool = False,
             trust_remote_code: bool = False) -> dict[str, Any]:
    """Base model and adapter side by side on the task's held-out splits.

    ``profile`` (a VRAM profile name or path) loads and generates as a training run under
    it would: its device and compute dtype, the input embedding in host memory if it says
    so, its KV-cache dtype, and, unless ``rows_per_chunk`` is given, the rows per chunk the
    memory planner fits (``PlanError`` before loading if not even one row fits).
    ``kv_cache_dtype`` ("auto" or "int8") overrides the profile's. ``sharded`` (under
    torchrun, called on every rank): each rank generates every world-th row of each split
    and every rank returns the whole report (see ``evaluate_rows``). ``trust_remote_code``
    lets transformers run the model repository's own code (off unless asked).

    ``task`` is a Task or a registered name (``splits`` may give rows directly instead);
    its reward functions, well-formed test and threshold apply unless overridden.
    Returns ``{"model", "adapter", "task", "splits": {split: {"base": metrics,
    "adapter": metrics}}}``; ``limit`` caps rows per split.
    """
    from lowmem_es.lora import attach_es_lora, first_adaptable_linear
    from lowmem_es.model import load_model
    from lowmem_es.tasks import get_task

    if isinstance(task, str):
        task = get_task(task)
    if task is None and splits is None:
        raise ValueError("give a `task` (name or Task) or `splits` to evaluate on")
    if splits is None:
        splits = task.splits(seed=seed)
    if reward_funcs is None:
        if task is None:
            raise ValueError("`reward_funcs` is required when evaluating plain `splits`")
        reward_funcs = list(task.reward_funcs)
    reward_funcs = [load_reward(f) for f in reward_funcs]
    threshold = correct_threshold if correct_threshold is not None else (
        task.correct_threshold if task is not None else 1.0)
    well_formed = task.well_formed if task is not None else None
    chosen = [name for name in dict.fromkeys(split_names) if name in splits]
    if not chosen:
        raise ValueError(f"none of the splits {list(split_names)} exist; the task has "
                         f"{sorted(splits)}")
    settings = adapter_settings(adapter) if adapter is not None else None
    if settings and settings["base_model"] and not _same_model(settings["base_model"], model):
        logger.warning("adapter %s was trained on %s, evaluating it on %s", adapter,
                       settings["base_model"], model)
    card = None
    compute_dtype = "auto"
    if profile is not None:
        from lowmem_es.profiles import load_profile

        card = load_profile(profile)
        device = card.device if device == "auto" else device
        compute_dtype = card.compute_dtype
        if kv_cache_dtype is None:
            kv_cache_dtype = card.run_kv_cache_dtype
    kv_cache_dtype = kv_cache_dtype or "auto"
    prefill_chunk = 0
    if card is not None and not rows_per_chunk:  # plan before loading any weights
        from lowmem_es.planner import plan, read_model_config

        config = read_model_config(str(model))
        if settings is None:  # base only: as below, named from the config (no weights yet)
            settings = {"rank": 1, "alpha": 1.0,
                        "target_modules": [_first_linear_name_of_config(config)]}
        most_rows = max(len(splits[name]) if limit is None else min(limit, len(splits[name]))
                        for name in chosen)
        planned = plan(config, card, settings["rank"], settings["target_modules"], 1,
                       max(1, most_rows), max_prompt_length=max_prompt_length,
                       max_completion_length=max_completion_length,
                       kv_cache_dtype=kv_cache_dtype)
        # The plan's rows assume its prefill chunking: evaluation must prefill the same way.
        rows_per_chunk, prefill_chunk = planned.rows_per_chunk, planned.prefill_chunk
    base, tokenizer, _ = load_model(model, device=device, compute_dtype=compute_dtype,
                                    trust_remote_code=trust_remote_code,
                                    embedding_on_cpu=bool(card and card.embedding_on_cpu))
    if settings is None:  # base only: a rank-1 adapter with B = 0 adds exactly zero
        settings = {"rank": 1, "alpha": 1.0, "target_modules": [first_adaptable_linear(base)]}
    es_model = attach_es_lora(base, settings["target_modules"], settings["rank"],
                              settings["alpha"], base_model_name_or_path=str(model))
    masters = es_model.parameters()
    base_masters = {name: tensor.detach().clone() for name, tensor in masters.items()}
    adapter_masters = None
    if adapter is not None:
        # Load (and so validate) the adapter before spending minutes on the base model;
        # the base is then evaluated with the freshly attached masters (B = 0) restored.
        es_model.load_adapter(adapter)
        adapter_masters = {name: tensor.detach().clone() for name, tensor in masters.items()}
    rows_by_split = {}
    for name in chosen:
        rows = fit_prompts(splits[name], tokenizer)
        rows_by_split[name] = rows[:limit] if limit is not None else rows
    every_row = [row for rows in rows_by_split.values() for row in rows]
    scorer = make_scorer(tokenizer, every_row, reward_funcs,
                         max_prompt_length=max_prompt_length)
    common = dict(scorer=scorer, well_formed=well_formed, correct_threshold=threshold,
                  max_prompt_length=max_prompt_length,
                  max_completion_length=max_completion_length, rows_per_chunk=rows_per_chunk,
                  samples=samples, kv_cache_dtype=kv_cache_dtype, prefill_chunk=prefill_chunk,
                  sharded=sharded)
    report: dict[str, Any] = {"model": str(model), "adapter": str(adapter) if adapter else None,
                              "task": task.name if task is not None else None,
                              "correct_threshold": threshold, "rows_per_chunk": rows_per_chunk,
                              "prefill_chunk": prefill_chunk,
                              "kv_cache_dtype": kv_cache_dtype, "splits": {}}
    for name in chosen:
        report["splits"][name] = {}
    variants = (["base"] if include_base or adapter is None else []) + (
        ["adapter"] if adapter is not None else [])
    for variant in variants:
        chosen_masters = adapter_masters if variant == "adapter" else base_masters
        for name, tensor in masters.items():
            tensor.data.copy_(chosen_masters[name])
        for name in chosen:
            logger.info("evaluating the %s on %s (%d rows)", "base model" if variant == "base"
                        else "adapter", name, len(rows_by_split[name]))
            report["splits"][name][variant] = evaluate_rows(
                es_model, tokenizer, rows_by_split[name], label=f"{variant} on {name}",
                **common)
    return report


def _first_linear_name_of_config(config: dict[str, Any]) -> str:
    """The first linear layer LoRA may target in the model a config describes (the
    planner's meta-device build): what ``lora.first_adaptable_linear`` gives once loaded."""
    from lowmem_es.planner import model_shape

    return model_shape(config).linears[0][0].rpartition(".")[2]


def format_report(report: dict[str, Any]) -> str:
    """A small text table: one line per split, base and adapter side by side."""
    def cell(metrics: dict[str, Any] | None, key: str) -> str:
        if metrics is None or metrics.get(key) is None:
            return "-"
        return f"{metrics[key]:.3f}"

    lines = [f"model {report['model']}  adapter {report['adapter'] or '-'}  "
             f"task {report['task'] or '-'}  (correct: reward >= {report['correct_threshold']})",
             f"{'split':<10}{'rows':>6}  {'accuracy':>17}  {'mean reward':>17}  "
             f"{'acc. well-formed':>17}  {'well-formed':>17}",
             f"{'':<10}{'':>6}  {'base -> adapter':>17}  {'base -> adapter':>17}  "
             f"{'base -> adapter':>17}  {'base -> adapter':>17}"]
    for name, result in report["splits"].items():
        base, tuned = result.get("base"), result.get("adapter")
        count = (base or tuned or {}).get("count", 0)
        cells = [f"{cell(base, key):>7} -> {cell(tuned, key):<6}"
                 for key in ("accuracy", "mean_reward", "accuracy_well_formed", "well_formed")]
        lines.append(f"{name:<10}{count:>6}  " + "  ".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def format_samples(report: dict[str, Any]) -> str:
    """The report's sample completions (``samples`` > 0) as text, split by split."""
    lines = []
    for name, result in report["splits"].items():
        for variant, metrics in result.items():
            for number, sample in enumerate(metrics.get("samples", []), start=1):
                lines.append(f"--- {name} / {variant} sample {number} (reward "
                             f"{sample['reward']:.3f})")
                lines.append(f"prompt: {sample['prompt']!r}")
                lines.append(f"completion: {sample['completion']!r}")
    return "\n".join(lines)
