"""The fast noise generators (``lowmem_es.noise_batch``): ``noise_batch`` and
``perturbed_rows``, eager and compiled, bit for bit the reference ``_randn_eager`` and
``noise`` key by key, whatever the block sizes, key order or antithetic pairs sharing a key.
"""

from __future__ import annotations

import pytest
import torch
from test_noise import KEYS, Q_PROJ, _compiled_or_skip

from lowmem_es import noise, noise_batch


@pytest.mark.parametrize("chunk", [100, 1 << 16])
def test_noise_batch_rows_are_per_key_noise(chunk: int) -> None:
    tids = [noise.tensor_id(f"model.layers.{layer}.mlp.up_proj", m) for layer in range(3)
            for m in "AB"]
    keys = [noise.member_key(99, 4, pair, tid) for pair in range(2) for tid in tids] + [2**63 - 1]
    shape = (8, 37)
    batch = noise_batch.noise_batch(keys, shape, chunk=chunk, backend="eager")
    assert batch.shape == (len(keys), *shape)
    for row, key in zip(batch, keys, strict=True):
        assert torch.equal(row, noise_batch.noise(key, shape, backend="eager"))
    assert noise_batch.noise_batch([], shape, backend="eager").shape == (0, *shape)


BATCH_KEYS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63 + 5,  # taken modulo 2**63
              noise.member_key(1234, 10, 3, noise.tensor_id(Q_PROJ, "A")),
              noise.member_key(1234, 10, 4, noise.tensor_id(Q_PROJ, "B"))]


