"""The int8 static KV cache: quantization error, memory, decode outputs, plan, validation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import es_model_and_batch

from lowmem_es.decode import DecodeStats, decode
from lowmem_es.es import Member
from lowmem_es.kv_cache import (
    cache_bytes,
    dequantize_int8,
    make_static_cache,
    quantize_int8,
)

PROMPTS = ["sun 1:", "a much longer prompt here 2:", "x", "rain and more rain 33:"]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_quantization_error_is_half_a_step(scale_dtype):
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(3, 4, 7, 64, generator=generator) * torch.logspace(-3, 2, 7)[:, None]
    states[0, 0, 0] = 0.0  # an all-zero vector: scale 0, exact
    codes, scales = quantize_int8(states, scale_dtype)
    assert codes.dtype == torch.int8 and scales.dtype == scale_dtype
    assert scales.shape == (3, 4, 7, 1)
    restored = codes.float() * scales.float()
    # What attention gets: the same product, rounded once to the scales' (compute) dtype.
    assert torch.equal(dequantize_int8(codes, scales), restored.to(scale_dtype))
    step = scales.float()
    assert torch.all((restored - states).abs() <= step / 2 * (1 + 1e-5) + 1e-30)
    assert torch.equal(restored[0, 0, 0], torch.zeros(64))
    # The step is 1/127 of each vector's own largest magnitude (per head, per token).
    largest = states.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(step * 127, largest, rtol=1e-2 if scale_dtype != torch.float32
                               else 1e-6, atol=0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_llama_dir, tiny_qwen2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    return es_model_and_batch(path, ["q_proj", "v_proj"], PROMPTS * 2)


def _decode(es_model, tokenizer, batch, kv_cache_dtype, seen=None):
    stats = DecodeStats()

    def keep(ids, scores):
        if seen is not None:
            seen.append(scores.clone())
        return scores

    with es_model.population(5, 1, 0.3, [Member(0, 1), Member(0, -1)], [(0, 4), (1, 4)]):
        out = decode(es_model.model, batch["input_ids"], batch["attention_mask"], 12,
                     [tokenizer.eos_token_id], tokenizer.pad_token_id, stats=stats,
                     logits_processor=keep, kv_cache_dtype=kv_cache_dtype)
    return out, stats


def test_int8_cache_decodes_like_the_full_precision_one(setup):
    es_model, tokenizer, batch = setup
    full_logits, int8_logits = [], []
    full, full_stats = _decode(es_model, tokenizer, batch, "auto", full_logits)
    quantized, int8_stats = _decode(es_model, tokenizer, batch, "int8", int8_logits)
    # First step: the prefill wrote the cache, attention read it back dequantized.
    first_full, first_int8 = full_logits[0], int8_logits[0]
    error = (first_int8 - first_full).abs().max() / first_full.abs().max()
    assert 0 < error < 0.02, error  # quantized, but barely
    # Greedy tokens: a tiny random model's logits are flat, so a quantization-sized nudge
    # can flip an argmax and the row then diverges; measured 0.92-0.96 agreement here,
    # against ~1/vocab for a broken cache.
    agree = (quantized == full).float().mean().item()
    assert agree >= 0.75, agree
    # Memory: fp32 compute here, so codes (1 B) + one fp32 scale per head vector against
    # 4 B per value; the shape is fixed at rows x (prompt + new tokens) from the start.
    config = es_model.model.config
    rows, total = batch["input_ids"].shape[0], full_stats.cache_tokens
    head_dim = config.hidden_size // config.num_attention_heads
    per_token_head = 2 * config.num_hidden_layers * config.num_key_value_heads
    assert full_stats.cache_bytes == rows * total * per_token_head * head_dim * 4
    assert int8_stats.cache_bytes == rows * total * per_token_head * (head_dim + 4)
    assert int8_stats.cache_tokens == total


def test_cache_rejects_unknown_dtypes_and_sliding_layers():
    from transformers import AutoConfig

    llama = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=40)
    with pytest.raises(ValueError, match=r"`kv_cache_dtype` must be one of"):
        make_static_cache(llama, 8, "fp8")
    assert cache_bytes(make_static_cache(llama, 8, "int8")) == 0  # nothing allocated yet
    mistral = AutoConfig.for_model("mistral", hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=40, sliding_window=4)
    with pytest.raises(ValueError, match=r"full-attention static cache layers only.*"
                                         r"kv_cache_dtype = \"auto\""):
        make_static_cache(mistral, 8, "int8")


def test_planner_counts_int8_codes_scales_and_the_dequantized_layer():
    from test_planner import ATTENTION, QWEN25_7B

    from lowmem_es.planner import model_shape, plan, predict
    from lowmem_es.profiles import load_profile

    profile = load_profile("8gb")
    shape = model_shape(QWEN25_7B)
    auto = plan(QWEN25_7B, profile, 8, ATTENTION, 30, 8)
    int8 = plan(QWEN25_7B, profile, 8, ATTENTION, 30, 8, kv_cache_dtype="int8")
    assert auto.kv_bytes_per_token == 57_344
    assert int8.kv_bytes_per_token == 2 * 28 * 4 * (128 + 2) == 29_120  # bf16 scales
    assert int8.rows_per_chunk > auto.rows_per_chunk
    rows, prompt, completion = 16, 256, 256
    one = {dtype: predict(QWEN25_7B, profile, 8, ATTENTION, 30, 8, rows_per_chunk=rows,
                          max_prompt_length=prompt, max_completion_length=completion,
                          kv_cache_dtype=dtype) for dtype in ("auto", "int8")}
    dequantized = 2 * rows * (prompt + completion) * 4 * 128 * 2  # one layer's K, V in bf16
    assert (one["int8"].phases["decode"]["activations"]
            - one["auto"].phases["decode"]["activations"]) == dequantized
    assert one["int8"].phases["decode"]["kv_cache"] == rows * (prompt + completion) * 29_120
    assert shape.num_kv_heads == 4
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'int8' needs the static-cache"):
        plan(QWEN25_7B, profile, 8, ATTENTION, 30, 8, kv_cache_dtype="int8",
             generation_backend="generate")


def test_profiles_accept_int8_and_pass_it_to_runs(tmp_path):
    from lowmem_es.profiles import load_profile, profile_dir

    text = (profile_dir() / "8gb.toml").read_text()
    path = tmp_path / "int8.toml"
    path.write_text(text.replace('kv_cache_dtype = "auto"', 'kv_cache_dtype = "int8"'))
    profile = load_profile(str(path))
    assert profile.kv_cache_dtype == "int8" and profile.kv_dtype == "int8"
    assert profile.es_overrides()["kv_cache_dtype"] == "int8"
    assert load_profile("8gb").es_overrides()["kv_cache_dtype"] == "auto"
    path.write_text(text.replace('kv_cache_dtype = "auto"', 'kv_cache_dtype = "float16"'))
    with pytest.raises(ValueError, match=r"`kv_cache_dtype`.*\"int8\""):
        load_profile(str(path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_cache_under_cuda_graph_capture_matches_eager(tiny_llama_dir):
    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    model, tokenizer, _ = load_model(tiny_llama_dir, device="cuda")
    es_model = attach_es_lora(model, ["q_proj", "v_proj"], 4, 8.0, seed=0)
    batch = tokenizer(PROMPTS * 2, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = {k: v.cuda() for k, v in batch.items()}
    outs = []
    for capture in (False, True):
        stats = DecodeStats()
        with es_model.population(5, 1, 0.3, [Member(0, 1), Member(0, -1)], [(0, 4), (1, 4)]):
            outs.append(decode(model, batch["input_ids"], batch["attention_mask"], 12,
                               [tokenizer.eos_token_id], tokenizer.pad_token_id,
                               capture=capture, stats=stats, kv_cache_dtype="int8"))
        assert stats.captured == capture
    assert torch.equal(outs[0], outs[1])
