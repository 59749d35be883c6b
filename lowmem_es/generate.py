"""Population generation: completions for many members' rows in shared forward passes.

A generation request is a list of rows ``(member index, prompt index)``; rows of one
member are contiguous. Rows are cut into chunks of at most ``rows_per_chunk``; each
chunk is one ``generate`` call whose rows carry their members' perturbations through
the ES-LoRA layers (lowmem_es.lora). Prompts are left-padded once for the whole
request, so every chunk sees the same token layout whatever its size, and sampling is
keyed per row, so completions do not depend on the chunking. That is what makes the
out-of-memory backoff lossless: a chunk that runs out of CUDA memory is re-run in halves
with the same seeds and gives the same completions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowmem_es import backends
from lowmem_es.decode import decode, supports_loop, warn_fallback
from lowmem_es.es import Member
from lowmem_es.lora import ESLoraModel
from lowmem_es.noise import MASK63, member_key

logger = logging.getLogger("lowmem_es")


@dataclass
class Completion:
    """One generated completion: its decoded text and token ids (up to and with EOS)."""

    text: str
    ids: list[int]


def _segments(row_members: Sequence[int]) -> list[tuple[int, int]]:
    """Run-length encode member ids: [(member, rows), ...] in row order."""
    segments: list[tuple[int, int]] = []
    for member in row_members:
        if segments and segments[-1][0] == member:
            segments[-1] = (member, segments[-1][1] + 1)
        else:
            segments.append((member, 1))
    return segments


SAMPLE_STREAM = 0x5A11 << 32  # tensor-id slot of sampling keys: disjoint from LoRA tensor ids


@torch.no_grad()
def generate_population(es_model: ESLoraModel, tokenizer: object, prompts: Sequence[str],
                        rows: Sequence[tuple[int | None, int]], *,
                        members: Sequence[Member] = (), run_seed: int = 0, iteration: int = 0,
                        sigma: float = 0.0, max_prompt_length: int = 256,
                        max_completion_length: int = 64, temperature: float = 0.0,
                        rows_per_chunk: int = 0, device: torch.device | str = "cpu",
                        events: list[dict[str, Any]] | None = None,
                        backend: str = "loop", prefill_chunk: int = 0,
                        kv_cache_dtype: str = "auto",
                        progress: Callable[[int, int], None] | None = None
                        ) -> list[Completion]:
    """Generate one completion per row; row member ``None`` means the unperturbed centre.

    Rows are generated ``rows_per_chunk`` at a time (0 = all at once). When a chunk runs
    out of CUDA memory, the chunk size is halved and the same rows are generated again
    (same members, same seeds, so the same completions); later chunks keep the smaller
    size. Each backoff is appended to ``events`` (when given) and logged. A single row
    that does not fit re-raises the OutOfMemoryError.

    Sampling (temperature > 0) is exact temperature sampling by the Gumbel-max trick with
    per-row noise keyed by (run_seed, iteration, prompt index, generation index, step):
    a row's completion does not depend on the chunking, on the other rows, or on the
    global RNG (which is never read). Rows of different members with the same prompt and
    generation index share that noise (common random numbers: fitness differences then
    come from the perturbations, not from sampling luck). On CUDA the noise is
    counter-based Philox, all rows in one kernel launch per step
    (``lowmem_es.kernels.sampling``); on CPU one seeded ``torch.Generator`` per row (see
    ``backends.sampler()``), so CPU and CUDA sample differently.

    ``backend="loop"`` decodes with lowmem_es.decode's static-cache loop (same tokens as
    ``generate()``, fewer per-step costs, CUDA-graph replay on GPU); ``"generate"`` uses
    ``model.generate()``. Architectures without static-cache support fall back to
    ``generate()`` with a one-time warning. ``prefill_chunk`` > 0 prefills prompts that
    many tokens at a time (the memory plan's choice when a whole prompt's activations do
    not fit; ``generate()`` gets it as ``prefill_chunk_size``). ``kv_cache_dtype="int8"``
    keeps the loop's KV cache in int8 (``lowmem_es.kv_cache``); ``generate()`` cannot.
    ``progress(done, total)`` is called after each chunk with the rows generated so far.
    """
    if backend not in ("loop", "generate"):
        raise ValueError(f"`generation_backend` must be 'loop' or 'generate', got {backend!r}")
    if kv_cache_dtype != "auto" and backend != "loop":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs generation_backend='loop' "
                         "(generate() keeps its own 16-bit cache); set kv_cache_dtype='auto'")
    if not rows:
        return []
    # Left padding and truncation for decoding, on the caller's tokenizer: put back after.
    sides = (tokenizer.padding_side, tokenizer.truncation_side)
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_prompt_length,
                            add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    input_ids = encoded["input_ids"].to(device)
    attention = encoded["attention_mask"].to(device)
    prompt_len = input_ids.shape[1]
    eos_ids = _eos_ids(tokenizer)
    sample_keys = _sample_keys(rows, run_seed, iteration) if temperature > 0 else []
    chunk = rows_per_chunk or len(rows)
    results: list[Completion] = []
    start = 0
    while start < len(rows):
        size = min(chunk, len(rows) - start)
        part = rows[start:start + size]
        prompt_index = torch.tensor([p for _, p in part], device=input_ids.device)
        kwargs = {"input_ids": input_ids[prompt_index], "attention_mask": attention[prompt_index],
                  "max_new_tokens": max_completion_length, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": eos_ids or None, "do_sample": False, "temperature": None,
                  "top_k": None, "top_p": None}
        if prefill_chunk:
            kwargs["prefill_chunk_size"] = prefill_chunk
        if kv_cache_dtype != "auto":
            kwargs["kv_cache_dtype"] = kv_cache_dtype
        if temperature > 0:
            kwargs["logits_processor"] = _sampler(sample_keys[start:start + size], prompt_len,
                                                  float(temperature))
        try:
            output = _generate_chunk(es_model, kwargs, [m for m, _ in part], members,
                                     run_seed, iteration, sigma, backend)
        except torch.cuda.OutOfMemoryError as error:
            if size == 1:
                error.add_note(f"lowmem-es: one generation row (prompt {prompt_len} + "
                               f"{max_completion_length} new tokens) does not fit; run "
                               "`lowmem-es plan` for what fits this card")
                raise
            chunk = size // 2
            event = {"event": "oom_backoff", "iteration": iteration, "first_row": start,
                     "rows": size, "retry_rows": chunk,
                     "message": (str(error).splitlines() or ["out of memory"])[0][:200]}
            if events is not None:
                events.append(event)
            logger.warning("out of memory generating rows %d-%d of iteration %d; retrying "
                           "them %d rows at a time", start, start + size - 1, iteration, chunk)
        else:
            for row in output[:, prompt_len:].tolist():
                ids = _cut(row, eos_ids, tokenizer.pad_token_id)
                results.append(Completion(tokenizer.decode(ids, skip_special_tokens=True), ids))
            start += size
            if progress is not None:
                progress(start, len(rows))
            continue
        # Outside the except block, so the failed attempt's tensors are already released.
        if input_ids.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _run_model(model: torch.nn.Module, kwargs: dict[str, Any], backend: str) -> torch.Tensor:
    """Prompt + completion ids of a chunk, by the decode loop or by ``generate()``."""
    if backend == "loop" and supports_loop(model):
        new = decode(model, kwargs["input_ids"], kwargs["attention_mask"],
                     kwargs["max_new_tokens"], kwargs["eos_token_id"] or [],
                     kwargs["pad_token_id"], logits_processor=kwargs.get("logits_processor"),
                     prefill_chunk=kwargs.get("prefill_chunk_size", 0),
                     kv_cache_dtype=kwargs.get("kv_cache_dtype", "auto"))
        return torch.cat([kwargs["input_ids"], new], dim=1)
    if kwargs.get("kv_cache_dtype", "auto") != "auto":
        raise ValueError(f"{type(model).__name__} cannot use the static-cache decode loop, so "
                         f"kv_cache_dtype={kwargs['kv_cache_dtype']!r} is not available for it; "
                         "set kv_cache_dtype='auto'")
    if backend == "loop":
        warn_fallback(model)
    return model.generate(**kwargs)


def _generate_chunk(es_model: ESLoraModel, kwargs: dict[str, Any],
                    row_members: list[int | None], members: Sequence[Member], run_seed: int,
                    iteration: int, sigma: float, backend: str = "loop") -> torch.Tensor:
    """One generation call with the chunk's members (only those) active."""
    if all(m is None for m in row_members):
        return _run_model(es_model.model, kwargs, backend)
    if any(m is None for m in row_members):
        raise ValueError("a chunk mixes centre rows and member rows")
    # Only the chunk's members: the CPU path caches a perturbed adapter per listed member.
    chunk_members = list(dict.fromkeys(row_members))
    local = {member: index for index, member in enumerate(chunk_members)}
    segments = [(local[member], count) for member, count in _segments(row_members)]
    with es_model.population(run_seed, iteration, sigma, [members[m] for m in chunk_members],
                             segments):
        return _run_model(es_model.model, kwargs, backend)


