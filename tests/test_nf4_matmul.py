"""Fused NF4 matmul (kernels/nf4_matmul.py): the Triton kernels against their torch twin.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) with fp32 and fp16 activations; on a GPU machine run pytest with
TRITON_INTERPRET=0 and the bf16 rows and the 7B-shaped cases run too. The interpreter
launches one big tile by default; ``LAUNCH_OVERRIDES`` cases force the GPU's launch
shapes (several K-steps, N-tiles, split-K with its reduction, blocksize larger and smaller
than BLOCK_K, select-tree dequantization) so those paths are checked here as well.
Weights are quantized by bitsandbytes itself (``quantize_4bit``), so the layout the kernel
reads is bitsandbytes' own.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402
from kernel_device import DEVICE, needs_kernel  # noqa: E402

from lowmem_es.kernels import nf4_matmul as knf  # noqa: E402
from lowmem_es.kernels._runtime import FORCE_TORCH_ENV  # noqa: E402
from lowmem_es.kernels.nf4_layout import nf4_layout  # noqa: E402

pytestmark = needs_kernel

# (dtype, atol, rtol) of kernel vs twin for outputs of size ~1 (x is scaled by 1/sqrt(K)).
# fp32: IEEE dots, only summation order differs. fp16/bf16: the weight is rounded to x's
# dtype on both sides and accumulated in fp32, so about one ulp of the output dtype
# (bf16 ulp at 2-4 is 1.6e-2). The bf16 row is reasoned, not yet run (GPU only).
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1.6e-2, id="bf16"),
]


def _quantized(out_features: int, in_features: int, blocksize: int = 64, nested: bool = True,
               seed: int = 0, device: str | None = None):
    """(packed weight, quant state, dense fp32 weight) quantized by bitsandbytes."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(out_features, in_features, generator=generator)
    packed, state = bnb_functional.quantize_4bit(
        dense.to(device or DEVICE), blocksize=blocksize, compress_statistics=nested,
        quant_type="nf4")
    return packed, state, dense


