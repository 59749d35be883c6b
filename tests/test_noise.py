"""The noise contract (DESIGN.md "Noise addressing").

* The pure-torch twin ``lowmem_es.noise`` against Triton's own ``tl.randn``/``tl.randint4x``,
  run by ``kernels/noise.py`` (on CPU in the interpreter, on CUDA when there is one).
* The stream's statistics, and independence across tensors, pairs, iterations and runs.
* Stable ``tensor_id``/``member_key`` and tiling-independent element values.

Statistical bounds are 5 standard errors of the statistic under the null (a correct
generator fails one with probability ~1e-6), not tolerances fitted to one output.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from kernel_device import DEVICE as KERNEL_DEVICE
from kernel_device import needs_kernel

from lowmem_es import noise, noise_batch
from lowmem_es.kernels import noise as knoise
from lowmem_es.kernels._runtime import FORCE_CHOICES, FORCE_TORCH_ENV, HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _philox_words_kernel(offsets_ptr, word0_ptr, word1_ptr, key, numel,
                             BLOCK: tl.constexpr):
        """Stores Triton's own first two Philox words of (key, offsets), bit-cast to int32."""
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < numel
        offsets = tl.load(offsets_ptr + idx, mask=mask, other=0)
        word0, word1, _, _ = tl.randint4x(key, offsets)
        tl.store(word0_ptr + idx, word0.to(tl.int32, bitcast=True), mask=mask)
        tl.store(word1_ptr + idx, word1.to(tl.int32, bitcast=True), mask=mask)


Q_PROJ = "model.layers.0.self_attn.q_proj"
KEYS = {
    "0": 0,
    "1": 1,  # Triton specialises the int 1 on GPUs
    "7": 7,
    "2**31-1": 2**31 - 1,
    "2**31": 2**31,  # the interpreter passes [2**31, 2**32) as uint32
    "2**32-1": 2**32 - 1,
    "2**32": 2**32,
    "2**32+1": 2**32 + 1,
    "2**47+12345": 2**47 + 12345,
    "2**63-2": 2**63 - 2,
    "2**63-1": 2**63 - 1,
    "member_0000": noise.member_key(0, 0, 0, 0),
    "member_q_proj_A": noise.member_key(1234, 10, 3, noise.tensor_id(Q_PROJ, "A")),
}
OFFSET_NUMEL = 40_000


