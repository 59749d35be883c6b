"""Population generation: completions for many members' rows in shared forward passes.

A generation request is a list of rows ``(member index, prompt index)``; rows of one
member are contiguous. Rows are cut into chunks of at most ``rows_per_chunk``; each
chunk is one ``generate`` call whose rows carry their members' perturbations through
the ES-LoRA layers (lowmem_es.lora). Prompts are left-padded once for the whole
request, so every chunk sees the same token layout whatever its size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowmem_es.lora import ESLoraModel, Member
from lowmem_es.noise import MASK63, member_key


@dataclass
class Completion:
    """One generated completion: its decoded text and token ids (up to and with EOS)."""

    text: str
    ids: list[int]


def render_prompt(prompt: object, tokenizer: object, row_index: int) -> str:
    """A prompt string: plain strings as they are, chat messages through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"row {row_index}: `prompt` is a list of chat messages but the "
                             "tokenizer has no chat template; give plain-string prompts")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"row {row_index}: `prompt` must be a string or a list of chat messages "
                     f"({{'role': ..., 'content': ...}}), got {type(prompt).__name__}")


def _segments(row_members: Sequence[int]) -> list[tuple[int, int]]:
    """Run-length encode member ids: [(member, rows), ...] in row order."""
    segments: list[tuple[int, int]] = []
    for member in row_members:
        if segments and segments[-1][0] == member:
            segments[-1] = (member, segments[-1][1] + 1)
        else:
            segments.append((member, 1))
    return segments


@torch.no_grad()
def generate_population(es_model: ESLoraModel, tokenizer: object, prompts: Sequence[str],
                        rows: Sequence[tuple[int | None, int]], *,
                        members: Sequence[Member] = (), run_seed: int = 0, iteration: int = 0,
                        sigma: float = 0.0, max_prompt_length: int = 256,
                        max_completion_length: int = 64, temperature: float = 0.0,
                        rows_per_chunk: int = 0, device: torch.device | str = "cpu"
                        ) -> list[Completion]:
    """Generate one completion per row; row member ``None`` means the unperturbed centre.

    Sampling (temperature > 0) is seeded from (run_seed, iteration, first row of the
    chunk) in a forked RNG, so it is reproducible and leaves the global RNG alone.
    """
    if not rows:
        return []
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_length, add_special_tokens=False)
    input_ids = encoded["input_ids"].to(device)
    attention = encoded["attention_mask"].to(device)
    prompt_len = input_ids.shape[1]
    eos_ids = _eos_ids(tokenizer)
    chunk = rows_per_chunk or len(rows)
    results: list[Completion] = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        prompt_index = torch.tensor([p for _, p in part], device=input_ids.device)
        row_members = [m for m, _ in part]
        kwargs = {"input_ids": input_ids[prompt_index], "attention_mask": attention[prompt_index],
                  "max_new_tokens": max_completion_length, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": eos_ids or None}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        with torch.random.fork_rng(devices=_rng_devices(input_ids.device)):
            torch.manual_seed(member_key(run_seed, iteration, start, 0x5A11) & MASK63)
            if any(m is not None for m in row_members):
                if any(m is None for m in row_members):
                    raise ValueError("a chunk mixes centre rows and member rows")
                segments = _segments(row_members)
                with es_model.population(run_seed, iteration, sigma, members, segments):
                    output = es_model.model.generate(**kwargs)
            else:
                output = es_model.model.generate(**kwargs)
        for row in output[:, prompt_len:].tolist():
            ids = _cut(row, eos_ids, tokenizer.pad_token_id)
            results.append(Completion(tokenizer.decode(ids, skip_special_tokens=True), ids))
    return results


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


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []
