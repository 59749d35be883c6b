"""Fused noisy LoRA (kernels/noisy_lora.py): the Triton kernel against its torch twin.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), in fp32 only; on a GPU machine run pytest with TRITON_INTERPRET=0 and
the fp16/bf16 rows run too. Shapes are odd on purpose (d_in=37, d_out=129, rank 5) so
every mask and padding path is used. A dense reference (noise materialised with
lowmem_es.noise, plain matmuls) checks the twin itself.
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, needs_kernel

from lowmem_es import backends, noise, noise_batch
from lowmem_es import lora as lora_module
from lowmem_es.kernels import noisy_lora as knl
from lowmem_es.kernels import row_plan
from lowmem_es.kernels._runtime import FORCE_TORCH_ENV

pytestmark = needs_kernel

D_IN, D_OUT = 37, 129
RUN_SEED, ITERATION = 1234, 7
TID_A = noise.tensor_id("model.layers.0.mlp.up_proj", "A")
TID_B = noise.tensor_id("model.layers.0.mlp.up_proj", "B")

# (dtype, atol, rtol) of kernel vs twin, for outputs of size ~1. fp32: IEEE dots, only the
# last-ulp differences of tl.randn vs the twin's Box-Muller and summation order. fp16/bf16:
# TF32 dots (10 mantissa bits per operand) and one rounding of the output, so about one
# ulp of the output dtype (bf16 ulp at 2-4 is 1.6e-2). GPU rows reasoned, not yet run.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1.6e-2, id="bf16"),
]


def _skip_half_off_gpu(dtype: torch.dtype) -> None:
    if dtype != torch.float32 and DEVICE != "cuda":
        pytest.skip("fp16/bf16 run on CUDA only (bf16 tl.dot is wrong in the interpreter)")


def _members(count: int, sigma: float, antithetic: bool = True, run_seed: int = RUN_SEED
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys_A, keys_B, steps of ``count`` members as es.member_schedule lays them out."""
    schedule = [(m // 2, 1 if m % 2 == 0 else -1) if antithetic else (m, 1)
                for m in range(count)]
    keys_a = [noise.member_key(run_seed, ITERATION, pair, TID_A) for pair, _ in schedule]
    keys_b = [noise.member_key(run_seed, ITERATION, pair, TID_B) for pair, _ in schedule]
    steps = [sign * sigma for _, sign in schedule]
    return (torch.tensor(keys_a, device=DEVICE), torch.tensor(keys_b, device=DEVICE),
            torch.tensor(steps, dtype=torch.float32, device=DEVICE))


def _weights(rank: int, seed: int = 0, d_in: int = D_IN, d_out: int = D_OUT
             ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = 0.2 * torch.randn(rank, d_in, generator=generator)
    b = 0.2 * torch.randn(d_out, rank, generator=generator) / max(1, rank) ** 0.5
    return a.to(DEVICE), b.to(DEVICE)


def _inputs(shape: tuple[int, ...], seed: int = 1, dtype: torch.dtype = torch.float32,
            d_out: int = D_OUT) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    out = torch.randn(*shape[:-1], d_out, generator=generator)
    return x.to(DEVICE, dtype), out.to(DEVICE, dtype)


def _dense_reference(x, out, a, b, keys_a, keys_b, steps, member_index, scale, steps_b=None):
    """Row by row: materialise the member's perturbed A and B, plain fp32 matmuls."""
    steps_b = steps if steps_b is None else steps_b
    result = out.to(torch.float32).clone()
    for row, member in enumerate(member_index.tolist()):
        eps_a = noise_batch.noise(int(keys_a[member]), a.shape, device=a.device)
        eps_b = noise_batch.noise(int(keys_b[member]), b.shape, device=b.device)
        a_m = a + steps[member] * eps_a
        b_m = b + steps_b[member] * eps_b
        result[row] += scale * (x[row].to(torch.float32) @ a_m.t()) @ b_m.t()
    return result


MAPPINGS = {  # rows -> member ids (4 antithetic members: pairs 0, 1; signs +, -)
    "contiguous": [0, 0, 1, 1, 2, 3],
    "permuted": [3, 0, 2, 0, 1, 3],
    "one_member": [1, 1, 1, 1, 1, 1],
    "each_row_own": [2, 0, 3, 1, 4, 5],  # 6 members, unsorted
}


# ------------------------------------------------------------------ kernel vs twin


@pytest.mark.parametrize("rank", [1, 5, 8, 16, 64])
@pytest.mark.parametrize("sigma", [0.0, 1e-3, 0.1])
def test_kernel_matches_twin_odd_shapes(rank: int, sigma: float) -> None:
    """T=3 rows, d_in=37, d_out=129, a permuted antithetic mapping, every rank tile."""
    a, b = _weights(rank)
    keys_a, keys_b, steps = _members(4, sigma)
    x, out = _inputs((3, D_IN))
    member_index = torch.tensor([3, 0, 3], device=DEVICE)
    kernel = knl.noisy_lora(x, a, b, keys_a, keys_b, steps, member_index, 0.5,
                            out=out.clone(), force="kernel")
    twin = knl.noisy_lora(x, a, b, keys_a, keys_b, steps, member_index, 0.5,
                          out=out.clone(), force="torch")
    torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)
    assert not torch.equal(kernel, out)  # the LoRA term was added


@pytest.mark.parametrize("paired", [False, True], ids=["unpaired", "paired"])
def test_b_takes_its_own_steps_when_given(paired: bool) -> None:
    """Per-tensor noise scaling: ``steps_B`` scales B's noise alone, in kernel and twin."""
    members = MAPPINGS["permuted"]
    a, b = _weights(8, seed=4)
    keys_a, keys_b, steps = _members(4, 0.1)
    steps_b = steps * 3.0
    x, out = _inputs((len(members), 2, D_IN), seed=5)
    member_index = torch.tensor(members, device=DEVICE)
    plan = row_plan.plan_rows(members, 4, 2, DEVICE, pairs=_pairs(4) if paired else None)
    kernel = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, plan, 2.0,
                                   out=out.clone(), steps_B=steps_b)
    twin = knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, member_index, 2.0,
                                out=out.clone(), steps_B=steps_b)
    reference = _dense_reference(x, out, a, b, keys_a, keys_b, steps, member_index, 2.0,
                                 steps_b=steps_b)
    torch.testing.assert_close(twin, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)
    same = knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, member_index, 2.0,
                                out=out.clone())
    assert (twin - same).abs().max() > 1e-3  # B's step changed the result
    with pytest.raises(ValueError, match="steps_B"):
        knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, member_index, 2.0,
                             steps_B=steps_b[:2])