def _offsets(kind: str) -> torch.Tensor:
    """Element indices of one kind, on the CPU."""
    n = OFFSET_NUMEL
    if kind == "range":
        return torch.arange(n)
    if kind == "range_int32":
        return torch.arange(n, dtype=torch.int32)
    if kind == "around_2**31":  # int32 would overflow here: int64 offsets
        return torch.arange(2**31 - n // 2, 2**31 + n // 2)
    if kind == "around_2**32":  # the high counter word goes 0 -> 1
        return torch.arange(2**32 - n // 2, 2**32 + n // 2)
    generator = torch.Generator().manual_seed(12345)
    if kind == "random_2**62":  # unsorted, every bit of both counter words in use
        return torch.randint(0, 2**62, (n,), generator=generator)
    if kind == "random_odd_shape":  # unsorted, repeats, a 3-d shape to keep
        return torch.randint(0, 2**33, (3, 37, 129), generator=generator)
    raise AssertionError(kind)


OFFSET_KINDS = ("range", "range_int32", "around_2**31", "around_2**32", "random_2**62",
                "random_odd_shape")


# ---------------------------------------------------------------- twin vs Triton kernel


@needs_kernel
@pytest.mark.parametrize("kind", OFFSET_KINDS)
@pytest.mark.parametrize("key", list(KEYS.values()), ids=list(KEYS))
def test_twin_matches_triton_randn(key: int, kind: str) -> None:
    offsets = _offsets(kind).to(KERNEL_DEVICE)
    kernel = knoise.randn(key, offsets, force="kernel")
    twin = noise.randn(key, offsets)
    assert kernel.shape == offsets.shape and kernel.dtype == torch.float32
    # Same Philox words; float32 log/cos/sqrt of numpy or CUDA vs torch differ in the last
    # ulps (on sm_90 Triton's tl.randn takes sqrt.approx.ftz.f32: a few ulps, so relative
    # too, as values reach 4-5 where an ulp is 4.8e-7). A wrong word is off by O(1).
    torch.testing.assert_close(kernel, twin, atol=1e-6, rtol=1e-6)


@needs_kernel
@pytest.mark.parametrize("start", [0, 5, 2**31 - 1000, 2**32 - 3, 2**40 + 1])
def test_kernel_flat_range_matches_twin(start: int) -> None:
    """The kernel's in-kernel offsets (start + i, int64 past 2**31) are the element indices."""
    key = KEYS["member_q_proj_A"]
    shape = (3, 37, 129)
    kernel = knoise.noise_triton(key, shape, device=KERNEL_DEVICE, start=start)
    numel = math.prod(shape)
    twin = noise.randn(key, torch.arange(start, start + numel, device=KERNEL_DEVICE))
    assert kernel.shape == shape
    torch.testing.assert_close(kernel, twin.reshape(shape), atol=1e-6, rtol=1e-6)
    if start == 0:
        torch.testing.assert_close(kernel, noise_batch.noise(key, shape, device=KERNEL_DEVICE),
                                   atol=1e-6, rtol=1e-6)


@needs_kernel
@pytest.mark.parametrize("key", [KEYS[name] for name in ("0", "2**31", "2**32+1", "2**63-1",
                                                         "member_q_proj_A")])
@pytest.mark.parametrize("kind", ["range", "around_2**32", "random_2**62"])
def test_philox_words_bit_identical_to_triton(key: int, kind: str) -> None:
    offsets = _offsets(kind).to(KERNEL_DEVICE)
    numel = offsets.numel()
    word0 = torch.empty(numel, dtype=torch.int32, device=KERNEL_DEVICE)
    word1 = torch.empty_like(word0)
    block = triton.next_power_of_2(numel) if KERNEL_DEVICE == "cpu" else 1024
    _philox_words_kernel[(triton.cdiv(numel, block),)](offsets, word0, word1, key, numel,
                                                       BLOCK=block)
    twin0, twin1 = noise.philox4x32(key, offsets)
    assert torch.equal(word0.to(torch.int64) & noise.MASK32, twin0)
    assert torch.equal(word1.to(torch.int64) & noise.MASK32, twin1)


@needs_kernel
def test_kernel_values_independent_of_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    key = KEYS["member_q_proj_A"]
    offsets = _offsets("random_odd_shape").to(KERNEL_DEVICE)
    reference = knoise.randn_triton(key, offsets)
    flat_reference = knoise.noise_triton(key, (5000,), device=KERNEL_DEVICE, start=2**32 - 7)
    for block in (128, 1024):
        monkeypatch.setattr(knoise, "BLOCK_INTERPRETER", block)
        monkeypatch.setattr(knoise, "BLOCK_GPU", block)
        assert torch.equal(knoise.randn_triton(key, offsets), reference)
        flat = knoise.noise_triton(key, (5000,), device=KERNEL_DEVICE, start=2**32 - 7)
        assert torch.equal(flat, flat_reference)


@needs_kernel
def test_kernel_permuted_offsets_give_permuted_values() -> None:
    key = KEYS["2**47+12345"]
    offsets = _offsets("random_2**62").to(KERNEL_DEVICE)
    perm = torch.randperm(offsets.numel(), generator=torch.Generator().manual_seed(1))
    perm = perm.to(KERNEL_DEVICE)
    assert torch.equal(knoise.randn_triton(key, offsets[perm]),
                       knoise.randn_triton(key, offsets)[perm])


# ---------------------------------------------------------------- dispatch


def test_dispatch_cpu_uses_twin_and_env_forces_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors take the twin (the rule itself: tests/test_runtime.py)."""
    key = KEYS["member_q_proj_A"]
    offsets = _offsets("random_2**62")[:1000]
    monkeypatch.delenv(FORCE_TORCH_ENV, raising=False)
    assert torch.equal(knoise.randn(key, offsets), noise.randn(key, offsets))
    assert torch.equal(knoise.noise(key, (7, 9)), noise_batch.noise(key, (7, 9)))
    monkeypatch.setenv(FORCE_TORCH_ENV, "1")
    assert torch.equal(knoise.randn(key, offsets), noise.randn(key, offsets))
    with pytest.raises(ValueError, match="force"):
        knoise.randn(key, offsets, force="triton")


@needs_kernel
def test_dispatch_force_kernel_and_input_errors() -> None:
    key = KEYS["7"]
    offsets = torch.arange(3000, device=KERNEL_DEVICE)
    assert torch.equal(knoise.randn(key, offsets, force="kernel"),
                       knoise.randn_triton(key, offsets))
    assert torch.equal(knoise.noise(key, (30, 100), device=KERNEL_DEVICE, force="kernel"),
                       knoise.noise_triton(key, (30, 100), device=KERNEL_DEVICE))
    empty = torch.empty((0, 4), dtype=torch.int64, device=KERNEL_DEVICE)
    for force in FORCE_CHOICES:
        assert knoise.randn(key, empty, force=force).shape == (0, 4)
        with pytest.raises(ValueError, match="non-negative"):
            knoise.randn(key, torch.tensor([3, -1], device=KERNEL_DEVICE), force=force)
    for force in FORCE_CHOICES:
        with pytest.raises(TypeError, match="integer"):
            knoise.randn(key, offsets.float(), force=force)
    # int16 offsets are widened to int64, not misread
    small = torch.arange(200, dtype=torch.int16, device=KERNEL_DEVICE)
    assert torch.equal(knoise.randn_triton(key, small), knoise.randn_triton(key, small.long()))


# ---------------------------------------------------------------- statistics


def _normal_ks_statistic(x: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample and N(0, 1)."""
    n = x.numel()
    cdf = torch.special.ndtr(torch.sort(x.double()).values)
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    return max(float((rank / n - cdf).max()), float((cdf - (rank - 1) / n).max()))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def _ks_bound(n: int, alpha: float = 1e-6) -> float:
    """KS distance a true sample of size n exceeds with probability ~alpha (asymptotic)."""
    return math.sqrt(math.log(2 / alpha) / (2 * n))


@pytest.mark.parametrize("key", [KEYS["member_q_proj_A"], KEYS["2**32+1"]])
def test_stream_is_standard_normal(key: int) -> None:
    n = 100_000
    x = noise_batch.noise(key, (n,)).double()
    mean, std = float(x.mean()), float(x.std())
    assert abs(mean) < 5 / math.sqrt(n)
    assert abs(std - 1) < 5 / math.sqrt(2 * n)  # sd of the sample std of N(0,1) ~ 1/sqrt(2n)
    within_one_sigma = float((x.abs() < 1).double().mean())
    p = math.erf(1 / math.sqrt(2))  # 0.6827
    assert abs(within_one_sigma - p) < 5 * math.sqrt(p * (1 - p) / n)
    z = (x - mean) / std
    kurtosis = float((z**4).mean())
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / n)
    assert abs(float((z**3).mean())) < 5 * math.sqrt(6 / n)  # skewness
    assert _normal_ks_statistic(x) < _ks_bound(n)


def test_same_element_across_pairs_is_uniform_and_uncorrelated() -> None:
    """ES sums one element over pairs: across keys its Philox words must be i.i.d. uniform."""
    pairs = 20_000
    tid = noise.tensor_id(Q_PROJ, "A")
    keys = torch.tensor([noise.member_key(1234, 10, pair, tid) for pair in range(pairs)])
    for offset in (0, 12345):
        word0, word1 = noise.philox4x32(keys, torch.full_like(keys, offset))
        for word in (word0, word1):
            u = word.double() / 2**32
            assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / pairs)
            ecdf = torch.arange(1, pairs + 1, dtype=torch.float64) / pairs
            ks = float((ecdf - torch.sort(u).values).abs().max())
            assert ks < _ks_bound(pairs) + 1 / pairs
            assert abs(_corr(u[:-1], u[1:])) < 5 / math.sqrt(pairs)  # adjacent pairs
        assert abs(_corr(word0.double(), word1.double())) < 5 / math.sqrt(pairs)


def test_streams_of_neighbouring_keys_are_uncorrelated() -> None:
    n = 100_000
    tid_a = noise.tensor_id(Q_PROJ, "A")
    base = (1234, 10, 3, tid_a)
    variants = {
        "run_seed+1": (1235, 10, 3, tid_a),
        "iteration+1": (1234, 11, 3, tid_a),
        "pair+1": (1234, 10, 4, tid_a),
        "matrix B": (1234, 10, 3, noise.tensor_id(Q_PROJ, "B")),
        "next layer": (1234, 10, 3, noise.tensor_id("model.layers.1.self_attn.q_proj", "A")),
        "k_proj": (1234, 10, 3, noise.tensor_id("model.layers.0.self_attn.k_proj", "A")),
        "fields swapped": (1234, 3, 10, tid_a),
    }
    bound = 5 / math.sqrt(n)
    base_key = noise.member_key(*base)
    x = noise_batch.noise(base_key, (n,))
    assert abs(_corr(x[:-1], x[1:])) < bound  # neighbouring elements of one stream
    for name, fields in variants.items():
        key = noise.member_key(*fields)
        assert key != base_key, name
        y = noise_batch.noise(key, (n,))
        assert abs(_corr(x, y)) < bound, name
        assert abs(_corr(x**2, y**2)) < bound, name  # no shared magnitudes either


def test_member_keys_distinct_over_a_grid() -> None:
    names = [f"model.layers.{layer}.self_attn.{proj}" for layer in range(7)
             for proj in ("q_proj", "v_proj")]
    tids = [noise.tensor_id(name, matrix) for name in names for matrix in "AB"]
    keys = [noise.member_key(run, iteration, pair, tid) for run in range(4)
            for iteration in range(8) for pair in range(8) for tid in tids]
    assert len(set(tids)) == len(tids)
    assert len(set(keys)) == len(keys)


