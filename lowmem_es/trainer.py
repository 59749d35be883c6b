"""ESTrainer: the ES loop that composes model loading, generation, rewards and ES math.

One iteration: draw a prompt batch (a pure function of seed and iteration), generate a
completion per (member, prompt, generation) row with the members' perturbations active,
score rows with the reward functions, average per member into fitness, shape it and
apply the ES update to the fp32 LoRA masters. The trainer knows nothing about noise or
kernels; it hands seeds and fitnesses to ``lowmem_es.es``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

from lowmem_es import __version__, checkpoint, distributed, es, lora, noise
from lowmem_es.config import NON_RESULT_FIELDS, ESConfig, to_toml
from lowmem_es.errors import KernelError
from lowmem_es.generate import Completion, generate_population, render_prompt
from lowmem_es.kernel_check import check_kernels
from lowmem_es.lora import ESLoraModel, Member, attach_es_lora
from lowmem_es.model import (
    load_model,
    offload_input_embedding,
    prepare_tokenizer,
    resolve_device,
)
from lowmem_es.profiles import Profile, load_profile
from lowmem_es.rewards import (
    RewardFunc,
    RewardScorer,
    member_fitness,
    reward_name,
    reward_path,
)
from lowmem_es.tasks.jsonl import message_problem

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
        prompt = row["prompt"]
        chat = isinstance(prompt, list) and all(message_problem(m) is None for m in prompt)
        if not (isinstance(prompt, str) and prompt) and not (chat and prompt):
            raise ValueError(f"`{name}` row {index}: field 'prompt' must be a non-empty string "
                             "or a list of chat messages {'role': str, 'content': str}, got "
                             f"{type(prompt).__name__} {str(prompt)[:60]!r}")
    return rows


def run_identity(model: str | os.PathLike | ESLoraModel, train_dataset: Sequence[dict],
                 reward_funcs: Sequence[RewardFunc] | None = None) -> dict[str, Any]:
    """What a run trains on, recorded in its checkpoints and compared on resume.

    ``base_model``: the model directory (absolute, when it is a local directory) or hub id;
    ``base_model_config_sha256``: sha256 of its config.json (of the loaded config for an
    ``ESLoraModel`` without a local directory; None when neither exists); ``train_rows``
    and ``train_data_sha256``: the number of training rows and the sha256 of their JSON;
    ``reward_functions``: each reward function as ``module:qualified_name`` (the objective;
    its weights are in the configuration). The weights and the functions' code are not
    hashed; the path, config and names stand for them.
    """
    config_text: bytes | None = None
    if isinstance(model, ESLoraModel):
        name = model.base_model_name_or_path
        config = getattr(model.model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            config_text = config.to_json_string(use_diff=False).encode()
    else:
        name = str(model)
    if name is not None and Path(name).is_dir():
        config_file = Path(name) / "config.json"
        if config_file.is_file():
            config_text = config_file.read_bytes()
        name = str(Path(name).resolve())
    rows = json.dumps(list(train_dataset), sort_keys=True, default=str).encode()
    return {"base_model": name,
            "base_model_config_sha256": (hashlib.sha256(config_text).hexdigest()
                                         if config_text is not None else None),
            "train_rows": len(train_dataset),
            "train_data_sha256": hashlib.sha256(rows).hexdigest(),
            "reward_functions": [reward_path(func) for func in reward_funcs or ()]}


def check_output_dir(args: ESConfig, resume: bool = False, overwrite: bool = False,
                     force: bool = False, identity: dict[str, Any] | None = None) -> bool:
    """Refuse, reading files only, what training into ``args.output_dir`` would refuse.

    Cheap, so callers run it before any model loading or evaluation (ESTrainer's
    constructor does; the CLI and ``run_default`` also before their own model work): a
    mistake then costs seconds, not a base-model evaluation. Refused: an output_dir that
    holds a run without ``resume`` or ``overwrite``; with ``resume``, a configuration whose
    result-changing fields differ from the run's run.toml, or (``identity``, see
    ``run_identity``) another base model or other training rows than the run's newest
    checkpoint records, unless ``force``. Returns whether output_dir holds a run.
    """
    if resume and overwrite:
        raise ValueError("`resume` and `overwrite` exclude each other: resume continues "
                         "the run in output_dir, overwrite deletes it")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} is a file, not a directory; pass "
                         "--output-dir (output_dir=) a directory to write the run into")
    checkpoint.check_unlocked(out)
    journal = out / "journal.jsonl"
    # A run exists once it has a complete checkpoint or a journaled iteration; a kill
    # while the very first checkpoint was being written leaves neither (only a temp
    # dir), and such a run simply starts again.
    steps = [step for step, _ in checkpoint.list_checkpoints(out)]
    has_run = bool(steps) or (journal.is_file() and journal.stat().st_size > 0)
    if not has_run or overwrite:
        return has_run
    if not resume:
        raise ValueError(f"output_dir {str(out)!r} already holds a run; pass --resume "
                         "(resume=True) to continue it or --overwrite (overwrite=True) to "
                         "start over")
    # Done: the newest checkpoint, or further the journal (resume replays its lines). Its
    # line count bounds its records, so it is parsed only when that bound matters.
    done = max(steps, default=0)
    if journal.is_file() and journal.read_bytes().count(b"\n") + 1 > args.iterations:
        done = max(done, len(checkpoint.read_journal(journal)))
    if args.iterations < done:
        raise ValueError(f"cannot resume {str(out)!r} with iterations={args.iterations}: the "
                         f"run has already done {done} iterations. "
                         "`iterations` is the run's total, not how many more to do: pass "
                         f"at least {done}")
    if force:
        return has_run
    saved_config = out / "run.toml"
    if not saved_config.is_file():
        # run.toml is written after the first checkpoint (or was deleted): compare the
        # result hash every checkpoint records instead.
        saved_hash = (checkpoint.newest_state(out) or {}).get("config_hash")
        if saved_hash is not None and saved_hash != args.result_hash():
            raise ValueError(f"cannot resume {str(out)!r}: it has no run.toml and the "
                             "configuration's fields that change results differ from the "
                             "ones its checkpoints record (config_hash "
                             f"{saved_hash} -> {args.result_hash()}). Restore them, or pass "
                             "--force (force=True) to resume anyway")
    if saved_config.is_file():
        saved = ESConfig.from_toml(saved_config).to_dict()
        current = args.to_dict()
        differing = sorted(k for k in current if k not in NON_RESULT_FIELDS
                           and saved.get(k) != current[k])
        if differing:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}"
                                for k in differing)
            raise ValueError(f"cannot resume {str(out)!r}: the configuration changed in "
                             f"fields that change results ({details}). Restore them, or "
                             "pass --force (force=True) to resume anyway")
    state = checkpoint.newest_state(out) or {}
    saved_identity = state.get(IDENTITY_KEY)
    if identity is not None and isinstance(saved_identity, dict):
        _compare_identity(out, saved_identity, identity)
    return has_run


IDENTITY_KEY = "run_identity"  # the trainer_state.json key run_identity() is saved under


def _compare_identity(out: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise when ``current`` names another base model or other training rows than ``saved``."""
    problems = []
    saved_hash = saved.get("base_model_config_sha256")
    current_hash = current.get("base_model_config_sha256")
    if saved.get("base_model") != current.get("base_model") or (
            saved_hash and current_hash and saved_hash != current_hash):
        problems.append(f"base model {saved.get('base_model')!r} (config.json sha256 "
                        f"{str(saved_hash)[:12]}) -> {current.get('base_model')!r} "
                        f"(config.json sha256 {str(current_hash)[:12]})")
    if saved.get("train_data_sha256") != current.get("train_data_sha256"):
        problems.append(f"training data {saved.get('train_rows')} rows (sha256 "
                        f"{str(saved.get('train_data_sha256'))[:12]}) -> "
                        f"{current.get('train_rows')} rows (sha256 "
                        f"{str(current.get('train_data_sha256'))[:12]})")
    saved_rewards = saved.get("reward_functions")  # absent: an older lowmem-es
    if saved_rewards is not None and saved_rewards != current.get("reward_functions"):
        problems.append(f"reward functions {', '.join(saved_rewards)} -> "
                        f"{', '.join(current.get('reward_functions') or [])}")
    if problems:
        raise ValueError(f"cannot resume {str(out)!r}: it was trained on something else "
                         f"({'; '.join(problems)}). Resume with the run's own --model, "
                         "data and --reward, pass another --output-dir to start a new run, "
                         "or pass --force (force=True) to continue this run on the new ones "
                         "anyway "
                         "(the same applies if the model directory only moved)")


