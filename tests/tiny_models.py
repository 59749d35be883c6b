"""Shared test helper: a tiny 4-bit model with a non-zero ES-LoRA adapter and a batch."""

from __future__ import annotations

import torch

from lowmem_es.lora import attach_es_lora
from lowmem_es.model import load_model


def es_model_and_batch(path, targets, prompts, *, seed: int = 3, padding_left: bool = True):
    """(es_model, tokenizer, batch): LoRA rank 4 on ``targets``, masters nudged by seeded
    noise (B starts at zero, which would make every member alike), ``prompts`` tokenized
    with left padding as generation pads them."""
    model, tokenizer, _ = load_model(path)
    es_model = attach_es_lora(model, list(targets), 4, 8.0, seed=0)
    generator = torch.Generator().manual_seed(seed)
    for tensor in es_model.parameters().values():
        tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    if padding_left:
        tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return es_model, tokenizer, batch


def save_random_adapter(model_dir, path, seed: int = 0):
    """A PEFT adapter for the tiny model with large random B (so outputs visibly change)."""
    base, _, _ = load_model(model_dir)
    es_model = attach_es_lora(base, ["q_proj", "v_proj"], 4, 8.0, seed=seed,
                              base_model_name_or_path=str(model_dir))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in es_model.parameters().items():
        if name.endswith("lora_B"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return es_model.save_adapter(path)