# ---------------------------------------------------------------- ids and keys


def test_tensor_id_is_stable() -> None:
    # Pinned: every saved journal and checkpoint regenerates its noise from this id.
    # Changing this value (the name canonicalisation or the hash) breaks all of them.
    assert noise.tensor_id(Q_PROJ, "A") == 2448830002365949865
    wrapped = "base_model.model.model.layers.0.self_attn.q_proj"  # PEFT's name for it
    for matrix in "AB":
        assert noise.tensor_id(wrapped, matrix) == noise.tensor_id(Q_PROJ, matrix)
    assert noise.tensor_id(Q_PROJ, "A") != noise.tensor_id(Q_PROJ, "B")
    assert noise.tensor_id(Q_PROJ, "A") != noise.tensor_id("model.layers.1.self_attn.q_proj", "A")
    assert 0 <= noise.tensor_id(Q_PROJ, "B") < 2**63
    for bad in ("a", "lora_A", "C"):
        with pytest.raises(ValueError, match="matrix"):
            noise.tensor_id(Q_PROJ, bad)


def test_member_key_deterministic_in_range_and_validated() -> None:
    # Pinned like tensor_id: journals store (run_seed, iteration, pair) and replay from them.
    assert noise.member_key(1234, 10, 3, 2448830002365949865) == 2295316061804518371
    fields = [0, 1, 2, 2**31, 2**32 + 5, 2**63 - 1, 2**63, 2**64 - 1]
    for a in fields:
        for b in fields[::3]:
            key = noise.member_key(a, b, a, b)
            assert key == noise.member_key(a, b, a, b)
            assert 0 <= key < 2**63
    for position in range(4):
        args = [1, 2, 3, 4]
        args[position] = -1
        with pytest.raises(ValueError, match=r"in \[0, 2\*\*64\)"):
            noise.member_key(*args)
        args[position] = 2**64  # would alias field value 0 if reduced modulo 2**64
        with pytest.raises(ValueError, match=r"in \[0, 2\*\*64\)"):
            noise.member_key(*args)
    for bad in (2.0, True):
        with pytest.raises(ValueError):
            noise.member_key(1, bad, 3, 4)


# ---------------------------------------------------------------- tiling independence


def test_twin_values_independent_of_chunking() -> None:
    key = KEYS["member_q_proj_A"]
    shape = (37, 129)
    reference = noise_batch.noise(key, shape, backend="eager")
    for chunk in (5, 64, 1000, 4773, 1 << 16):
        assert torch.equal(noise_batch.noise(key, shape, chunk=chunk, backend="eager"), reference)
    flat = reference.reshape(-1)
    numel = flat.numel()
    assert torch.equal(noise.randn(key, torch.arange(numel), backend="eager"), flat)
    some = torch.tensor([0, 1, 129, numel - 1])
    assert torch.equal(noise.randn(key, some, backend="eager"), flat[some])


def test_twin_permuted_offsets_give_permuted_values() -> None:
    key = KEYS["2**47+12345"]
    offsets = _offsets("random_2**62")
    perm = torch.randperm(offsets.numel(), generator=torch.Generator().manual_seed(2))
    for chunk in (noise.DEFAULT_CHUNK, 777):
        values = noise.randn(key, offsets, chunk=chunk, backend="eager")
        permuted = noise.randn(key, offsets[perm], chunk=chunk, backend="eager")
        assert torch.equal(permuted, values[perm])


# ---------------------------------------------------------------- compiled backend


def _compiled_or_skip() -> str:
    """Switch to the compiled backend (the caller restores it) or skip the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = noise.set_backend("compiled")
    if backend != "compiled":
        reasons = "; ".join(str(w.message) for w in caught) or "set_backend fell back"
        pytest.skip(f"torch.compile unusable here: {reasons}")
    return backend


def test_compiled_backend_matches_eager() -> None:
    previous = noise.get_backend()
    try:
        _compiled_or_skip()
        key = KEYS["member_q_proj_A"]
        shape = (3, 37, 1001)  # more than one chunk, a partial last chunk
        eager = noise_batch.noise(key, shape, backend="eager")
        torch.testing.assert_close(noise_batch.noise(key, shape), eager, atol=2e-6, rtol=0)
        offsets = _offsets("random_odd_shape")
        torch.testing.assert_close(noise.randn(key, offsets),
                                   noise.randn(key, offsets, backend="eager"),
                                   atol=2e-6, rtol=0)
    finally:
        noise.set_backend(previous)
