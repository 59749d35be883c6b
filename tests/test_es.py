"""Tests of the ES math (lowmem_es/es.py) against independent references.

References are computed here from the definitions: the update against one that stacks every
member's noise, Adam against torch.optim.Adam/AdamW, and the estimator's direction against
autograd gradients (with the sqrt(N' / (N' + d + 1)) cosine law). CPU only, no compile.
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import lowmem_es.es as es
from lowmem_es.es import (
    AdamState,
    es_update,
    estimate_direction,
    member_fitness,
    member_schedule,
    pair_coefficients,
    shape_fitness,
)
from lowmem_es.noise import member_key, tensor_id
from lowmem_es.noise_batch import noise

# The gradient-quality measurement is shared with the benchmark that reports it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from es_cosine import RUN_SEED, classifier, cosine, es_direction, predicted_cosine, quadratic


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # local generator: never the global RNG


def _tensor_ids(names) -> dict[str, int]:
    return {name: tensor_id(f"layers.{i}.q_proj", "A") for i, name in enumerate(names)}


def _naive_direction(params, tensor_ids, iteration, fitness, schedule):
    """d per tensor, materialising every member's noise: (1/N) sum_m f_m s_m eps_pair(m)."""
    fitness = torch.as_tensor(fitness, dtype=torch.float64)
    signs = torch.tensor([sign for _, sign in schedule], dtype=torch.float64)
    out = {}
    for name, theta in params.items():
        member_noise = torch.stack([  # (N, *shape): the buffer es_update must avoid
            noise(member_key(RUN_SEED, iteration, pair, tensor_ids[name]), theta.shape)
            for pair, _ in schedule]).double()
        out[name] = torch.einsum("m,m...->...", fitness * signs, member_noise) / len(schedule)
    return out


def _example_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = _generator(seed)  # odd shapes on purpose
    return {"layers.0.lora_A": torch.randn(3, 37, generator=g),
            "layers.0.lora_B": torch.randn(37, 5, generator=g),
            "layers.1.lora_A": torch.randn(129, generator=g)}


def _clone(params):
    return {name: value.clone() for name, value in params.items()}


# member_schedule ----------------------------------------------------------------------------

def test_member_schedule_antithetic_pairs_and_signs():
    schedule = member_schedule(6, antithetic=True)
    assert schedule == [(0, 1), (0, -1), (1, 1), (1, -1), (2, 1), (2, -1)]
    for m, (pair, sign) in enumerate(member_schedule(30, antithetic=True)):
        assert pair == m // 2
        assert sign == (1 if m % 2 == 0 else -1)


def test_member_schedule_plain():
    assert member_schedule(5, antithetic=False) == [(m, 1) for m in range(5)]
    assert member_schedule(1, antithetic=False) == [(0, 1)]


@pytest.mark.parametrize(("population_size", "antithetic"),
                         [(7, True), (1, True), (0, True), (0, False), (-4, False)])
def test_member_schedule_rejects_bad_population(population_size, antithetic):
    with pytest.raises(ValueError, match="`population_size`") as info:
        member_schedule(population_size, antithetic)
    assert str(population_size) in str(info.value)


# shape_fitness ------------------------------------------------------------------------------