def _pairs(count: int) -> list[int]:
    """Pair id of each of ``count`` antithetic members (es.member_schedule's layout)."""
    return [m // 2 for m in range(count)]


@pytest.mark.parametrize("paired", [False, True], ids=["unpaired", "paired"])
@pytest.mark.parametrize("mapping", list(MAPPINGS))
@pytest.mark.parametrize("rank", [8, 16])
def test_kernel_twin_and_dense_reference_agree_for_any_mapping(mapping: str, rank: int,
                                                              paired: bool) -> None:
    """(rows, T, d_in) input: rows of a member share it across their T tokens. Paired:
    the plan knows the antithetic pairs, and a program serves a member and its partner
    from one noise draw (with a partner absent, or runs of unequal length, too)."""
    members = MAPPINGS[mapping]
    count = max(members) + 1
    a, b = _weights(rank, seed=2)
    keys_a, keys_b, steps = _members(count, 0.1)
    x, out = _inputs((len(members), 3, D_IN), seed=3)
    member_index = torch.tensor(members, device=DEVICE)
    plan = row_plan.plan_rows(members, count, 3, DEVICE, pairs=_pairs(count) if paired else None)
    assert plan.paired == (paired and mapping != "one_member")
    kernel = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, plan, 2.0,
                                   out=out.clone())
    twin = knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, member_index, 2.0,
                                out=out.clone())
    dense = _dense_reference(x, out, a, b, keys_a, keys_b, steps, member_index, 2.0)
    assert kernel.shape == (len(members), 3, D_OUT)
    torch.testing.assert_close(twin, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("rank", [8, 64])
def test_dtype_table(dtype: torch.dtype, atol: float, rtol: float, rank: int) -> None:
    _skip_half_off_gpu(dtype)
    a, b = _weights(rank, seed=4)
    keys_a, keys_b, steps = _members(4, 0.1)
    x, out = _inputs((4, 5, D_IN), seed=5, dtype=dtype)
    member_index = torch.tensor([1, 0, 3, 2], device=DEVICE)
    kernel = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, member_index, 0.5,
                                   out=out.clone())
    twin = knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, member_index, 0.5,
                                out=out.clone())
    assert kernel.dtype == dtype
    torch.testing.assert_close(kernel.float(), twin.float(), atol=atol, rtol=rtol)


