"""Which path each op takes: a Triton kernel or its torch twin. One table, one rule.

Four ops have a fused Triton kernel and a torch path:

- ``NOISY_LORA``: the ES-LoRA layers' perturbed rows (``kernels/noisy_lora.py``; the
  torch path builds each chunk's perturbed A and B once, ``noise_batch.perturbed_rows``);
- ``NF4_MATMUL``: the frozen 4-bit base (``kernels/nf4_matmul.py``; the torch path is
  bitsandbytes' own ``Linear4bit``);
- ``ES_UPDATE``: the update's noise regeneration (``kernels/es_update.py``; torch loop);
- ``SAMPLING``: the Gumbel noise of the Philox sampler (``kernels/sampling.py``; twin).

Each op has a switch, ``force(op)``: None (the default: the kernel for CUDA tensors, the
torch path elsewhere), ``"kernel"`` (the kernel everywhere; on CPU it then needs
``TRITON_INTERPRET=1``, as the tests run it) or ``"torch"``. ``use_kernel(op, device)`` is
the one rule every caller asks: the switch, then ``LOWMEM_ES_FORCE_TORCH=1`` and Triton
being there (``kernels._runtime.use_kernel``). ``switch_off(op)`` is what the start-up
self-check (``kernel_check``) does to a kernel that failed it. ``sampler()`` says where
sampling noise comes from ("philox" or "generator"; None: Philox on CUDA, one kernel
launch per step for all rows, or when the sampling kernel is forced; a seeded generator
per row elsewhere, since the Philox twin costs 2.4-11x as much on CPU).

The settings are process-wide, as a run's kernels are. ``ESTrainer`` applies its own
per call with ``scoped`` (its NF4 switch and its CPU noise generator, which stays with
the generator in ``noise.set_backend`` because choosing "compiled" probes torch.compile
there), so two trainers in one process never change each other's paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lowmem_es import noise

NOISY_LORA = "noisy_lora"
NF4_MATMUL = "nf4_matmul"
ES_UPDATE = "es_update"
SAMPLING = "sampling"
OPS = (NOISY_LORA, NF4_MATMUL, ES_UPDATE, SAMPLING)
FORCE_CHOICES = (None, "kernel", "torch")
SAMPLERS = ("philox", "generator")

_force: dict[str, str | None] = dict.fromkeys(OPS)
_sampler: str | None = None


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the ops with a kernel are {OPS}")


def _check_force(name: str, value: str | None) -> None:
    if value not in FORCE_CHOICES:
        raise ValueError(f"`{name}` must be one of ('kernel', 'torch') or None, got {value!r}")


def force(op: str) -> str | None:
    """The switch of ``op``: None (decide by device), ``"kernel"`` or ``"torch"``."""
    _check_op(op)
    return _force[op]


def set_force(op: str, value: str | None) -> None:
    """Set the switch of ``op`` for the whole process (see the module docstring)."""
    _check_op(op)
    _check_force(f"force({op!r})", value)
    _force[op] = value


def use_kernel(op: str, device: torch.device | str, force: str | None = None) -> bool:
    """Whether ``op`` runs its Triton kernel for tensors on ``device``: the one rule.

    ``force`` (a caller's own choice) else the op's switch: ``"torch"`` never, None off
    CUDA never (decided without importing Triton); otherwise
    ``kernels._runtime.use_kernel``: ``"kernel"`` always, else not when
    ``LOWMEM_ES_FORCE_TORCH`` is set, else CUDA with compiled (not interpreted) Triton.
    """
    _check_op(op)
    if force is None:
        force = _force[op]
    _check_force("force", force)
    if force == "torch" or (force is None and torch.device(device).type != "cuda"):
        return False
    from lowmem_es.kernels._runtime import use_kernel as kernel_rule

    return kernel_rule(device, force)


def switch_off(op: str) -> None:
    """Send ``op`` to its torch path from now on (a kernel that failed its self-check).

    For ``SAMPLING`` the noise source is pinned to Philox as well: with the source left
    to the default, the torch path on CPU would switch to the per-row generators, whose
    draws differ, so the run's samples would change with the switch.
    """
    global _sampler
    set_force(op, "torch")
    if op == SAMPLING:
        _sampler = _sampler or "philox"


def sampler() -> str | None:
    """The sampling noise source: None (by device), ``"philox"`` or ``"generator"``."""
    return _sampler


def set_sampler(value: str | None) -> None:
    """Choose the sampling noise source for the whole process (None: by device)."""
    global _sampler
    if value is not None and value not in SAMPLERS:
        raise ValueError(f"the sampler must be one of {SAMPLERS} or None, got {value!r}")
    _sampler = value


def sampling_source(device: torch.device) -> str:
    """``"philox"`` or ``"generator"``: where sampling on ``device`` draws its noise (the
    sampler if set, else Philox on CUDA or when the sampling kernel is forced)."""
    if _sampler is not None:
        return _sampler
    device = torch.device(device)
    return "philox" if device.type == "cuda" or _force[SAMPLING] == "kernel" else "generator"


def snapshot() -> dict[str, object]:
    """Every setting here (the switches, the sampler, the noise generator), for ``restore``."""
    return {"force": dict(_force), "sampler": _sampler, "noise_backend": noise.get_backend()}


def restore(settings: dict[str, object]) -> None:
    """Put back what ``snapshot`` returned."""
    global _sampler
    _force.update(settings["force"])
    _sampler = settings["sampler"]
    noise.set_backend(settings["noise_backend"])


@contextlib.contextmanager
def scoped(noise_backend: str, nf4_force: str | None) -> Iterator[None]:
    """Run a block under a trainer's own settings (its CPU noise generator and its NF4
    switch), restoring the previous ones after: two trainers in one process keep theirs."""
    previous = noise.get_backend(), _force[NF4_MATMUL]
    noise.set_backend(noise_backend)
    set_force(NF4_MATMUL, nf4_force)
    try:
        yield
    finally:
        noise.set_backend(previous[0])
        _force[NF4_MATMUL] = previous[1]
