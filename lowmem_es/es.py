"""The ES math: member schedule, fitness shaping and the seeded update, as pure functions.

One iteration perturbs the fp32 master copy theta of every LoRA tensor: member ``m`` uses
``theta + s_m * sigma * eps_k(m)``, where ``(k(m), s_m)`` comes from ``member_schedule`` and
``eps_k`` for tensor ``j`` is ``noise(member_key(run_seed, iteration, k, j), shape)``. After
evaluation the fitnesses are shaped (``shape_fitness``) and the update

    d = (1 / N) * sum_m f_m * s_m * eps_k(m)          (N = population size)
    theta += learning_rate * d                        (or Adam on d)

is applied by ``es_update``, which regenerates each pair's noise from its seed, one tensor
and one pair at a time, into a single buffer of the tensor's size: no population-sized
buffer and no stored noise. The two members of an antithetic pair share one noise draw, so
their coefficients are summed first (``pair_coefficients``) and the draw is made once.

Following the paper, 1/sigma is folded into the learning rate (sigma=1e-3, lr=5e-4, N=30
reproduce its defaults). Everything here is deterministic: no global RNG, pairs and
tensors in a fixed order, so a journal of seeds and fitnesses replays every update.
No model or transformers imports: this module only sees named tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lowmem_es import backends
from lowmem_es.config import FITNESS_SHAPINGS, LR_SCHEDULES, OPTIMIZERS
from lowmem_es.noise import MASK63, member_key
from lowmem_es.noise_batch import noise

_STD_EPS = 1e-8  # z-score denominator guard, as in the paper's code


def member_schedule(population_size: int, antithetic: bool) -> list[tuple[int, int]]:
    """``(pair, sign)`` of every member ``m``, in member order.

    Antithetic: ``(m // 2, +1 if m is even else -1)``, so members ``2k`` and ``2k + 1`` see
    ``+eps_k`` and ``-eps_k`` (the mirrored pair cancels the even terms of the fitness and
    halves the noise draws). Otherwise ``(m, +1)``: every member gets its own draw.
    """
    if isinstance(population_size, bool) or not isinstance(population_size, int):
        raise ValueError(f"`population_size` must be an integer, got {population_size!r}")
    if antithetic and (population_size < 2 or population_size % 2):
        fix = max(2, population_size + (population_size % 2))
        raise ValueError(
            f"`population_size` must be an even number >= 2 when `antithetic` is on (members "
            f"come in +/- pairs), got {population_size}; use {fix}, or set antithetic=False")
    if population_size < 1:
        raise ValueError(f"`population_size` must be >= 1, got {population_size}; "
                         "use a positive population size (the paper uses 30)")
    if antithetic:
        return [(m // 2, 1 if m % 2 == 0 else -1) for m in range(population_size)]
    return [(m, 1) for m in range(population_size)]


def scheduled_learning_rate(learning_rate: float, schedule: str, iteration: int,
                            iterations: int, min_ratio: float = 0.1) -> float:
    """The learning rate of 0-based ``iteration`` out of ``iterations`` under ``schedule``.

    ``constant`` is the paper's choice. ``cosine`` and ``linear`` decay from
    ``learning_rate`` (first iteration) to ``learning_rate * min_ratio`` (last iteration):
    on SmolLM2 a large constant step learns fastest early and then random-walks the LoRA
    norm up and the accuracy down, a small one is stable but slow; decaying gets both.
    The trainer journals the value it used, so replay never recomputes it.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; use one of {list(LR_SCHEDULES)}")
    if schedule == "constant" or iterations <= 1:
        return float(learning_rate)
    progress = min(max(iteration, 0), iterations - 1) / (iterations - 1)
    if schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return float(learning_rate * (min_ratio + (1.0 - min_ratio) * factor))


def shape_fitness(rewards: Sequence[float] | torch.Tensor, method: str = "zscore"
                  ) -> torch.Tensor:
    """Shaped fitness of one iteration's members, as a float64 tensor of shape (N,).

    Shaping makes the step size independent of the reward's scale and offset:

    * ``"zscore"`` (paper default): ``(r - mean) / (std + 1e-8)`` with the population std
      (``correction=0``); all-equal rewards give zeros (no signal, no step).
    * ``"centered_rank"``: rank / (N - 1) - 0.5, so values lie in [-0.5, 0.5]; tied rewards
      share their average rank. Robust to outlier rewards.
    * ``"none"``: ``r - mean``; keeps the raw scale (an unbiased gradient estimate, used to
      check the estimator against autograd).
    """
    if method not in FITNESS_SHAPINGS:
        raise ValueError(f"`fitness_shaping` must be one of {FITNESS_SHAPINGS}, got {method!r}")
    fitness = torch.as_tensor(rewards, dtype=torch.float64).detach().reshape(-1).cpu()
    if fitness.numel() == 0:
        raise ValueError("`rewards` is empty: need one reward per population member")
    if not bool(torch.isfinite(fitness).all()):
        bad = int((~torch.isfinite(fitness)).nonzero()[0])
        raise ValueError(f"`rewards` must be finite, got {float(fitness[bad])} for member {bad}; "
                         "map None/NaN rewards to a number before shaping")
    if bool((fitness == fitness[0]).all()):
        return torch.zeros_like(fitness)  # no ranking information at all
    if method == "centered_rank":
        # Ranks 0..N-1 over sorted unique values; a run of `count` ties starting at rank
        # `start` gets the average rank start + (count - 1) / 2.
        _, inverse, counts = torch.unique(fitness, sorted=True, return_inverse=True,
                                          return_counts=True)
        counts = counts.to(torch.float64)
        start = torch.cumsum(counts, 0) - counts
        ranks = (start + (counts - 1) / 2)[inverse]
        return ranks / (fitness.numel() - 1) - 0.5
    centered = fitness - fitness.mean()
    if method == "none":
        return centered
    return centered / (fitness.std(correction=0) + _STD_EPS)


@dataclass
class AdamState:
    """Adam moments of the ES direction, fp32, one entry per parameter name.

    ``exp_avg`` tracks the ascent direction ``d`` itself (not ``-d``). Moments are created
    lazily (zeros) the first time ``es_update`` sees a name; ``step`` counts ``es_update``
    calls and is shared by all tensors, as in one optimizer param group.
    """

    step: int = 0  # number of Adam updates applied; drives bias correction
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)  # first moment of d
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # second moment of d

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor dict for ``safetensors``: ``"step"`` (0-d int64),
        ``"exp_avg.<name>"`` and ``"exp_avg_sq.<name>"`` (shares storage with this state)."""
        out = {"step": torch.tensor(self.step, dtype=torch.int64)}
        out.update({f"exp_avg.{name}": value for name, value in self.exp_avg.items()})
        out.update({f"exp_avg_sq.{name}": value for name, value in self.exp_avg_sq.items()})
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> AdamState:
        """Inverse of ``state_dict`` (e.g. after ``safetensors.torch.load_file``)."""
        if "step" not in state:
            raise ValueError("Adam state has no `step` entry; is this an optimizer.safetensors "
                             "written by AdamState.state_dict()?")
        exp_avg: dict[str, torch.Tensor] = {}
        exp_avg_sq: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key == "step":
                continue
            # "exp_avg_sq." does not start with "exp_avg.", so the order of tests is free.
            if key.startswith("exp_avg_sq."):
                exp_avg_sq[key[len("exp_avg_sq."):]] = value.to(torch.float32)
            elif key.startswith("exp_avg."):
                exp_avg[key[len("exp_avg."):]] = value.to(torch.float32)
            else:
                raise ValueError(f"unexpected key {key!r} in Adam state; expected 'step', "
                                 "'exp_avg.<name>' or 'exp_avg_sq.<name>'")
        if exp_avg.keys() != exp_avg_sq.keys():
            missing = sorted(exp_avg.keys() ^ exp_avg_sq.keys())
            raise ValueError(f"Adam state has only one of the two moments for {missing}")
        return cls(step=int(state["step"]), exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def estimate_direction(shape: torch.Size | tuple[int, ...], key_for_pair: Callable[[int], int],
                       coefficients: dict[int, float], device: torch.device | str = "cpu",
                       noise_backend: str | None = None, force: str | None = None
                       ) -> torch.Tensor:
    """``sum_k coefficients[k] * noise(key_for_pair(k), shape)`` as one fp32 tensor.

    Pairs are visited in ascending order (a reproducible float sum) and pairs with a zero
    coefficient are skipped. CUDA tensors take the in-kernel update
    (``lowmem_es.kernels.es_update``: noise regenerated per element inside the kernel,
    fp32 registers, only the output in memory); CPU tensors run the torch loop below,
    which holds two tensors of ``shape`` (the accumulator and the current draw) whatever
    the population and is what the kernel's twin reproduces. ``force="kernel"|"torch"``
    (None: the switch ``backends.force(ES_UPDATE)``) or ``LOWMEM_ES_FORCE_TORCH=1``
    choose, by the rule of every kernel (``backends.use_kernel``).
    """
    pairs = [pair for pair, coefficient in sorted(coefficients.items()) if coefficient != 0.0]
    direction = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    if backends.use_kernel(backends.ES_UPDATE, device, force):
        from lowmem_es.kernels import es_update as kernel  # imports triton: only when asked

        keys = torch.tensor([key_for_pair(pair) & MASK63 for pair in pairs],
                            dtype=torch.int64, device=device)
        values = torch.tensor([coefficients[pair] for pair in pairs], dtype=torch.float32,
                              device=device)
        return kernel.es_direction_triton(keys, values, direction)
    for pair in pairs:
        direction.add_(noise(key_for_pair(pair), direction.shape, device=device,
                             backend=noise_backend), alpha=coefficients[pair])
    return direction


def pair_coefficients(shaped_fitness: Sequence[float] | torch.Tensor,
                      schedule: list[tuple[int, int]]) -> dict[int, float]:
    """``coef[pair] = sum of f_m * s_m`` over the members ``m`` of that pair.

    For an antithetic pair this is ``f_plus - f_minus``: the pair's noise then only has to
    be generated once in the update.
    """
    fitness = torch.as_tensor(shaped_fitness, dtype=torch.float64).reshape(-1).tolist()
    if len(fitness) != len(schedule):
        raise ValueError(f"`shaped_fitness` has {len(fitness)} values but the schedule has "
                         f"{len(schedule)} members; pass one fitness per member")
    coefficients: dict[int, float] = {}
    for value, (pair, sign) in zip(fitness, schedule, strict=True):
        coefficients[pair] = coefficients.get(pair, 0.0) + value * sign
    return coefficients


def relative_noise_scales(origin: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-tensor noise scales of ``ESConfig.noise_scaling='relative'``: each tensor's RMS
    in ``origin`` (the run's starting adapter), 1.0 for a tensor that starts at zero.

    Why: with LoRA's B = 0 at the start, a member's weight change is
    ``sigma * (epsB A + B epsA) + sigma^2 epsB epsA``; only the first term flips sign
    between antithetic partners, and with A's entries ~1/sqrt(d_in) (PEFT's Kaiming init)
    the second term, shared noise that no update can use, takes over once sigma exceeds
    A's scale. Noise on A relative to A's own scale keeps the change first-order at the
    sigma that moves completions. The RMS is an exactly rounded sum (``math.fsum``), so
    every machine, rank and replay derives the same scales from the same adapter.
    """
    scales = {}
    for name in sorted(origin):
        # squares elementwise (the same bits everywhere), then one exactly rounded sum
        squares = origin[name].detach().to("cpu", torch.float64).reshape(-1).square()
        rms = math.sqrt(math.fsum(squares.tolist()) / max(1, squares.numel()))
        scales[name] = rms if rms > 0 else 1.0
    return scales


