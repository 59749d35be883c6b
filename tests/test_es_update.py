"""In-kernel ES update (kernels/es_update.py) against its twin and lowmem_es.es.

The kernel regenerates every pair's noise per element and sums in fp32 registers; it
must give ``es.estimate_direction``'s direction (and so ``es.es_update``'s step) to
~1e-6, whatever the block size. On CPU the kernel runs in the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, needs_kernel

from lowmem_es import es, noise
from lowmem_es.kernels import es_update as kes
from lowmem_es.kernels._runtime import FORCE_TORCH_ENV

pytestmark = needs_kernel

RUN_SEED, ITERATION = 99, 12
IDENT = noise.tensor_id("model.layers.3.self_attn.v_proj", "B")


def key_for_pair(pair: int) -> int:
    return noise.member_key(RUN_SEED, ITERATION, pair, IDENT)


def _coefficients(num_pairs: int, seed: int = 0, zeros: tuple[int, ...] = ()) -> dict[int, float]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(num_pairs, generator=generator, dtype=torch.float64) / num_pairs
    coefficients = {pair: float(v) for pair, v in zip(range(num_pairs), values, strict=True)}
    coefficients.update({pair: 0.0 for pair in zeros})
    return coefficients


def _tensors(coefficients: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = sorted(coefficients)
    keys = torch.tensor([key_for_pair(p) for p in pairs], dtype=torch.int64, device=DEVICE)
    values = torch.tensor([coefficients[p] for p in pairs], dtype=torch.float32, device=DEVICE)
    return keys, values


@pytest.mark.parametrize("shape", [(5, 37), (129, 5), (3, 37, 129), (1,)])
@pytest.mark.parametrize("num_pairs", [1, 4, 15])
def test_kernel_matches_twin_and_estimate_direction(shape, num_pairs) -> None:
    coefficients = _coefficients(num_pairs, seed=num_pairs, zeros=(1,) if num_pairs > 2 else ())
    keys, values = _tensors(coefficients)
    out = torch.full(shape, float("nan"), device=DEVICE)  # every element must be written
    kernel = kes.es_direction(keys, values, out, force="kernel")
    twin = kes.es_direction(keys, values, torch.empty(shape, device=DEVICE), force="torch")
    reference = es.estimate_direction(shape, key_for_pair, coefficients, device=DEVICE,
                                      force="torch")
    assert kernel is out and kernel.dtype == torch.float32
    assert torch.equal(twin, reference)  # the twin is estimate_direction's own loop
    torch.testing.assert_close(kernel, reference, atol=1e-6, rtol=1e-6)
    via_dispatch = es.estimate_direction(shape, key_for_pair, coefficients, device=DEVICE,
                                         force="kernel")
    assert torch.equal(via_dispatch, kernel)


def test_block_size_does_not_change_a_bit(monkeypatch) -> None:
    """Each element sums its pairs in the same order whatever the tiling."""
    keys, values = _tensors(_coefficients(6, seed=3))
    numel = 5000
    one_block = kes.es_direction_triton(keys, values, torch.empty(numel, device=DEVICE))
    monkeypatch.setattr(kes, "BLOCK_INTERPRETER", 1024)  # 5 programs, ragged last one
    monkeypatch.setattr(kes, "BLOCK_GPU", 128)
    many_blocks = kes.es_direction_triton(keys, values, torch.empty(numel, device=DEVICE))
    assert torch.equal(one_block, many_blocks)


def test_accumulate_is_the_whole_sgd_step() -> None:
    """out=theta, alpha=lr, accumulate: theta += lr * sum c eps in one launch, no buffer."""
    coefficients = _coefficients(8, seed=4)
    keys, values = _tensors(coefficients)
    generator = torch.Generator().manual_seed(5)
    theta = torch.randn(37, 129, generator=generator).to(DEVICE)
    direction = es.estimate_direction(theta.shape, key_for_pair, coefficients, device=DEVICE,
                                      force="torch")
    kernel = kes.es_direction_triton(keys, values, theta.clone(), alpha=0.05, accumulate=True)
    twin = kes.es_direction_torch(keys, values, theta.clone(), alpha=0.05, accumulate=True)
    expected = theta + 0.05 * direction
    torch.testing.assert_close(kernel, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(twin, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_es_update_through_kernel_matches_cpu_path(monkeypatch, optimizer) -> None:
    """es.es_update with its direction from the kernel: the same step to ~1e-6."""
    generator = torch.Generator().manual_seed(6)
    params = {"layer.lora_A": torch.randn(5, 37, generator=generator),
              "layer.lora_B": torch.randn(129, 5, generator=generator)}
    ids = {name: noise.tensor_id("layer", name[-1]) for name in params}
    schedule = es.member_schedule(8, antithetic=True)
    fitness = es.shape_fitness(torch.randn(8, generator=generator, dtype=torch.float64))
    kwargs = dict(run_seed=RUN_SEED, iteration=ITERATION, shaped_fitness=fitness,
                  schedule=schedule, learning_rate=0.01, optimizer=optimizer,
                  weight_decay=0.1)
    original = es.estimate_direction
    results = {}
    for force in ("torch", "kernel"):
        monkeypatch.setattr(es, "estimate_direction",
                            lambda *a, force=force, **k: original(*a, **k, force=force))
        results[force] = {n: t.clone().to(DEVICE) for n, t in params.items()}
        stats = es.es_update(results[force], ids, adam_state=es.AdamState(), **kwargs)
    cpu, kernel = results["torch"], results["kernel"]
    for name in params:
        torch.testing.assert_close(kernel[name], cpu[name], atol=1e-6, rtol=1e-6)
    assert stats["direction_norm"] > 0


def test_same_keys_bitwise_same_other_keys_differ() -> None:
    keys, values = _tensors(_coefficients(5, seed=7))
    first = kes.es_direction_triton(keys, values, torch.empty(3, 37, device=DEVICE))
    second = kes.es_direction_triton(keys, values, torch.empty(3, 37, device=DEVICE))
    other = kes.es_direction_triton(keys + 1, values, torch.empty(3, 37, device=DEVICE))
    assert torch.equal(first, second)
    assert not torch.allclose(first, other, atol=1e-3)


def test_no_pairs_gives_zeros_and_keys_mod_2_63() -> None:
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    out = kes.es_direction_triton(empty, empty.float(), torch.ones(7, device=DEVICE))
    assert torch.equal(out, torch.zeros(7, device=DEVICE))
    keys, values = _tensors(_coefficients(2, seed=8))
    high = keys | torch.tensor(-(2**63), dtype=torch.int64, device=DEVICE)
    assert torch.equal(kes.es_direction_triton(high, values, torch.empty(9, device=DEVICE)),
                       kes.es_direction_triton(keys, values, torch.empty(9, device=DEVICE)))


@pytest.mark.parametrize("force", ["kernel", "torch"])
def test_bad_input_raises_clear_error(force) -> None:
    keys, values = _tensors(_coefficients(3))
    out = torch.empty(4, 6, device=DEVICE)
    with pytest.raises(TypeError, match=r"`out` must be a float32 tensor"):
        kes.es_direction(keys, values, out.half(), force=force)
    with pytest.raises(ValueError, match=r"`out` must be contiguous"):
        kes.es_direction(keys, values, out.t(), force=force)
    with pytest.raises(TypeError, match=r"`keys` must be a torch.int64 tensor of shape"):
        kes.es_direction(keys.int(), values, out, force=force)
    with pytest.raises(TypeError, match=r"`coefficients` must be a torch.float32 tensor"):
        kes.es_direction(keys, values.double(), out, force=force)
    with pytest.raises(ValueError, match=r"`keys` has shape \(3,\) but `coefficients` has "
                                         r"\(2,\)"):
        kes.es_direction(keys, values[:2].contiguous(), out, force=force)
    with pytest.raises(ValueError, match="`force` must be one of"):
        es.estimate_direction((2, 2), key_for_pair, {0: 1.0}, device=DEVICE, force="gpu")


def test_dispatch_twin_on_cpu_and_env_switch(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(kes, "es_direction_torch", lambda *a: calls.append("torch"))
    monkeypatch.setattr(kes, "es_direction_triton", lambda *a: calls.append("kernel"))
    keys, values = _tensors(_coefficients(2))
    kes.es_direction(keys.cpu(), values.cpu(), torch.empty(3))
    monkeypatch.setenv(FORCE_TORCH_ENV, "1")
    kes.es_direction(keys, values, torch.empty(3, device=DEVICE))
    kes.es_direction(keys, values, torch.empty(3, device=DEVICE), force="kernel")
    assert calls == ["torch", "torch", "kernel"]


@pytest.mark.skipif(DEVICE != "cuda", reason="peak memory is measured on CUDA")
def test_no_population_sized_buffer_on_cuda() -> None:
    """64 pairs over 4M elements: nothing beyond the output and the (64,) key tensors."""
    coefficients = _coefficients(64, seed=9)
    keys, values = _tensors(coefficients)
    out = torch.empty(1 << 22, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kes.es_direction_triton(keys, values, out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 1 << 20