def _sample_keys(rows: Sequence[tuple[int | None, int]], run_seed: int, iteration: int
                 ) -> list[int]:
    """Sampling key of every row: (run_seed, iteration, prompt, generation index).

    The generation index counts earlier rows of the same member and prompt, so the k-th
    completion of a prompt gets the same key for every member.
    """
    seen: dict[tuple[int | None, int], int] = {}
    keys = []
    for member, prompt in rows:
        generation = seen.get((member, prompt), 0)
        seen[(member, prompt)] = generation + 1
        keys.append(member_key(run_seed, iteration, prompt, SAMPLE_STREAM + generation))
    return keys


def _sampler(row_keys: list[int], prompt_len: int, temperature: float) -> list:
    """A transformers logits processor that samples each row by Gumbel-max with its own key.

    argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T), so greedy
    decoding over the processed scores is exact temperature sampling. The two noise
    sources (``backends.sampler()``) give different draws from the same distribution, both keyed
    per row and step only.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    keys_on: dict[torch.device, torch.Tensor] = {}

    class RowGumbelSampler(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            step = input_ids.shape[1] - prompt_len
            if backends.sampling_source(scores.device) == "philox":
                from lowmem_es.kernels.sampling import gumbel_scores

                if scores.device not in keys_on:  # once per chunk: no host work per step
                    keys_on[scores.device] = torch.tensor(row_keys, dtype=torch.int64,
                                                          device=scores.device)
                return gumbel_scores(scores, keys_on[scores.device], step, float(temperature),
                                     force=backends.force(backends.SAMPLING))
            uniform = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
            generator = torch.Generator(device=scores.device)
            for row, key in enumerate(row_keys):  # (rows, vocab)
                generator.manual_seed(member_key(key, step, 0, 0) & MASK63)
                uniform[row].uniform_(generator=generator)
            gumbel = -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(torch.float32).tiny)))
            return scores.to(torch.float32) / temperature + gumbel

    return LogitsProcessorList([RowGumbelSampler()])


def _eos_ids(tokenizer: object) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _cut(row: list[int], eos_ids: list[int], pad_id: int | None) -> list[int]:
    """Tokens up to and including the first EOS; trailing padding dropped."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    while row and pad_id is not None and row[-1] == pad_id and pad_id not in eos_ids:
        row = row[:-1]
    return row
