"""ESTrainer: the ES loop that composes model loading, generation, rewards and ES math.

One iteration: draw a prompt batch (a pure function of seed and iteration), generate a
completion per (member, prompt, generation) row with the members' perturbations active,
score rows with the reward functions, average per member into fitness, shape it and
apply the ES update to the fp32 LoRA masters (``journal.apply_record``, the code path
replay uses). The trainer holds no noise or kernel code: it hands seeds and fitnesses to
``lowmem_es.es``, and sets its kernel switches through ``lowmem_es.backends``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowmem_es import backends, checkpoint, distributed, es, journal, noise, run_dir
from lowmem_es._version import __version__
from lowmem_es.adapter_io import adapter_params
from lowmem_es.atomic import atomic_write_text
from lowmem_es.config import SIGMA_GROWTH_CAP, ESConfig, to_toml
from lowmem_es.data import epoch_order, render_prompt, validate_rows, warn_long_rows
from lowmem_es.errors import CheckpointError, KernelError
from lowmem_es.es import Member
from lowmem_es.evaluate import score_centre
from lowmem_es.generate import Completion, generate_population
from lowmem_es.kernel_check import check_kernels
from lowmem_es.lora import ESLoraModel, attach_es_lora
from lowmem_es.model import (
    load_model,
    offload_input_embedding,
    prepare_tokenizer,
    resolve_device,
)
from lowmem_es.profiles import Profile, load_profile
from lowmem_es.progress import Progress, peak_memory_mb, plot_rewards
from lowmem_es.rewards.functions import RewardFunc
from lowmem_es.rewards.scoring import RewardScorer, reward_name
from lowmem_es.run_dir import (
    ADAPTER,
    IDENTITY_KEY,
    JOURNAL,
    METRICS,
    PLAN,
    RUN_CONFIG,
    check_output_dir,
    metrics_entry,
    resumed_metrics,
    run_identity,
    write_failure,
)

logger = logging.getLogger("lowmem_es")


def _own_settings(method: Callable) -> Callable:
    """Run an ESTrainer method under its own process-wide settings (``backends.scoped``:
    the noise backend and the NF4 kernel switch), restoring the previous ones after: two
    trainers in one process must not change each other's noise or kernels."""
    @functools.wraps(method)
    def wrapper(self: ESTrainer, *args: Any, **kwargs: Any) -> Any:
        with backends.scoped(self.args.noise_backend, self._nf4_force):
            return method(self, *args, **kwargs)

    return wrapper


