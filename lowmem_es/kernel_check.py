"""Start-up self-check of the Triton kernels: run each once against its twin, or turn it off.

The kernels (``lowmem_es.kernels``) were written and tested in the Triton interpreter on
CPU; the first compile on a user's GPU may fail (an unsupported architecture, a Triton
version that rejects a construct), crash at launch, or, worst, give wrong numbers that
would silently corrupt a run of hours. ``check_kernels`` is the first contact: before the
first iteration it runs every kernel that this run WOULD use (the dispatch rule of the
layers and the update, ``backends.use_kernel``) on small problems shaped like the model's
real layers (every distinct LoRA and NF4 weight shape, since the GPU launch depends on
them), runs the torch twin on the same inputs, and compares with the tolerances of
the kernel tests. A kernel that raises or disagrees is switched off for the rest of the
process (``backends.switch_off``), with one warning saying what failed and
that the run continues on the torch path (slower, same results up to rounding). Where no
kernel would run (CPU, or ``LOWMEM_ES_FORCE_TORCH=1``) it returns at once without
importing Triton.

The inputs are synthetic values in the real shapes (d_in, d_out, rank, packed NF4 weight)
and activation dtype: the real LoRA B starts at zero, which would hide half of the fused
LoRA kernel. Synthetic values come from a private seeded generator (the global RNG is
never read, as everywhere on the ES path); masters, the population slot and the layers'
caches are not touched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lowmem_es import backends, es, noise
from lowmem_es.backends import ES_UPDATE, NF4_MATMUL, NOISY_LORA, SAMPLING
from lowmem_es.lora import ESLoraLinear, ESLoraModel

logger = logging.getLogger("lowmem_es")

KERNELS = backends.OPS
OK, NOT_USED = "ok", "not used"
FORCE_TORCH_ENV = "LOWMEM_ES_FORCE_TORCH"  # the same name as lowmem_es.kernels._runtime's

# (atol, rtol) of kernel vs twin for outputs normalised to RMS 1: the tables of
# tests/test_noisy_lora.py and tests/test_nf4_matmul.py (fp32: summation order and
# tl.randn's last ulp; fp16/bf16: about one ulp of the output dtype), and the 1e-6 of
# tests/test_es_update.py (fp32 sums of regenerated noise).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
              torch.bfloat16: (1e-2, 1.6e-2)}
# NF4 in bf16 on real (large-K) shapes: test_nf4_matmul.py's 7B-shape atol.
NF4_TOLERANCES = {**TOLERANCES, torch.bfloat16: (2e-2, 1.6e-2)}
ES_UPDATE_TOLERANCE = (1e-6, 1e-6)
# Gumbel scores (fp32 out): the same uniforms bit for bit, logs to an ulp or two.
SAMPLING_TOLERANCE = (1e-5, 1e-5)
# Rows of the sampling check (over the model's whole vocabulary) and its decode step.
SAMPLING_ROWS, SAMPLING_STEP = 4, 3

# The check's population: 2 antithetic pairs, as es.member_schedule(4, True) lays them out.
MEMBERS = ((0, 1), (0, -1), (1, 1), (1, -1))
CHECK_SEED = 0x5E1F  # run seed of the check's noise keys and its private input generator
# Row layouts of the fused LoRA check, (label, rows per member, tokens per row): decode
# steps (one token per row) and a prefill whose runs of one member span more than one row
# block on a GPU (160 > BLOCK_M_MAX_GPU), so the stage-2 multi-block path compiles too.
NOISY_LORA_LAYOUTS = (("decode", 2, 1), ("prefill", 1, 160))
# Distinct layer shapes checked per kernel (a 7B with q/k/v/o targets has 2, with the MLP
# too 4; the check costs a few milliseconds per shape on a GPU once compiled).
MAX_CHECKED_SHAPES = 6
# Rows of the NF4 check: the one-row GEMV kernel and the tl.dot kernel.
NF4_ROWS = (1, 24)
# Fitnesses of the four members in the update check (any distinct values do).
UPDATE_FITNESS = (0.9, -0.3, 0.2, -1.1)


class _TwinError(Exception):
    """The torch twin (or the inputs) failed: the kernel cannot be judged."""


class _KernelError(Exception):
    """The kernel raised or disagreed with its twin; ``str()`` says how."""


@dataclass
class _Case:
    """One comparison: the same inputs through the twin and through the kernel."""

    label: str
    twin: Callable[[], torch.Tensor]
    kernel: Callable[[], torch.Tensor]
    atol: float
    rtol: float


@dataclass
class _Check:
    """A kernel this run would use, how to test it, and how to switch it off."""

    name: str
    what: str  # the kernel in words, for the warning
    cases: Callable[[], list[_Case]]
    fallback: str  # what runs instead, for the warning
    silence: str  # how to skip the kernel (and this check), for the warning


@torch.no_grad()
def check_kernels(es_model: ESLoraModel, device: torch.device | str,
                  dtype: torch.dtype | None = None, *, sampling: bool = True
                  ) -> dict[str, str]:
    """Check every Triton kernel this run would use on ``device``; switch off failures.

    ``es_model``: the ES-LoRA model about to be trained (its layers give the shapes);
    ``device``: where the run computes; ``dtype``: the activations' dtype (default: the
    dtype of the input embeddings, else float32); ``sampling``: whether the run samples
    (temperature > 0), the only use of the sampling kernel. Returns ``{kernel: status}``
    for ``noisy_lora``, ``nf4_matmul``, ``es_update`` and ``sampling``, each ``"ok"``,
    ``"not used"``, ``"disabled: <reason>"`` (switched off, one warning logged) or ``"unchecked:
    <reason>"`` (the torch twin itself failed, so nothing was concluded; kernel left on).

    Call it on every rank after the model is built and before the first iteration: under
    torchrun the decisions are made unanimous (a kernel off on one rank is off on all),
    since every rank must apply the identical update. Never raises for a failing kernel;
    raises TypeError/ValueError only for wrong arguments.
    """
    if not isinstance(es_model, ESLoraModel):
        raise TypeError(f"`es_model` must be a lowmem_es.lora.ESLoraModel, got "
                        f"{type(es_model).__name__}")
    device = torch.device(device)
    if dtype is None:
        dtype = _activation_dtype(es_model)
    if dtype not in TOLERANCES:
        raise ValueError(f"`dtype` must be one of {list(TOLERANCES)}, got {dtype}")
    started = time.perf_counter()
    status: dict[str, str] = {}
    lost_context: str | None = None
    for name in KERNELS:
        try:
            check = (None if name == SAMPLING and not sampling
                     else _planned_check(name, es_model, device, dtype))
        except Exception as error:  # e.g. a bitsandbytes layer of an unforeseen kind
            status[name] = f"unchecked: deciding whether it runs raised {_first_line(error)}"
            logger.warning("lowmem-es: could not check the Triton kernel `%s`: %s", name,
                           status[name])
            continue
        if check is None:
            status[name] = NOT_USED
        elif lost_context is not None:
            status[name] = f"unchecked: {lost_context}"
        else:
            status[name], lost_context = _run_check(check, device)
    status = _agree_across_ranks(status, device)
    if any(value != NOT_USED for value in status.values()):
        logger.info("kernel self-check on %s (%.1f s): %s", _describe_device(device),
                    time.perf_counter() - started,
                    ", ".join(f"{name} {value}" for name, value in status.items()))
    return status


# ----------------------------------------------------------------------------- dispatch


def _planned_check(name: str, es_model: ESLoraModel, device: torch.device,
                   dtype: torch.dtype) -> _Check | None:
    """The check of kernel ``name`` if this run would use it on ``device``, else None.

    The rule is the callers' (``backends.use_kernel``: the op's switch, then
    ``LOWMEM_ES_FORCE_TORCH``, Triton present and compiled), plus, for NF4, a 4-bit base
    whose layout the kernel reads. On CPU nothing is imported unless a switch says
    "kernel"; a switch of "kernel" on CPU is checked too (the layer then calls the kernel
    on CPU tensors as well), so that the interpreter tests can reach it.
    """
    if name == SAMPLING:  # the logits' kernel: no layer shapes involved
        return _sampling_check(es_model, device, dtype)
    layers = _distinct_layers(es_model, device)
    if not layers or not backends.use_kernel(name, device):
        return None
    if name == NOISY_LORA:
        return _Check(NOISY_LORA, "fused noisy LoRA (lowmem_es.kernels.noisy_lora)",
                      lambda: [case for layer in layers
                               for case in _noisy_lora_cases(layer, device, dtype)],
                      "the ES-LoRA layers use their cached torch path",
                      f"set {FORCE_TORCH_ENV}=1 (all kernels)")
    if name == NF4_MATMUL:
        bases = _nf4_bases(es_model, device)
        if not bases:
            return None
        return _Check(NF4_MATMUL, "NF4 base matmul (lowmem_es.kernels.nf4_matmul)",
                      lambda: [case for base in bases
                               for case in _nf4_cases(base, device, dtype)],
                      "the frozen 4-bit base layers use bitsandbytes",
                      f"pass --nf4-kernel false (ESConfig.nf4_kernel=False) or set "
                      f"{FORCE_TORCH_ENV}=1 (all kernels)")
    return _Check(ES_UPDATE, "ES update (lowmem_es.kernels.es_update)",
                  lambda: [case for layer in layers for case in _es_update_cases(layer, device)],
                  "the ES update regenerates noise with the torch loop",
                  f"set {FORCE_TORCH_ENV}=1 (all kernels)")


def _sampling_check(es_model: ESLoraModel, device: torch.device, dtype: torch.dtype
                    ) -> _Check | None:
    """The Gumbel sampling kernel, where the sampler would call it (``generate._sampler``:
    the Philox source on CUDA logits, or with the sampling kernel forced)."""
    if backends.sampling_source(device) != "philox" \
            or not backends.use_kernel(SAMPLING, device):
        return None
    vocab = _vocab_size(es_model)
    return _Check(SAMPLING, "Gumbel sampling noise (lowmem_es.kernels.sampling)",
                  lambda: _sampling_cases(vocab, device, dtype),
                  "sampling draws its Philox noise with the torch twin",
                  f"set {FORCE_TORCH_ENV}=1 (all kernels)")


def _vocab_size(es_model: ESLoraModel) -> int:
    """Columns of the model's logits: its output embedding's rows, else the config's."""
    try:
        return int(es_model.model.get_output_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError, TypeError):
        return int(getattr(es_model.model.config, "vocab_size", 0) or 32000)


