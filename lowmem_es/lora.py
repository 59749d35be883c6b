"""The ES-LoRA layer: one frozen base layer, fp32 master LoRA weights, per-row members.

A batch entering the model is a stack of rows from several population members (rows of
one member contiguous). For the rows of member m (antithetic pair k, sign s) each adapted
layer computes

    base(x) + scale * (x (A + s sigma epsA_k)^T) (B + s sigma epsB_k)^T

with eps regenerated from seeds under the noise contract (lowmem_es.noise), so the base
matmul is shared by the whole population and only the rank-r term differs per row.

CPU path: the perturbed A_m, B_m of the members in the current chunk are built once per
chunk (rank-r matrices: N x LoRA size, small next to the base) and reused by every decode
step; rows are then grouped per member into one batched matmul. On CPU regenerating the
noise every step costs more than the rank-r matmul it feeds, so caching wins there.
CUDA path: the fused Triton kernel ``lowmem_es.kernels.noisy_lora`` regenerates eps from
the members' keys inside the LoRA matmul and adds into the base output in place; nothing
of population size is stored. ``backends.use_kernel(NOISY_LORA, device)`` chooses between
them (the switch ``backends.force``, ``LOWMEM_ES_FORCE_TORCH=1``); the kernel's torch twin
is the same math as the CPU path (tests/test_noisy_lora.py holds them together). The NF4
base goes through ``kernels/nf4_matmul.py`` where ``backends.use_kernel(NF4_MATMUL, ...)``
says so (its torch path is bitsandbytes' own layer).

With no population active (or sigma = 0) the layer is PEFT's LoRA: B(A(x)) * scale,
computed in fp32 and cast back, as PEFT does for fp32 adapters.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowmem_es import adapter_io, backends, noise, noise_batch
from lowmem_es.adapter_io import PEFT_PREFIX
from lowmem_es.es import Member

if TYPE_CHECKING:  # the kernels module imports triton: only at run time, when needed
    from lowmem_es.kernels.row_plan import RowPlan

@dataclass
class Population:
    """The perturbation of the rows now flowing through the model.

    ``segments`` lists (member index into ``members``, row count) in row order; rows of a
    segment are contiguous. ``version`` changes whenever the layers must rebuild caches.
    """

    run_seed: int
    iteration: int
    sigma: float
    members: Sequence[Member]
    segments: Sequence[tuple[int, int]]
    version: int = 0

    @property
    def num_rows(self) -> int:
        return sum(count for _, count in self.segments)


@dataclass
class PopulationSlot:
    """Shared by every ES-LoRA layer of one model: the population active right now."""

    current: Population | None = None
    counter: int = 0


class ESLoraLinear(nn.Module):
    """A frozen base linear (NF4 or dense) plus an ES-perturbable LoRA term."""

    def __init__(self, base_layer: nn.Module, name: str, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float, slot: PopulationSlot) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.qualified_name = name  # as in the transformers model: PEFT key names use it
        self.name = noise.canonical_module_name(name)  # noise tensor ids use this
        # fp32 masters: ES steps are ~1e-5 and would vanish in bf16.
        self.lora_A = nn.Parameter(lora_A.detach().to(torch.float32).clone(),
                                   requires_grad=False)  # (r, d_in)
        self.lora_B = nn.Parameter(lora_B.detach().to(torch.float32).clone(),
                                   requires_grad=False)  # (d_out, r)
        self.scaling = float(scaling)
        self.slot = slot
        self.tensor_id_A = noise.tensor_id(self.name, "A")
        self.tensor_id_B = noise.tensor_id(self.name, "B")
        # Per-tensor noise scaling (ESConfig.noise_scaling): member m's step on A is
        # sign * sigma * noise_scale_A, on B sign * sigma * noise_scale_B.
        self.noise_scale_A = 1.0
        self.noise_scale_B = 1.0
        self._cache_version: int | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (M, d_in, r), (M, r, d_out)
        # Kernel path: per-member Philox keys and signed steps of A and B, (M,) each.
        self._member_cache_version: int | None = None
        self._member_cache: tuple[torch.Tensor, ...] | None = None

    def extra_repr(self) -> str:
        r, d_in = self.lora_A.shape
        return f"{self.name}: d_in={d_in}, d_out={self.lora_B.shape[0]}, r={r}"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs and backends.use_kernel(backends.NF4_MATMUL, x.device):
            from lowmem_es.kernels.nf4_matmul import nf4_linear

            result = nf4_linear(x, self.base_layer, force=backends.force(backends.NF4_MATMUL))
        else:
            result = self.base_layer(x, *args, **kwargs)
        population = self.slot.current
        if population is not None and population.sigma != 0 \
                and backends.use_kernel(backends.NOISY_LORA, x.device):
            return self._population_lora_kernel(x, result, population)
        x32 = x.to(torch.float32)
        # Accumulate into the base output in place when we may (fp32, contiguous, not
        # tracked by autograd): the rank-r up-projection, the scaling and the add become one
        # addmm/baddbmm pass over the output instead of three (the two extra passes were
        # ~4% of a profiled CPU population forward on SmolLM2, bench/bench_population.py).
        in_place = (result.dtype == torch.float32 and result.is_contiguous()
                    and not result.requires_grad)
        if population is None or population.sigma == 0:
            if in_place:
                down = x32.reshape(-1, x32.shape[-1]) @ self.lora_A.t()
                result.view(-1, result.shape[-1]).addmm_(down, self.lora_B.t(),
                                                         alpha=self.scaling)
                return result
            lora = (x32 @ self.lora_A.t()) @ self.lora_B.t()
        else:
            lora = self._population_lora(x32, population, result if in_place else None)
            if in_place:
                return result
        return result + (lora * self.scaling).to(result.dtype)

    def _population_lora_kernel(self, x: torch.Tensor, result: torch.Tensor,
                                population: Population) -> torch.Tensor:
        """base + scale * LoRA_m(x) per row, eps regenerated in the fused kernel.

        The LoRA term is added into ``result`` in place (fp32 accumulation, one rounding),
        unless autograd tracks it or it is not contiguous, in which case into a copy.
        """
        from lowmem_es.kernels import noisy_lora

        rows = x.shape[0]
        if rows != population.num_rows:
            raise RuntimeError(f"ES-LoRA layer {self.name}: batch has {rows} rows but the "
                               f"active population describes {population.num_rows}")
        if x.stride(-1) != 1:
            x = x.contiguous()
        plan = _row_plan(population, rows, math.prod(x.shape[1:-1]), x.device)
        keys_a, keys_b, steps_a, steps_b = self._member_tensors(population, x.device)
        if result.requires_grad or not result.is_contiguous():
            result = result.clone(memory_format=torch.contiguous_format)
        return noisy_lora.noisy_lora_triton(x, self.lora_A, self.lora_B, keys_a, keys_b,
                                            steps_a, plan, self.scaling, out=result,
                                            steps_B=steps_b)

    def _steps(self, population: Population, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed per-member steps of A and of B: sign * sigma * the tensor's noise scale."""
        return tuple(torch.tensor([m.sign * population.sigma * scale for m in population.members],
                                  dtype=torch.float32, device=device)
                     for scale in (self.noise_scale_A, self.noise_scale_B))

    def _member_tensors(self, population: Population, device: torch.device
                        ) -> tuple[torch.Tensor, ...]:
        """(keys_A, keys_B, steps_A, steps_B) of the population's members on ``device``."""
        if self._member_cache_version != population.version or self._member_cache is None:
            members = population.members
            keys = [[noise.member_key(population.run_seed, population.iteration, m.pair, tid)
                     for m in members] for tid in (self.tensor_id_A, self.tensor_id_B)]
            self._member_cache = (
                torch.tensor(keys[0], dtype=torch.int64, device=device),
                torch.tensor(keys[1], dtype=torch.int64, device=device),
                *self._steps(population, device))
            self._member_cache_version = population.version
        return self._member_cache

    def perturbed_weights(self, population: Population) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_m^T, B_m^T) stacked over the population's members, built once per version."""
        if self._cache_version != population.version or self._cache is None:
            device = self.lora_A.device
            stacked = []
            for master, tid, steps in zip((self.lora_A, self.lora_B),
                                          (self.tensor_id_A, self.tensor_id_B),
                                          self._steps(population, device), strict=True):
                keys = [noise.member_key(population.run_seed, population.iteration, m.pair, tid)
                        for m in population.members]
                # master + s sigma eps per member, written by the generator pass itself
                # (no noise tensor; the same bits as master + steps * noise_batch(...)).
                rows = noise_batch.perturbed_rows(keys, master, steps)  # (M, numel)
                stacked.append(rows.view(len(keys), *master.shape).transpose(1, 2).contiguous())
            self._cache = (stacked[0], stacked[1])
            self._cache_version = population.version
        return self._cache

    def clear_cache(self) -> None:
        self._cache, self._cache_version = None, None
        self._member_cache, self._member_cache_version = None, None

    def _population_lora(self, x: torch.Tensor, population: Population,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """LoRA_m(x) per row (unscaled), or, with ``out``, ``out += scaling * LoRA_m(x)``.

        ``out`` (the fp32 base output, same rows) is updated in place and returned.
        """
        rows = x.shape[0]
        if rows != population.num_rows:
            raise RuntimeError(f"ES-LoRA layer {self.name}: batch has {rows} rows but the "
                               f"active population describes {population.num_rows}")
        a_t, b_t = self.perturbed_weights(population)
        tail = x.shape[1:-1]
        d_in = x.shape[-1]
        counts = [count for _, count in population.segments]
        indices = [index for index, _ in population.segments]
        if len(set(counts)) == 1:
            # Equal segments: one batched matmul over members. (M, rows_m * T, d_in)
            grouped = x.reshape(len(counts), -1, d_in)
            if indices != list(range(len(a_t))):  # segments not in member order: gather
                idx = torch.tensor(indices, device=x.device)
                a_t, b_t = a_t[idx], b_t[idx]
            # (in member order, the usual layout, the cached stacks serve as they are: a
            # gather would copy every member's A and B on every forward)
            down = torch.bmm(grouped, a_t)
            if out is not None:
                out.view(len(counts), -1, out.shape[-1]).baddbmm_(down, b_t,
                                                                  alpha=self.scaling)
                return out
            return torch.bmm(down, b_t).reshape(rows, *tail, -1)
        if out is not None:  # each segment's rows of `out` are a contiguous view
            for index, chunk, target in zip(indices, torch.split(x, counts),
                                            torch.split(out, counts), strict=True):
                target.view(-1, out.shape[-1]).addmm_(chunk.reshape(-1, d_in) @ a_t[index],
                                                      b_t[index], alpha=self.scaling)
            return out
        parts = []
        for index, chunk in zip(indices, torch.split(x, counts), strict=True):
            flat = chunk.reshape(-1, d_in)
            parts.append(((flat @ a_t[index]) @ b_t[index]).reshape(*chunk.shape[:-1], -1))
        return torch.cat(parts)


# The row plan of the batch now in flight, shared by every layer (they all see the same
# rows): built once per (population, rows, tokens), so a decode step does no host work per
# layer beyond two launches. Holding the population keeps its id from being reused.
_ROW_PLAN: dict[str, object] = {}


def _row_plan(population: Population, rows: int, tokens: int, device: torch.device
              ) -> RowPlan:
    """The kernel's RowPlan for the population's segments with ``tokens`` per row."""
    key = (id(population), population.version, rows, tokens, device)
    if _ROW_PLAN.get("key") != key:
        from lowmem_es.kernels import row_plan

        member_index = [index for index, count in population.segments for _ in range(count)]
        # Antithetic partners share their keys: the kernel draws a pair's noise once. A
        # pair id held by one member, or by more than two, is not paired (own id < 0).
        held = Counter(m.pair for m in population.members)
        pairs = [m.pair if held[m.pair] == 2 else -1 - i
                 for i, m in enumerate(population.members)]
        _ROW_PLAN["plan"] = row_plan.plan_rows(member_index, len(population.members), tokens,
                                               device, pairs=pairs)
        _ROW_PLAN["key"], _ROW_PLAN["population"] = key, population
    return _ROW_PLAN["plan"]


class ESLoraModel:
    """A causal LM whose target linears are ES-LoRA layers, plus the adapter's metadata."""

    def __init__(self, model: nn.Module, layers: dict[str, ESLoraLinear], slot: PopulationSlot,
                 rank: int, alpha: float, target_modules: list[str],
                 base_model_name_or_path: str | None = None) -> None:
        self.model = model
        self.layers = layers  # canonical module name -> layer, sorted by name
        self.slot = slot
        self.rank = rank
        self.alpha = alpha
        self.target_modules = list(target_modules)
        self.base_model_name_or_path = base_model_name_or_path

    # --- parameters ---
    def parameters(self) -> dict[str, torch.Tensor]:
        """fp32 master tensors by stable name ``<module>.lora_A`` / ``<module>.lora_B``."""
        params = {}
        for name, layer in self.layers.items():
            params[f"{name}.lora_A"] = layer.lora_A.data
            params[f"{name}.lora_B"] = layer.lora_B.data
        return params

    def tensor_ids(self) -> dict[str, int]:
        """Noise-contract tensor id of every master tensor (same keys as ``parameters``)."""
        return adapter_io.param_tensor_ids(self.parameters())

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters().values())

    def noise_scales(self) -> dict[str, float]:
        """Per-tensor noise scale (same keys as ``parameters``); 1.0 unless set."""
        scales = {}
        for name, layer in self.layers.items():
            scales[f"{name}.lora_A"] = layer.noise_scale_A
            scales[f"{name}.lora_B"] = layer.noise_scale_B
        return scales

    def set_noise_scales(self, scales: dict[str, float] | None) -> None:
        """Scale each tensor's noise in the population's forward passes (None: all 1.0).

        ``scales`` needs every key of ``parameters``; ``es.es_update`` must get the same
        mapping, so the update steps along the noise the members were evaluated with.
        """
        names = set(self.parameters())
        if scales is not None and set(scales) != names:
            missing = sorted(names - set(scales))[:3] or sorted(set(scales) - names)[:3]
            raise ValueError(f"noise scales must name every LoRA tensor exactly; mismatch "
                             f"at {missing}")
        for name, layer in self.layers.items():
            layer.noise_scale_A = 1.0 if scales is None else float(scales[f"{name}.lora_A"])
            layer.noise_scale_B = 1.0 if scales is None else float(scales[f"{name}.lora_B"])
            layer.clear_cache()

    # --- population ---
    @contextlib.contextmanager
    def population(self, run_seed: int, iteration: int, sigma: float, members: Sequence[Member],
                   segments: Sequence[tuple[int, int]]) -> Iterator[Population]:
        """Activate a population for the rows of the next forward passes / ``generate``."""
        self.slot.counter += 1
        population = Population(run_seed, iteration, float(sigma), list(members), list(segments),
                                version=self.slot.counter)
        previous = self.slot.current
        self.slot.current = population
        try:
            yield population
        finally:
            self.slot.current = previous
            for layer in self.layers.values():
                layer.clear_cache()

    # --- PEFT-format adapter I/O ---
    def state_dict_peft(self) -> dict[str, torch.Tensor]:
        """Adapter tensors under PEFT's key names (``base_model.model.<module>.lora_A.weight``)."""
        tensors = {}
        for layer in self.layers.values():
            qualified = layer.qualified_name
            tensors[f"{PEFT_PREFIX}{qualified}.lora_A.weight"] = layer.lora_A.detach().cpu()
            tensors[f"{PEFT_PREFIX}{qualified}.lora_B.weight"] = layer.lora_B.detach().cpu()
        return {k: v.contiguous() for k, v in tensors.items()}

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Write a standard PEFT adapter directory atomically (``adapter_io.save_adapter``)."""
        return adapter_io.save_adapter(self, path)

    def write_adapter(self, directory: Path) -> None:
        """Write the PEFT adapter files into ``directory`` (``adapter_io.write_adapter``)."""
        adapter_io.write_adapter(self, directory)

    def load_adapter(self, path: str | os.PathLike) -> None:
        """Load master weights from a PEFT adapter directory (``adapter_io.load_adapter``)."""
        adapter_io.load_adapter(self, path)


@dataclass
class _Replacement:
    parent: nn.Module
    attr: str
    qualified: str
    peft_layer: nn.Module = field(repr=False)


def attach_es_lora(model: nn.Module, target_modules: Sequence[str], rank: int, alpha: float,
                   seed: int = 0, base_model_name_or_path: str | None = None) -> ESLoraModel:
    """Put ES-LoRA layers on ``model``'s target linears, initialised exactly as PEFT does.

    PEFT builds and initialises the adapter (A Kaiming-uniform, B = 0) under a seeded,
    forked RNG so the global RNG is untouched; its LoRA layers are then swapped for
    ES-LoRA layers holding fp32 copies, and the PEFT wrapper is dropped.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    check_target_modules(model, target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model
    replacements = []
    for qualified, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            parent_name, _, attr = qualified.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            replacements.append(_Replacement(parent, attr, qualified, module))
    slot = PopulationSlot()
    layers: dict[str, ESLoraLinear] = {}
    for rep in replacements:
        peft_layer = rep.peft_layer
        layer = ESLoraLinear(peft_layer.base_layer, rep.qualified,
                             peft_layer.lora_A["default"].weight,
                             peft_layer.lora_B["default"].weight,
                             peft_layer.scaling["default"], slot)
        setattr(rep.parent, rep.attr, layer)
        layers[layer.name] = layer
    for param in inner.parameters():
        param.requires_grad_(False)
    if hasattr(inner, "peft_config"):
        del inner.peft_config
    layers = dict(sorted(layers.items()))
    return ESLoraModel(inner, layers, slot, rank, alpha, list(target_modules),
                       base_model_name_or_path)


def adaptable_linears(model: nn.Module) -> list[str]:
    """The short names (``q_proj``, ...) of the linear layers LoRA may target, in module
    order: every ``nn.Linear`` but the output head (``lm_head``)."""
    names: dict[str, None] = {}
    for qualified, module in model.named_modules():
        if isinstance(module, nn.Linear) and not qualified.endswith("lm_head"):
            names.setdefault(qualified.rpartition(".")[2])
    return list(names)


def check_target_modules(model: nn.Module, target_modules: Sequence[str]) -> None:
    """Raise a ValueError naming targets that match no linear layer, and listing the valid ones."""
    linear_names = adaptable_linears(model)
    missing = [t for t in target_modules if t not in linear_names]
    if missing:
        raise ValueError(f"`lora_target_modules` contains {missing}, which match no linear layer "
                         f"of this model; valid names are {sorted(linear_names)}")


def first_adaptable_linear(model: nn.Module) -> str:
    """A linear layer to hang a zero adapter on (generation needs an ``ESLoraModel``, also
    to evaluate the base model alone)."""
    names = adaptable_linears(model)
    if not names:
        raise ValueError("the model has no linear layer besides lm_head; it cannot be evaluated")
    return names[0]