def _check_update_args(params: dict[str, torch.Tensor], tensor_ids: dict[str, int],
                       optimizer: str, adam_state: AdamState | None, learning_rate: float,
                       betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "adam" and adam_state is None:
        raise ValueError("`adam_state` is required when optimizer='adam'; pass AdamState() "
                         "on the first iteration and the same object afterwards")
    if not math.isfinite(learning_rate) or learning_rate < 0:
        raise ValueError(f"`learning_rate` must be a finite number >= 0, got {learning_rate}")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay}")
    if optimizer == "adam":
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"`betas` must both lie in [0, 1), got {tuple(betas)}")
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0, got {eps}")
    for name, theta in params.items():
        if theta.dtype != torch.float32:
            raise ValueError(f"parameter {name!r} is {theta.dtype}; ES updates need the fp32 "
                             "master copy (steps of ~1e-5 vanish in bf16/fp16)")
        if name not in tensor_ids:
            raise ValueError(f"parameter {name!r} has no entry in `tensor_ids`; derive it with "
                             "lowmem_es.noise.tensor_id(module_name, 'A' or 'B')")


@torch.no_grad()
def es_update(params: dict[str, torch.Tensor], tensor_ids: dict[str, int], *, run_seed: int,
              iteration: int, shaped_fitness: Sequence[float] | torch.Tensor,
              schedule: list[tuple[int, int]], learning_rate: float, optimizer: str = "sgd",
              adam_state: AdamState | None = None, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8, weight_decay: float = 0.0,
              noise_backend: str | None = None, anchor_decay: float = 0.0,
              anchor: dict[str, torch.Tensor] | None = None,
              noise_scales: dict[str, float] | None = None) -> dict[str, float]:
    """Apply one ES step in place to the fp32 master tensors ``params`` (name -> tensor).

    For each tensor, ``d = (1/N) * sum_m f_m s_m eps_k(m)`` with ``N = len(schedule)`` and
    ``eps_k = noise(member_key(run_seed, iteration, k, tensor_ids[name]), shape)``, i.e.
    exactly the noise the members were evaluated with. Then:

    * weight decay (decoupled, as AdamW): ``theta -= learning_rate * weight_decay * theta``;
    * anchored decay toward the starting tensors ``anchor`` (name -> theta_0):
      ``theta -= learning_rate * anchor_decay * (theta - theta_0)``;
    * ``"sgd"``: ``theta += learning_rate * d`` (1/sigma folded into the learning rate);
    * ``"adam"``: bias-corrected Adam ascent on ``d`` (torch.optim.Adam's formula with
      ``grad = -d``); ``adam_state.step`` goes up by one per call. Ignored for ``"sgd"``.
    * ``noise_scales`` (name -> c, per-tensor noise scaling: members were evaluated at
      ``theta + s sigma c eps``): the step of that tensor is multiplied by ``c``, the
      search distribution's own scale (a diagonal preconditioner); decays are not.

    Only one direction buffer (plus one noise draw and, for Adam, one denominator) of the
    current tensor's size exists at a time. Returns global L2 norms as floats:
    ``update_norm`` (of the change applied to theta), ``param_norm`` (of theta after the
    step) and ``direction_norm`` (of ``d``, the gradient estimate times sigma).
    """
    _check_update_args(params, tensor_ids, optimizer, adam_state, learning_rate, betas, eps,
                       weight_decay)
    if anchor_decay:
        if not math.isfinite(anchor_decay) or anchor_decay < 0:
            raise ValueError(f"`anchor_decay` must be a finite number >= 0, got {anchor_decay}")
        if anchor is None or set(anchor) != set(params):
            raise ValueError("`anchor_decay` needs `anchor`: the starting tensor of every "
                             "parameter, by the same names")
    if noise_scales is not None:
        bad = [name for name in params if not (isinstance(noise_scales.get(name), float)
                                               and math.isfinite(noise_scales[name])
                                               and noise_scales[name] > 0)]
        if bad:
            raise ValueError(f"`noise_scales` needs a finite float > 0 for every parameter; "
                             f"missing or bad for {bad[:3]}")
    population_size = len(schedule)
    coefficients = {pair: value / population_size
                    for pair, value in pair_coefficients(shaped_fitness, schedule).items()}
    if optimizer == "adam":
        assert adam_state is not None  # checked above
        adam_state.step += 1
        bias_correction1 = 1.0 - betas[0] ** adam_state.step
        bias_correction2 = 1.0 - betas[1] ** adam_state.step

    update_sq = param_sq = direction_sq = 0.0
    for name in sorted(params):  # fixed order: reproducible stats whatever the dict order
        theta = params[name]
        ident = tensor_ids[name]
        direction = estimate_direction(
            theta.shape, lambda pair, ident=ident: member_key(run_seed, iteration, pair, ident),
            coefficients, device=theta.device, noise_backend=noise_backend)
        direction_sq += float(torch.linalg.vector_norm(direction, dtype=torch.float64)) ** 2
        # From here `direction` is reused as the buffer of the change applied to theta.
        if optimizer == "sgd":
            direction.mul_(learning_rate)
        else:
            exp_avg = _moment(adam_state.exp_avg, name, theta)
            exp_avg_sq = _moment(adam_state.exp_avg_sq, name, theta)
            exp_avg.mul_(betas[0]).add_(direction, alpha=1.0 - betas[0])
            exp_avg_sq.mul_(betas[1]).addcmul_(direction, direction, value=1.0 - betas[1])
            denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(eps)
            torch.div(exp_avg, denom, out=direction)
            direction.mul_(learning_rate / bias_correction1)
            del denom
        if noise_scales is not None:
            direction.mul_(noise_scales[name])
        if weight_decay:
            direction.add_(theta, alpha=-learning_rate * weight_decay)
        if anchor_decay:
            assert anchor is not None  # checked above
            direction.add_(theta - anchor[name].to(theta.device),
                           alpha=-learning_rate * anchor_decay)
        theta.add_(direction)
        update_sq += float(torch.linalg.vector_norm(direction, dtype=torch.float64)) ** 2
        param_sq += float(torch.linalg.vector_norm(theta, dtype=torch.float64)) ** 2
    return {"update_norm": math.sqrt(update_sq), "param_norm": math.sqrt(param_sq),
            "direction_norm": math.sqrt(direction_sq)}