def _rewards(count: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randn(count, generator=_generator(seed), dtype=torch.float64) * 2.0 + 0.7


@pytest.mark.parametrize(("scale", "offset"), [(0.5, -3.0), (3.0, 10.0), (250.0, 1e3)])
def test_shape_fitness_affine_invariant(scale, offset):
    rewards = _rewards()
    transformed = rewards * scale + offset
    torch.testing.assert_close(shape_fitness(transformed, "zscore"),
                               shape_fitness(rewards, "zscore"), rtol=1e-6, atol=1e-9)
    assert torch.equal(shape_fitness(transformed, "centered_rank"),
                       shape_fitness(rewards, "centered_rank"))


def test_shape_fitness_zscore_definition_and_moments():
    rewards = _rewards().tolist()
    shaped = shape_fitness(rewards, "zscore")
    assert shaped.dtype == torch.float64
    mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
    expected = torch.tensor([(r - mean) / (std + 1e-8) for r in rewards], dtype=torch.float64)
    torch.testing.assert_close(shaped, expected)
    assert abs(float(shaped.mean())) < 1e-12
    assert abs(float(shaped.std(correction=0)) - 1.0) < 1e-6


def test_shape_fitness_none_is_centered_reward():
    rewards = _rewards()
    torch.testing.assert_close(shape_fitness(rewards, "none"), rewards - rewards.mean())


@pytest.mark.parametrize("method", ["zscore", "centered_rank", "none"])
def test_shape_fitness_all_equal_is_zero(method):
    shaped = shape_fitness([0.1] * 7, method)  # 0.1 is inexact: mean may differ by an ulp
    assert torch.equal(shaped, torch.zeros(7, dtype=torch.float64))
    assert torch.equal(shape_fitness([2.5], method), torch.zeros(1, dtype=torch.float64))


def test_shape_fitness_centered_rank_ties_get_average_rank():
    rewards = [3.0, 1.0, 3.0, 2.0, 1.0, -4.0, 3.0, 0.5]
    count = len(rewards)
    # From the definition: rank = #smaller + (#equal - 1) / 2, then rank / (N - 1) - 0.5.
    expected = []
    for value in rewards:
        smaller = sum(other < value for other in rewards)
        equal = sum(other == value for other in rewards)
        expected.append((smaller + (equal - 1) / 2) / (count - 1) - 0.5)
    shaped = shape_fitness(rewards, "centered_rank")
    torch.testing.assert_close(shaped, torch.tensor(expected, dtype=torch.float64))
    assert float(shaped[5]) == -0.5  # the unique minimum
    assert shaped[0] == shaped[2] == shaped[6]
    distinct = shape_fitness(_rewards(), "centered_rank")
    assert float(distinct.min()) == -0.5 and float(distinct.max()) == 0.5


def test_shape_fitness_rejects_unknown_method_and_nan():
    with pytest.raises(ValueError, match="centered_rank") as info:
        shape_fitness([1.0, 2.0], "rank")
    assert "zscore" in str(info.value) and "'rank'" in str(info.value)
    with pytest.raises(ValueError, match="member 1"):
        shape_fitness([1.0, float("nan"), 2.0])


# pair_coefficients --------------------------------------------------------------------------

def test_pair_coefficients_small_example():
    fitness = [0.5, -1.0, 2.0, 0.25, -0.75, -0.75]
    coefficients = pair_coefficients(fitness, member_schedule(6, antithetic=True))
    # By hand: f(+) - f(-) per pair.
    assert coefficients == {0: 0.5 - (-1.0), 1: 2.0 - 0.25, 2: 0.0}
    assert pair_coefficients(fitness, member_schedule(6, antithetic=False)) == dict(
        enumerate(fitness))
    # Any schedule: coef[k] = sum of f_m * s_m over members of pair k.
    schedule = [(1, 1), (0, -1), (1, -1), (1, 1), (0, -1), (2, 1)]
    assert pair_coefficients(fitness, schedule) == pytest.approx(
        {1: 0.5 - 2.0 + 0.25, 0: 1.0 + 0.75, 2: -0.75})
    with pytest.raises(ValueError, match="`shaped_fitness`"):
        pair_coefficients(fitness[:5], member_schedule(6, antithetic=True))


# estimate_direction / es_update vs naive references -----------------------------------------

def test_estimate_direction_sums_weighted_noise_and_skips_zeros(monkeypatch):
    calls = []
    original = es.noise

    def recording(key, shape, *args, **kwargs):
        calls.append(key)
        return original(key, shape, *args, **kwargs)

    monkeypatch.setattr(es, "noise", recording)
    key_for_pair = lambda pair: member_key(RUN_SEED, 4, pair, 17)  # noqa: E731
    direction = estimate_direction((6, 11), key_for_pair, {7: -2.0, 0: 0.5, 3: 0.0})
    expected = 0.5 * noise(key_for_pair(0), (6, 11)) - 2.0 * noise(key_for_pair(7), (6, 11))
    torch.testing.assert_close(direction, expected)
    assert direction.dtype == torch.float32
    assert sorted(calls) == sorted([key_for_pair(0), key_for_pair(7)])  # pair 3 skipped


@pytest.mark.parametrize(("population_size", "antithetic"), [(8, True), (5, False)])
def test_sgd_update_matches_naive_reference(population_size, antithetic):
    params = _example_params()
    start = _clone(params)
    ids = _tensor_ids(params)
    schedule = member_schedule(population_size, antithetic)
    rewards = torch.randn(population_size, generator=_generator(9), dtype=torch.float64)
    if antithetic:
        rewards[3] = rewards[2]  # a zero pair coefficient must still match
    fitness = shape_fitness(rewards)
    stats = es_update(params, ids, run_seed=RUN_SEED, iteration=3, shaped_fitness=fitness,
                      schedule=schedule, learning_rate=0.05)
    direction = _naive_direction(start, ids, 3, fitness, schedule)
    for name in params:
        expected = (start[name].double() + 0.05 * direction[name]).float()
        torch.testing.assert_close(params[name], expected)
    change = torch.cat([(params[n] - start[n]).flatten() for n in sorted(params)])
    torch.testing.assert_close(stats["update_norm"], float(change.norm()), rtol=1e-5, atol=0)
    flat = torch.cat([params[n].flatten() for n in sorted(params)])
    torch.testing.assert_close(stats["param_norm"], float(flat.norm()), rtol=1e-6, atol=0)


def test_sgd_weight_decay_is_decoupled():
    params = _example_params(1)
    start = _clone(params)
    ids = _tensor_ids(params)
    schedule = member_schedule(6, antithetic=True)
    fitness = shape_fitness(torch.randn(6, generator=_generator(2)))
    lr, decay = 0.1, 0.3
    es_update(params, ids, run_seed=RUN_SEED, iteration=0, shaped_fitness=fitness,
              schedule=schedule, learning_rate=lr, weight_decay=decay)
    direction = _naive_direction(start, ids, 0, fitness, schedule)
    for name in params:
        expected = start[name].double() * (1 - lr * decay) + lr * direction[name]
        torch.testing.assert_close(params[name], expected.float())


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_matches_torch_optim(weight_decay):
    params = _example_params(2)
    ids = _tensor_ids(params)
    reference = {name: torch.nn.Parameter(value.clone()) for name, value in params.items()}
    lr, betas, eps = 1e-2, (0.8, 0.99), 1e-6
    optimizer_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    torch_opt = optimizer_cls(list(reference.values()), lr=lr, betas=betas, eps=eps,
                              weight_decay=weight_decay)
    state = AdamState()
    schedule = member_schedule(6, antithetic=True)
    for iteration in range(4):
        fitness = shape_fitness(torch.randn(6, generator=_generator(10 + iteration)))
        direction = _naive_direction(params, ids, iteration, fitness, schedule)
        es_update(params, ids, run_seed=RUN_SEED, iteration=iteration, shaped_fitness=fitness,
                  schedule=schedule, learning_rate=lr, optimizer="adam", adam_state=state,
                  betas=betas, eps=eps, weight_decay=weight_decay)
        for name, parameter in reference.items():
            parameter.grad = -direction[name].float()  # ascent on d == descent on -d
        torch_opt.step()
        for name, parameter in reference.items():
            torch.testing.assert_close(params[name], parameter.detach())
    assert state.step == 4
    for name, parameter in reference.items():
        torch.testing.assert_close(state.exp_avg[name], -torch_opt.state[parameter]["exp_avg"])
        torch.testing.assert_close(state.exp_avg_sq[name],
                                   torch_opt.state[parameter]["exp_avg_sq"])


def test_adam_state_roundtrips_through_safetensors():
    ids = _tensor_ids(_example_params())
    schedule = member_schedule(4, antithetic=True)
    fitness = [shape_fitness(torch.randn(4, generator=_generator(20 + i))) for i in range(3)]
    kwargs = dict(run_seed=RUN_SEED, schedule=schedule, learning_rate=1e-3, optimizer="adam")

    straight, straight_state = _example_params(), AdamState()
    for i in range(3):
        es_update(straight, ids, iteration=i, shaped_fitness=fitness[i],
                  adam_state=straight_state, **kwargs)

    resumed, state = _example_params(), AdamState()
    for i in range(2):
        es_update(resumed, ids, iteration=i, shaped_fitness=fitness[i], adam_state=state,
                  **kwargs)
    flat = state.state_dict()
    assert flat["step"].dtype == torch.int64 and flat["step"].dim() == 0
    assert set(flat) == {"step"} | {f"exp_avg.{n}" for n in ids} | {
        f"exp_avg_sq.{n}" for n in ids}
    state = AdamState.from_state_dict(load_safetensors(save_safetensors(flat)))
    assert state.step == 2
    es_update(resumed, ids, iteration=2, shaped_fitness=fitness[2], adam_state=state, **kwargs)
    for name in straight:
        assert torch.equal(resumed[name], straight[name])  # bit-exact resume
    with pytest.raises(ValueError, match="step"):
        AdamState.from_state_dict({"exp_avg.x": torch.zeros(2), "exp_avg_sq.x": torch.zeros(2)})


def test_update_is_deterministic_and_independent_of_dict_order():
    params = _example_params()
    ids = _tensor_ids(params)
    schedule = member_schedule(10, antithetic=True)
    fitness = shape_fitness(torch.randn(10, generator=_generator(5)), "centered_rank")
    kwargs = dict(run_seed=RUN_SEED, iteration=7, shaped_fitness=fitness, schedule=schedule,
                  learning_rate=0.01)
    first, second = _clone(params), dict(reversed(list(_clone(params).items())))
    stats_first = es_update(first, ids, **kwargs)
    stats_second = es_update(second, ids, **kwargs)
    assert stats_first == stats_second
    for name in first:
        assert torch.equal(first[name], second[name])
    zero = _clone(params)
    es_update(zero, ids, run_seed=RUN_SEED, iteration=7, shaped_fitness=[0.0] * 10,
              schedule=schedule, learning_rate=0.01)
    for name in zero:
        assert torch.equal(zero[name], params[name])


def test_update_rejects_bad_arguments():
    params = _example_params()
    ids = _tensor_ids(params)
    schedule = member_schedule(4, antithetic=True)
    kwargs = dict(run_seed=RUN_SEED, iteration=0, shaped_fitness=[1.0, -1.0, 0.5, 0.0],
                  schedule=schedule, learning_rate=0.1)
    half = dict(params, **{"layers.0.lora_B": params["layers.0.lora_B"].bfloat16()})
    with pytest.raises(ValueError, match=r"layers\.0\.lora_B"):
        es_update(half, ids, **kwargs)
    with pytest.raises(ValueError, match="`adam_state`"):
        es_update(params, ids, optimizer="adam", **kwargs)
    with pytest.raises(ValueError, match="`optimizer`"):
        es_update(params, ids, optimizer="lion", **kwargs)
    with pytest.raises(ValueError, match="`tensor_ids`"):
        es_update(params, {}, **kwargs)
    with pytest.raises(ValueError, match="`shaped_fitness`"):
        es_update(params, ids, **dict(kwargs, shaped_fitness=[1.0, 2.0]))
    torch.testing.assert_close(params, _example_params())  # nothing applied on error


def test_update_draws_one_tensor_sized_noise_at_a_time(monkeypatch):
    """No population-sized buffer: every draw has the parameter's shape, each pair is drawn
    once per tensor (antithetic members share it) and a draw is freed before the next."""
    params = _example_params()
    ids = _tensor_ids(params)
    shapes = {ids[name]: tuple(value.shape) for name, value in params.items()}
    population_size = 64
    schedule = member_schedule(population_size, antithetic=True)
    fitness = shape_fitness(torch.randn(population_size, generator=_generator(6)))
    expected_keys = {member_key(RUN_SEED, 2, pair, ident): ident
                     for pair in range(population_size // 2) for ident in ids.values()}
    original = es.noise
    live = [0]
    peak = [0]
    drawn: list[int] = []

    def released():
        live[0] -= 1

    def recording(key, shape, *args, **kwargs):
        assert tuple(shape) == shapes[expected_keys[key]]  # never (N, ...) or concatenated
        out = original(key, shape, *args, **kwargs)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(out, released)
        drawn.append(key)
        return out

    monkeypatch.setattr(es, "noise", recording)
    es_update(params, ids, run_seed=RUN_SEED, iteration=2, shaped_fitness=fitness,
              schedule=schedule, learning_rate=0.01)
    assert sorted(drawn) == sorted(expected_keys)  # once per (pair, tensor), not per member
    assert peak[0] == 1 and live[0] == 0


# Gradient quality: the ES direction against autograd ----------------------------------------
#
# With antithetic pairs and 'none' shaping, the mean drops out of each pair, so
#     d = (1/N) sum_k (r_k+ - r_k-) eps_k,    r_k+- = f(theta +- sigma eps_k).
# For the quadratic f = -0.5 ||theta - target||^2 the difference is exactly 2 sigma g.eps_k
# (g = target - theta), so with N' = N/2 pairs  d / sigma = (1/N') sum_k eps_k eps_k^T g.
# Each term has mean g and covariance E[(eps.g)^2 eps eps^T] - g g^T = |g|^2 I + g g^T, so
# d / sigma = g + noise with E|noise|^2 = (dim + 1) |g|^2 / N', and to leading order
#     cos(d, g) ~= 1 / sqrt(1 + (dim + 1) / N') = sqrt(N' / (N' + dim + 1)),
# the sqrt(N/d) law (sqrt(N'/dim) while N' << dim). A smooth objective behaves the same
# once sigma is small enough that third-order terms vanish. (Monte Carlo of this estimator
# gives mean cosines within 0.006 of the formula at dim=200, N' >= 16.)

QUAD_DIM = 200


def test_es_direction_matches_gradient_on_quadratic():
    theta, ids, objective, gradient, _ = quadratic(QUAD_DIM)
    num_pairs = 2048  # population 4096
    measured = cosine(es_direction(theta, ids, objective, num_pairs, 1e-2, 0), gradient)
    predicted = predicted_cosine(num_pairs, QUAD_DIM)
    print(f"\nquadratic dim={QUAD_DIM} N={2 * num_pairs}: cos={measured:.4f} "
          f"predicted={predicted:.4f}")
    assert measured > 0.8
    assert abs(measured - predicted) < 0.03


def test_es_direction_matches_gradient_on_tiny_model():
    theta, ids, objective, gradient, dim = classifier()
    num_pairs = 2048
    measured = cosine(es_direction(theta, ids, objective, num_pairs, 1e-3, 0), gradient)
    predicted = predicted_cosine(num_pairs, dim)
    print(f"\nclassifier dim={dim} N={2 * num_pairs}: cos={measured:.4f} "
          f"predicted={predicted:.4f}")
    # Predicted ~0.944; per-draw spread at this N' is ~0.005, so 0.9 leaves room only for
    # estimator noise, not for a wrong sign, scale mix-up across tensors or reused noise.
    assert measured > 0.9
    assert abs(measured - predicted) < 0.03


def test_es_cosine_follows_sqrt_law_on_quadratic():
    theta, ids, objective, gradient, _ = quadratic(QUAD_DIM)
    seeds = 12
    measured = {}
    for num_pairs in (16, 64, 256):
        cosines = [cosine(es_direction(theta, ids, objective, num_pairs, 1e-2, it), gradient)
                   for it in range(seeds)]
        measured[num_pairs] = statistics.fmean(cosines)
        predicted = predicted_cosine(num_pairs, QUAD_DIM)
        print(f"\nN'={num_pairs:4d}: mean cos over {seeds} seeds={measured[num_pairs]:.4f} "
              f"(sd {statistics.stdev(cosines):.4f}) predicted={predicted:.4f}")
        # Per-draw sd is ~0.046 / 0.037 / 0.022 (Monte Carlo), so the mean of 12 has sd
        # <= 0.014: 0.05 is > 3.5 sd plus the formula's 0.006 second-order bias.
        assert abs(measured[num_pairs] - predicted) < 0.05
    assert measured[16] < measured[64] < measured[256]


def test_module_uses_no_global_rng():
    state = torch.random.get_rng_state()
    params = _example_params()
    es_update(params, _tensor_ids(params), run_seed=RUN_SEED, iteration=1,
              shaped_fitness=shape_fitness([1.0, 3.0, 2.0, 0.0]),
              schedule=member_schedule(4, antithetic=True), learning_rate=0.1,
              optimizer="adam", adam_state=AdamState())
    assert torch.equal(torch.random.get_rng_state(), state)


# --- learning-rate schedule ---

@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_scheduled_learning_rate_decays_from_lr_to_min(schedule):
    rates = [es.scheduled_learning_rate(0.02, schedule, i, 11, 0.1) for i in range(11)]
    assert rates[0] == pytest.approx(0.02) and rates[-1] == pytest.approx(0.002)
    assert all(a > b for a, b in itertools.pairwise(rates))  # strictly decreasing
    middle = 0.002 + 0.5 * (0.02 - 0.002)  # both schedules are half way at the midpoint
    assert rates[5] == pytest.approx(middle)
    if schedule == "linear":
        steps = [a - b for a, b in itertools.pairwise(rates)]
        assert max(steps) == pytest.approx(min(steps))
    else:  # cosine: slow at both ends, fast in the middle
        assert rates[0] - rates[1] < rates[5] - rates[6]
    assert es.scheduled_learning_rate(0.02, schedule, 50, 11, 0.1) == pytest.approx(0.002)


def test_scheduled_learning_rate_constant_and_errors():
    assert [es.scheduled_learning_rate(0.01, "constant", i, 5) for i in range(5)] == [0.01] * 5
    assert es.scheduled_learning_rate(0.01, "cosine", 0, 1) == 0.01  # one iteration: no decay
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        es.scheduled_learning_rate(0.01, "step", 0, 5)


# Two prompts x three generations, prompt-major.
TOTALS = [0.0, 1.1, 0.1,    # prompt 0: one of three correct (1.1 >= 1.0)
          0.1, 0.0, 0.1]    # prompt 1: none correct


def test_member_fitness_plain_mean():
    assert member_fitness(TOTALS, 2, 3) == pytest.approx(1.4 / 6)
    assert member_fitness([0.5], 1, 1) == 0.5


def test_member_fitness_pass_at_k_any():
    assert member_fitness(TOTALS, 2, 3, pass_at_k=True) == 0.5
    assert member_fitness([1.0, 1.0, 0.0, 1.0], 2, 2, pass_at_k=True) == 1.0
    assert member_fitness([0.0] * 4, 2, 2, pass_at_k=True) == 0.0


def test_member_fitness_threshold_is_inclusive_and_configurable():
    assert member_fitness([0.1, 0.0], 1, 2, pass_at_k=True, correct_threshold=0.1) == 1.0
    assert member_fitness([0.09, 0.0], 1, 2, pass_at_k=True, correct_threshold=0.1) == 0.0


@pytest.mark.parametrize(("fraction", "expected"), [
    (0.0, 1.0),   # any one of 4
    (0.25, 1.0),  # ceil(1.0) = 1
    (0.5, 1.0),   # 2 of 4 needed, 2 correct
    (0.51, 0.0),  # ceil(2.04) = 3 needed
    (1.0, 0.0),   # all 4 needed
])
def test_member_fitness_fraction(fraction, expected):
    totals = [1.0, 0.0, 1.0, 0.0]  # one prompt, k = 4, two correct
    assert member_fitness(totals, 1, 4, pass_at_k=True, pass_at_k_fraction=fraction) == expected


def test_member_fitness_fraction_float_error():
    # 0.3 * 10 = 3.0000000000000004 in floats: it must need 3 correct, not 4.
    totals = [1.0] * 3 + [0.0] * 7
    assert member_fitness(totals, 1, 10, pass_at_k=True, pass_at_k_fraction=0.3) == 1.0


def test_member_fitness_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"got 5 rewards for 2 prompts x 3 generations = 6"):
        member_fitness(TOTALS[:5], 2, 3)
    with pytest.raises(ValueError, match=r"num_prompts >= 1"):
        member_fitness([], 0, 3)
    with pytest.raises(ValueError, match=r"`pass_at_k_fraction`.*1.5"):
        member_fitness(TOTALS, 2, 3, pass_at_k=True, pass_at_k_fraction=1.5)


def test_relative_noise_scales_are_each_tensors_rms_and_one_at_zero():
    origin = {"a": torch.tensor([[3.0, -4.0]]), "b": torch.zeros(2, 3),
              "c": torch.full((5,), 0.25)}
    scales = es.relative_noise_scales(origin)
    assert scales == {"a": pytest.approx(math.sqrt(12.5)), "b": 1.0, "c": 0.25}
    assert all(isinstance(v, float) for v in scales.values())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_noise_scales_multiply_each_tensors_step(optimizer):
    """Members saw theta + s sigma c eps: the tensor's step is c times the unscaled one."""
    params = _example_params(3)
    ids = _tensor_ids(params)
    schedule = member_schedule(6, antithetic=True)
    fitness = shape_fitness(torch.randn(6, generator=_generator(4)))
    scales = {name: 0.5 + i for i, name in enumerate(sorted(params))}
    plain, scaled = _clone(params), _clone(params)
    kwargs = dict(run_seed=RUN_SEED, iteration=2, shaped_fitness=fitness, schedule=schedule,
                  learning_rate=0.1, optimizer=optimizer)
    es_update(plain, ids, adam_state=AdamState(), **kwargs)
    es_update(scaled, ids, adam_state=AdamState(), noise_scales=scales, **kwargs)
    for name in params:
        torch.testing.assert_close(scaled[name] - params[name],
                                   scales[name] * (plain[name] - params[name]))
    with pytest.raises(ValueError, match="noise_scales"):
        es_update(_clone(params), ids, noise_scales={**scales, sorted(params)[0]: 0.0},
                  adam_state=AdamState(), **kwargs)