def _own_settings(method: Callable) -> Callable:
    """Run an ESTrainer method under its own process-wide settings (the noise backend and
    the NF4 kernel switch), restoring the previous ones after: two trainers in one process
    must not change each other's noise or kernels (the last one built used to win)."""
    @functools.wraps(method)
    def wrapper(self: ESTrainer, *args: Any, **kwargs: Any) -> Any:
        previous = noise.get_backend(), lora.NF4_MATMUL_FORCE
        noise.set_backend(self.args.noise_backend)
        lora.NF4_MATMUL_FORCE = self._nf4_force
        try:
            return method(self, *args, **kwargs)
        finally:
            noise.set_backend(previous[0])
            lora.NF4_MATMUL_FORCE = previous[1]

    return wrapper


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
                 trust_remote_code: bool = False, resume: bool = False,
                 overwrite: bool = False, force: bool = False) -> None:
        if resume and overwrite:
            raise ValueError("`resume` and `overwrite` exclude each other: resume continues "
                             "the run in output_dir, overwrite deletes it")
        self.resume, self.overwrite, self.force = resume, overwrite, force
        self.stopped_early = False
        self._signal: int | None = None
        self.args = args or ESConfig()
        self.args.validate()
        self.scorer = RewardScorer(reward_funcs, self.args.reward_weights)
        self.reward_funcs = self.scorer.reward_funcs
        self.train_dataset = validate_rows(train_dataset, "train_dataset")
        self.eval_dataset = (validate_rows(eval_dataset, "eval_dataset")
                             if eval_dataset is not None else None)
        if model is None or str(model) == "":
            raise ValueError("`model` is missing; pass a model directory or hub id")
        # Base model + training rows, as given (before the CLI fits chat prompts to the
        # tokenizer): saved in every checkpoint, compared on resume.
        self.identity = run_identity(model, self.train_dataset, self.reward_funcs)
        # Before any model loading: a clash with output_dir costs nothing yet.
        check_output_dir(self.args, resume, overwrite, force, self.identity)
        noise.set_backend(self.args.noise_backend)
        lora.NF4_MATMUL_FORCE = None if self.args.nf4_kernel else "torch"
        distributed.setup(self.args.distributed_timeout, resolve_device(self.args.device))
        self.schedule = es.member_schedule(self.args.population_size, self.args.antithetic)
        self.members = [Member(pair, sign) for pair, sign in self.schedule]
        # Under torchrun each rank evaluates a block of whole antithetic pairs.
        self.local_members = distributed.shard_members(self.schedule, distributed.world_size(),
                                                       distributed.rank())
        self.rows_per_chunk = self.args.rows_per_chunk
        self.plan = None
        profile = load_profile(self.args.profile) if self.args.profile else None
        # The plan counts the input embedding as freed when the profile keeps it on the host.
        embedding_on_cpu = profile is not None and profile.embedding_on_cpu
        if profile is not None:  # fit rows and lengths to the budget before loading weights
            self.plan = self._make_plan(model, profile)
            self.rows_per_chunk = self.plan.rows_per_chunk
            logger.info("memory plan (profile %s):\n%s", self.args.profile, self.plan.format())
        if isinstance(model, ESLoraModel):
            if tokenizer is None:
                raise ValueError("`tokenizer` is required when `model` is an ESLoraModel")
            self.es_model, self.tokenizer = model, prepare_tokenizer(tokenizer)
            self._check_lora_settings(model)
            self.device = next(model.model.parameters()).device
            if self.device.type == "cuda" and embedding_on_cpu:
                offload_input_embedding(model.model, self.device)  # as the plan assumed
        else:
            base, self.tokenizer, self.device = load_model(
                model, load_in_4bit=self.args.load_in_4bit,
                compute_dtype=self.args.compute_dtype, device=self.args.device,
                trust_remote_code=trust_remote_code,
                embedding_on_cpu=embedding_on_cpu)
            if tokenizer is not None:  # the caller's (e.g. with its chat template)
                self.tokenizer = prepare_tokenizer(tokenizer)
            self.es_model = attach_es_lora(base, self.args.lora_target_modules,
                                           self.args.lora_rank, self.args.lora_alpha,
                                           seed=self.args.seed,
                                           base_model_name_or_path=str(model))
        self._check_prompt_lengths()
        # First contact of the Triton kernels with this GPU: a kernel that fails to compile
        # or disagrees with its torch twin is switched off, with a warning (on CPU: no-op).
        # Every rank runs it (it agrees on the outcome through one collective).
        self.kernel_status = check_kernels(self.es_model, self.device,
                                           sampling=self.args.temperature > 0)
        broken = [name for name, value in self.kernel_status.items()
                  if "CUDA context was lost" in value]
        if broken:  # every later CUDA call would fail: stop here, before any work
            raise KernelError(
                f"the Triton kernel(s) {broken} crashed the CUDA context at their start-up "
                f"check ({self.kernel_status[broken[0]]}). Nothing was trained or written; "
                "restart the same command with LOWMEM_ES_FORCE_TORCH=1 in the environment "
                "(torch paths only), and please report the warning above")
        self.adam_state = es.AdamState(0, {}, {}) if self.args.optimizer == "adam" else None
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self._orders: dict[int, list[int]] = {}
        self._written_dir: Path | None = None  # the output_dir whose run this instance wrote
        self._start_masters: dict[str, torch.Tensor] | None = None  # at the first train()
        # The NF4 kernel switch as the start-up check left it (it may have switched a
        # broken kernel off): what every later call runs with (see _own_settings).
        self._nf4_force = lora.NF4_MATMUL_FORCE

    def _check_lora_settings(self, model: ESLoraModel) -> None:
        """A ready ESLoraModel must be what ``args`` says (rank, alpha, target modules):
        run.toml records ``args``, and a resume by path rebuilds the model from them."""
        given = {"lora_rank": model.rank, "lora_alpha": float(model.alpha),
                 "lora_target_modules": sorted(model.target_modules)}
        wanted = {"lora_rank": self.args.lora_rank, "lora_alpha": float(self.args.lora_alpha),
                  "lora_target_modules": sorted(self.args.lora_target_modules)}
        differing = [f"{k}: args {wanted[k]!r}, model {given[k]!r}" for k in given
                     if given[k] != wanted[k]]
        if differing:
            raise ValueError("the ESLoraModel passed as `model` does not match `args` ("
                             f"{'; '.join(differing)}); build the model with the settings in "
                             "args (attach_es_lora(base, args.lora_target_modules, "
                             "args.lora_rank, args.lora_alpha, seed=args.seed)) or set args "
                             "to the model's")

    def _check_prompt_lengths(self) -> None:
        """Warn once, up front, about prompts that will be left-truncated (never a crash)."""
        from lowmem_es.evaluate import warn_long_rows

        rows = list(self.train_dataset) + list(self.eval_dataset or [])
        warn_long_rows(rows, self.tokenizer, self.args.max_prompt_length)

    def _make_plan(self, model: object, profile: Profile) -> object:
        """The memory plan of this rank's share of the population under ``profile``."""
        from lowmem_es.planner import plan, read_model_config

        args = self.args
        config = (model.model.config if isinstance(model, ESLoraModel)
                  else read_model_config(str(model)))
        return plan(config, profile, args.lora_rank,
                    list(args.lora_target_modules), max(1, len(self.local_members)),
                    args.batch_size, args.num_generations,
                    max_prompt_length=args.max_prompt_length,
                    max_completion_length=args.max_completion_length,
                    rows_per_chunk=args.rows_per_chunk, optimizer=args.optimizer,
                    generation_backend=args.generation_backend,
                    kv_cache_dtype=args.kv_cache_dtype)

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
        """Total reward per completion under the TRL contract (see ``RewardScorer.score``)."""
        return self.scorer.score(rows, prompt_index, completions)

    # --- one iteration ---
    @_own_settings
    def step(self, iteration: int) -> dict[str, Any]:
        """Run ES iteration ``iteration`` (evaluate the population, update the masters)."""
        args = self.args
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # peak memory per iteration
        events: list[dict[str, Any]] = []
        rows = [self.train_dataset[i] for i in self.batch_indices(iteration)]
        prompts = self._prompts(rows)
        local = [self.members[m] for m in self.local_members]
        row_spec = [(i, p) for i in range(len(local)) for p in range(len(rows))
                    for _ in range(args.num_generations)]
        completions = generate_population(
            self.es_model, self.tokenizer, prompts, row_spec, members=local,
            run_seed=args.seed, iteration=iteration, sigma=args.sigma,
            max_prompt_length=args.max_prompt_length,
            max_completion_length=args.max_completion_length, temperature=args.temperature,
            rows_per_chunk=self.rows_per_chunk, device=self.device, events=events,
            backend=args.generation_backend,
            prefill_chunk=self.plan.prefill_chunk if self.plan is not None else 0,
            kv_cache_dtype=args.kv_cache_dtype)
        if events:  # an OOM backoff: keep the chunk size that worked
            self.rows_per_chunk = min(e["retry_rows"] for e in events)
        generated = time.perf_counter()
        totals, per_func = (self.score(rows, [p for _, p in row_spec], completions)
                            if completions else ([], {}))
        per_member = len(rows) * args.num_generations
        local_fitness = {
            m: member_fitness(totals[i * per_member:(i + 1) * per_member], len(rows),
                              args.num_generations, pass_at_k=args.pass_at_k,
                              pass_at_k_fraction=args.pass_at_k_fraction,
                              correct_threshold=args.correct_threshold)
            for i, m in enumerate(self.local_members)}
        fitness = distributed.gather_fitness(local_fitness, len(self.members), self.device)
        all_missing = all(v is None for values in per_func.values() for v in values)
        all_missing = not distributed.any_rank(not all_missing)
        learning_rate = es.scheduled_learning_rate(args.learning_rate, args.lr_schedule,
                                                   iteration, args.iterations, args.lr_min_ratio)
        record: dict[str, Any] = {
            "iteration": iteration, "run_seed": args.seed, "sigma": args.sigma,
            "learning_rate": learning_rate, "fitness_shaping": args.fitness_shaping,
            "optimizer": args.optimizer, "weight_decay": args.weight_decay,
            "members": [[m.pair, m.sign] for m in self.members],
            "prompt_indices": self.batch_indices(iteration), "fitness": fitness,
        }
        if all_missing:
            # TRL semantics: None means "no opinion". With no opinion at all there is no
            # signal; skip the update rather than step on zeros (replay skips it too).
            logger.warning("iteration %d: every reward function returned None for every "
                           "completion; skipping the update", iteration + 1)
            record.update(skipped=True, reward_mean=None, reward_max=None, reward_min=None)
        else:
            shaped = es.shape_fitness(fitness, args.fitness_shaping)
            stats = es.es_update(self.es_model.parameters(), self.es_model.tensor_ids(),
                                 run_seed=args.seed, iteration=iteration, shaped_fitness=shaped,
                                 schedule=self.schedule, learning_rate=learning_rate,
                                 optimizer=args.optimizer, adam_state=self.adam_state,
                                 weight_decay=args.weight_decay,
                                 noise_backend=args.noise_backend)
            record.update(shaped_fitness=[float(f) for f in shaped],
                          reward_mean=sum(fitness) / len(fitness), reward_max=max(fitness),
                          reward_min=min(fitness), **stats)
        finished = time.perf_counter()
        # Every rank's completions (ranks generate in parallel, so per second too).
        tokens = distributed.total(sum(len(c.ids) for c in completions))
        if events:
            record["oom_events"] = events
        if self.plan is not None:
            record["predicted_peak_mb"] = self.plan.predicted_peak_bytes / 2**20
        record.update(tokens=tokens, generate_s=generated - started,
                      update_s=finished - generated, iteration_s=finished - started,
                      tokens_per_s=tokens / max(generated - started, 1e-9),
                      peak_memory_mb=peak_memory_mb(self.device))
        self.iteration = iteration + 1
        return record

    # --- evaluation ---
    @_own_settings
    def evaluate(self, dataset: Sequence[dict] | None = None) -> dict[str, float]:
        """Mean reward of the unperturbed adapter (greedy) on ``dataset`` or the eval split.

        Under torchrun every rank must call it (a collective): rank r generates and scores
        rows r, r + world, ..., and the per-row rewards are gathered and averaged in row
        order on every rank, so the result is that of one process and no rank waits
        through another's evaluation (which used to count against the timeout).
        """
        rows = validate_rows(dataset, "dataset") if dataset is not None else (
            self.eval_dataset or self.train_dataset)
        prompts = self._prompts(rows)
        mine = distributed.shard_rows(len(rows))
        totals: list[float] = []
        per_func: dict[str, list] = {}
        if mine:  # all prompts go in: the same left padding, so the same tokens, as alone
            completions = generate_population(
                self.es_model, self.tokenizer, prompts, [(None, p) for p in mine],
                max_prompt_length=self.args.max_prompt_length,
                max_completion_length=self.args.max_completion_length, temperature=0.0,
                rows_per_chunk=self.rows_per_chunk, device=self.device,
                backend=self.args.generation_backend, kv_cache_dtype=self.args.kv_cache_dtype,
                prefill_chunk=self.plan.prefill_chunk if self.plan is not None else 0)
            totals, per_func = self.score(rows, mine, completions)
        names = [reward_name(f) for f in self.scorer.reward_funcs]  # unique (RewardScorer)
        empty = [None] * len(mine)  # a rank without rows has no per-function values
        merged = distributed.gather_rows(
            mine, [totals] + [per_func.get(name, empty) for name in names], len(rows))
        totals, per_func = merged[0], dict(zip(names, merged[1:], strict=True))
        result = {"eval_reward": sum(totals) / len(totals)}
        for name, values in per_func.items():
            scored = [v for v in values if v is not None]
            if scored:
                result[f"eval_{name}"] = sum(scored) / len(scored)
        return result

    # --- the loop ---
    @_own_settings
    def train(self, callback: Callable[[dict[str, Any]], None] | None = None
              ) -> list[dict[str, Any]]:
        """Run up to ``args.iterations`` iterations, resumable and interruptible.

        Writes run.toml, journal.jsonl (fsynced per iteration), metrics.jsonl, checkpoints
        every ``save_steps`` (and step 0, the initial adapter), reward.png and adapter/.
        The first SIGINT/SIGTERM finishes the iteration in flight, checkpoints and returns
        (``self.stopped_early`` is then True); a second one aborts at once, which is safe
        because every file is written atomically and the journal replays on resume.
        The output directory is locked meanwhile: a second process training there is
        refused (``checkpoint.lock_run``).
        """
        out = Path(self.args.output_dir)
        acquired, refused = False, None
        if distributed.is_main():  # under torchrun rank 0 holds the lock for all
            try:
                acquired = checkpoint.lock_run(out)
            except ValueError as error:
                refused = error
        # Every rank learns the outcome: none waits in a barrier for a rank 0 that left.
        if distributed.any_rank(refused is not None):
            raise refused or ValueError(f"rank 0 could not lock {str(out)!r}: another "
                                        "lowmem-es process is training there (see rank 0)")
        try:
            return self._train(out, callback)
        finally:
            if acquired:  # not a lock this process already held (a nested train())
                checkpoint.unlock_run(out)

    def _train(self, out: Path, callback: Callable[[dict[str, Any]], None] | None
               ) -> list[dict[str, Any]]:
        args = self.args
        main = distributed.is_main()  # under torchrun only rank 0 writes files
        self._prepare_output_dir(out)
        logger.info("training %d LoRA values (%d tensors), population %d%s, iterations "
                    "%d..%d -> %s", self.es_model.num_parameters(),
                    len(self.es_model.tensor_ids()), args.population_size,
                    f" over {distributed.world_size()} ranks"
                    if distributed.world_size() > 1 else "",
                    self.iteration + 1, args.iterations, out)
        self.stopped_early = False
        self._signal = None
        started = time.perf_counter()
        first = self.iteration
        progress = _Progress(args.iterations, first, args.logging_steps) if main else None
        previous_handlers = self._install_signal_handlers()
        try:
            with contextlib.ExitStack() as files:
                if main:
                    journal = files.enter_context(open(out / "journal.jsonl", "a"))
                    metrics = files.enter_context(open(out / "metrics.jsonl", "a"))
                for iteration in range(self.iteration, args.iterations):
                    record = self.step(iteration)
                    entry = _metrics_entry(record)
                    if iteration == first:  # what this process ran on, once per start
                        entry["kernels"] = self.kernel_status
                    if main:
                        with _write_failure(out / "journal.jsonl", iteration):
                            journal.write(json.dumps(record) + "\n")
                            journal.flush()
                            os.fsync(journal.fileno())  # the update is durable from here
                    if args.eval_steps and (iteration + 1) % args.eval_steps == 0:
                        entry.update(self.evaluate())  # every rank: a sharded collective
                    if main:
                        with _write_failure(out / "metrics.jsonl", iteration):
                            metrics.write(json.dumps(entry) + "\n")
                            metrics.flush()
                        progress.update(entry, record)
                    self.history.append(entry)
                    if callback is not None:
                        callback(entry)
                    done = iteration + 1
                    elapsed = time.perf_counter() - started
                    out_of_time = bool(args.max_hours) and elapsed + elapsed / (
                        done - first) > args.max_hours * 3600
                    # Only with iterations left: after the last one the run is complete
                    # (adapter, final checkpoint), however long it took or whatever arrived.
                    # Unanimous: a rank that stops alone would leave the others waiting.
                    if done < args.iterations and distributed.any_rank(
                            self._signal is not None or out_of_time):
                        reason = ("a signal" if not out_of_time
                                  else f"--max-hours {args.max_hours}")
                        self._checkpoint(out, done)
                        self.stopped_early = True
                        logger.warning("stopped after iteration %d/%d (%s); checkpoint written."
                                       " Resume with --resume", done, args.iterations, reason)
                        break
                    if args.save_steps and done % args.save_steps == 0:
                        self._checkpoint(out, done)
        finally:
            if progress is not None:
                progress.close()
            self._restore_signal_handlers(previous_handlers)
        if not self.stopped_early:
            if not checkpoint.step_dir(out, self.iteration).is_dir():
                self._checkpoint(out, self.iteration)
            if main:
                self.save_adapter(out / "adapter")
            logger.info("done: adapter written to %s", out / "adapter")
        distributed.barrier()
        return self.history

    def _checkpoint(self, out: Path, step: int) -> None:
        if not distributed.is_main():
            return
        checkpoint.save_checkpoint(out, step, self.es_model, {
            "config_hash": self.args.result_hash(), "run_seed": self.args.seed,
            "lowmem_es_version": __version__, IDENTITY_KEY: self.identity}, self.adam_state)
        checkpoint.rotate_checkpoints(out, self.args.save_total_limit)
        try:
            plot_rewards(out)
        except Exception as error:  # a picture is never worth stopping a run
            logger.warning("reward.png not drawn (%s: %s)", type(error).__name__, error)

    def _prepare_output_dir(self, out: Path) -> None:
        """Start fresh, refuse to clobber another run, or restore for --resume."""
        # A run this instance wrote is continued by a later train() (more iterations, or
        # after a stop), never overwritten from its trained weights nor refused.
        own = self._written_dir is not None and self._written_dir == out.resolve()
        resume, overwrite = self.resume or own, self.overwrite and not own
        # Again, as in the constructor: output_dir may have changed since.
        has_run = check_output_dir(self.args, resume, overwrite, self.force, self.identity)
        main = distributed.is_main()
        if main:
            checkpoint.remove_partial_checkpoints(out)
        if has_run and overwrite and main:
            for name in ("journal.jsonl", "metrics.jsonl", "run.toml", "reward.png"):
                (out / name).unlink(missing_ok=True)
            for name in ("checkpoints", "adapter"):
                shutil.rmtree(out / name, ignore_errors=True)
        if overwrite:
            has_run = False
        elif resume and not has_run and main:
            logger.warning("--resume: %s holds no run to continue (check the path); starting "
                           "a new run there", out)
        if main:
            out.mkdir(parents=True, exist_ok=True)
        distributed.barrier()  # nobody reads while rank 0 clears
        masters = self.es_model.parameters()
        if self._start_masters is None:  # as the caller set them up (maybe an adapter loaded)
            self._start_masters = {n: t.detach().to("cpu", copy=True) for n, t in masters.items()}
        if has_run:
            self._restore(out)
        else:
            # A new run starts from the starting adapter, also after this instance trained
            # one elsewhere (or overwrote its own): never from trained weights.
            for name, tensor in masters.items():
                tensor.data.copy_(self._start_masters[name])
            self.adam_state = es.AdamState(0, {}, {}) if self.args.optimizer == "adam" else None
            self.history = []
            self.iteration = 0
            self._checkpoint(out, 0)  # the initial adapter: the origin of journal replay
        if main:
            atomic_write_text(out / "run.toml", to_toml(self.args.to_dict()))
            if self.plan is not None:
                atomic_write_text(out / "plan.json", json.dumps(self.plan.to_dict(), indent=2))
        distributed.barrier()  # ranks start together; rank 0's files exist
        self._written_dir = out.resolve()

    def _restore(self, out: Path) -> None:
        """Newest valid checkpoint + replay of the journal lines after it (the configuration
        and the run's identity were checked by ``check_output_dir``)."""
        records = checkpoint.read_journal(out / "journal.jsonl", repair=distributed.is_main())
        expected = list(range(len(records)))
        if [r["iteration"] for r in records] != expected:
            raise checkpoint.CheckpointError(
                f"journal {out / 'journal.jsonl'} does not hold iterations 0..{len(records) - 1}"
                " in order; it was edited or mixes two runs")
        found = checkpoint.newest_valid_checkpoint(out)
        if found is None:
            raise checkpoint.CheckpointError(f"{str(out)!r} has no valid checkpoint to resume "
                                             "from; start over with --overwrite")
        step, path, state = found
        if IDENTITY_KEY not in state:
            logger.warning("%s was written by an older lowmem-es that did not record the base "
                           "model and training data: resuming without checking that they are "
                           "the same as this run's", out)
        if step > len(records):
            raise checkpoint.CheckpointError(f"checkpoint {path} is at step {step} but the "
                                             f"journal has only {len(records)} iterations")
        self.es_model.load_adapter(path)
        self.adam_state = checkpoint.load_adam(path) or self.adam_state
        params, ids = self.es_model.parameters(), self.es_model.tensor_ids()
        for record in records[step:]:
            checkpoint.apply_journal_record(params, ids, record, self.adam_state,
                                            self.args.noise_backend)
        self.iteration = len(records)
        metrics = [m for m in read_metrics(out, repair=distributed.is_main())
                   if m["iteration"] < self.iteration]
        # A kill between an iteration's journal line and its metrics line loses the
        # latter: rebuild it from the journal (which holds every training metric; a
        # periodic evaluation of that iteration is lost, and the line says so).
        logged = {m["iteration"] for m in metrics}
        rebuilt = [dict(_metrics_entry(r), rebuilt_from_journal=True)
                   for r in records if r["iteration"] not in logged]
        if rebuilt:
            metrics = sorted(metrics + rebuilt, key=lambda m: m["iteration"])
            logger.info("metrics.jsonl lacked iteration(s) %s (a kill before they were "
                        "written): rebuilt from the journal",
                        ", ".join(str(m["iteration"] + 1) for m in rebuilt))
        if distributed.is_main():
            checkpoint.rewrite_jsonl(out / "metrics.jsonl", metrics)
        self.history = metrics
        logger.info("resuming %s at iteration %d (checkpoint step %d + %d journal lines "
                    "replayed)", out, self.iteration + 1, step, len(records) - step)
        if self.force and (state.get(IDENTITY_KEY) != self.identity
                           or state.get("config_hash") != self.args.result_hash()):
            # Forced onto another model, data or configuration: put them on record now
            # (the restored state is exact), or a crash before the next checkpoint would
            # leave the old ones there and the next --resume would need --force again.
            self._checkpoint(out, self.iteration)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: object) -> None:
            if self._signal is not None:
                raise KeyboardInterrupt(f"second signal {signum}: stopping now")
            self._signal = signum
            logger.warning("received signal %d: finishing this iteration, then checkpointing"
                           " (send it again to stop at once)", signum)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Write the current (centre) adapter as a PEFT adapter directory."""
        return self.es_model.save_adapter(path)


@contextlib.contextmanager
def _write_failure(path: Path, iteration: int) -> Iterator[None]:
    """Turn a failed append (a full disk, a lost mount) into an error that says what
    failed and that the run can go on: a torn last line is dropped on resume."""
    try:
        yield
    except OSError as error:
        raise OSError(f"could not append iteration {iteration + 1} to {str(path)!r} "
                      f"({error.strerror or error}); the checkpoints and the journal up to "
                      f"iteration {iteration} are intact: free space there (or fix the "
                      "directory) and continue with --resume") from error


def _metrics_entry(record: dict[str, Any]) -> dict[str, Any]:
    """An iteration's metrics line from its journal record (which holds every one)."""
    return {k: record[k] for k in _METRIC_KEYS if k in record}


