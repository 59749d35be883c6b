"""ESTrainer: the ES loop that composes model loading, generation, rewards and ES math.

One iteration: draw a prompt batch (a pure function of seed and iteration), generate a
completion per (member, prompt, generation) row with the members' perturbations active,
score rows with the reward functions, average per member into fitness, shape it and
apply the ES update to the fp32 LoRA masters. The trainer knows nothing about noise or
kernels; it hands seeds and fitnesses to ``lowmem_es.es``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

from lowmem_es import es, noise
from lowmem_es.config import ESConfig, to_toml
from lowmem_es.generate import Completion, generate_population, render_prompt
from lowmem_es.lora import ESLoraModel, Member, attach_es_lora
from lowmem_es.model import load_model
from lowmem_es.rewards import RewardFunc, compute_rewards, load_reward

logger = logging.getLogger("lowmem_es")


def validate_rows(rows: Sequence[dict], name: str) -> list[dict]:
    """Check a dataset is a non-empty list of dicts with a ``prompt``; errors name the row."""
    if rows is None or isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
        raise ValueError(f"`{name}` must be a list of dicts with a 'prompt' key")
    rows = list(rows)
    if not rows:
        raise ValueError(f"`{name}` is empty; give at least one row with a 'prompt'")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"`{name}` row {index} has no 'prompt' key (got "
                             f"{row if not isinstance(row, dict) else sorted(row)}); every row "
                             "needs a 'prompt' plus the columns the reward functions read")
    return rows


class ESTrainer:
    """Fine-tune LoRA adapters of a frozen (NF4) causal LM with Evolution Strategies.

    ``model`` is a path / hub id (loaded in NF4 with LoRA on ``args.lora_target_modules``)
    or a ready ``ESLoraModel`` (then pass ``tokenizer``). ``reward_funcs`` are TRL-style
    reward functions or names accepted by ``lowmem_es.rewards.load_reward``.
    """

    def __init__(self, model: str | os.PathLike | ESLoraModel,
                 reward_funcs: Sequence[RewardFunc | str] | RewardFunc | str,
                 train_dataset: Sequence[dict], eval_dataset: Sequence[dict] | None = None,
                 args: ESConfig | None = None, tokenizer: object | None = None,
                 trust_remote_code: bool = False) -> None:
        self.args = args or ESConfig()
        self.args.validate()
        if callable(reward_funcs) or isinstance(reward_funcs, str):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ValueError("`reward_funcs` is empty; pass at least one reward function")
        self.reward_funcs = [load_reward(f) for f in reward_funcs]
        if self.args.reward_weights is not None and len(self.args.reward_weights) != len(
                self.reward_funcs):
            raise ValueError(f"`reward_weights` has {len(self.args.reward_weights)} entries for "
                             f"{len(self.reward_funcs)} reward functions; give one per function")
        self.train_dataset = validate_rows(train_dataset, "train_dataset")
        self.eval_dataset = (validate_rows(eval_dataset, "eval_dataset")
                             if eval_dataset is not None else None)
        noise.set_backend(self.args.noise_backend)
        if isinstance(model, ESLoraModel):
            if tokenizer is None:
                raise ValueError("`tokenizer` is required when `model` is an ESLoraModel")
            self.es_model, self.tokenizer = model, tokenizer
            self.device = next(model.model.parameters()).device
        else:
            if model is None or str(model) == "":
                raise ValueError("`model` is missing; pass a model directory or hub id")
            base, self.tokenizer, self.device = load_model(
                model, load_in_4bit=self.args.load_in_4bit,
                compute_dtype=self.args.compute_dtype, device=self.args.device,
                trust_remote_code=trust_remote_code)
            self.es_model = attach_es_lora(base, self.args.lora_target_modules,
                                           self.args.lora_rank, self.args.lora_alpha,
                                           seed=self.args.seed,
                                           base_model_name_or_path=str(model))
        self.schedule = es.member_schedule(self.args.population_size, self.args.antithetic)
        self.members = [Member(pair, sign) for pair, sign in self.schedule]
        self.adam_state = es.AdamState(0, {}, {}) if self.args.optimizer == "adam" else None
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self._orders: dict[int, list[int]] = {}

    # --- data ---
    def batch_indices(self, iteration: int) -> list[int]:
        """Dataset rows of an iteration: epoch-wise seeded permutations, a pure function."""
        n = len(self.train_dataset)
        size = self.args.batch_size
        indices = []
        for position in range(iteration * size, iteration * size + size):
            epoch, offset = divmod(position, n)
            if epoch not in self._orders:
                generator = torch.Generator().manual_seed(
                    noise.member_key(self.args.seed, epoch, 0, 0xDA7A))
                self._orders = {epoch: torch.randperm(n, generator=generator).tolist()}
            indices.append(self._orders[epoch][offset])
        return indices

    def _prompts(self, rows: Sequence[dict]) -> list[str]:
        return [render_prompt(row["prompt"], self.tokenizer, i) for i, row in enumerate(rows)]

    # --- scoring ---
    def score(self, rows: Sequence[dict], prompt_index: Sequence[int],
              completions: Sequence[Completion]) -> tuple[list[float], dict[str, list]]:
        """Total reward per completion under the TRL contract (plus each function's values)."""
        conversational = [not isinstance(rows[p]["prompt"], str) for p in prompt_index]
        texts = [[{"role": "assistant", "content": c.text}] if conv else c.text
                 for c, conv in zip(completions, conversational, strict=True)]
        columns: dict[str, list] = {}
        keys = sorted({k for row in rows for k in row if k != "prompt"})
        for key in keys:
            columns[key] = [rows[p].get(key) for p in prompt_index]
        return compute_rewards(self.reward_funcs, prompts=[rows[p]["prompt"] for p in prompt_index],
                               completions=texts, completion_ids=[c.ids for c in completions],
                               columns=columns, weights=self.args.reward_weights)

    # --- one iteration ---
    def step(self, iteration: int) -> dict[str, Any]:
        """Run ES iteration ``iteration`` (evaluate the population, update the masters)."""
        args = self.args
        started = time.perf_counter()
        rows = [self.train_dataset[i] for i in self.batch_indices(iteration)]
        prompts = self._prompts(rows)
        row_spec = [(m, p) for m in range(len(self.members)) for p in range(len(rows))
                    for _ in range(args.num_generations)]
        completions = generate_population(
            self.es_model, self.tokenizer, prompts, row_spec, members=self.members,
            run_seed=args.seed, iteration=iteration, sigma=args.sigma,
            max_prompt_length=args.max_prompt_length,
            max_completion_length=args.max_completion_length, temperature=args.temperature,
            rows_per_chunk=args.rows_per_chunk, device=self.device)
        generated = time.perf_counter()
        totals, _ = self.score(rows, [p for _, p in row_spec], completions)
        per_member = len(rows) * args.num_generations
        fitness = [sum(totals[m * per_member:(m + 1) * per_member]) / per_member
                   for m in range(len(self.members))]
        shaped = es.shape_fitness(fitness, args.fitness_shaping)
        stats = es.es_update(self.es_model.parameters(), self.es_model.tensor_ids(),
                             run_seed=args.seed, iteration=iteration, shaped_fitness=shaped,
                             schedule=self.schedule, learning_rate=args.learning_rate,
                             optimizer=args.optimizer, adam_state=self.adam_state,
                             weight_decay=args.weight_decay, noise_backend=args.noise_backend)
        finished = time.perf_counter()
        tokens = sum(len(c.ids) for c in completions)
        record = {
            "iteration": iteration, "run_seed": args.seed, "sigma": args.sigma,
            "learning_rate": args.learning_rate,
            "members": [[m.pair, m.sign] for m in self.members],
            "prompt_indices": self.batch_indices(iteration),
            "fitness": fitness, "shaped_fitness": [float(f) for f in shaped],
            "reward_mean": sum(fitness) / len(fitness), "reward_max": max(fitness),
            "reward_min": min(fitness), **stats,
            "tokens": tokens, "generate_s": generated - started,
            "update_s": finished - generated, "iteration_s": finished - started,
            "tokens_per_s": tokens / max(generated - started, 1e-9),
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        self.iteration = iteration + 1
        return record

    # --- evaluation ---
    def evaluate(self, dataset: Sequence[dict] | None = None) -> dict[str, float]:
        """Mean reward of the unperturbed adapter (greedy) on ``dataset`` or the eval split."""
        rows = validate_rows(dataset, "dataset") if dataset is not None else (
            self.eval_dataset or self.train_dataset)
        prompts = self._prompts(rows)
        spec = [(None, p) for p in range(len(rows))]
        completions = generate_population(
            self.es_model, self.tokenizer, prompts, spec,
            max_prompt_length=self.args.max_prompt_length,
            max_completion_length=self.args.max_completion_length, temperature=0.0,
            rows_per_chunk=self.args.rows_per_chunk, device=self.device)
        totals, per_func = self.score(rows, list(range(len(rows))), completions)
        result = {"eval_reward": sum(totals) / len(totals)}
        for name, values in per_func.items():
            scored = [v for v in values if v is not None]
            if scored:
                result[f"eval_{name}"] = sum(scored) / len(scored)
        return result

    # --- the loop ---
    def train(self, callback: Callable[[dict[str, Any]], None] | None = None
              ) -> list[dict[str, Any]]:
        """Run ``args.iterations`` iterations; writes run.toml, journal, metrics and adapter."""
        args = self.args
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "run.toml", to_toml(args.to_dict()))
        logger.info("training %d LoRA values (%d tensors), population %d, %d iterations -> %s",
                    self.es_model.num_parameters(), len(self.es_model.tensor_ids()),
                    args.population_size, args.iterations, out)
        started = time.perf_counter()
        first = self.iteration
        with open(out / "journal.jsonl", "a") as journal, \
                open(out / "metrics.jsonl", "a") as metrics:
            for iteration in range(self.iteration, args.iterations):
                record = self.step(iteration)
                journal.write(json.dumps(record) + "\n")
                journal.flush()
                entry = {k: record[k] for k in ("iteration", "reward_mean", "reward_max",
                                                "update_norm", "param_norm", "iteration_s",
                                                "tokens_per_s", "peak_memory_mb")}
                if args.eval_steps and (iteration + 1) % args.eval_steps == 0:
                    entry.update(self.evaluate())
                metrics.write(json.dumps(entry) + "\n")
                metrics.flush()
                self.history.append(entry)
                if callback is not None:
                    callback(entry)
                if args.logging_steps and (iteration + 1) % args.logging_steps == 0:
                    elapsed = time.perf_counter() - started
                    eta = elapsed / (iteration + 1 - first) * (args.iterations - iteration - 1)
                    extra = (f" | eval {entry['eval_reward']:.3f}" if "eval_reward" in entry
                             else "")
                    logger.info("iter %d/%d | reward mean %.3f max %.3f%s | %.1f s/it | "
                                "%.0f tok/s | ETA %s", iteration + 1, args.iterations,
                                entry["reward_mean"], entry["reward_max"], extra,
                                record["iteration_s"], record["tokens_per_s"],
                                _format_seconds(eta))
                if args.save_steps and (iteration + 1) % args.save_steps == 0:
                    self.save_adapter(out / "checkpoints" / f"step_{iteration + 1:06d}")
        self.save_adapter(out / "adapter")
        logger.info("done: adapter written to %s", out / "adapter")
        return self.history

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Write the current (centre) adapter as a PEFT adapter directory."""
        return self.es_model.save_adapter(path)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's peak resident memory on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # not on Linux/macOS: current RSS is the best we have
        return psutil.Process().memory_info().rss / 2**20


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
