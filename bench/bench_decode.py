"""Decode speed: model.generate() vs the lowmem-es static-cache loop (vs CUDA-graph replay).

Greedy, plus the loop with temperature sampling from each noise source (Philox kernel,
per-row generators): what sampling adds to a step.

CPU (default): a small random Llama (hidden 256, 4 layers, vocab 1000) in NF4 + LoRA with
mixed-member rows. CUDA: a Qwen2.5-7B-shaped model (real widths, --layers of them) in
NF4, and the step time as a multiple of its weight-read floor (packed bytes read per
step / measured device copy bandwidth, both measured in the same run).

    python bench/bench_decode.py [--rows 8 32 128] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, copy_bandwidth, median_seconds

# Timed copies for the weight-read floor (bench/_common.copy_bandwidth: median of CUDA-event
# timings of a 1 GiB copy).
BANDWIDTH_REPEATS = 10


def build(device: torch.device, layers: int, tmp: str):
    """A random-weight NF4 model with LoRA on q/k/v/o, and its byte-level tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from lowmem_es.example import char_tokenizer
    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    tokenizer = char_tokenizer()
    if device.type == "cuda":  # Qwen2.5-7B widths
        config = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=layers, num_attention_heads=28,
                             num_key_value_heads=4, max_position_embeddings=4096,
                             tie_word_embeddings=False)
    else:
        config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                             num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device.type ==
                                             "cuda" else torch.float32)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    base, tokenizer, _ = load_model(tmp, device=str(device))
    es_model = attach_es_lora(base, ["q_proj", "k_proj", "v_proj", "o_proj"], 8, 16.0)
    return es_model, tokenizer


def packed_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read: every parameter and buffer (NF4 weights packed)."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * tensor.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    from lowmem_es.decode import decode
    from lowmem_es.es import Member
    from lowmem_es.noise import member_key

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        es_model, tokenizer = build(device, args.layers, tmp)
    model = es_model.model
    floor_s = None
    if device.type == "cuda":
        floor_s = packed_bytes(model) / (copy_bandwidth(device, BANDWIDTH_REPEATS) / 2)
    print(f"### Decode: generate() vs static-cache loop, {args.new_tokens} new tokens\n")
    print(f"Command: `{command_line()}`\n")
    print(f"- {platform.platform()}, Python {platform.python_version()}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"- model: {type(model).__name__}, {args.layers} layers, packed weights "
          f"{packed_bytes(model) / 2**20:.1f} MiB" + (
              f", weight-read floor {floor_s * 1e3:.3f} ms/step" if floor_s else ""))
    print("\n| rows | provider | ms / step | tokens/s | x generate | x floor |")
    print("|---:|---|---:|---:|---:|---:|")
    members = [Member(k // 2, 1 if k % 2 == 0 else -1) for k in range(8)]
    for rows in args.rows:
        ids = torch.randint(4, 40, (rows, args.prompt_tokens), device=device)
        mask = torch.ones_like(ids)
        segments = [(m, rows // 8 + (1 if m < rows % 8 else 0)) for m in range(8)]
        segments = [(m, c) for m, c in segments if c]
        providers = {
            "generate()": lambda ids=ids, mask=mask: model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id),
            "loop": lambda ids=ids, mask=mask: decode(
                model, ids, mask, args.new_tokens, [], tokenizer.pad_token_id, capture=False),
        }
        if device.type == "cuda":
            providers["loop + CUDA graph"] = lambda ids=ids, mask=mask: decode(
                model, ids, mask, args.new_tokens, [], tokenizer.pad_token_id, capture=True)
            # Issue 3's design question: the fused kernel regenerates every member's noise
            # at every step; the torch path builds the members' perturbed A/B once per
            # call (timed here: caches cleared first) and runs grouped matmuls per step.
            providers["loop + CUDA graph, cached LoRA (torch path)"] = (
                lambda ids=ids, mask=mask: _torch_lora_path(
                    es_model, lambda: decode(model, ids, mask, args.new_tokens, [],
                                             tokenizer.pad_token_id, capture=True)))
        # Sampled decoding (T = 0.7): the per-row keyed Gumbel noise from one Philox launch
        # per step (the CUDA default; the torch twin on CPU) or from one torch.Generator
        # per row (the CPU default), on top of the same loop.
        keys = [member_key(0, 0, row, 0) for row in range(rows)]
        for source in ("philox", "generator"):
            providers[f"loop{' + CUDA graph' if device.type == 'cuda' else ''}, sampled "
                      f"({source})"] = (
                lambda ids=ids, mask=mask, source=source, keys=keys: _sampled(
                    source, keys, lambda processor: decode(
                        model, ids, mask, args.new_tokens, [], tokenizer.pad_token_id,
                        capture=device.type == "cuda", logits_processor=processor),
                    args.prompt_tokens))
        baseline = None
        with torch.no_grad(), es_model.population(0, 0, 0.01, members, segments):
            for name, fn in providers.items():
                seconds = median_seconds(fn, args.repeats, device)
                baseline = baseline or seconds
                step_ms = seconds / args.new_tokens * 1e3
                floor = f"{step_ms / (floor_s * 1e3):.2f}" if floor_s else "-"
                print(f"| {rows} | {name} | {step_ms:.2f} | "
                      f"{rows * args.new_tokens / seconds:.0f} | {seconds / baseline:.2f} | "
                      f"{floor} |")


def _sampled(source: str, keys: list[int], call, prompt_len: int):
    """``call(processor)`` with generation's per-row sampler, its noise from ``source``."""
    from lowmem_es import backends, generate

    previous = backends.sampler()
    backends.set_sampler(source)
    try:
        return call(generate._sampler(keys, prompt_len, 0.7))
    finally:
        backends.set_sampler(previous)


def _torch_lora_path(es_model, call):
    """``call()`` with the ES-LoRA layers on their cached torch path (no fused kernel),
    their per-member caches rebuilt as a generation call rebuilds them."""
    from lowmem_es import backends

    previous = backends.force(backends.NOISY_LORA)
    backends.set_force(backends.NOISY_LORA, "torch")
    try:
        for layer in es_model.layers.values():
            layer.clear_cache()
        return call()
    finally:
        backends.set_force(backends.NOISY_LORA, previous)


if __name__ == "__main__":
    main()