def test_antithetic_members_mirror_the_perturbation() -> None:
    """Members 2k, 2k+1 share eps with opposite signs: their outputs sum to twice the
    centre's plus the second-order term 2 sigma^2 (x epsA^T) epsB^T."""
    rank, sigma = 5, 0.1
    a, b = _weights(rank, seed=6)
    keys_a, keys_b, steps = _members(2, sigma)
    x, _ = _inputs((1, D_IN), seed=7)
    zeros = torch.zeros(1, D_OUT, device=DEVICE)
    plus = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, torch.tensor([0]), 1.0,
                                 out=zeros.clone())
    minus = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, torch.tensor([1]), 1.0,
                                  out=zeros.clone())
    centre = (x @ a.t()) @ b.t()
    eps_a = noise_batch.noise(int(keys_a[0]), a.shape, device=DEVICE)
    eps_b = noise_batch.noise(int(keys_b[0]), b.shape, device=DEVICE)
    second_order = 2 * sigma**2 * (x @ eps_a.t()) @ eps_b.t()
    torch.testing.assert_close(plus + minus, 2 * centre + second_order, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plus, minus)


def test_sigma_zero_is_plain_lora() -> None:
    a, b = _weights(16, seed=8)
    keys_a, keys_b, steps = _members(4, 0.0)
    x, out = _inputs((2, 4, D_IN), seed=9)
    result = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, torch.tensor([2, 1]), 0.25,
                                   out=out.clone())
    torch.testing.assert_close(result, out + 0.25 * (x @ a.t()) @ b.t(), atol=1e-5, rtol=1e-5)


def test_out_none_starts_from_zeros_in_x_dtype() -> None:
    a, b = _weights(8)
    keys_a, keys_b, steps = _members(2, 0.1)
    x, _ = _inputs((3, D_IN))
    member_index = torch.tensor([0, 1, 0])
    kernel = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, member_index, 1.0)
    twin = knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, member_index, 1.0)
    assert kernel.dtype == x.dtype and kernel.shape == (3, D_OUT)
    torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    {"block_m": 16, "block_k": 16, "splits": 3, "block_n": 32, "groups": 2},
    {"block_m": 32, "block_k": 16, "splits": 1, "block_n": 16, "groups": 9},
    {"block_m": 16, "block_k": 32, "splits": 2, "block_n": 64, "groups": 2, "sub_blocks": 3},
], ids=["splits3_groups2", "groups9", "sub_blocks3"])
@pytest.mark.parametrize("paired", [False, True], ids=["unpaired", "paired"])
def test_split_k_and_column_groups_match_twin(monkeypatch, overrides, paired: bool) -> None:
    """The GPU launch shapes (several K-splits summed in stage 2, column groups looped,
    a member cut into several row blocks, stage-2 programs walking several row blocks
    per noise tile) give the same result; the interpreter's own default is one of each.
    Paired: member 0's 40 rows share noise with member 1's 17 (unequal block counts),
    member 3's partner has no rows."""
    monkeypatch.setattr(knl, "LAUNCH_OVERRIDES", overrides)
    a, b = _weights(5, seed=10)
    keys_a, keys_b, steps = _members(4, 0.1)
    members = [0] * 40 + [3] * 3 + [1] * 17  # 40 rows > block_m: several blocks
    x, out = _inputs((len(members), D_IN), seed=11)
    member_index = torch.tensor(members)
    plan = row_plan.plan_rows(members, 4, 1, DEVICE, pairs=_pairs(4) if paired else None)
    kernel = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, plan, 0.5,
                                   out=out.clone())
    twin = knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, member_index, 0.5,
                                out=out.clone())
    torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)


