"""The plan: the largest rows per chunk whose predicted peak fits the profile.

``plan`` searches rows (and, for a profile's own lengths, shorter lengths) over the
estimates of ``lowmem_es.planner.estimate``; ``predict`` is the prediction at given rows;
``PlanError`` says by how much one row is over and what would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lowmem_es.planner.estimate import _Estimate, _Estimator
from lowmem_es.profiles import GIB, MIB, Profile, load_profile

MIN_LENGTH = 8  # shortest prompt/completion the planner will shrink a profile's length to
SHIPPED_FALLBACKS = ("8gb", "12gb", "16gb", "24gb")  # suggested, smallest first


class PlanError(ValueError):
    """Nothing fits the budget even at one row: ``over_bytes`` says by how much."""

    def __init__(self, message: str, over_bytes: int, suggestions: list[str]) -> None:
        super().__init__(message)
        self.over_bytes = over_bytes
        self.suggestions = suggestions


@dataclass
class Plan:
    """Predicted peak memory of one ES iteration and the chunking that fits the profile."""

    profile: str
    device: str
    architecture: str
    total_params: int
    lora_values: int
    rows_per_chunk: int
    num_chunks: int
    members_per_chunk: int
    total_rows: int
    max_prompt_length: int
    max_completion_length: int
    kv_bytes_per_token: int
    static: dict[str, int]
    phases: dict[str, dict[str, int]]  # "prefill" / "decode": kv_cache, activations, logits
    peak_phase: str
    predicted_peak_bytes: int
    target_bytes: int
    usable_bytes: int
    budget_bytes: int
    reserve_bytes: int
    limited_by: str  # "memory", "max_rows_in_flight", "rows_per_chunk" or "total_rows"
    notes: list[str] = field(default_factory=list)
    prefill_chunk: int = 0  # prompt tokens per prefill pass (0 = the whole prompt at once)

    @property
    def breakdown(self) -> dict[str, int]:
        """Every term at the peak moment; the values sum to ``predicted_peak_bytes``."""
        return {**self.static, **self.phases[self.peak_phase]}

    @property
    def fits(self) -> bool:
        return self.predicted_peak_bytes <= self.target_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (bytes as integers)."""
        return {"profile": self.profile, "device": self.device,
                "architecture": self.architecture, "total_params": self.total_params,
                "lora_values": self.lora_values, "rows_per_chunk": self.rows_per_chunk,
                "num_chunks": self.num_chunks, "members_per_chunk": self.members_per_chunk,
                "total_rows": self.total_rows, "max_prompt_length": self.max_prompt_length,
                "max_completion_length": self.max_completion_length,
                "kv_bytes_per_token": self.kv_bytes_per_token, "breakdown": self.breakdown,
                "static": dict(self.static), "phases": {k: dict(v) for k, v in
                                                        self.phases.items()},
                "peak_phase": self.peak_phase,
                "predicted_peak_bytes": self.predicted_peak_bytes,
                "target_bytes": self.target_bytes, "usable_bytes": self.usable_bytes,
                "budget_bytes": self.budget_bytes, "reserve_bytes": self.reserve_bytes,
                "fits": self.fits, "limited_by": self.limited_by,
                "prefill_chunk": self.prefill_chunk, "notes": list(self.notes)}

    def format(self) -> str:
        """A human-readable table of the plan."""
        gib = lambda n: f"{n / GIB:8.3f}"  # noqa: E731
        row_tokens = self.max_prompt_length + self.max_completion_length
        lines = [
            f"model {self.architecture}: {self.total_params / 1e9:.2f} B parameters; LoRA "
            f"{self.lora_values / 1e6:.2f} M fp32 values",
            f"profile {self.profile} ({self.device}): budget {self.budget_bytes / GIB:.2f} GiB"
            f" - reserve {self.reserve_bytes / GIB:.2f} = usable {self.usable_bytes / GIB:.2f}"
            f" GiB; planning to {self.target_bytes / GIB:.2f} GiB",
            f"rows per chunk {self.rows_per_chunk} ({self.num_chunks} chunks of "
            f"{self.total_rows} rows, up to {self.members_per_chunk} members each; limited by "
            f"{self.limited_by}); prompt {self.max_prompt_length} + completion "
            f"{self.max_completion_length} tokens"
            + (f"; prefill {self.prefill_chunk} prompt tokens at a time"
               if self.prefill_chunk else ""),
            f"KV cache {self.kv_bytes_per_token / 1024:.1f} KiB/token = "
            f"{self.phases['decode']['kv_cache'] / self.rows_per_chunk / MIB:.1f} MiB per row"
            + (" (sliding-window layers hold their window only)"
               if self.phases["decode"]["kv_cache"] < self.kv_bytes_per_token * row_tokens
               * self.rows_per_chunk else ""),
            "",
            f"{'resident':<22}{'GiB':>8}",
        ]
        lines += [f"  {name:<20}{gib(value)}" for name, value in self.static.items()]
        lines.append(f"{'per chunk':<22}{'prefill':>8}  {'decode':>8}")
        for name in self.phases["prefill"]:
            lines.append(f"  {name:<20}{gib(self.phases['prefill'][name])}  "
                         f"{gib(self.phases['decode'][name])}")
        lines.append(f"{'peak (' + self.peak_phase + ')':<22}{gib(self.predicted_peak_bytes)}"
                     f"  of {self.target_bytes / GIB:.3f} planned: "
                     f"{'fits' if self.fits else 'DOES NOT FIT'}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _make_plan(estimate: _Estimator, rows: int, prompt: int, completion: int,
               limited_by: str, notes: list[str], prefill_chunk: int | None = None) -> Plan:
    """The Plan of ``estimate`` at these rows and lengths: at ``prefill_chunk`` (0 = the
    whole prompt), or at the best chunking (``_Estimator.best``) when None."""
    best = (estimate.best(rows, prompt, completion) if prefill_chunk is None
            else estimate(rows, prompt, completion, prefill_chunk))
    profile = estimate.profile
    if not estimate.lora_kernel and best.static["lora_member_copies"] > 0.1 * \
            profile.target_bytes:
        notes.append(f"per-member LoRA copies take "
                     f"{best.static['lora_member_copies'] / GIB:.2f} GiB: fewer target "
                     "modules, a lower rank or the fused kernel free it")
    return Plan(
        profile=profile.name, device=profile.device, architecture=estimate.shape.architecture,
        total_params=estimate.shape.total_params, lora_values=estimate.lora_values,
        rows_per_chunk=rows, num_chunks=math.ceil(estimate.total_rows / rows),
        members_per_chunk=best.members, total_rows=estimate.total_rows,
        max_prompt_length=prompt, max_completion_length=completion,
        kv_bytes_per_token=estimate.kv_per_token, static=best.static, phases=best.phases,
        peak_phase=best.peak_phase, predicted_peak_bytes=best.peak,
        target_bytes=profile.target_bytes, usable_bytes=profile.usable_bytes,
        budget_bytes=int(profile.memory_budget_gib * GIB),
        reserve_bytes=int(profile.reserve_gib * GIB), limited_by=limited_by,
        notes=estimate.notes + notes, prefill_chunk=best.prefill_chunk)


def predict(config: Any, profile: Profile, lora_rank: int, target_modules: list[str],
            population_size: int, batch_size: int, num_generations: int = 1, *,
            rows_per_chunk: int, max_prompt_length: int, max_completion_length: int,
            optimizer: str = "sgd", lora_kernel: bool = False,
            full_prefill_logits: bool | None = None, prefill_chunk: int = 0,
            generation_backend: str = "loop", kv_cache_dtype: str | None = None) -> Plan:
    """The prediction at exactly these rows, lengths and prefill chunk (0 = whole prompt),
    fitting or not (see ``plan``).

    For benchmarks and checks: ``plan`` is what a run uses.
    """
    estimator = _Estimator(config, profile, lora_rank, target_modules, population_size,
                           batch_size, num_generations, optimizer, lora_kernel,
                           full_prefill_logits, generation_backend=generation_backend,
                           kv_cache_dtype=kv_cache_dtype)
    return _make_plan(estimator, rows_per_chunk, max_prompt_length, max_completion_length,
                      "rows_per_chunk", [], prefill_chunk)


def plan(config: Any, profile: Profile, lora_rank: int, target_modules: list[str],
         population_size: int, batch_size: int, num_generations: int = 1, *,
         max_prompt_length: int | None = None, max_completion_length: int | None = None,
         rows_per_chunk: int = 0, optimizer: str = "sgd", lora_kernel: bool = False,
         full_prefill_logits: bool | None = None, chunked_prefill: bool = True,
         generation_backend: str = "loop", kv_cache_dtype: str | None = None) -> Plan:
    """Plan one ES iteration of ``population_size`` x ``batch_size`` x ``num_generations``
    rows under ``profile``: the largest rows per chunk whose predicted peak fits.

    Lengths given explicitly are kept (``PlanError`` if one row does not fit); lengths left
    None come from the profile and are lowered together when one row would not fit.
    ``rows_per_chunk`` > 0 caps the rows as the profile's ``max_rows_in_flight`` does.
    ``lora_kernel``: the fused CUDA kernel regenerates noise, so no member copies.
    ``full_prefill_logits``: None = R x P x vocab only if the model lacks logits_to_keep.
    ``chunked_prefill``: when the whole prompt's prefill is what does not fit, prefill it in
    chunks (``Plan.prefill_chunk`` tokens) rather than take fewer rows or shorter lengths.
    ``generation_backend``: "loop" (static cache, allocated in full) or "generate"
    (DynamicCache, grows by copying), as ``ESConfig.generation_backend``.
    ``kv_cache_dtype``: None = the profile's; "auto" (compute dtype) or "int8" (1-byte
    codes + a scale per head and token, and one layer dequantized at a time) override it.
    """
    estimate = _Estimator(config, profile, lora_rank, target_modules, population_size,
                          batch_size, num_generations, optimizer, lora_kernel,
                          full_prefill_logits, chunked_prefill, generation_backend,
                          kv_cache_dtype)
    target = profile.target_bytes
    prompt = max_prompt_length or profile.max_prompt_length
    completion = max_completion_length or profile.max_completion_length
    notes: list[str] = []
    one = estimate.best(1, prompt, completion)
    if one.peak > target:
        fitting = _fitting_lengths(estimate, prompt, completion, target)
        if max_prompt_length is None and max_completion_length is None and fitting:
            notes.append(f"the profile's lengths ({prompt} + {completion} tokens) do not fit "
                         f"one row; lowered to {fitting[0]} + {fitting[1]}")
            prompt, completion = fitting
        else:
            raise _plan_error(estimate, one, prompt, completion, fitting)
    caps = {"max_rows_in_flight": profile.max_rows_in_flight,
            "total_rows": estimate.total_rows}
    if rows_per_chunk:
        caps["rows_per_chunk"] = rows_per_chunk
    cap = min(caps.values())
    low, high = 1, cap  # largest rows with peak <= target (the peak grows with rows)
    while low < high:
        middle = (low + high + 1) // 2
        if estimate.best(middle, prompt, completion).peak <= target:
            low = middle
        else:
            high = middle - 1
    limited_by = "memory" if low < cap else min(caps, key=caps.get)
    rows = _balanced_rows(low, estimate.total_rows, estimate.rows_per_member)
    return _make_plan(estimate, rows, prompt, completion, limited_by, notes)