def _inputs(shape: tuple[int, ...], out_features: int, seed: int = 1,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled so outputs are ~1, and a bias."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) / shape[-1] ** 0.5
    bias = torch.randn(out_features, generator=generator)
    return x.to(DEVICE, dtype), bias.to(DEVICE, dtype)


@pytest.fixture
def overrides(monkeypatch):
    """Set ``LAUNCH_OVERRIDES`` for one test (restored afterwards)."""
    def apply(**values):
        monkeypatch.setattr(knf, "LAUNCH_OVERRIDES", dict(values))
    return apply


def _skip_off_gpu(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and DEVICE != "cuda":
        pytest.skip("bf16 runs on CUDA only (bf16 tl.dot is wrong in the interpreter)")


# ------------------------------------------------------------------ layout


@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_layout_decoding_matches_bitsandbytes(nested: bool, blocksize: int) -> None:
    """The layout the kernel assumes, decoded in plain torch from ``nf4_layout``'s tensors,
    equals bitsandbytes' dequantize_4bit bit for bit: high nibble = even element,
    scale = code2[absmax] * absmax2[block // nested_bs] + offset."""
    packed, state, _ = _quantized(129, 256, blocksize, nested)
    layout = nf4_layout(packed, state)
    assert layout.nested == nested and layout.standard_code
    nibbles = torch.stack([layout.packed.long() >> 4, layout.packed.long() & 15], dim=1)
    values = layout.code[nibbles.reshape(-1)]
    if nested:
        blocks = torch.arange(layout.absmax.numel(), device=packed.device)
        scale = (layout.code2[layout.absmax.long()] * layout.absmax2[blocks // 256]
                 + layout.offset)
    else:
        scale = layout.absmax
    decoded = (values.reshape(-1, blocksize) * scale[:, None]).reshape(129, 256)
    reference = bnb_functional.dequantize_4bit(packed, state).float()
    if DEVICE == "cpu":
        assert torch.equal(decoded, reference)
    else:  # bitsandbytes' CUDA kernels may round the same products differently by an ulp
        torch.testing.assert_close(decoded, reference, atol=0, rtol=2.4e-7)


def test_layout_is_cached_and_rebuilt_for_new_weights() -> None:
    packed, state, _ = _quantized(33, 64)
    first = nf4_layout(packed, state)
    assert nf4_layout(packed, state) is first
    state.absmax = state.absmax.clone()  # new storage: the cached layout is stale
    assert nf4_layout(packed, state) is not first


# ------------------------------------------------------------------ kernel vs twin

SHAPES = [  # (out_features, in_features, blocksize): odd N, in_features a blocksize multiple
    (129, 192, 64),
    (129, 384, 128),
    (33, 64, 64),
    (17, 96, 32),
]


@pytest.mark.parametrize("rows", [1, 3, 16, 100])
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize(("out_features", "in_features", "blocksize"), SHAPES)
def test_kernel_matches_twin(out_features: int, in_features: int, blocksize: int,
                             nested: bool, rows: int) -> None:
    packed, state, _ = _quantized(out_features, in_features, blocksize, nested)
    x, bias = _inputs((rows, in_features), out_features, seed=rows)
    use_bias = bias if rows % 2 else None  # odd row counts with bias, even without
    kernel = knf.nf4_matmul(x, packed, state, use_bias, force="kernel")
    twin = knf.nf4_matmul(x, packed, state, use_bias, force="torch")
    assert kernel.shape == (rows, out_features) and kernel.dtype == x.dtype
    torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)


def test_twin_is_x_times_dequantized_weight() -> None:
    """The twin against a dense reference built from the fp32 weights bitsandbytes
    rebuilds: an independent check of the twin's transposes and bias."""
    packed, state, dense = _quantized(129, 192)
    x, bias = _inputs((5, 192), 129)
    rebuilt = bnb_functional.dequantize_4bit(packed, state).float()
    assert (rebuilt.cpu() - dense).abs().max() < 0.5 * dense.abs().max()  # it is NF4 of dense
    twin = knf.nf4_matmul_torch(x, packed, state, bias)
    torch.testing.assert_close(twin, x @ rebuilt.t() + bias, atol=1e-5, rtol=1e-5)


GPU_LAUNCHES = {  # LAUNCH_OVERRIDES: the GPU's launch shapes, run in the interpreter
    "dot_splitk3_tree": dict(kernel="dot", block_m=16, block_n=32, block_k=64, splits=3,
                             dequant="tree"),
    "dot_blockk_below_blocksize": dict(kernel="dot", block_m=16, block_n=64, block_k=32,
                                       splits=2, dequant="table"),
    "dot_blockk_above_blocksize": dict(kernel="dot", block_m=16, block_n=32, block_k=256,
                                       splits=1, dequant="tree"),
    "gemv_splitk2_tree": dict(kernel="gemv", block_n=32, block_k=64, splits=2,
                              dequant="tree"),
    "gemv_blockk_below_blocksize": dict(kernel="gemv", block_n=64, block_k=32, splits=1,
                                        dequant="table"),
}


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize("launch", list(GPU_LAUNCHES))
def test_gpu_launch_shapes_match_twin(overrides, launch: str, nested: bool, rows: int
                                      ) -> None:
    """129 x 256 with blocksize 64/128 against tiles of 32-256: several N-tiles and
    K-steps, a ragged last N-tile, split-K partials summed by the reduction kernel."""
    overrides(**GPU_LAUNCHES[launch])
    blocksize = 128 if "below" in launch else 64
    packed, state, _ = _quantized(129, 256, blocksize, nested, seed=3)
    x, bias = _inputs((rows, 256), 129, seed=4)
    kernel = knf.nf4_matmul_triton(x, packed, state, bias)
    twin = knf.nf4_matmul_torch(x, packed, state, bias)
    torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["dot", "gemv"])
def test_select_tree_equals_table_bitwise(overrides, kernel: str) -> None:
    """The select tree's literals are exactly bitsandbytes' NF4 code: same bits out."""
    packed, state, _ = _quantized(129, 192, seed=5)
    x, _ = _inputs((3, 192), 129, seed=6)
    results = []
    for dequant in ("tree", "table"):
        overrides(kernel=kernel, dequant=dequant)
        results.append(knf.nf4_matmul_triton(x, packed, state))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("rows", [1, 16])
def test_dtype_table(dtype: torch.dtype, atol: float, rtol: float, rows: int) -> None:
    _skip_off_gpu(dtype)
    packed, state, _ = _quantized(129, 192, seed=7)
    x, bias = _inputs((rows, 192), 129, seed=8, dtype=dtype)
    kernel = knf.nf4_matmul_triton(x, packed, state, bias)
    twin = knf.nf4_matmul_torch(x, packed, state, bias)
    assert kernel.dtype == dtype
    torch.testing.assert_close(kernel.float(), twin.float(), atol=atol, rtol=rtol)


def test_leading_dims_strided_x_and_zero_rows() -> None:
    packed, state, _ = _quantized(33, 64, seed=9)
    x, bias = _inputs((2, 3, 64), 33, seed=10)
    kernel = knf.nf4_matmul_triton(x, packed, state, bias)
    assert kernel.shape == (2, 3, 33)
    torch.testing.assert_close(kernel, knf.nf4_matmul_torch(x, packed, state, bias),
                               atol=1e-5, rtol=1e-5)
    strided = torch.randn(64, 5, device=DEVICE).t()  # (5, 64), last-dim stride 5
    torch.testing.assert_close(knf.nf4_matmul_triton(strided, packed, state),
                               knf.nf4_matmul_torch(strided, packed, state),
                               atol=1e-5, rtol=1e-5)
    empty = knf.nf4_matmul_triton(torch.empty(0, 64, device=DEVICE), packed, state)
    assert empty.shape == (0, 33)


# ------------------------------------------------------------------ errors


def _good() -> dict:
    packed, state, _ = _quantized(33, 64, seed=11)
    x, bias = _inputs((3, 64), 33, seed=12)
    return dict(x=x, weight=packed, quant_state=state, bias=bias)


BAD_INPUTS = {  # name -> (change, error, match); raised alike by kernel and twin
    "x_int": (lambda g: g.update(x=g["x"].to(torch.int32)), TypeError,
              r"`x` has dtype torch.int32; expected float16, bfloat16 or float32"),
    "x_fp64": (lambda g: g.update(x=g["x"].double()), TypeError, r"`x` has dtype "
               r"torch.float64"),
    "x_width": (lambda g: g.update(x=g["x"][:, :32]), ValueError,
                r"`x` has shape \(3, 32\); its last dimension must be in_features=64"),
    "bias_shape": (lambda g: g.update(bias=g["bias"][:32]), ValueError,
                   r"`bias` has shape \(32,\); expected \(out_features,\) = \(33,\)"),
    "bias_int": (lambda g: g.update(bias=g["bias"].to(torch.int64)), TypeError,
                 r"`bias` must be a float16/bfloat16/float32 tensor"),
    "weight_truncated": (lambda g: g.update(weight=g["weight"][:100]), ValueError,
                         r"`weight` holds 100 bytes but `quant_state.shape` \(33, 64\) "
                         r"packs into 1056"),
    "fp4": (lambda g: setattr(g["quant_state"], "quant_type", "fp4"), ValueError,
            r"`quant_state.quant_type` is 'fp4'"),
    "no_state": (lambda g: g.update(quant_state=None), ValueError,
                 r"`quant_state` is None"),
}


@pytest.mark.parametrize("force", ["kernel", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case: str, force: str) -> None:
    change, error, match = BAD_INPUTS[case]
    args = _good()
    change(args)
    with pytest.raises(error, match=match):
        knf.nf4_matmul(**args, force=force)


def test_blocks_crossing_rows_kernel_refuses_twin_reads() -> None:
    """in_features=96 with blocksize 64: quantization blocks straddle rows. The kernel
    names the field; the twin (and so the default dispatch) computes it."""
    packed, state, _ = _quantized(33, 96, blocksize=64, seed=13)
    x, bias = _inputs((3, 96), 33, seed=14)
    with pytest.raises(ValueError, match=r"`weight` has in_features=96, not a multiple of "
                                         r"`quant_state.blocksize`=64"):
        knf.nf4_matmul(x, packed, state, bias, force="kernel")
    assert not knf._kernel_fits(x, packed, state, bias)
    dense = bnb_functional.dequantize_4bit(packed, state).float()
    torch.testing.assert_close(knf.nf4_matmul(x, packed, state, bias), x @ dense.t() + bias,
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ dispatch


def test_dispatch_rules(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(knf, "nf4_matmul_torch", lambda *a: calls.append("torch"))
    monkeypatch.setattr(knf, "nf4_matmul_triton", lambda *a: calls.append("kernel"))
    args = _good()
    knf.nf4_matmul(**args)  # CPU tensors (interpreter or not): the twin
    knf.nf4_matmul(**args, force="kernel")
    monkeypatch.setenv(FORCE_TORCH_ENV, "1")
    knf.nf4_matmul(**args)
    knf.nf4_matmul(**args, force="kernel")  # an explicit force wins over the variable
    expected = ["torch", "kernel", "torch", "kernel"]
    if DEVICE == "cuda":
        expected[0] = "kernel"
    assert calls == expected
    with pytest.raises(ValueError, match="`force` must be one of"):
        knf.nf4_matmul(**args, force="gpu")


def test_kernel_fits_rows_grad_and_cpu_packing() -> None:
    """What the default dispatch refuses on CUDA: too many rows, autograd, a layout the
    kernel cannot read."""
    args = _good()
    x, packed, state, bias = args["x"], args["weight"], args["quant_state"], args["bias"]
    assert knf._kernel_fits(x, packed, state, bias)
    many = torch.zeros(knf.DISPATCH_MAX_ROWS + 1, 64, device=DEVICE)
    assert not knf._kernel_fits(many, packed, state, bias)
    assert knf._kernel_fits(many[:knf.DISPATCH_MAX_ROWS], packed, state, bias)
    assert not knf._kernel_fits(x.clone().requires_grad_(), packed, state, bias)
    with torch.no_grad():
        assert knf._kernel_fits(x.clone().requires_grad_(), packed, state, bias)
    state.packing_format_for_cpu = True
    assert not knf._kernel_fits(x, packed, state, bias)


# ------------------------------------------------------------------ nf4_linear


def _linear4bit(in_features: int, out_features: int, bias: bool = True):
    generator = torch.Generator().manual_seed(15)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias,
                              compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_features, in_features, generator=generator), requires_grad=False,
        compress_statistics=True, quant_type="nf4")
    if bias:
        layer.bias.data = torch.randn(out_features, generator=generator)
    return layer.to(DEVICE)


def test_nf4_linear_matches_the_layer() -> None:
    """nf4_linear equals the layer's own forward. In training mode bitsandbytes
    dequantizes and calls F.linear (fp32 here). In eval mode on an AVX512-BF16 CPU it
    first repacks the weight into a layout only it reads (and computes in bf16); after
    that nf4_linear must notice: the kernel refuses, the twin and default defer to
    bitsandbytes. (160 features: that repacking asserts out_features % 32 == 0.)"""
    layer = _linear4bit(192, 160)
    x, _ = _inputs((2, 3, 192), 160, seed=16)
    with torch.no_grad():
        reference = layer(x)  # training mode: no repacking
    kernel = knf.nf4_linear(x, layer, force="kernel")
    assert kernel.shape == (2, 3, 160)
    torch.testing.assert_close(kernel, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(knf.nf4_linear(x, layer, force="torch"), reference,
                               atol=1e-5, rtol=1e-5)
    layer.eval()
    with torch.no_grad():
        evaluated = layer(x)
        default = knf.nf4_linear(x, layer)  # CPU: bitsandbytes' own path; CUDA: kernel
        if DEVICE == "cpu":
            assert torch.equal(default, evaluated)
        torch.testing.assert_close(default, evaluated, atol=1e-5, rtol=1e-5)
        if DEVICE == "cpu" and getattr(layer.weight.quant_state, "packing_format_for_cpu",
                                       False):
            with pytest.raises(ValueError, match="packing_format_for_cpu"):
                knf.nf4_linear(x, layer, force="kernel")
            torch.testing.assert_close(knf.nf4_linear(x, layer, force="torch"), evaluated,
                                       atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(knf.nf4_linear(x, layer, force="kernel"), evaluated,
                                       atol=1e-5, rtol=1e-5)


def test_nf4_linear_half_input_computes_in_compute_dtype() -> None:
    """fp16 x into a layer with fp32 compute_dtype: computed in fp32, returned as fp16."""
    layer = _linear4bit(64, 33, bias=False)
    x, _ = _inputs((4, 64), 33, seed=17, dtype=torch.float16)
    kernel = knf.nf4_linear(x, layer, force="kernel")
    assert kernel.dtype == torch.float16
    reference = knf.nf4_matmul_torch(x.float(), layer.weight, layer.weight.quant_state)
    torch.testing.assert_close(kernel, reference.half(), atol=1e-3, rtol=1e-3)  # 1 fp16 ulp


def test_nf4_linear_dense_layer_is_the_layer_itself() -> None:
    layer = torch.nn.Linear(8, 4).to(DEVICE)
    x = torch.randn(2, 8, device=DEVICE)
    assert torch.equal(knf.nf4_linear(x, layer), layer(x))
    with pytest.raises(ValueError, match="has no 4-bit quant state"):
        knf.nf4_linear(x, layer, force="kernel")


# ------------------------------------------------------------------ GPU only

SEVEN_B = [(4096, 4096), (3584, 18944), (18944, 3584), (14336, 4096), (512, 3584)]
_SEVEN_B_WEIGHTS: dict[tuple[int, int], tuple] = {}  # quantized once per shape


@pytest.mark.skipif(DEVICE != "cuda", reason="7B shapes: compiled kernels on CUDA only "
                                             "(minutes in the interpreter)")
@pytest.mark.parametrize("rows", [1, 8, 32, 128, 512])
@pytest.mark.parametrize(("out_features", "in_features"), SEVEN_B)
def test_seven_b_shapes_bf16(out_features: int, in_features: int, rows: int) -> None:
    """The launch heuristics' real choices (GEMV, split-K, tile tables) at 7B shapes."""
    key = (out_features, in_features)
    if key not in _SEVEN_B_WEIGHTS:
        _SEVEN_B_WEIGHTS[key] = _quantized(out_features, in_features, seed=18)[:2]
    packed, state = _SEVEN_B_WEIGHTS[key]
    x, bias = _inputs((rows, in_features), out_features, seed=19, dtype=torch.bfloat16)
    kernel = knf.nf4_matmul_triton(x, packed, state, bias)
    twin = knf.nf4_matmul_torch(x, packed, state, bias)
    torch.testing.assert_close(kernel.float(), twin.float(), atol=2e-2, rtol=1.6e-2)