def _sampling_cases(vocab: int, device: torch.device, dtype: torch.dtype) -> list[_Case]:
    """Logits of the model's vocabulary and activation dtype, one key per row."""
    from lowmem_es.kernels import sampling

    logits = (4 * torch.randn(SAMPLING_ROWS, vocab, generator=_generator())).to(device, dtype)
    keys = torch.tensor([noise.member_key(CHECK_SEED, 0, row, 0) for row in
                         range(SAMPLING_ROWS)], dtype=torch.int64, device=device)
    atol, rtol = SAMPLING_TOLERANCE
    return [_Case(f"{SAMPLING_ROWS} rows x {vocab} logits, {dtype}",
                  lambda: sampling.gumbel_scores(logits, keys, SAMPLING_STEP, 0.7,
                                                 force="torch"),
                  lambda: sampling.gumbel_scores(logits, keys, SAMPLING_STEP, 0.7,
                                                 force="kernel"), atol, rtol)]


def _on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (
        device.index is None or tensor.device.index in (None, device.index))


def _distinct_layers(es_model: ESLoraModel, device: torch.device) -> list[ESLoraLinear]:
    """One ES-LoRA layer on ``device`` per distinct (A shape, B shape), largest first
    (first by name among equals), at most ``MAX_CHECKED_SHAPES``.

    The GPU launch (K-splits, column groups, masks of the last tiles) depends on d_in,
    d_out and the rank, so a kernel that is right for q_proj can still be wrong for a
    grouped-query k_proj or an MLP projection: every shape the run will meet is checked.
    """
    chosen: dict[tuple[tuple[int, ...], tuple[int, ...]], ESLoraLinear] = {}
    for layer in es_model.layers.values():
        if _on_device(layer.lora_A, device):
            chosen.setdefault((tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)), layer)
    layers = sorted(chosen.values(), key=lambda layer: -(layer.lora_A.numel()
                                                          + layer.lora_B.numel()))
    return layers[:MAX_CHECKED_SHAPES]


