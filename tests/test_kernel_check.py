"""Start-up kernel self-check (lowmem_es/kernel_check.py) on the tiny 4-bit Llama.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): the tests force each kernel path with its switch in
lowmem_es.backends (restored after each test by tests/conftest.py) and break the kernel on
purpose to see it switched off with one warning.
Only fp32 activations here (bf16 tl.dot is wrong in the interpreter). On a GPU machine
(pytest with TRITON_INTERPRET=0) the model lives on CUDA and the same tests run the
compiled kernels, plus the default dispatch, which then checks all four.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch
from kernel_device import DEVICE, needs_kernel

from lowmem_es import backends, es, kernel_check

KERNEL_FUNCTIONS = {  # kernel -> (module under lowmem_es.kernels, launcher the callers use)
    "noisy_lora": ("noisy_lora", "noisy_lora_triton"),
    "nf4_matmul": ("nf4_matmul", "nf4_matmul_triton"),
    "es_update": ("es_update", "es_direction_triton"),
    "sampling": ("sampling", "gumbel_scores_triton"),
}
TWIN_FUNCTIONS = {"noisy_lora": "noisy_lora_torch", "nf4_matmul": "nf4_matmul_torch",
                  "es_update": "es_direction_torch", "sampling": "gumbel_scores_torch"}


def _forces() -> tuple:
    """The four kernel switches, in backends.OPS order."""
    return tuple(backends.force(op) for op in backends.OPS)


@pytest.fixture(scope="module")
def es_model(tiny_llama_dir):
    """The tiny Llama in NF4 (fp32 compute) with ES-LoRA on all seven projections.

    No forward runs on it: on an AVX512-BF16 CPU bitsandbytes repacks a 4-bit weight on
    its first eval-mode forward into a layout the NF4 kernel does not read.
    """
    pytest.importorskip("bitsandbytes")
    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    device = "cuda" if DEVICE == "cuda" else "cpu"
    model, _, _ = load_model(tiny_llama_dir, device=device, compute_dtype="float32")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return attach_es_lora(model, targets, rank=4, alpha=8.0, seed=0)


@pytest.fixture
def switches(monkeypatch):
    """Set the kernels' switches for one test (conftest restores them afterwards, also
    after check_kernels turned one to "torch" or pinned the sampler)."""
    monkeypatch.delenv(kernel_check.FORCE_TORCH_ENV, raising=False)

    def force(**values: str | None) -> None:
        for kernel, value in values.items():
            backends.set_force(kernel, value)

    return force


def _kernel_module(kernel: str):
    import importlib

    return importlib.import_module(f"lowmem_es.kernels.{KERNEL_FUNCTIONS[kernel][0]}")


def _state(es_model) -> tuple:
    masters = {name: t.clone() for name, t in es_model.parameters().items()}
    matmul = torch.backends.cuda.matmul
    precision = (torch.get_float32_matmul_precision(),
                 matmul.allow_bf16_reduced_precision_reduction,
                 matmul.allow_fp16_reduced_precision_reduction)
    return masters, es_model.slot.current, torch.get_rng_state(), precision


def _assert_untouched(es_model, before) -> None:
    """Masters, population slot, layer caches, global RNG and matmul precision as before."""
    masters, current, rng, precision = before
    assert _state(es_model)[3] == precision  # the twin's exact matmuls were undone
    for name, tensor in es_model.parameters().items():
        assert torch.equal(tensor, masters[name]), name
    assert es_model.slot.current is current
    assert all(layer._cache is None and layer._member_cache is None
               for layer in es_model.layers.values())
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG was never read


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lowmem_es" and r.levelno >= logging.WARNING]


def test_cpu_without_forcing_checks_nothing(es_model, switches, monkeypatch, caplog) -> None:
    """CPU, switches at their defaults: no kernel would run, so none is called or judged."""
    if DEVICE == "cuda":
        pytest.skip("the model is on CUDA on a GPU machine")
    for kernel, (_, function) in KERNEL_FUNCTIONS.items():
        for name in (function, TWIN_FUNCTIONS[kernel]):
            monkeypatch.setattr(_kernel_module(kernel), name,
                                lambda *a, _n=name, **k: pytest.fail(f"{_n} ran"))
    before = _state(es_model)
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="lowmem_es"):
        status = kernel_check.check_kernels(es_model, "cpu")
    assert time.perf_counter() - started < 1.0
    assert status == {kernel: "not used" for kernel in KERNEL_FUNCTIONS}
    assert _forces() == (None,) * 4
    assert not [r for r in caplog.records if r.name == "lowmem_es"]
    _assert_untouched(es_model, before)


def test_switches_set_to_torch_check_nothing(es_model, switches) -> None:
    switches(noisy_lora="torch", nf4_matmul="torch", es_update="torch")
    assert set(kernel_check.check_kernels(es_model, "cpu").values()) == {"not used"}


@needs_kernel
def test_correct_kernels_stay_on(es_model, switches, monkeypatch, caplog, request) -> None:
    """All four kernels forced: each runs (counted) against its twin and stays on; the
    masters, the population slot, the caches and the global RNG are as before."""
    switches(noisy_lora="kernel", nf4_matmul="kernel", es_update="kernel", sampling="kernel")
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed, as many training scripts do
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(precision))
    calls: dict[str, int] = {}
    for kernel, (_, function) in KERNEL_FUNCTIONS.items():
        module = _kernel_module(kernel)
        real = getattr(module, function)

        def counted(*args, _real=real, _kernel=kernel, **kwargs):
            calls[_kernel] = calls.get(_kernel, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, function, counted)
    before = _state(es_model)
    with caplog.at_level(logging.INFO, logger="lowmem_es"):
        status = kernel_check.check_kernels(es_model, DEVICE)
    assert status == {kernel: "ok" for kernel in KERNEL_FUNCTIONS}
    # Per distinct layer shape (the tiny Llama's seven projections have four: q/o,
    # grouped-query k/v, gate/up, down): decode + prefill layouts; GEMV + tl.dot row
    # counts; the A and B masters.
    shapes = {(tuple(layer.lora_A.shape), tuple(layer.lora_B.shape))
              for layer in es_model.layers.values()}
    assert len(shapes) == 4
    assert calls == {"noisy_lora": 2 * len(shapes), "nf4_matmul": 2 * len(shapes),
                     "es_update": 2 * len(shapes), "sampling": 1}
    assert _forces() == ("kernel",) * 4
    assert not _warnings(caplog)
    assert "kernel self-check on" in caplog.text
    _assert_untouched(es_model, before)


@needs_kernel
@pytest.mark.parametrize("kernel", list(KERNEL_FUNCTIONS))
def test_raising_kernel_is_switched_off_with_one_warning(es_model, switches, monkeypatch,
                                                         caplog, kernel: str) -> None:
    switches(**{kernel: "kernel"})

    def broken(*args, **kwargs):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_120\nmore detail")

    monkeypatch.setattr(_kernel_module(kernel), KERNEL_FUNCTIONS[kernel][1], broken)
    before = _state(es_model)
    with caplog.at_level(logging.WARNING, logger="lowmem_es"):
        status = kernel_check.check_kernels(es_model, DEVICE)
    assert status[kernel].startswith("disabled: RuntimeError: PTX .version 8.7")
    assert "more detail" in status[kernel]  # the last line of a multi-line error too
    assert all(value == "not used" for name, value in status.items() if name != kernel)
    assert backends.force(kernel) == "torch"
    [warning] = _warnings(caplog)
    message = warning.getMessage()
    assert f"`{kernel}`" in message and "RuntimeError" in message
    assert "switched off for the rest of this run" in message
    assert "same results up to rounding" in message and "LOWMEM_ES_FORCE_TORCH=1" in message
    _assert_untouched(es_model, before)


@needs_kernel
@pytest.mark.parametrize("kernel", list(KERNEL_FUNCTIONS))
def test_wrong_kernel_result_is_switched_off_with_the_error(es_model, switches, monkeypatch,
                                                            caplog, kernel: str) -> None:
    switches(**{kernel: "kernel"})
    module = _kernel_module(kernel)
    real = getattr(module, KERNEL_FUNCTIONS[kernel][1])

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs).add_(1e-2)

    monkeypatch.setattr(module, KERNEL_FUNCTIONS[kernel][1], off_by_a_bit)
    with caplog.at_level(logging.WARNING, logger="lowmem_es"):
        status = kernel_check.check_kernels(es_model, DEVICE)
    assert status[kernel].startswith("disabled: max abs error 0.01 vs its torch twin")
    assert backends.force(kernel) == "torch"
    if kernel == "sampling":  # the twin of the same Philox draws, not the generators
        assert backends.sampler() == "philox"
    [warning] = _warnings(caplog)
    assert f"`{kernel}`" in warning.getMessage()
    assert "max abs error 0.01" in warning.getMessage()


@needs_kernel
def test_a_kernel_wrong_for_one_layer_shape_only_is_caught(es_model, switches,
                                                          monkeypatch) -> None:
    """Right for the largest layers, wrong for the grouped-query k/v shape (the smallest
    d_out): the check meets every shape, so the kernel is still switched off."""
    switches(noisy_lora="kernel")
    from lowmem_es.kernels import noisy_lora

    smallest = min(layer.lora_B.shape[0] for layer in es_model.layers.values())
    real = noisy_lora.noisy_lora_triton

    def wrong_for_small(x, lora_A, lora_B, *args, **kwargs):
        result = real(x, lora_A, lora_B, *args, **kwargs)
        return result.add_(1e-2) if lora_B.shape[0] == smallest else result

    monkeypatch.setattr(noisy_lora, "noisy_lora_triton", wrong_for_small)
    status = kernel_check.check_kernels(es_model, DEVICE)
    assert status["noisy_lora"].startswith("disabled: max abs error 0.01")
    assert f"d_out={smallest}" in status["noisy_lora"]
    assert backends.force("noisy_lora") == "torch"


def test_distinct_shapes_are_capped(es_model, monkeypatch) -> None:
    device = next(iter(es_model.layers.values())).lora_A.device
    layers = kernel_check._distinct_layers(es_model, device)
    sizes = [layer.lora_A.numel() + layer.lora_B.numel() for layer in layers]
    assert len(layers) == 4 and sizes == sorted(sizes, reverse=True)
    monkeypatch.setattr(kernel_check, "MAX_CHECKED_SHAPES", 2)
    assert kernel_check._distinct_layers(es_model, device) == layers[:2]


@needs_kernel
def test_nan_from_the_kernel_is_a_failure(es_model, switches, monkeypatch) -> None:
    switches(es_update="kernel")
    from lowmem_es.kernels import es_update

    monkeypatch.setattr(es_update, "es_direction_triton",
                        lambda keys, coefficients, out, *a, **k: out.fill_(float("nan")))
    status = kernel_check.check_kernels(es_model, DEVICE)
    assert "are NaN/inf where the torch twin's are finite" in status["es_update"]
    assert backends.force("es_update") == "torch"


@needs_kernel
def test_failing_twin_leaves_the_kernel_on(es_model, switches, monkeypatch, caplog) -> None:
    """If the twin itself fails nothing can be concluded: warn, keep the kernel."""
    switches(es_update="kernel")
    monkeypatch.setattr(es, "noise", lambda *a, **k: (_ for _ in ()).throw(MemoryError("x")))
    with caplog.at_level(logging.WARNING, logger="lowmem_es"):
        status = kernel_check.check_kernels(es_model, DEVICE)
    assert status["es_update"].startswith("unchecked: its torch twin raised MemoryError")
    assert backends.force("es_update") == "kernel"
    [warning] = _warnings(caplog)
    assert "could not check" in warning.getMessage()


@needs_kernel
def test_a_failure_on_another_rank_switches_the_kernel_off_here(es_model, switches,
                                                               monkeypatch, caplog) -> None:
    """torchrun: the ranks must update alike, so a kernel off anywhere is off everywhere."""
    from lowmem_es import distributed

    switches(es_update="kernel")
    reduced = []

    def all_reduce(tensor, op=None):
        reduced.append(tensor.tolist())
        tensor[kernel_check.KERNELS.index("es_update")] = 1  # another rank failed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(distributed, "all_reduce", all_reduce)
    with caplog.at_level(logging.WARNING, logger="lowmem_es"):
        status = kernel_check.check_kernels(es_model, DEVICE)
    assert reduced == [[0, 0, 0, 0]]  # passed here
    assert status["es_update"] == "disabled: its self-check failed on another rank"
    assert backends.force("es_update") == "torch"
    assert status["noisy_lora"] == status["nf4_matmul"] == "not used"
    assert "another rank" in _warnings(caplog)[0].getMessage()


@pytest.mark.skipif(DEVICE != "cuda", reason="the default dispatch uses kernels on CUDA only")
def test_default_dispatch_on_cuda_checks_every_kernel(es_model, switches) -> None:
    before = _state(es_model)
    status = kernel_check.check_kernels(es_model, DEVICE)
    assert status == {kernel: "ok" for kernel in KERNEL_FUNCTIONS}
    assert _forces() == (None,) * 4
    _assert_untouched(es_model, before)


def test_force_torch_variable_rules_every_kernel_out(es_model, switches, monkeypatch) -> None:
    monkeypatch.setenv(kernel_check.FORCE_TORCH_ENV, "1")
    device = DEVICE or "cpu"
    assert set(kernel_check.check_kernels(es_model, device).values()) == {"not used"}


def test_wrong_arguments_raise(es_model, switches) -> None:
    with pytest.raises(TypeError, match="ESLoraModel"):
        kernel_check.check_kernels(es_model.model, "cpu")
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        kernel_check.check_kernels(es_model, "cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match=r"`force\('noisy_lora'\)` must be one of"):
        switches(noisy_lora="gpu")


def test_update_switch_routes_estimate_direction(monkeypatch) -> None:
    """The ES_UPDATE switch is what estimate_direction (and so es_update) obeys when not
    told."""
    from lowmem_es import noise

    def key_for_pair(pair: int) -> int:
        return noise.member_key(1, 2, pair, 3)

    backends.set_force(backends.ES_UPDATE, "torch")
    direction = es.estimate_direction((3, 5), key_for_pair, {0: 0.5, 1: -0.25})
    assert torch.equal(direction, es.estimate_direction((3, 5), key_for_pair, {0: 0.5, 1: -0.25},
                                                        force="torch"))
    with pytest.raises(ValueError, match="`force` must be one of"):
        es.estimate_direction((3, 5), key_for_pair, {0: 0.5}, force="gpu")


@needs_kernel
def test_sampling_kernel_is_checked_only_when_the_run_samples_with_it(es_model, switches,
                                                                      monkeypatch) -> None:
    """A greedy run (temperature 0), or one sampling from per-row generators, never calls
    the sampling kernel: it is not judged then."""
    switches(sampling="kernel")
    assert kernel_check.check_kernels(es_model, DEVICE, sampling=False)["sampling"] == "not used"
    assert kernel_check.check_kernels(es_model, DEVICE, sampling=True)["sampling"] == "ok"
    backends.set_sampler("generator")
    assert kernel_check.check_kernels(es_model, DEVICE)["sampling"] == "not used"
