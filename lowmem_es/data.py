"""Dataset rows on their way to the model: checked, rendered, fitted, ordered.

A row is a dict with a ``prompt`` (a string, or chat messages ``{"role", "content"}``)
plus the columns the reward functions read. Training and evaluation take rows through
the same functions here, so a prompt is rendered the same way in both, and a row's
problem is reported once, naming the row: ``validate_rows`` (shape), ``render_prompt``
(chat template), ``fit_prompts`` (chat rows for a tokenizer without a template),
``warn_long_rows`` (truncation), ``epoch_order`` (the seeded data order).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

from lowmem_es.noise import member_key

logger = logging.getLogger("lowmem_es")

DATA_ORDER_STREAM = 0xDA7A  # tensor-id slot of the data-order keys (disjoint from LoRA ids)


def validate_rows(rows: Sequence[dict], name: str) -> list[dict]:
    """Check a dataset is a non-empty list of dicts with a ``prompt``; errors name the row."""
    if rows is None or isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
        raise ValueError(f"`{name}` must be a list of dicts with a 'prompt' key")
    rows = list(rows)
    if not rows:
        raise ValueError(f"`{name}` is empty; give at least one row with a 'prompt'")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"`{name}` row {index} has no 'prompt' key (got "
                             f"{row if not isinstance(row, dict) else sorted(row)}); every row "
                             "needs a 'prompt' plus the columns the reward functions read")
        prompt = row["prompt"]
        chat = isinstance(prompt, list) and all(message_problem(m) is None for m in prompt)
        if not (isinstance(prompt, str) and prompt) and not (chat and prompt):
            raise ValueError(f"`{name}` row {index}: field 'prompt' must be a non-empty string "
                             "or a list of chat messages {'role': str, 'content': str}, got "
                             f"{type(prompt).__name__} {str(prompt)[:60]!r}")
    return rows


def message_problem(message: object) -> str | None:
    """What is wrong with a chat message (None: an object with a string ``role`` and a
    string ``content``); shared by the JSONL reader and ``validate_rows``."""
    if not isinstance(message, dict):
        return f"is a JSON {type(message).__name__}, not an object"
    for key in ("role", "content"):
        if key not in message:
            return f"has no {key!r}"
    for key in ("role", "content"):
        if not isinstance(message[key], str):
            return f"has {key!r} = {json.dumps(message[key], default=repr)}, not a string"
    return None


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


def fit_prompts(rows: Sequence[dict], tokenizer: object) -> list[dict]:
    """Rows whose chat-message prompts become plain text when ``tokenizer`` has no chat template.

    Base (non-instruct) models have no template; their prompt is then the messages'
    contents joined by blank lines. Rows with string prompts pass through unchanged.
    """
    if getattr(tokenizer, "chat_template", None) is not None:
        return list(rows)
    out = []
    flattened = False
    for row in rows:
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            flattened = True
            row = dict(row, prompt="\n\n".join(str(m.get("content", "")) for m in prompt
                                               if isinstance(m, dict)))
        out.append(row)
    if flattened:
        logger.warning("the tokenizer has no chat template: chat prompts are given as plain "
                       "text (message contents joined by blank lines)")
    return out


def warn_long_rows(rows: Sequence[dict], tokenizer: Any, max_prompt_length: int) -> int:
    """``warn_long_prompts`` for dataset rows, their prompts rendered as generation does.

    Rows whose chat prompts cannot be rendered (no chat template) are skipped here: that
    error is reported, naming the row, when the rows are used.
    """
    try:
        prompts = [render_prompt(row["prompt"], tokenizer, i) for i, row in enumerate(rows)]
    except ValueError:
        return 0
    return warn_long_prompts(prompts, tokenizer, max_prompt_length)


def warn_long_prompts(prompts: Sequence[str], tokenizer: Any, max_prompt_length: int) -> int:
    """Log a warning when prompts exceed ``max_prompt_length`` tokens (they get left-truncated)."""
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    too_long = sum(length > max_prompt_length for length in lengths)
    if too_long:
        logger.warning("%d of %d prompts are longer than max_prompt_length=%d tokens (longest "
                       "%d) and are truncated on the left; raise --max-prompt-length to keep "
                       "them whole", too_long, len(prompts), max_prompt_length, max(lengths))
    return too_long


def epoch_order(seed: int, epoch: int, num_rows: int) -> list[int]:
    """The order of the training rows in ``epoch``: a seeded permutation, a pure function
    of (seed, epoch, number of rows), so resume, replay and every rank agree on it."""
    generator = torch.Generator().manual_seed(member_key(seed, epoch, 0, DATA_ORDER_STREAM))
    return torch.randperm(num_rows, generator=generator).tolist()