class ESTrainer:
    """Fine-tune LoRA adapters of a frozen (NF4) causal LM with Evolution Strategies.

    ``model`` is a path / hub id (loaded in NF4 with LoRA on ``args.lora_target_modules``)
    or a ready ``ESLoraModel`` (then pass ``tokenizer``). ``reward_funcs`` are TRL-style
    reward functions or names accepted by ``lowmem_es.rewards.scoring.load_reward``.
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
        backends.set_force(backends.NF4_MATMUL, None if self.args.nf4_kernel else "torch")
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
        self._no_signal_run = 0  # iterations in a row whose members all scored alike
        self._sigma_level = 0  # sigma_growth's exponent (sigma_level of the journal so far)
        self._anchor: dict[str, torch.Tensor] | None = None  # theta_0, for anchor_decay
        # es.relative_noise_scales(theta_0) when this run or its journal uses them
        self._noise_scales: dict[str, float] | None = None
        self._written_dir: Path | None = None  # the output_dir whose run this instance wrote
        self._start_masters: dict[str, torch.Tensor] | None = None  # at the first train()
        # The NF4 kernel switch as the start-up check left it (it may have switched a
        # broken kernel off): what every later call runs with (see _own_settings).
        self._nf4_force = backends.force(backends.NF4_MATMUL)

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
                    args.prompts_per_member, args.num_generations,
                    max_prompt_length=args.max_prompt_length,
                    max_completion_length=args.max_completion_length,
                    rows_per_chunk=args.rows_per_chunk, optimizer=args.optimizer,
                    generation_backend=args.generation_backend,
                    kv_cache_dtype=args.kv_cache_dtype)

    # --- data ---
    def batch_indices(self, iteration: int) -> list[int]:
        """Dataset rows of an iteration: epoch-wise seeded permutations, a pure function."""
        size = self.args.batch_size
        return self._data_stream(iteration * size, size)

    def prompt_groups(self, iteration: int) -> list[list[int]]:
        """The dataset rows each member sees in ``iteration``, as groups: one group shared
        by every member (``prompt_assignment="shared"``), or one per antithetic pair
        (``"per_pair"``: group k for pair k; each member of the pair sees all of it). A
        pure function of (seed, iteration, pair): the pairs take consecutive windows of
        the same seeded epoch order, so resume, replay and every rank agree."""
        if self.args.prompt_assignment == "shared":
            return [self.batch_indices(iteration)]
        size = self.args.prompts_per_member
        pairs = len(self.members) if not self.args.antithetic else len(self.members) // 2
        return [self._data_stream((iteration * pairs + pair) * size, size)
                for pair in range(pairs)]

    def _data_stream(self, start: int, count: int) -> list[int]:
        """Positions ``start .. start + count`` of the data order: epoch after epoch, each
        a seeded permutation of the training rows (``data.epoch_order``)."""
        n = len(self.train_dataset)
        indices = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, n)
            if epoch not in self._orders:  # two epochs at most are live at a time
                self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
                self._orders[epoch] = epoch_order(self.args.seed, epoch, n)
            indices.append(self._orders[epoch][offset])
        return indices

    def _group_of(self, member: Member) -> int:
        """The prompt group ``member`` sees (``prompt_groups``): 0, or its pair's."""
        return 0 if self.args.prompt_assignment == "shared" else member.pair

    def _centred(self, fitness: list[float], prompt_scores: list[list[float]],
                 groups: list[list[int]]) -> list[float]:
        """Member fitness minus its baseline (``ESConfig.fitness_baseline``).

        "pair": minus the mean of its antithetic pair, so only the pair's difference is
        left. "prompt": the mean over its prompts of its score minus that prompt's mean
        score over every member that saw it (pooled by dataset row, so a row two pairs
        drew is one prompt); ``prompt_scores[j][m]`` is member m's score on the j-th
        prompt of its group.
        """
        if self.args.fitness_baseline == "pair":
            pair_sum: dict[int, float] = {}
            pair_count: Counter[int] = Counter()
            for member, value in zip(self.members, fitness, strict=True):
                pair_sum[member.pair] = pair_sum.get(member.pair, 0.0) + value
                pair_count[member.pair] += 1
            return [value - pair_sum[m.pair] / pair_count[m.pair]
                    for m, value in zip(self.members, fitness, strict=True)]
        seen: dict[int, list[float]] = {}
        for m, member in enumerate(self.members):
            for j, row in enumerate(groups[self._group_of(member)]):
                seen.setdefault(row, []).append(prompt_scores[j][m])
        baseline = {row: sum(values) / len(values) for row, values in seen.items()}
        centred = []
        for m, member in enumerate(self.members):
            group = groups[self._group_of(member)]
            centred.append(sum(prompt_scores[j][m] - baseline[row]
                               for j, row in enumerate(group)) / len(group))
        return centred

    def _anchor_tensors(self) -> dict[str, torch.Tensor] | None:
        """theta_0 for anchor_decay: the adapter this run started from (step_000000)."""
        if self.args.anchor_decay and self._anchor is None:
            self._anchor = {name: t.clone() for name, t in self.es_model.parameters().items()}
        return self._anchor

    def _use_noise_scales(self, origin: dict[str, torch.Tensor] | None) -> None:
        """Derive the per-tensor noise scales from the run's starting adapter ``origin``
        (None: this run and its journal need none) and give the layers this run's."""
        self._noise_scales = None if origin is None else es.relative_noise_scales(origin)
        relative = self.args.noise_scaling == "relative"
        self.es_model.set_noise_scales(self._noise_scales if relative else None)

    def _warn_no_signal(self, iteration: int, value: float, identical: float) -> None:
        """Say so when an iteration had no signal: every member scored ``value``."""
        self._no_signal_run += 1
        logger.warning("iteration %d: no signal: every member scored %.4g (%.0f%% of the "
                       "members gave identical completions), so the update is zero",
                       iteration + 1, value, 100 * identical)
        if self._no_signal_run in (3, 10) or self._no_signal_run % 50 == 0:
            logger.warning("%d iterations in a row without signal: the population has "
                           "collapsed onto one behaviour. Remedies: a larger --sigma (more "
                           "different members), sampling (--temperature 1.0 "
                           "--num-generations 2 or more), more prompts per iteration "
                           "(--batch-size), or a reward that tells answers apart (partial "
                           "credit)", self._no_signal_run)

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
        if args.noise_scaling != "none" and self._noise_scales is None:
            # step() called outside train(): theta_0 is the adapter as it is now
            self._use_noise_scales(self.es_model.parameters())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # peak memory per iteration
        events: list[dict[str, Any]] = []
        groups = self.prompt_groups(iteration)
        # Every process renders every group's prompts (the same padding, so the same
        # tokens, as one process); a member's rows point at its own group's slots.
        slots = [index for group in groups for index in group]
        rows = [self.train_dataset[i] for i in slots]
        prompts = self._prompts(rows)
        local = [self.members[m] for m in self.local_members]
        size = len(groups[0])
        row_spec = [(i, self._group_of(member) * size + p) for i, member in enumerate(local)
                    for p in range(size) for _ in range(args.num_generations)]
        sigma = args.sigma * args.sigma_growth ** self._sigma_level
        completions = generate_population(
            self.es_model, self.tokenizer, prompts, row_spec, members=local,
            run_seed=args.seed, iteration=iteration, sigma=sigma,
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
        per_member = size * args.num_generations
        scored = functools.partial(es.member_fitness, num_generations=args.num_generations,
                                   pass_at_k=args.pass_at_k,
                                   pass_at_k_fraction=args.pass_at_k_fraction,
                                   correct_threshold=args.correct_threshold)
        by_prompt = args.fitness_baseline == "prompt"
        local = {}  # this rank's members: fitness, digest of completions(, prompt scores)
        for i, m in enumerate(self.local_members):
            mine = totals[i * per_member:(i + 1) * per_member]
            values = [scored(mine, size),
                      _completions_digest(completions[i * per_member:(i + 1) * per_member])]
            if by_prompt:
                g = args.num_generations
                values += [scored(mine[j * g:(j + 1) * g], 1) for j in range(size)]
            local[m] = values
        gathered = distributed.gather_members(local, len(self.members),
                                              2 + (size if by_prompt else 0))
        fitness, digests = gathered[0], gathered[1]
        all_missing = all(v is None for values in per_func.values() for v in values)
        all_missing = not distributed.any_rank(not all_missing)
        learning_rate = es.scheduled_learning_rate(args.learning_rate, args.lr_schedule,
                                                   iteration, args.iterations, args.lr_min_ratio)
        record: dict[str, Any] = {
            "iteration": iteration, "run_seed": args.seed, "sigma": sigma,
            "learning_rate": learning_rate, "fitness_shaping": args.fitness_shaping,
            "optimizer": args.optimizer, "weight_decay": args.weight_decay,
            "members": [[m.pair, m.sign] for m in self.members],
            "prompt_indices": groups[0] if args.prompt_assignment == "shared" else groups,
            "fitness": fitness,
        }
        if args.anchor_decay:
            record["anchor_decay"] = args.anchor_decay
        if args.noise_scaling != "none":
            record["noise_scaling"] = args.noise_scaling
        if args.fitness_baseline != "none":  # what the update shapes (apply_record)
            record.update(fitness_baseline=args.fitness_baseline,
                          centred_fitness=self._centred(fitness, gathered[2:], groups))
        signal = record.get("centred_fitness", fitness)
        # Is there a signal? Members that all score alike give a zero update (z-scores
        # and ranks of equal values are zeros); identical completions are the usual cause.
        spread = statistics.pstdev(fitness)
        identical = max(Counter(digests).values()) / len(digests)
        record.update(fitness_std=spread, identical_members=identical)
        alike = identical_pairs(self.members, digests)
        if alike is not None:  # what sigma_growth reads: do partners still differ?
            record["identical_pairs"] = alike
        if all_missing:
            # TRL semantics: None means "no opinion". With no opinion at all there is no
            # signal; skip the update rather than step on zeros (replay skips it too).
            logger.warning("iteration %d: every reward function returned None for every "
                           "completion; skipping the update", iteration + 1)
            record.update(skipped=True, reward_mean=None, reward_max=None, reward_min=None)
        else:
            if len(set(signal)) == 1:  # what es.shape_fitness turns into zeros
                record["no_signal"] = True
                self._warn_no_signal(iteration, signal[0], identical)
            else:
                self._no_signal_run = 0
            self._sigma_level = next_sigma_level(self._sigma_level, record, args.sigma_growth)
            # The update is applied from the record itself, as resume and replay apply it.
            shaped, stats = journal.apply_record(
                self.es_model.parameters(), self.es_model.tensor_ids(), record,
                self.adam_state, args.noise_backend, self._anchor_tensors(),
                self._noise_scales)
            record.update(shaped_fitness=shaped,
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
        mine, _, totals, per_func = score_centre(
            self.es_model, self.tokenizer, rows, self._prompts(rows), self.scorer,
            sharded=True, device=self.device,
            max_prompt_length=self.args.max_prompt_length,
            max_completion_length=self.args.max_completion_length,
            rows_per_chunk=self.rows_per_chunk, backend=self.args.generation_backend,
            kv_cache_dtype=self.args.kv_cache_dtype,
            prefill_chunk=self.plan.prefill_chunk if self.plan is not None else 0)
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
                acquired = run_dir.lock_run(out)
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
                run_dir.unlock_run(out)

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
        progress = Progress(args.iterations, first, args.logging_steps) if main else None
        previous_handlers = self._install_signal_handlers()
        try:
            with contextlib.ExitStack() as files:
                if main:
                    journal_file = files.enter_context(open(out / JOURNAL, "a"))
                    metrics_file = files.enter_context(open(out / METRICS, "a"))
                for iteration in range(self.iteration, args.iterations):
                    record = self.step(iteration)
                    entry = metrics_entry(record)
                    if iteration == first:  # what this process ran on, once per start
                        entry["kernels"] = self.kernel_status
                    if main:
                        with write_failure(out / JOURNAL, iteration):
                            journal_file.write(json.dumps(record) + "\n")
                            journal_file.flush()
                            os.fsync(journal_file.fileno())  # the update is durable from here
                    if args.eval_steps and (iteration + 1) % args.eval_steps == 0:
                        entry.update(self.evaluate())  # every rank: a sharded collective
                    if main:
                        with write_failure(out / METRICS, iteration):
                            metrics_file.write(json.dumps(entry) + "\n")
                            metrics_file.flush()
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
                self.save_adapter(out / ADAPTER)
            logger.info("done: adapter written to %s", out / ADAPTER)
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
            run_dir.remove_partial_checkpoints(out)
        if has_run and overwrite and main:
            run_dir.clear_run(out)
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
            self._anchor = None  # theta_0 is the starting adapter again
            self._use_noise_scales(self._start_masters if self.args.noise_scaling != "none"
                                   else None)
            self.adam_state = es.AdamState(0, {}, {}) if self.args.optimizer == "adam" else None
            self.history = []
            self.iteration = 0
            self._checkpoint(out, 0)  # the initial adapter: the origin of journal replay
        if main:
            atomic_write_text(out / RUN_CONFIG, to_toml(self.args.to_dict()))
            if self.plan is not None:
                atomic_write_text(out / PLAN, json.dumps(self.plan.to_dict(), indent=2))
        distributed.barrier()  # ranks start together; rank 0's files exist
        self._written_dir = out.resolve()

    def _restore(self, out: Path) -> None:
        """Newest valid checkpoint + replay of the journal lines after it (the configuration
        and the run's identity were checked by ``check_output_dir``)."""
        records = journal.read_journal(out / JOURNAL, repair=distributed.is_main())
        expected = list(range(len(records)))
        if [r["iteration"] for r in records] != expected:
            raise CheckpointError(
                f"journal {out / 'journal.jsonl'} does not hold iterations 0..{len(records) - 1}"
                " in order; it was edited or mixes two runs")
        found = checkpoint.newest_valid_checkpoint(out)
        if found is None:
            raise CheckpointError(f"{str(out)!r} has no valid checkpoint to resume "
                                             "from; start over with --overwrite")
        step, path, state = found
        if IDENTITY_KEY not in state:
            logger.warning("%s was written by an older lowmem-es that did not record the base "
                           "model and training data: resuming without checking that they are "
                           "the same as this run's", out)
        if step > len(records):
            raise CheckpointError(f"checkpoint {path} is at step {step} but the "
                                             f"journal has only {len(records)} iterations")
        self.es_model.load_adapter(path)
        self.adam_state = checkpoint.load_adam(path) or self.adam_state
        params, ids = self.es_model.parameters(), self.es_model.tensor_ids()
        # theta_0 (step_000000), read once, for anchor_decay and relative noise scales
        anchored = self.args.anchor_decay or any(r.get("anchor_decay") for r in records)
        scaled = self.args.noise_scaling != "none" or any(r.get("noise_scaling")
                                                           for r in records)
        origin = adapter_params(checkpoint.step_dir(out, 0)) if anchored or scaled else None
        if anchored:
            self._anchor = {name: origin[name].to(t.device, t.dtype).clone()
                            for name, t in params.items()}
        self._use_noise_scales(origin if scaled else None)
        for record in records[step:]:
            journal.apply_record(params, ids, record, self.adam_state,
                                 self.args.noise_backend, self._anchor, self._noise_scales)
        for record in records:
            self._sigma_level = next_sigma_level(self._sigma_level, record,
                                                 self.args.sigma_growth)
            if not record.get("skipped"):
                self._no_signal_run = self._no_signal_run + 1 if record.get("no_signal") else 0
        self.iteration = len(records)
        metrics = resumed_metrics(out, records, repair=distributed.is_main())
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


def identical_pairs(members: Sequence[Member], digests: Sequence[float]) -> float | None:
    """Share of antithetic pairs whose two members gave identical completions (None: no
    pairs). A pair whose partners write the same text has a zero difference whatever
    the reward, so this, not the whole population's sameness, says whether more noise
    can help (with per-pair prompts, members of different pairs never write the same)."""
    by_pair: dict[int, list[float]] = {}
    for member, digest in zip(members, digests, strict=True):
        by_pair.setdefault(member.pair, []).append(digest)
    pairs = [values for values in by_pair.values() if len(values) == 2]
    if not pairs:
        return None
    return sum(a == b for a, b in pairs) / len(pairs)


def next_sigma_level(level: int, record: dict[str, Any], growth: float) -> int:
    """sigma_growth's exponent after the iteration ``record`` journals, a function of the
    journal alone (so resume rebuilds it):

    * no signal and the members alike (at least half the antithetic pairs, or without
      pairs at least half the population, wrote identical completions): one level up, to
      ``SIGMA_GROWTH_CAP`` x sigma: the noise is too small to change what they write;
    * no signal although the members differ, or a signal: one level down, to 0. Members
      that all write different text yet all score alike (often all 0) are, more often
      than not, broken by too much noise; a sparse reward looks the same, and there a
      larger sigma would not help either;
    * a skipped iteration, or ``growth`` 1 (off): unchanged (0 when off).
    """
    if growth <= 1.0 or record.get("skipped"):
        return 0 if growth <= 1.0 else level
    alike = record.get("identical_pairs", record.get("identical_members", 1.0))
    if record.get("no_signal") and alike >= 0.5:
        top = math.floor(math.log(SIGMA_GROWTH_CAP) / math.log(growth) + 1e-9)
        return min(level + 1, top)
    return max(level - 1, 0)


def _completions_digest(completions: Sequence[Completion]) -> float:
    """A member's completions as one number (52 bits of a BLAKE2b of their token ids, exact
    in float64 so it crosses ranks with the fitness): equal digests, equal completions."""
    digest = hashlib.blake2b(digest_size=8)
    for completion in completions:
        digest.update(len(completion.ids).to_bytes(4, "little"))
        digest.update(b"".join(int(i).to_bytes(8, "little", signed=True)
                               for i in completion.ids))
    return float(int.from_bytes(digest.digest(), "little") >> 12)