def _nf4_bases(es_model: ESLoraModel, device: torch.device) -> list[torch.nn.Module]:
    """One 4-bit base layer on ``device`` per distinct weight shape whose packed layout
    the kernel reads (``nf4_linear`` leaves the others to bitsandbytes, so they never
    meet the kernel), largest first, at most ``MAX_CHECKED_SHAPES``."""
    from lowmem_es.kernels import nf4_layout

    chosen: dict[tuple[int, int], torch.nn.Module] = {}
    for layer in es_model.layers.values():
        base = layer.base_layer
        weight = getattr(base, "weight", None)
        state = _quant_state(base)
        if state is None or not isinstance(weight, torch.Tensor) \
                or not _on_device(weight, device) \
                or getattr(state, "packing_format_for_cpu", False):
            continue
        try:
            layout = nf4_layout.nf4_layout(weight, state)
        except (TypeError, ValueError):  # not NF4, or a layout it does not read
            continue
        if nf4_layout.kernel_unsupported_reason(layout) is None:
            chosen.setdefault((layout.out_features, layout.in_features), base)
    shapes = sorted(chosen, key=lambda shape: -shape[0] * shape[1])
    return [chosen[shape] for shape in shapes[:MAX_CHECKED_SHAPES]]


def _quant_state(base: torch.nn.Module) -> object | None:
    """bitsandbytes' QuantState of a 4-bit layer (on its weight, or on the module), or None:
    where ``nf4_linear`` looks for it."""
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def _activation_dtype(es_model: ESLoraModel) -> torch.dtype:
    """The dtype hidden states have in this model: its input embeddings' dtype."""
    try:
        weight = es_model.model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return torch.float32
    return weight.dtype if weight.dtype in TOLERANCES else torch.float32