def test_pairing_is_only_a_hint_keys_that_differ_get_their_own_noise() -> None:
    """A plan that pairs members whose keys differ (not antithetic partners) still gives
    each member its own noise: the kernel compares the keys and regenerates."""
    a, b = _weights(8, seed=30)
    keys_a, keys_b, steps = _members(4, 0.1, antithetic=False)
    x, out = _inputs((6, D_IN), seed=31)
    members = [0, 1, 2, 3, 1, 0]
    wrong = row_plan.plan_rows(members, 4, 1, DEVICE, pairs=[0, 0, 1, 1])
    assert wrong.paired
    kernel = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, wrong, 1.0,
                                   out=out.clone())
    twin = knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, torch.tensor(members), 1.0,
                                out=out.clone())
    torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)


def test_rows_do_not_depend_on_batch_mates() -> None:
    """A member's rows give the same values alone as inside a larger, permuted batch."""
    a, b = _weights(8, seed=12)
    keys_a, keys_b, steps = _members(4, 0.1)
    x, out = _inputs((6, D_IN), seed=13)
    members = torch.tensor([2, 0, 2, 1, 3, 2])
    together = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, members, 1.0,
                                     out=out.clone())
    rows = [0, 2, 5]
    alone = knl.noisy_lora_triton(x[rows], a, b, keys_a, keys_b, steps,
                                  torch.tensor([2, 2, 2]), 1.0, out=out[rows].clone())
    torch.testing.assert_close(together[rows], alone, atol=1e-6, rtol=1e-6)


def test_row_plan_is_reusable_and_equivalent() -> None:
    a, b = _weights(8, seed=14)
    keys_a, keys_b, steps = _members(4, 0.1)
    x, out = _inputs((4, 2, D_IN), seed=15)
    members = [3, 3, 0, 1]
    plan = row_plan.plan_rows(members, 4, tokens_per_row=2, device=DEVICE)
    assert not plan.identity and plan.num_rows == 8 and plan.max_run == 4
    with_plan = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, plan, 1.0,
                                      out=out.clone())
    with_index = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps,
                                       torch.tensor(members), 1.0, out=out.clone())
    assert torch.equal(with_plan, with_index)
    twin = knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, plan, 1.0, out=out.clone())
    torch.testing.assert_close(with_plan, twin, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ reproducibility


def test_same_seed_bitwise_same_and_other_seed_differs() -> None:
    a, b = _weights(16, seed=16)
    x, out = _inputs((5, D_IN), seed=17)
    members = torch.tensor([0, 1, 1, 2, 3])
    runs = []
    for run_seed in (RUN_SEED, RUN_SEED, RUN_SEED + 1):
        keys_a, keys_b, steps = _members(4, 0.1, run_seed=run_seed)
        runs.append(knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, members, 1.0,
                                          out=out.clone()))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2], atol=1e-3)


def test_keys_taken_modulo_2_63_like_the_twin() -> None:
    a, b = _weights(8, seed=18)
    keys_a, keys_b, steps = _members(2, 0.1)
    x, out = _inputs((2, D_IN), seed=19)
    high = keys_a | torch.tensor(-(2**63), dtype=torch.int64)  # sign bit set
    members = torch.tensor([0, 1])
    kernel = knl.noisy_lora_triton(x, a, b, high, keys_b, steps, members, 1.0, out=out.clone())
    reference = knl.noisy_lora_triton(x, a, b, keys_a, keys_b, steps, members, 1.0,
                                      out=out.clone())
    twin = knl.noisy_lora_torch(x, a, b, high, keys_b, steps, members, 1.0, out=out.clone())
    assert torch.equal(kernel, reference)
    torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ bad input


def _good():
    a, b = _weights(5)
    keys_a, keys_b, steps = _members(3, 0.1, antithetic=False)
    x, out = _inputs((3, D_IN))
    return dict(x=x, lora_A=a, lora_B=b, keys_A=keys_a, keys_B=keys_b, steps=steps,
                member_index=torch.tensor([0, 2, 1]), scale=1.0, out=out)