def _moment(moments: dict[str, torch.Tensor], name: str, theta: torch.Tensor) -> torch.Tensor:
    """The Adam moment of ``name``: zeros on first use, moved to theta's device if loaded
    elsewhere (e.g. from a CPU checkpoint), and checked against theta's shape."""
    value = moments.get(name)
    if value is None:
        value = moments[name] = torch.zeros_like(theta, dtype=torch.float32)
    elif value.shape != theta.shape:
        raise ValueError(f"Adam state for {name!r} has shape {tuple(value.shape)} but the "
                         f"parameter has {tuple(theta.shape)}; the optimizer state belongs to "
                         "another adapter (drop it to restart Adam)")
    elif value.device != theta.device or value.dtype != torch.float32:
        value = moments[name] = value.to(device=theta.device, dtype=torch.float32)
    return value


def member_fitness(totals: Sequence[float], num_prompts: int, num_generations: int, *,
                   pass_at_k: bool = False, pass_at_k_fraction: float = 0.0,
                   correct_threshold: float = 1.0) -> float:
    """One member's fitness from the total rewards of its completions.

    ``totals`` is prompt-major: the ``num_generations`` completions of prompt 0, then of
    prompt 1, ... Without ``pass_at_k`` the fitness is the mean total reward. With it
    (k = ``num_generations``), a prompt scores 1.0 when at least
    ``max(1, ceil(pass_at_k_fraction * k))`` of its k completions reach
    ``correct_threshold`` (fraction 0 = any one), else 0.0; the fitness is the mean over
    prompts. pass@k rewards a member for solving a prompt sometimes, which keeps a
    signal on prompts the model rarely solves (greedy scoring would say 0 for all).
    """
    if num_prompts < 1 or num_generations < 1:
        raise ValueError(f"member_fitness needs num_prompts >= 1 and num_generations >= 1, "
                         f"got {num_prompts} and {num_generations}")
    expected = num_prompts * num_generations
    if len(totals) != expected:
        raise ValueError(f"member_fitness got {len(totals)} rewards for {num_prompts} prompts "
                         f"x {num_generations} generations = {expected}; totals must hold "
                         "every completion of the member, prompt-major")
    if not pass_at_k:
        return float(sum(totals)) / expected
    if not 0 <= pass_at_k_fraction <= 1:
        raise ValueError(f"`pass_at_k_fraction` should be in [0, 1], got {pass_at_k_fraction!r}")
    # 1e-9 absorbs float error: 0.3 * 10 is 3.0000000000000004 and must need 3, not 4.
    needed = max(1, math.ceil(pass_at_k_fraction * num_generations - 1e-9))
    solved = 0
    for start in range(0, expected, num_generations):
        group = totals[start:start + num_generations]
        solved += sum(t >= correct_threshold for t in group) >= needed
    return solved / num_prompts


@dataclass(frozen=True)
class Member:
    """One population member: its antithetic pair (noise stream) and sign."""

    pair: int
    sign: int
