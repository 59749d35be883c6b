"""Per-row keyed Gumbel scores: the kernel against its twin, the uniforms' range, rows
independent of each other, and Gumbel-max drawing from softmax(logits / T)."""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, needs_kernel

from lowmem_es.kernels import sampling
from lowmem_es.noise import member_key, philox4x32

KEYS = [member_key(7, 3, r, 11) for r in range(5)]


def _logits(rows, vocab, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, vocab, generator=generator)).to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("vocab", "step"), [(1000, 0), (4099, 17)])
def test_kernel_matches_twin(dtype, vocab, step):
    """Same uniforms bit for bit (same Philox words), so the scores agree to the logs'
    rounding, over vocabularies that are not a multiple of the block."""
    logits = _logits(5, vocab, dtype).to(DEVICE)
    keys = torch.tensor(KEYS, device=DEVICE)
    kernel = sampling.gumbel_scores_triton(logits, keys, step, 0.7)
    twin = sampling.gumbel_scores_torch(logits, keys, step, 0.7)
    assert kernel.dtype == twin.dtype == torch.float32 and kernel.shape == (5, vocab)
    torch.testing.assert_close(kernel, twin, rtol=1e-5, atol=1e-5)
    assert torch.equal(kernel.argmax(-1), twin.argmax(-1))


@needs_kernel
def test_kernel_reads_strided_rows():
    """A row stride wider than the vocabulary (a view of a padded buffer) reads the view;
    keys are taken mod 2**63 inside the kernel, as the twin takes them."""
    wide = _logits(3, 300).to(DEVICE)
    view = wide[:, :257]
    keys = torch.tensor([KEYS[0], -5, -(2 ** 63)], device=DEVICE)
    torch.testing.assert_close(sampling.gumbel_scores_triton(view, keys, 2, 1.0),
                               sampling.gumbel_scores_torch(view.contiguous(), keys, 2, 1.0),
                               rtol=1e-5, atol=1e-5)


def test_twin_is_the_formula_and_chunk_free(monkeypatch):
    """Element (r, c) is logits / T - log(-log(u)) with u from Philox word 0 of key r at
    counter (c, step): computed directly here, and equal for any chunk width."""
    logits = _logits(3, 700)
    keys = torch.tensor(KEYS[:3])
    step = 5
    counters = torch.arange(700, dtype=torch.int64) | (step << 32)
    word, _ = philox4x32(keys[:, None], counters[None, :])
    u = sampling.uniform24(word)
    expected = logits / 0.5 - torch.log(-torch.log(u))
    whole = sampling.gumbel_scores_torch(logits, keys, step, 0.5)
    torch.testing.assert_close(whole, expected, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(sampling, "TWIN_ELEMENTS", 3 * 64)  # 64 columns a pass
    assert torch.equal(sampling.gumbel_scores_torch(logits, keys, step, 0.5), whole)


def test_uniforms_never_reach_zero_or_one():
    """The extreme words map strictly inside (0, 1), exactly: no infinite Gumbel value."""
    words = torch.tensor([0, 1, 511, 512, (1 << 31) - 1, 1 << 31, (1 << 32) - 1])
    u = sampling.uniform24(words)
    assert u[0].item() == 2.0 ** -24 and u[-1].item() == 1 - 2.0 ** -24
    assert bool(((u > 0) & (u < 1)).all())
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())
    assert u[2].item() == u[0].item() and u[3].item() > u[2].item()  # 23 bits kept


def test_rows_depend_only_on_their_key_and_step():
    """Reordering rows reorders the scores; another step or key gives other noise."""
    logits = torch.zeros(4, 500)
    keys = torch.tensor(KEYS[:4])
    base = sampling.gumbel_scores_torch(logits, keys, 3, 1.0)
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(sampling.gumbel_scores_torch(logits, keys[order], 3, 1.0), base[order])
    assert not torch.equal(sampling.gumbel_scores_torch(logits, keys, 4, 1.0), base)
    same = torch.tensor([KEYS[0], KEYS[0]])
    twice = sampling.gumbel_scores_torch(torch.zeros(2, 500), same, 3, 1.0)
    assert torch.equal(twice[0], twice[1]) and torch.equal(twice[0], base[0])


def test_gumbel_max_draws_from_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    rows = 4000
    keys = torch.tensor([member_key(1, 0, r, 0) for r in range(rows)])
    scores = sampling.gumbel_scores_torch(logits.expand(rows, -1), keys, 0, 0.5)
    frequencies = torch.bincount(scores.argmax(-1), minlength=5).float() / rows
    torch.testing.assert_close(frequencies, torch.softmax(logits / 0.5, dim=0), atol=0.02,
                               rtol=0)


def test_bad_inputs_are_named():
    logits = torch.zeros(2, 8)
    keys = torch.tensor(KEYS[:2])
    with pytest.raises(ValueError, match="keys"):
        sampling.gumbel_scores(logits, keys[:1], 0, 1.0)
    with pytest.raises(ValueError, match="keys"):
        sampling.gumbel_scores(logits, keys.to(torch.int32), 0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        sampling.gumbel_scores(logits, keys, 0, 0.0)
    with pytest.raises(ValueError, match=r"1e-30.*float32"):  # 1 / T would overflow
        sampling.gumbel_scores(logits, keys, 0, 1e-40)
    with pytest.raises(ValueError, match="step"):
        sampling.gumbel_scores(logits, keys, -1, 1.0)
    with pytest.raises(ValueError, match="logits"):
        sampling.gumbel_scores(torch.zeros(8), keys, 0, 1.0)