BAD_INPUTS = {
    "A_width": (lambda g: g.update(lora_A=g["lora_A"][:, :36].contiguous()),
                ValueError, r"`lora_A` has shape \(5, 36\); expected \(r, d_in\) = \(r, 37\)"),
    "B_rank": (lambda g: g.update(lora_B=g["lora_B"][:, :4].contiguous()),
               ValueError, r"`lora_B` has shape \(129, 4\); expected \(d_out, r\) = "
                           r"\(d_out, 5\)"),
    "rank_65": (lambda g: g.update(lora_A=torch.zeros(65, D_IN, device=DEVICE),
                                   lora_B=torch.zeros(D_OUT, 65, device=DEVICE)),
                ValueError, r"`lora_A` has rank r=65"),
    "x_int": (lambda g: g.update(x=g["x"].to(torch.int32)), TypeError,
              r"`x` has dtype torch.int32; expected one of float16, bfloat16, float32"),
    "keys_int32": (lambda g: g.update(keys_A=g["keys_A"].to(torch.int32)), TypeError,
                   r"`keys_A` must be a torch.int64 tensor of shape \(members,\)"),
    "steps_fp64": (lambda g: g.update(steps=g["steps"].double()), TypeError,
                   r"`steps` must be a torch.float32 tensor"),
    "steps_length": (lambda g: g.update(steps=g["steps"][:2].contiguous()), ValueError,
                     r"`steps` has shape \(2,\); expected \(members,\) = \(3,\)"),
    "member_out_of_range": (lambda g: g.update(member_index=torch.tensor([0, 3, 1])),
                            ValueError, r"`member_index` holds member 3 at row 1, outside "
                                        r"\[0, 3\)"),
    "member_negative": (lambda g: g.update(member_index=torch.tensor([0, -1, 1])),
                        ValueError, r"`member_index` holds member -1 at row 1"),
    "member_float": (lambda g: g.update(member_index=torch.tensor([0.0, 1.0, 1.0])),
                     TypeError, r"`member_index` must be an integer tensor"),
    "member_length": (lambda g: g.update(member_index=torch.tensor([0, 1])), ValueError,
                      r"`member_index` has shape \(2,\); expected \(rows,\) = \(3,\)"),
    "out_shape": (lambda g: g.update(out=g["out"][:, :128].contiguous()), ValueError,
                  r"`out` has shape \(3, 128\); expected \(\*x.shape\[:-1\], d_out\) = "
                  r"\(3, 129\)"),
    "A_transposed": (lambda g: g.update(lora_A=g["lora_A"].t().contiguous().t()),
                     ValueError, r"`lora_A` must be contiguous"),
    "x_transposed": (lambda g: g.update(x=g["x"].t().contiguous().t()), ValueError,
                     r"`x` must be contiguous along its last dimension"),
    "out_transposed": (lambda g: g.update(out=g["out"].t().contiguous().t()), ValueError,
                       r"`out` must be contiguous along its last dimension"),
}


@pytest.mark.parametrize("force", ["kernel", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case: str, force: str) -> None:
    """Both paths refuse the same inputs, naming the tensor and the expected shape/dtype."""
    change, error, match = BAD_INPUTS[case]
    args = _good()
    change(args)
    with pytest.raises(error, match=match):
        knl.noisy_lora(**args, force=force)


def test_row_plan_mismatch_is_an_error() -> None:
    args = _good()
    args["member_index"] = row_plan.plan_rows([0, 1, 2], 4, device=DEVICE)
    with pytest.raises(ValueError, match="RowPlan was built for 4 members"):
        knl.noisy_lora_triton(**args)
    args["member_index"] = row_plan.plan_rows([0, 1], 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"RowPlan describes 2 rows x 1 tokens"):
        knl.noisy_lora_triton(**args)


# ------------------------------------------------------------------ dispatch


def test_dispatch_cpu_twin_env_switch_and_force(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(knl, "noisy_lora_torch", lambda *a, **k: calls.append("torch"))
    monkeypatch.setattr(knl, "noisy_lora_triton", lambda *a, **k: calls.append("kernel"))
    args = _good()
    cpu_args = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    knl.noisy_lora(**cpu_args)  # CPU tensors: the twin, interpreter or not
    knl.noisy_lora(**cpu_args, force="kernel")
    monkeypatch.setenv(FORCE_TORCH_ENV, "1")
    knl.noisy_lora(**args)
    knl.noisy_lora(**args, force="kernel")  # an explicit force wins over the variable
    assert calls == ["torch", "kernel", "torch", "kernel"]
    with pytest.raises(ValueError, match="`force` must be one of"):
        knl.noisy_lora(**args, force="gpu")


# ------------------------------------------------------------------ ES-LoRA layer


@pytest.fixture(scope="module")
def tiny_es_model(tiny_llama_dir):
    """The tiny 4-bit Llama with ES-LoRA on all seven projections, with nonzero B."""
    pytest.importorskip("bitsandbytes")
    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    device = "cuda" if DEVICE == "cuda" else "cpu"
    model, tokenizer, _ = load_model(tiny_llama_dir, device=device, compute_dtype="float32")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    es_model = attach_es_lora(model, targets, rank=4, alpha=8.0, seed=0)
    generator = torch.Generator().manual_seed(123)
    for tensor in es_model.parameters().values():
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator).to(tensor.device))
    # Random-init embeddings (std 0.02) make every RMSNorm amplify float noise ~50x per
    # layer (1e-7 layer differences became 4e-4 in the logits); unit-scale hidden states
    # keep the comparison about the kernel, not the conditioning of a random model.
    es_model.model.get_input_embeddings().weight.data.mul_(50.0)
    tokenizer.padding_side = "left"
    return es_model, tokenizer