# ----------------------------------------------------------------------------- cases


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(CHECK_SEED)  # CPU: same values on every device


def _member_tensors(tensor_id_a: int, tensor_id_b: int, sigma: float, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys_A, keys_B, steps of MEMBERS, built as ESLoraLinear._member_tensors builds them."""
    keys = [[noise.member_key(CHECK_SEED, 0, pair, tid) for pair, _ in MEMBERS]
            for tid in (tensor_id_a, tensor_id_b)]
    return (torch.tensor(keys[0], dtype=torch.int64, device=device),
            torch.tensor(keys[1], dtype=torch.int64, device=device),
            torch.tensor([sign * sigma for _, sign in MEMBERS], dtype=torch.float32,
                         device=device))


def _noisy_lora_cases(layer: ESLoraLinear, device: torch.device, dtype: torch.dtype
                      ) -> list[_Case]:
    """The layer's shapes, rank and scaling, in decode and prefill row layouts.

    Sizes are chosen so that everything matters at the tolerance: sigma = 1/sqrt(d_in)
    and A, B ~ sigma * N(0, 1) make the noise as large as the weights in both matrices,
    and the base output ``out`` is about as large as the LoRA term it is added to.
    """
    from lowmem_es.kernels import noisy_lora, row_plan

    rank, d_in = layer.lora_A.shape
    d_out = layer.lora_B.shape[0]
    scale = layer.scaling if layer.scaling != 0 else 1.0
    sigma = d_in ** -0.5
    generator = _generator()
    lora_a = (sigma * torch.randn(rank, d_in, generator=generator)).to(device)
    lora_b = (sigma * torch.randn(d_out, rank, generator=generator)).to(device)
    keys_a, keys_b, steps = _member_tensors(layer.tensor_id_A, layer.tensor_id_B, sigma, device)
    out_std = abs(scale) * 2.0 * sigma * rank ** 0.5  # std of the LoRA term
    atol, rtol = TOLERANCES[dtype]
    cases = []
    for label, rows_per_member, tokens in NOISY_LORA_LAYOUTS:
        member_index = [m for m in range(len(MEMBERS)) for _ in range(rows_per_member)]
        rows = len(member_index)
        x = torch.randn(rows, tokens, d_in, generator=generator).to(device, dtype)
        out = (out_std * torch.randn(rows, tokens, d_out, generator=generator)).to(device, dtype)

        def run(fn: Callable[..., torch.Tensor], rows_of: object, x: torch.Tensor = x,
                out: torch.Tensor = out) -> torch.Tensor:
            return fn(x, lora_a, lora_b, keys_a, keys_b, steps, rows_of, scale,
                      out=out.clone())

        def kernel(run: Callable[..., torch.Tensor] = run, member_index: list[int] = member_index,
                   tokens: int = tokens) -> torch.Tensor:
            # The kernel path builds its RowPlan as the layer does (lora._row_plan),
            # antithetic pairs included (the paired kernel variant).
            plan = row_plan.plan_rows(member_index, len(MEMBERS), tokens, device,
                                      pairs=[pair for pair, _ in MEMBERS])
            return run(noisy_lora.noisy_lora_triton, plan)

        index = torch.tensor(member_index, dtype=torch.int64, device=device)
        cases.append(_Case(
            f"{layer.name} (d_in={d_in}, d_out={d_out}, r={rank}), {label}: {rows} rows x "
            f"{tokens} tokens, {dtype}",
            lambda run=run, index=index: run(noisy_lora.noisy_lora_torch, index), kernel,
            atol, rtol))
    return cases


def _nf4_cases(base: torch.nn.Module, device: torch.device, dtype: torch.dtype
               ) -> list[_Case]:
    """The layer's own packed weight, through ``nf4_linear`` as the layer calls it."""
    from lowmem_es.kernels import nf4_matmul

    out_features, in_features = (int(size) for size in _quant_state(base).shape)
    compute = getattr(base, "compute_dtype", None) or dtype
    # The looser of the two dtypes the result passes through.
    atol, rtol = max(NF4_TOLERANCES.get(compute, NF4_TOLERANCES[dtype]), NF4_TOLERANCES[dtype])
    generator = _generator()
    cases = []
    for rows in NF4_ROWS:
        x = (torch.randn(rows, in_features, generator=generator)
             / in_features ** 0.5).to(device, dtype)
        cases.append(_Case(
            f"({rows} x {in_features}) @ NF4 ({out_features} x {in_features})^T, {dtype}",
            lambda x=x: nf4_matmul.nf4_linear(x, base, force="torch"),
            lambda x=x: nf4_matmul.nf4_linear(x, base, force="kernel"), atol, rtol))
    return cases


def _es_update_cases(layer: ESLoraLinear, device: torch.device) -> list[_Case]:
    """The direction of a 4-member step for the layer's A and B shapes and tensor ids,
    through ``es.estimate_direction`` as ``es_update`` calls it."""
    schedule = [tuple(member) for member in MEMBERS]
    shaped = es.shape_fitness(list(UPDATE_FITNESS))
    coefficients = {pair: value / len(MEMBERS)
                    for pair, value in es.pair_coefficients(shaped, schedule).items()}
    atol, rtol = ES_UPDATE_TOLERANCE
    cases = []
    for matrix, master, ident in (("A", layer.lora_A, layer.tensor_id_A),
                                  ("B", layer.lora_B, layer.tensor_id_B)):
        shape = tuple(master.shape)

        def direction(force: str, shape: tuple[int, ...] = shape, ident: int = ident
                      ) -> torch.Tensor:
            return es.estimate_direction(
                shape, lambda pair: noise.member_key(CHECK_SEED, 0, pair, ident),
                coefficients, device=device, noise_backend="eager", force=force)

        cases.append(_Case(f"{layer.name}.lora_{matrix} {shape}, {len(MEMBERS)} members",
                           lambda direction=direction: direction("torch"),
                           lambda direction=direction: direction("kernel"), atol, rtol))
    return cases


# ----------------------------------------------------------------------------- running


def _run_check(check: _Check, device: torch.device) -> tuple[str, str | None]:
    """(status, why the CUDA context is lost or None) of one kernel; acts on failure."""
    try:
        cases = check.cases()
        for case in cases:
            try:
                with _exact_matmuls():
                    twin = case.twin()
                    _synchronize(device)
            except Exception as error:
                raise _TwinError(f"its torch twin raised {_first_line(error)} on {case.label}"
                                 ) from error
            try:
                result = case.kernel()
                _synchronize(device)
                problem = _mismatch(result, twin, case.atol, case.rtol)
            except Exception as error:
                raise _KernelError(f"{_first_line(error)} on {case.label}") from error
            if problem is not None:
                raise _KernelError(f"{problem} on {case.label}")
    except _KernelError as failure:
        backends.switch_off(check.name)
        lost = _lost_context(device)
        reason = str(failure)
        logger.debug("kernel self-check: %s failed", check.name, exc_info=failure)
        if lost is None:
            logger.warning(
                "lowmem-es: the Triton kernel `%s`, %s, failed its start-up self-check on "
                "%s: %s. It is switched off for the rest of this run: %s instead (slower, "
                "same results up to rounding). Please report this message to the lowmem-es "
                "maintainers; to skip this kernel and its check, %s.", check.name,
                check.what, _describe_device(device), reason, check.fallback, check.silence)
            return f"disabled: {reason}", None
        logger.error(
            "lowmem-es: the Triton kernel `%s`, %s, failed its start-up self-check on %s: "
            "%s. The CUDA context is unusable afterwards (%s), so this process cannot go on "
            "on the GPU: restart with %s=1 to run on the torch paths, and please report "
            "this message to the lowmem-es maintainers.", check.name, check.what,
            _describe_device(device), reason, lost, FORCE_TORCH_ENV)
        return (f"disabled: {reason}; the CUDA context was lost, restart with "
                f"{FORCE_TORCH_ENV}=1"), f"the CUDA context was lost ({lost})"
    except Exception as failure:  # the twin, or building the inputs: nothing concluded
        reason = str(failure) if isinstance(failure, _TwinError) else (
            f"building its inputs raised {_first_line(failure)}")
        logger.debug("kernel self-check: %s could not be checked", check.name,
                     exc_info=failure)
        logger.warning("lowmem-es: could not check the Triton kernel `%s` on %s: %s. The "
                       "kernel stays on.", check.name, _describe_device(device), reason)
        return f"unchecked: {reason}", _lost_context(device)
    return OK, None


def _mismatch(kernel: torch.Tensor, twin: torch.Tensor, atol: float, rtol: float
              ) -> str | None:
    """How ``kernel`` differs from ``twin`` beyond ``atol + rtol * |twin|`` once both are
    scaled to the twin's RMS (the tolerances are for outputs of size ~1), or None."""
    if not isinstance(kernel, torch.Tensor):
        return f"returned {type(kernel).__name__}, not a tensor"
    if kernel.shape != twin.shape or kernel.dtype != twin.dtype:
        return (f"returned {kernel.dtype} {tuple(kernel.shape)} where the torch twin returns "
                f"{twin.dtype} {tuple(twin.shape)}")
    reference = twin.detach().to(torch.float64)
    values = kernel.detach().to(torch.float64)
    finite = torch.isfinite(values)
    if not bool(finite[torch.isfinite(reference)].all()):
        bad = int((~finite & torch.isfinite(reference)).sum())
        return f"{bad} of {values.numel()} values are NaN/inf where the torch twin's are finite"
    rms = float(reference.pow(2).mean().sqrt()) if reference.numel() else 1.0
    rms = rms if rms > 0 and rms == rms else 1.0
    error = (values - reference).abs().nan_to_num(nan=0.0)
    allowed = atol * rms + rtol * reference.abs()
    outside = error > allowed
    if not bool(outside.any()):
        return None
    worst = int(error.argmax())
    return (f"max abs error {float(error.reshape(-1)[worst]):.3g} vs its torch twin, "
            f"tolerance {float(allowed.reshape(-1)[worst]):.3g} there (atol {atol:g} x "
            f"output RMS {rms:.3g} + rtol {rtol:g} x |twin|); {int(outside.sum())} of "
            f"{values.numel()} values outside")


@contextlib.contextmanager
def _exact_matmuls() -> Iterator[None]:
    """Full-precision torch matmuls for the twin (restored afterwards): a process that
    allows TF32 or reduced-precision bf16/fp16 reductions would otherwise make the
    reference itself miss the fp32 tolerance and switch a good kernel off."""
    matmul = torch.backends.cuda.matmul
    saved = (torch.get_float32_matmul_precision(),
             matmul.allow_bf16_reduced_precision_reduction,
             matmul.allow_fp16_reduced_precision_reduction)
    try:
        torch.set_float32_matmul_precision("highest")
        matmul.allow_bf16_reduced_precision_reduction = False
        matmul.allow_fp16_reduced_precision_reduction = False
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        matmul.allow_bf16_reduced_precision_reduction = saved[1]
        matmul.allow_fp16_reduced_precision_reduction = saved[2]


def _synchronize(device: torch.device) -> None:
    """Surface asynchronous CUDA errors here, inside the try of the call that caused them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lost_context(device: torch.device) -> str | None:
    """None if the device still works after a failure, else the error it now gives
    (an illegal memory access leaves the CUDA context unusable for the process)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except Exception as error:
        return _first_line(error)
    return None


def _first_line(error: BaseException) -> str:
    """``Type: first line`` of an exception, plus its last line when that differs (Triton's
    CompilationError puts the source location first and the actual error last)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = type(error).__name__
    if lines:
        text += f": {lines[0][:300]}"
        if len(lines) > 1 and lines[-1] != lines[0]:
            text += f" ... {lines[-1][:300]}"
    return text


def _describe_device(device: torch.device) -> str:
    """The device with what a bug report needs: GPU name, compute capability, versions."""
    if device.type != "cuda":
        return str(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # absent or broken
        triton_version = "not importable"
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        gpu = f"cuda:{index}, {name}, sm_{major}{minor}"
    except Exception:  # a lost context cannot describe itself
        gpu = str(device)
    return (f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, triton "
            f"{triton_version}")


def _agree_across_ranks(status: dict[str, str], device: torch.device) -> dict[str, str]:
    """Under torchrun, a kernel switched off on any rank is switched off on every rank.

    Every rank applies the same update to the same masters; one rank on the update kernel
    and another on the twin would let the masters drift apart by rounding. One all-reduce
    (MAX) of a flag per kernel, on the device the process group's backend serves.
    """
    from lowmem_es import distributed

    if distributed.world_size() == 1:
        return status
    flags = torch.tensor([1 if status[name].startswith("disabled") else 0 for name in KERNELS],
                         dtype=torch.int64)
    try:
        flags = flags.to(distributed.collective_device())
        distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    except Exception as error:
        logger.warning("lowmem-es: could not agree the kernel self-check across ranks (%s); "
                       "each rank keeps its own result", _first_line(error))
        return status
    agreed = dict(status)
    for name, flag in zip(KERNELS, flags.tolist(), strict=True):
        if flag and not status[name].startswith("disabled") and status[name] != NOT_USED:
            backends.switch_off(name)
            agreed[name] = "disabled: its self-check failed on another rank"
            logger.warning("lowmem-es: the Triton kernel `%s` failed its start-up self-check "
                           "on another rank; switched off here too so that all ranks compute "
                           "alike", name)
    return agreed