@pytest.mark.parametrize("key", list(KEYS.values()), ids=list(KEYS))
def test_batch_generators_bit_identical_to_reference(key: int) -> None:
    """The batch paths' generators (eager buffered ``_randn_block``, and ``_randn_low``
    which the compiled tiles run) against the readable ``_randn_eager``, bit for bit,
    where the counter's words carry and overflow."""
    key_t = torch.tensor([[key], [2**63 - 1 - key]])
    work = [torch.empty(2 * 600, dtype=torch.int64) for _ in range(5)]
    work += [torch.empty(2 * 600) for _ in range(2)]
    for start in (0, 2**31 - 300, 2**32 - 300, 2**45 + 7):
        reference = noise._randn_eager(key_t, torch.arange(start, start + 600)[None, :])
        assert torch.equal(noise_batch._randn_block(key_t, start, 600, work), reference)
        if start + 600 <= 2**32:
            assert torch.equal(noise_batch._randn_low(key_t, torch.arange(start, start + 600)),
                               reference)
    low = torch.randint(0, 2**32, (5000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise_batch._randn_low(key_t[:1], low), noise._randn_eager(key_t[:1], low))


@pytest.mark.parametrize("chunk", [7, 1000, noise.DEFAULT_CHUNK])
def test_eager_noise_batch_andperturbed_rows_bit_identical(chunk: int) -> None:
    shape = (37, 129)
    batch = noise_batch.noise_batch(BATCH_KEYS, shape, chunk=chunk, backend="eager")
    generator = torch.Generator().manual_seed(4)
    master = torch.randn(shape, generator=generator)
    steps = torch.randn(len(BATCH_KEYS), generator=generator)
    rows = noise_batch.perturbed_rows(BATCH_KEYS, master.to(torch.bfloat16), steps, backend="eager")
    for i, key in enumerate(BATCH_KEYS):
        eps = noise_batch.noise(key, shape, backend="eager")
        assert torch.equal(batch[i], eps)
        expected = master.to(torch.bfloat16).float() + steps[i] * eps
        assert torch.equal(rows[i, :master.numel()].view(shape), expected)


# Shapes for the compiled tiles: one partial tile; several keys a block (the ring of
# master rows); > 256 tiles a key, so blocks wrap from one key to the next, with 64- and
# 16-tile remainder blocks; whole tiles (no copy, master viewed in place).
COMPILED_SHAPES = [(5,), (37, 129), (300, 1000), (8, 4096)]


def test_compiled_noise_batch_equals_noise_per_key_bit_for_bit() -> None:
    previous = noise.get_backend()
    try:
        _compiled_or_skip()
        for shape in COMPILED_SHAPES:
            keys = BATCH_KEYS[:3] if shape == (300, 1000) else BATCH_KEYS
            batch = noise_batch.noise_batch(keys, shape)
            assert batch.shape == (len(keys), *shape) and batch.is_contiguous()
            for row, key in zip(batch, keys, strict=True):
                assert torch.equal(row, noise_batch.noise(key, shape))  # the per-key compiled path
        assert noise_batch.noise_batch([], (3, 4)).shape == (0, 3, 4)
        # Every block height is compiled now: new shapes and key counts reuse them.
        with torch.compiler.set_stance("fail_on_recompile"):
            batch = noise_batch.noise_batch(BATCH_KEYS[:5], (77, 13))
            rows = noise_batch.perturbed_rows(BATCH_KEYS[:2], torch.ones(3, 700), torch.ones(2))
        assert torch.equal(batch[4], noise_batch.noise(BATCH_KEYS[4], (77, 13)))
        assert torch.equal(rows[1, :2100], 1 + noise_batch.noise(BATCH_KEYS[1], (2100,)))
    finally:
        noise.set_backend(previous)


def test_compiledperturbed_rows_equal_master_plus_step_noise() -> None:
    """``master + step * eps`` fused into the compiled pass rounds like eager (two
    roundings, no FMA), and padded rows are sliced off by the caller."""
    previous = noise.get_backend()
    try:
        _compiled_or_skip()
        generator = torch.Generator().manual_seed(5)
        for shape in COMPILED_SHAPES:
            keys = BATCH_KEYS[:3] if shape == (300, 1000) else BATCH_KEYS
            master = torch.randn(shape, generator=generator)
            steps = torch.randn(len(keys), generator=generator)
            rows = noise_batch.perturbed_rows(keys, master, steps)
            numel = master.numel()
            assert rows.shape[0] == len(keys) and rows.shape[1] >= numel
            for i, key in enumerate(keys):
                expected = master + steps[i] * noise_batch.noise(key, shape)
                assert torch.equal(rows[i, :numel].view(shape), expected)
    finally:
        noise.set_backend(previous)


# Keys as populations lay them out: antithetic pairs share a key (members 2k, 2k+1),
# shuffled pairs, a key with no partner, keys equal modulo 2**63, and a key three times
# (no sharing: the plain path).
SHARED_KEY_LAYOUTS = [[5, 5, 9, 9, 11], [9, 5, 11, 9, 5], [2**63 + 5, 5, 3, 3], [7, 7],
                      [4, 4, 4, 6]]


def test_shared_keys_groups_pairs_and_declines_otherwise() -> None:
    assert noise_batch._shared_keys([5, 5, 9, 9, 11]) == ([5, 9, 11], [([0, 1, 2], [0, 2, 4]),
                                                                 ([0, 1], [1, 3])])
    assert noise_batch._shared_keys([2**63 + 5, 5]) == ([5], [([0], [0]), ([0], [1])])
    assert noise_batch._shared_keys([1, 2, 3]) is None  # every key distinct
    assert noise_batch._shared_keys([4, 4, 4, 6]) is None  # a key three times


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("keys", SHARED_KEY_LAYOUTS, ids=str)
def test_shared_keys_give_the_bits_of_key_by_key(backend: str, keys: list[int]) -> None:
    """A pair's noise drawn once and written to both members' rows: the same bits as
    generating each member on its own, whatever the order, for perturbed rows (opposite
    steps, as antithetic members have) and for plain noise."""
    previous = noise.get_backend()
    try:
        if backend == "compiled":
            _compiled_or_skip()
        _check_shared_layout(keys, backend)
    finally:
        noise.set_backend(previous)


def _check_shared_layout(keys: list[int], backend: str) -> None:
    generator = torch.Generator().manual_seed(6)
    shapes = [(5,), (37, 129)] + ([(300, 1000)] if backend == "compiled" else [])
    for shape in shapes:
        master = torch.randn(shape, generator=generator)
        steps = torch.randn(len(keys), generator=generator)
        steps[1::2] = -steps[::2][:len(steps[1::2])]
        rows = noise_batch.perturbed_rows(keys, master, steps, backend=backend)
        batch = noise_batch.noise_batch(keys, shape, backend=backend)
        assert rows.shape == (len(keys), master.numel()) and rows.is_contiguous()
        for i, key in enumerate(keys):
            eps = noise_batch.noise(key, shape, backend=backend)
            assert torch.equal(batch[i], eps), (shape, i)
            assert torch.equal(rows[i].view(shape), master + steps[i] * eps), (shape, i)


@pytest.mark.parametrize("chunk", [7, 1000])
def test_eager_shared_keys_independent_of_block_width(chunk: int) -> None:
    keys, shape = [5, 9, 5, 11, 9], (37, 129)
    master = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    steps = torch.tensor([1.0, 0.5, -1.0, 2.0, -0.5])
    rows = noise_batch._batch_eager(keys, master.numel(), master.reshape(-1), steps, "cpu", chunk)
    for i, key in enumerate(keys):
        expected = master + steps[i] * noise_batch.noise(key, shape, backend="eager")
        assert torch.equal(rows[i].view(shape), expected)