def test_es_lora_layer_logits_kernel_equal_torch_paths(tiny_es_model, monkeypatch) -> None:
    """One forward of three antithetic members in ragged, out-of-order segments: the
    layer's kernel path (run in the interpreter on CPU), the same path through the twin,
    and the cached torch path give the same logits; sigma=0 gives PEFT's plain LoRA."""
    from lowmem_es.es import Member

    es_model, tokenizer = tiny_es_model
    device = next(iter(es_model.parameters().values())).device
    batch = tokenizer(["sun 1:", "a longer prompt:", "rain 2:", "moon"], return_tensors="pt",
                      padding=True, add_special_tokens=False).to(device)
    members = [Member(0, 1), Member(0, -1), Member(3, 1)]
    segments = [(2, 1), (0, 2), (1, 1)]

    def logits(force: str | None, sigma: float = 0.05) -> torch.Tensor:
        backends.set_force(backends.NOISY_LORA, force)
        with torch.no_grad(), es_model.population(5, 2, sigma, members, segments):
            return es_model.model(**batch).logits

    torch_path = logits("torch")
    kernel_path = logits("kernel")
    monkeypatch.setattr(knl, "noisy_lora_triton", knl.noisy_lora_torch)
    twin_path = logits("kernel")
    with torch.no_grad():
        plain = es_model.model(**batch).logits
    # Every row's perturbation moves its logits far more than the tolerance below.
    assert (torch_path - plain).abs().amax(dim=(1, 2)).min() > 1e-2
    torch.testing.assert_close(kernel_path, torch_path, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(twin_path, torch_path, atol=5e-5, rtol=5e-5)
    monkeypatch.setattr(knl, "noisy_lora_triton", lambda *a, **k: pytest.fail("kernel ran"))
    torch.testing.assert_close(logits("kernel", sigma=0.0), plain, atol=1e-5, rtol=1e-5)


def test_es_lora_layer_noise_scales_kernel_equal_torch_path(tiny_es_model) -> None:
    """Per-tensor noise scales (A and B apart) reach the kernel path as the torch path."""
    from lowmem_es.es import Member

    es_model, tokenizer = tiny_es_model
    device = next(iter(es_model.parameters().values())).device
    batch = tokenizer(["sun 1:", "rain 2:"], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device)
    members = [Member(0, 1), Member(0, -1)]
    scales = {name: (0.3 if name.endswith("lora_A") else 2.0) for name in es_model.parameters()}

    def logits(force: str) -> torch.Tensor:
        backends.set_force(backends.NOISY_LORA, force)
        with torch.no_grad(), es_model.population(5, 2, 0.05, members, [(0, 1), (1, 1)]):
            return es_model.model(**batch).logits

    unscaled = logits("torch")
    es_model.set_noise_scales(scales)
    try:
        torch_path, kernel_path = logits("torch"), logits("kernel")
    finally:
        es_model.set_noise_scales(None)
        backends.set_force(backends.NOISY_LORA, None)
    assert (torch_path - unscaled).abs().max() > 1e-2
    torch.testing.assert_close(kernel_path, torch_path, atol=5e-5, rtol=5e-5)


def test_layer_row_plan_pairs_antithetic_partners_only() -> None:
    """The layer's RowPlan pairs the two members of an antithetic pair; a pair id held by
    one member, or by three (no population has that, but a caller may), stays unpaired
    instead of failing."""
    from lowmem_es.es import Member
    from lowmem_es.lora import Population

    members = [Member(0, 1), Member(3, 1), Member(0, -1)]
    population = Population(5, 2, 0.1, members, [(0, 1), (1, 1), (2, 1)], version=901)
    plan = lora_module._row_plan(population, 3, 2, torch.device(DEVICE))
    assert plan.paired and plan.partner == [2, -1, 0]
    odd = Population(5, 2, 0.1, [Member(1, 1), Member(1, -1), Member(1, 1)],
                     [(0, 1), (1, 1), (2, 1)], version=902)
    plan = lora_module._row_plan(odd, 3, 1, torch.device(DEVICE))
    assert not plan.paired and plan.partner == [-1, -1, -1]


# ------------------------------------------------------------------ twin vs its plain form


def _plain_twin(x, out, a, b, keys_a, keys_b, steps, member_index, scale):
    """The twin's math written plainly, as the twin computed it before its generation was
    fused: the present members' noise from ``noise_batch.noise`` key by key, stacked, ``A + s *
    eps``; per member, its rows (a slice when rows are sorted by member, else gathered)
    through two fp32 matmuls; ``(out + lora * scale)`` rounded once to out's dtype.

    Operand layouts (stacked weights, row slices) are the twin's on purpose: BLAS results
    can differ in the last bit with where an operand starts, and this test is about
    bits.
    """
    result = out.clone()
    x_flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
    out_flat = result.view(-1, result.shape[-1])
    tokens = x_flat.shape[0] // member_index.shape[0]
    flat_member = member_index.repeat_interleave(tokens)
    present = sorted(set(member_index.tolist()))
    step = steps[torch.tensor(present)][:, None, None]
    a_all = a.to(torch.float32) + step * torch.stack(
        [noise_batch.noise(int(keys_a[m]), a.shape) for m in present])
    b_all = b.to(torch.float32) + step * torch.stack(
        [noise_batch.noise(int(keys_b[m]), b.shape) for m in present])
    in_order = bool((member_index[1:] >= member_index[:-1]).all())
    for i, member in enumerate(present):
        rows = (flat_member == member).nonzero().squeeze(1)
        if in_order:
            rows = slice(int(rows[0]), int(rows[-1]) + 1)
        lora = (x_flat[rows] @ a_all[i].t()) @ b_all[i].t()
        out_flat[rows] = (out_flat[rows].to(torch.float32) + lora * scale).to(out.dtype)
    return result


TWIN_CASES = {  # (rows, tokens, d_in, d_out, rank, member ids, dtype)
    "contiguous_fp32": (8, 1, D_IN, D_OUT, 8, [0, 0, 1, 1, 2, 2, 3, 3], torch.float32),
    "permuted_tokens_bf16": (6, 3, D_IN, D_OUT, 5, [3, 0, 2, 0, 1, 3], torch.bfloat16),
    # > 256 compiled tiles per key of A: blocks wrap between members, remainder blocks.
    "many_tiles_fp32": (6, 1, 4100, 70, 64, [0, 0, 1, 1, 2, 2], torch.float32),
}


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("case", list(TWIN_CASES))
def test_twin_bit_identical_to_plain_formulation(case: str, backend: str) -> None:
    """The twin's fused generation (perturbation inside the generator pass, padded
    rows, per-run output updates) changes no bit of its result."""
    if DEVICE != "cpu" and backend == "compiled":
        pytest.skip("the compiled generator is the CPU path")
    rows, tokens, d_in, d_out, rank, members, dtype = TWIN_CASES[case]
    previous = noise.get_backend()
    try:
        if noise.set_backend(backend) != backend:
            pytest.skip("torch.compile unusable here")
        a, b = _weights(rank, seed=6, d_in=d_in, d_out=d_out)
        keys_a, keys_b, steps = _members(max(members) + 1, 0.05)
        shape = (rows, tokens, d_in) if tokens > 1 else (rows, d_in)
        x, out = _inputs(shape, seed=7, dtype=dtype, d_out=d_out)
        member_index = torch.tensor(members, device=DEVICE)
        twin = knl.noisy_lora_torch(x, a, b, keys_a, keys_b, steps, member_index, 1.5,
                                    out=out.clone())
        plain = _plain_twin(x, out, a, b, keys_a, keys_b, steps, member_index, 1.5)
        assert twin.dtype == dtype
        assert torch.equal(twin, plain)
        assert not torch.equal(twin, out)
    finally:
        noise.set_backend(previous)