_METRIC_KEYS = ("iteration", "reward_mean", "reward_max", "update_norm", "param_norm",
                "iteration_s", "tokens_per_s", "peak_memory_mb", "predicted_peak_mb",
                "oom_events", "skipped")


class _Progress:
    """A tqdm bar on a terminal; one concise log line per ``every`` iterations otherwise."""

    def __init__(self, total: int, initial: int, every: int) -> None:
        self.total, self.every, self.started = total, max(every, 1), time.perf_counter()
        self.initial = initial
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)

    def update(self, entry: dict[str, Any], record: dict[str, Any]) -> None:
        stats = ("skipped (no rewards)" if entry.get("skipped") else
                 f"reward {entry['reward_mean']:.3f}/{entry['reward_max']:.3f}")
        if "eval_reward" in entry:
            stats += f" eval {entry['eval_reward']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{stats} | {record['tokens_per_s']:.0f} tok/s | "
                                     f"{record['peak_memory_mb']:.0f} MiB")
            self.bar.update(1)
            return
        done = entry["iteration"] + 1
        if done % self.every == 0 or done == self.total:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / (done - self.initial) * (self.total - done)
            logger.info("iter %d/%d | %s (mean/max) | %.1f s/it | %.0f tok/s | %.0f MiB | "
                        "ETA %s", done, self.total, stats, record["iteration_s"],
                        record["tokens_per_s"], record["peak_memory_mb"],
                        _format_seconds(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_plot_warned = False


def plot_rewards(out: Path) -> Path | None:
    """reward.png: train mean/max reward and eval reward against iteration (matplotlib)."""
    global _plot_warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _plot_warned:
            logger.info("matplotlib is not installed: reward.png is off "
                        "(pip install 'lowmem-es[plot]')")
            _plot_warned = True
        return None
    metrics = read_metrics(out)  # damage is skipped: a picture never stops a run
    if not metrics:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    its = [m["iteration"] + 1 for m in metrics if m.get("reward_mean") is not None]
    axis.plot(its, [m["reward_mean"] for m in metrics if m.get("reward_mean") is not None],
              label="train mean")
    axis.plot(its, [m["reward_max"] for m in metrics if m.get("reward_max") is not None],
              label="train max", alpha=0.4)
    evals = [(m["iteration"] + 1, m["eval_reward"]) for m in metrics if "eval_reward" in m]
    if evals:
        axis.plot(*zip(*evals, strict=True), "o-", label="eval (centre)")
    axis.set_xlabel("iteration")
    axis.set_ylabel("reward")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    tmp = out / f".reward.png.tmp-{os.getpid()}.png"
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, out / "reward.png")
    return out / "reward.png"


def read_metrics(out: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of ``out/metrics.jsonl``. The metrics are a log that resume does not
    need, so damage (a bad line in the middle) does not stop a run: with ``repair`` the
    damaged file is kept as ``metrics.jsonl.damaged-<time>`` and its readable records go on
    in metrics.jsonl, with a warning; without, the readable records are returned."""
    path = out / "metrics.jsonl"
    try:
        return checkpoint.read_journal(path, repair=repair, what="metrics")
    except checkpoint.CheckpointError as damage:
        error = damage
    # Salvage every readable record that names its iteration.
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if checkpoint.is_record(record):
            records.append(record)
    if repair:
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(path, aside)
        checkpoint.rewrite_jsonl(path, records)
        logger.warning("%s; kept the damaged file as %s and its %d readable records",
                       error, aside, len(records))
    return records


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced sibling and a rename: a crash leaves
    the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