def _balanced_rows(most: int, total_rows: int, rows_per_member: int) -> int:
    """Rows per chunk: the fewest chunks of at most ``most`` rows, sized equally, and made
    of whole members (equal segments take the batched-matmul path) when that costs no chunk.
    """
    chunks = math.ceil(total_rows / most)
    if most >= rows_per_member:
        whole = math.ceil(total_rows // rows_per_member / chunks) * rows_per_member
        if whole <= most:
            return whole
    return math.ceil(total_rows / chunks)


def _fitting_lengths(estimate: _Estimator, prompt: int, completion: int, target: int
                     ) -> tuple[int, int] | None:
    """Largest (prompt, completion), scaled together, that fits at one row; None if none."""
    def lengths(fraction: float) -> tuple[int, int]:
        return (max(MIN_LENGTH, int(prompt * fraction)),
                max(MIN_LENGTH, int(completion * fraction)))

    if estimate.best(1, *lengths(0.0)).peak > target:
        return None
    low, high = 0, 1024  # fraction in 1/1024 steps
    while low < high:
        middle = (low + high + 1) // 2
        if estimate.best(1, *lengths(middle / 1024)).peak <= target:
            low = middle
        else:
            high = middle - 1
    return lengths(low / 1024)


def _plan_error(estimate: _Estimator, one: _Estimate, prompt: int, completion: int,
                fitting: tuple[int, int] | None) -> PlanError:
    """The error for 'not even one row fits': by how much, and what would fit."""
    profile, shape, c = estimate.profile, estimate.shape, estimate.c
    target = profile.target_bytes
    over = one.peak - target
    static = sum(one.static.values())
    needed_budget = one.peak / (1 - profile.headroom_fraction) + profile.reserve_gib * GIB
    suggestions = []
    if fitting:
        suggestions.append(f"max_prompt_length={fitting[0]} and max_completion_length="
                           f"{fitting[1]}")
    if not profile.embedding_on_cpu and not shape.tied_embeddings and profile.device == "cuda":
        saved = shape.embedding_params * c
        if one.peak - saved <= target:
            suggestions.append(f"embedding_on_cpu = true in the profile (frees "
                               f"{saved / GIB:.2f} GiB)")
    copies = one.static["lora_member_copies"]
    if copies and one.peak - copies <= target:
        suggestions.append("the fused LoRA kernel (no per-member copies) or fewer target "
                           "modules / a lower rank")
    if profile.device == "cuda":
        for name in SHIPPED_FALLBACKS:
            bigger = load_profile(name)
            if bigger.memory_budget_gib <= profile.memory_budget_gib:
                continue
            args = dict(estimate.args)
            fits = predict(estimate.config, bigger, args.pop("lora_rank"),
                           args.pop("target_modules"), args.pop("population_size"),
                           args.pop("batch_size"), args.pop("num_generations"),
                           rows_per_chunk=1, max_prompt_length=prompt,
                           max_completion_length=completion, **args).fits
            if fits:
                suggestions.append(f"--profile {name}")
                break
    suggestions.append(f"a card with memory_budget_gib >= {needed_budget / GIB:.2f}")
    resident = (f" (the resident part alone, weights + LoRA + workspace, is "
                f"{static / GIB:.2f} GiB)" if static > target else "")
    message = (f"{shape.architecture} does not fit profile {profile.name!r}: one row of "
               f"{prompt} prompt + {completion} completion tokens peaks at "
               f"{one.peak / GIB:.2f} GiB in {one.peak_phase}{resident}, {over / GIB:.2f} GiB "
               f"over the {target / GIB:.2f} GiB it plans to (budget "
               f"{profile.memory_budget_gib} GiB - reserve {profile.reserve_gib} GiB, "
               f"{profile.headroom_fraction:.0%} headroom). To fit, use: "
               + "; or ".join(suggestions))
    return PlanError(message, over, suggestions)
