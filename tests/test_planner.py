"""Memory planner: arithmetic on real model configs (written here: nothing is downloaded),
the chunking it picks, PlanError's advice, and the ``plan`` command.

Configs are the published config.json values of Qwen2.5-7B and Llama-3.1-8B; the models
are built on the meta device, so no weights exist.
"""

from __future__ import annotations

import json
import math

import pytest

from lowmem_es.planner import (
    NF4_BITS_PER_VALUE,
    PlanError,
    model_shape,
    nf4_bytes,
    plan,
    predict,
)
from lowmem_es.profiles import GIB, Profile, load_profile

QWEN25_7B = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA31_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN25_05B = {  # tied embeddings
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "vocab_size": 151936, "tie_word_embeddings": True,
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEARS = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


def _plan(config, profile="8gb", **kwargs):
    options = dict(lora_rank=8, target_modules=ATTENTION, population_size=30, batch_size=8)
    options.update(kwargs)
    profile = load_profile(profile) if isinstance(profile, str) else profile
    return plan(config, profile, **options)


def _profile(**changes):
    values = dict(name="test", memory_budget_gib=8.0, reserve_gib=0.8, workspace_mib=192,
                  headroom_fraction=0.05, compute_dtype="bfloat16", max_rows_in_flight=64,
                  max_prompt_length=256, max_completion_length=256)
    values.update(changes)
    return Profile(**values)


# --- parameter counts and per-token arithmetic ---

def _by_hand(hidden, inner, layers, heads, kv_heads, vocab, qkv_bias):
    """Parameter groups of a Llama/Qwen2 decoder, from the published shapes."""
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    linear = layers * (attention + 3 * hidden * inner)
    bias = layers * (hidden + 2 * kv_heads * head_dim) if qkv_bias else 0
    norms = layers * 2 * hidden + hidden
    return linear, vocab * hidden, bias + norms


@pytest.mark.parametrize(("config", "known_total", "dims", "qkv_bias"), [
    (QWEN25_7B, 7_615_616_512, (3584, 18944, 28, 28, 4, 152064), True),
    (LLAMA31_8B, 8_030_261_248, (4096, 14336, 32, 32, 8, 128256), False),
])
def test_parameter_counts_match_the_published_models(config, known_total, dims, qkv_bias):
    shape = model_shape(config)
    linear, embedding, other = _by_hand(*dims, qkv_bias)
    assert shape.linear_params == linear
    assert shape.embedding_params == shape.lm_head_params == embedding
    assert shape.other_params == other
    assert shape.total_params == known_total  # 7.62 B / 8.03 B as the model cards say
    assert not shape.tied_embeddings and shape.supports_logits_to_keep


def test_kv_cache_bytes_per_token():
    assert model_shape(QWEN25_7B).kv_bytes_per_token(2) == 57_344  # 56 KiB
    assert model_shape(LLAMA31_8B).kv_bytes_per_token(2) == 131_072  # 128 KiB
    assert model_shape(LLAMA31_8B).kv_bytes_per_token(4) == 262_144


def test_tied_embedding_is_counted_once():
    shape = model_shape(QWEN25_05B)
    assert shape.tied_embeddings and shape.lm_head_params == 0
    assert shape.total_params == 494_032_768  # Qwen2.5-0.5B


def test_pretrained_config_gives_the_same_shape():
    from transformers import AutoConfig

    values = dict(QWEN25_7B)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    assert model_shape(config).total_params == model_shape(QWEN25_7B).total_params


def test_config_without_model_type_is_an_error():
    with pytest.raises(ValueError, match="no `model_type`"):
        model_shape({"hidden_size": 64})


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("hidden_size", "64", '"64"'), ("hidden_size", 64.0, "64.0"),
    ("num_attention_heads", 0, "0"), ("vocab_size", -5, "-5"),
    ("num_hidden_layers", 0, "0"), ("num_key_value_heads", 0, "0"), ("head_dim", 0, "0"),
    ("intermediate_size", True, "true"), ("hidden_size", None, "null"),
])
def test_model_size_that_is_not_a_positive_integer_is_named(key, value, shown):
    """transformers failed deep inside instead: a strict-dataclass TypeError, a
    ZeroDivisionError or a negative-dimension RuntimeError (or, for 0 layers, the planner
    divided by zero later)."""
    with pytest.raises(ValueError) as caught:
        model_shape({**QWEN25_05B, key: value})
    assert str(caught.value).startswith(f"`{key}` should be a positive integer (a JSON "
                                        f"number, no quotes), but the value is {shown}")


def test_model_size_is_checked_under_the_name_config_json_uses():
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_head": 0, "n_layer": 2, "vocab_size": 96}
    with pytest.raises(ValueError, match=r"^`n_head` should be a positive integer.*is 0"):
        model_shape(gpt2)
    assert model_shape({**gpt2, "n_head": 4}).num_heads == 4


def test_model_config_transformers_cannot_build_is_a_value_error():
    """A bad value the size checks do not know is still a ValueError naming the model
    type (here rope_theta: a TypeError while building the rotary embedding)."""
    with pytest.raises(ValueError, match=r"^transformers cannot build a 'qwen2' model from "
                                         r"the model config \(TypeError: .*\); check its "
                                         "values") as caught:
        model_shape({**QWEN25_05B, "rope_theta": "x"})
    assert isinstance(caught.value.__cause__, TypeError)


def test_nf4_bytes_match_bitsandbytes():
    """Our byte count equals what bitsandbytes stores (blocksize 64, double quant)."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    for shape in [(512, 3584), (37, 129), (64, 1000)]:
        packed, state = quantize_4bit(torch.zeros(shape), blocksize=64,
                                      compress_statistics=True, quant_type="nf4")
        stored = sum(t.numel() * t.element_size() for t in (
            packed, state.absmax, state.code, state.offset, state.state2.absmax,
            state.state2.code))
        assert nf4_bytes(shape[0] * shape[1]) == stored


def test_nf4_is_4_127_bits_per_value():
    assert NF4_BITS_PER_VALUE == pytest.approx(4.127, abs=5e-4)
    numel = 3584 * 18944  # Qwen2.5-7B gate_proj
    assert nf4_bytes(numel) * 8 / numel == pytest.approx(4.127, abs=1e-3)


# --- the plan's terms on real configs ---

@pytest.mark.parametrize(("config", "kv_per_token"), [(QWEN25_7B, 57_344),
                                                      (LLAMA31_8B, 131_072)])
@pytest.mark.parametrize("profile_name", ["8gb", "12gb"])
@pytest.mark.parametrize("backend", ["loop", "generate"])
def test_plan_terms(config, kv_per_token, profile_name, backend):
    """The terms with the whole prompt prefilled at once (chunked prefill: tested below)."""
    profile = load_profile(profile_name)
    result = _plan(config, profile, chunked_prefill=False, generation_backend=backend)
    shape = model_shape(config)
    rows, prompt, completion = (result.rows_per_chunk, result.max_prompt_length,
                                result.max_completion_length)
    assert (prompt, completion) == (profile.max_prompt_length, profile.max_completion_length)
    static, decode = result.static, result.phases["decode"]
    assert static["nf4_linear_weights"] == pytest.approx(
        shape.linear_params * 4.127 / 8, rel=1e-3)
    # The 8gb and 12gb profiles keep the (untied) input embedding in CPU memory.
    assert profile.embedding_on_cpu and not shape.tied_embeddings
    assert static["embedding"] == 0 and static["lm_head"] == shape.embedding_params * 2
    lora_per_layer = sum(8 * (d_in + d_out) for name, d_in, d_out in shape.linears
                         if name.startswith("model.layers.0.") and name.endswith(
                             tuple(ATTENTION)))
    assert static["lora_masters"] == 4 * shape.num_layers * lora_per_layer
    assert static["lora_member_copies"] == result.members_per_chunk * static["lora_masters"]
    assert decode["kv_cache"] == rows * (prompt + completion) * kv_per_token
    # The decode loop's StaticCache exists in full from the first prefill write; generate()'s
    # DynamicCache holds the prompt then, and copies one layer's K/V per decode step.
    prefill_keys = prompt + completion if backend == "loop" else prompt
    assert result.phases["prefill"]["kv_cache"] == rows * prefill_keys * kv_per_token
    other = predict(config, profile, 8, ATTENTION, 30, 8, rows_per_chunk=rows,
                    max_prompt_length=prompt, max_completion_length=completion,
                    generation_backend="generate" if backend == "loop" else "loop")
    cat_copy = rows * (prompt + completion) * kv_per_token // shape.num_layers
    sign = 1 if backend == "generate" else -1
    assert decode["activations"] - other.phases["decode"]["activations"] == sign * cat_copy
    assert decode["logits"] == rows * shape.vocab_size * (2 + 16)  # bf16 out + fp32 temps
    # The breakdown sums to the peak, the peak fits, and one row more would not.
    assert sum(result.breakdown.values()) == result.predicted_peak_bytes
    assert result.fits and result.predicted_peak_bytes <= profile.target_bytes
    assert result.limited_by == "memory"
    assert not _fits_more(config, profile, rows, prompt, completion, backend)
    more = predict(config, profile, 8, ATTENTION, 30, 8, rows_per_chunk=rows + 1,
                   max_prompt_length=prompt, max_completion_length=completion,
                   generation_backend=backend)
    assert more.predicted_peak_bytes > result.predicted_peak_bytes


def _fits_more(config, profile, rows, prompt, completion, backend="loop"):
    """Would one chunk fewer fit? (plan evens out chunk sizes, so it may use fewer rows
    than fit; what must not fit is the row count that saves a chunk)."""
    chunks = math.ceil(240 / rows)
    if chunks == 1:
        return False
    fewer = math.ceil(240 / (chunks - 1))
    return predict(config, profile, 8, ATTENTION, 30, 8, rows_per_chunk=fewer,
                   max_prompt_length=prompt, max_completion_length=completion,
                   generation_backend=backend).fits


def test_8gb_numbers_for_7b_models():
    """The 7B-class targets of issue 4: both models run under 8gb with several rows."""
    qwen, llama = _plan(QWEN25_7B), _plan(LLAMA31_8B)
    for result in (qwen, llama):
        assert result.predicted_peak_bytes <= 7.2 * GIB * 0.95
        assert result.rows_per_chunk >= 8
    # KV is 2.3x larger per token for Llama, so it gets fewer rows per chunk.
    assert llama.rows_per_chunk < qwen.rows_per_chunk
    # With generate()'s growing cache Llama's peak is in decode; with the decode loop's
    # full-length static cache, prefill (cache + activations) is the larger moment.
    assert _plan(LLAMA31_8B, generation_backend="generate").peak_phase == "decode"
    assert llama.peak_phase == "prefill"


def test_rows_capped_by_profile_total_rows_and_request():
    small = _plan(QWEN25_7B, "24gb", population_size=4, batch_size=2)
    assert small.rows_per_chunk == 8 and small.limited_by == "total_rows"
    assert small.num_chunks == 1 and small.members_per_chunk == 4
    capped = _plan(QWEN25_7B, _profile(memory_budget_gib=80.0, max_rows_in_flight=24))
    assert capped.rows_per_chunk == 24 and capped.limited_by == "max_rows_in_flight"
    asked = _plan(QWEN25_7B, "24gb", rows_per_chunk=16)
    assert asked.rows_per_chunk == 16 and asked.limited_by == "rows_per_chunk"


def test_chunks_hold_whole_members_when_that_costs_no_chunk():
    # 30 members x 8 rows; a cap of 44 rows needs 6 chunks, and 40 = 5 whole members does too.
    result = _plan(QWEN25_7B, _profile(memory_budget_gib=80.0, max_rows_in_flight=44))
    assert (result.rows_per_chunk, result.num_chunks, result.members_per_chunk) == (40, 6, 5)


def test_fused_kernel_and_adam_terms():
    base = _plan(QWEN25_7B, rows_per_chunk=8)
    kernel = _plan(QWEN25_7B, rows_per_chunk=8, lora_kernel=True)
    adam = _plan(QWEN25_7B, rows_per_chunk=8, optimizer="adam")
    assert base.static["lora_member_copies"] > 0 and kernel.static["lora_member_copies"] == 0
    assert adam.static["optimizer_state"] == 2 * base.static["lora_masters"]


def test_all_linear_targets_and_full_logits_cost_more():
    attention = _plan(QWEN25_7B, rows_per_chunk=8)
    every = _plan(QWEN25_7B, rows_per_chunk=8, target_modules=ALL_LINEARS)
    assert every.lora_values > 3 * attention.lora_values
    assert every.phases["prefill"]["activations"] > attention.phases["prefill"]["activations"]
    full = _plan(QWEN25_7B, rows_per_chunk=8, full_prefill_logits=True)
    extra = 8 * 256 * 152064 * 2  # rows x prompt x vocab in bf16
    assert full.phases["prefill"]["logits"] - attention.phases["prefill"]["logits"] == extra


def test_embedding_on_cpu_frees_the_embedding_unless_tied():
    off = _plan(LLAMA31_8B, _profile(embedding_on_cpu=True))
    on = _plan(LLAMA31_8B, _profile())
    assert off.static["embedding"] == 0 and on.static["embedding"] == 128256 * 4096 * 2
    assert off.rows_per_chunk > on.rows_per_chunk
    tied = _plan(QWEN25_05B, _profile(embedding_on_cpu=True))
    assert tied.static["embedding"] > 0
    assert any("tied" in note for note in tied.notes)


def test_cpu_profile_counts_fp32_and_the_repacked_weights():
    result = _plan(QWEN25_05B, "cpu", population_size=8, batch_size=2)
    shape = model_shape(QWEN25_05B)
    assert result.static["embedding"] == shape.embedding_params * 4
    assert result.static["nf4_linear_weights"] > sum(nf4_bytes(i * o) for _, i, o in
                                                     shape.linears)


def test_invalid_inputs_name_the_field():
    with pytest.raises(ValueError, match=r"`lora_target_modules` contains \['qkv'\].*valid "
                                         r"names are \['down_proj'"):
        _plan(QWEN25_7B, target_modules=["qkv"])
    with pytest.raises(ValueError, match=r"`batch_size` should be a positive integer.*0"):
        _plan(QWEN25_7B, batch_size=0)


# --- when nothing fits ---

def test_plan_error_says_how_far_over_and_what_fits():
    with pytest.raises(PlanError) as info:
        _plan(LLAMA31_8B, max_prompt_length=16384, max_completion_length=4096)
    error = info.value
    assert isinstance(error, ValueError)
    message = str(error)
    assert "GiB over the 6.84 GiB" in message and "16384 prompt + 4096 completion" in message
    one_row = [predict(LLAMA31_8B, load_profile("8gb"), 8, ATTENTION, 30, 8, rows_per_chunk=1,
                       max_prompt_length=16384, max_completion_length=4096, prefill_chunk=k)
               for k in (0, 16)]  # the whole prompt, and the smallest prefill chunk tried
    lowest = min(p.predicted_peak_bytes for p in one_row)
    assert error.over_bytes == lowest - one_row[0].target_bytes > 0
    assert "--profile 12gb" in error.suggestions
    # The suggested lengths really fit at one row.
    lengths = error.suggestions[0]
    assert lengths.startswith("max_prompt_length=")
    prompt, completion = (int(part.split("=")[1]) for part in lengths.split(" and "))
    fitted = _plan(LLAMA31_8B, max_prompt_length=prompt, max_completion_length=completion)
    assert fitted.fits and fitted.rows_per_chunk >= 1


def test_plan_error_when_the_weights_alone_do_not_fit():
    with pytest.raises(PlanError, match=r"resident part alone.*To fit, use: --profile 8gb") \
            as info:
        _plan(LLAMA31_8B, _profile(memory_budget_gib=5.0))
    assert info.value.suggestions[-1].startswith("a card with memory_budget_gib >= ")


def test_profile_lengths_are_lowered_when_one_row_does_not_fit():
    profile = _profile(max_prompt_length=32768, max_completion_length=8192)
    result = _plan(LLAMA31_8B, profile)
    assert result.fits and result.rows_per_chunk >= 1
    assert result.max_prompt_length < 32768 and result.max_completion_length < 8192
    assert result.max_prompt_length / result.max_completion_length == pytest.approx(4, rel=0.01)
    assert any("lowered" in note for note in result.notes)


def test_to_dict_and_format():
    result = _plan(QWEN25_7B, "12gb")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["fits"] is True and data["rows_per_chunk"] == result.rows_per_chunk
    assert data["kv_bytes_per_token"] == 57_344
    assert sum(data["breakdown"].values()) == data["predicted_peak_bytes"]
    text = result.format()
    for word in ("nf4_linear_weights", "kv_cache", "prefill", "decode", "56.0 KiB/token",
                 "fits"):
        assert word in text


# --- the `plan` command ---

def test_chunked_prefill_fits_more_rows_when_prefill_is_the_limit():
    """Qwen2.5-7B under 8gb: the whole-prompt prefill limits the rows; prefilling the prompt
    in chunks fits more rows per chunk (fewer passes) within the same target."""
    whole = _plan(QWEN25_7B, chunked_prefill=False)
    assert whole.peak_phase == "prefill" and whole.limited_by == "memory"
    assert whole.prefill_chunk == 0
    chunked = _plan(QWEN25_7B)
    assert chunked.rows_per_chunk > whole.rows_per_chunk
    assert chunked.num_chunks < whole.num_chunks
    assert 0 < chunked.prefill_chunk < chunked.max_prompt_length
    assert chunked.fits
    assert f"prefill {chunked.prefill_chunk} prompt tokens at a time" in chunked.format()
    assert chunked.to_dict()["prefill_chunk"] == chunked.prefill_chunk
    # The same rows with the whole prompt in one pass would not fit, so the chunk is needed.
    args = dict(population_size=30, batch_size=8, max_prompt_length=256,
                max_completion_length=256)
    profile = load_profile("8gb")
    at_once = predict(QWEN25_7B, profile, 8, list(ATTENTION), rows_per_chunk=chunked.rows_per_chunk,
                      **args)
    assert not at_once.fits
    pieces = predict(QWEN25_7B, profile, 8, list(ATTENTION), rows_per_chunk=chunked.rows_per_chunk,
                     prefill_chunk=chunked.prefill_chunk, **args)
    assert pieces.predicted_peak_bytes == chunked.predicted_peak_bytes
    # Smaller chunks lower the prefill activations (but never the static cache).
    small = predict(QWEN25_7B, profile, 8, list(ATTENTION), rows_per_chunk=chunked.rows_per_chunk,
                    prefill_chunk=16, **args)
    assert small.phases["prefill"]["activations"] < pieces.phases["prefill"]["activations"]
    assert small.phases["prefill"]["kv_cache"] == pieces.phases["prefill"]["kv_cache"]


def test_decode_limited_plan_never_chunks_prefill():
    plan_ = _plan(LLAMA31_8B, generation_backend="generate")
    assert plan_.peak_phase == "decode" and plan_.prefill_chunk == 0


def test_plan_notes_say_where_the_embedding_and_the_cache_are():
    notes = "\n".join(_plan(QWEN25_7B, kv_cache_dtype="int8").notes)
    assert "input embedding (1.02 GiB) stays in CPU memory" in notes
    assert "KV cache in int8" in notes
    assert not any("int8" in n or "CPU memory" in n for n in _plan(QWEN25_7B, "24gb").notes)


# --- sliding-window layers, eager attention, multimodal configs, the mask ---

GEMMA3_4B_TEXT = {  # Gemma-3-4B's text decoder: 5 full-attention + 29 sliding (1024) layers
    "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
    "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "sliding_window": 1024, "sliding_window_pattern": 6,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "vocab_size": 262208,
    "query_pre_attn_scalar": 256, "rope_theta": 1000000, "rope_local_base_freq": 10000,
}
GEMMA3_4B = {  # the published multimodal config: the text decoder under text_config
    "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
    "mm_tokens_per_image": 256, "text_config": GEMMA3_4B_TEXT,
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                      "image_size": 896, "intermediate_size": 4304, "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}
MISTRAL_7B_V01 = {  # every layer attends to a 4096-token sliding window
    "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
    "vocab_size": 32000, "max_position_embeddings": 32768, "sliding_window": 4096,
    "tie_word_embeddings": False,
}
GEMMA2_2B = {  # softcapped attention: transformers 5.24 loads it eager (no SDPA)
    "model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "num_hidden_layers": 26, "vocab_size": 256000, "sliding_window": 4096,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
}


def _pretrained(config):
    from transformers import AutoConfig

    values = dict(config)
    return AutoConfig.for_model(values.pop("model_type"), **values)


@pytest.mark.parametrize("config", [MISTRAL_7B_V01, GEMMA3_4B_TEXT, GEMMA2_2B])
def test_int8_kv_cache_is_refused_where_the_cache_has_sliding_window_layers(config):
    """The plan refuses int8 exactly where lowmem_es.kv_cache would, after loading."""
    from lowmem_es.kv_cache import make_static_cache

    with pytest.raises(ValueError, match="full-attention static cache layers only"):
        make_static_cache(_pretrained(config), 64, "int8")
    with pytest.raises(ValueError, match=r"StaticSlidingWindowLayer.*Set kv_cache_dtype = "
                                         r"\"auto\""):
        _plan(config, kv_cache_dtype="int8")
    assert _plan(config, kv_cache_dtype="auto").fits
    full = dict(MISTRAL_7B_V01, sliding_window=None)  # Mistral without a window: int8 is fine
    make_static_cache(_pretrained(full), 64, "int8")
    assert "KV cache in int8" in "\n".join(_plan(full, kv_cache_dtype="int8").notes)


def test_multimodal_config_is_refused_with_what_to_plan_instead(tmp_path):
    from test_cli_plan import plan_command

    from lowmem_es.cli.plan import run_plan

    message = r"counts a text decoder only.*`text_config`.*model_type 'gemma3_text'"
    with pytest.raises(ValueError, match=message):
        model_shape(GEMMA3_4B)
    with pytest.raises(ValueError, match=message):
        model_shape(_pretrained(GEMMA3_4B))
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_4B))
    with pytest.raises(ValueError, match=message):
        run_plan(plan_command("plan", "--model", str(tmp_path), "--profile", "8gb"))
    # The text model itself plans, with its own dimensions.
    shape = model_shape(GEMMA3_4B["text_config"])
    assert (shape.architecture, shape.hidden_size, shape.num_layers) == \
        ("Gemma3ForCausalLM", 2560, 34)


def test_sliding_window_layers_hold_what_transformers_allocates():
    """KV bytes equal those of transformers' own StaticCache, allocated for real on CPU
    (a tiny Gemma 3: 5 sliding layers of window 8 + 1 full layer, 24-token cache)."""
    import torch
    from transformers import StaticCache

    from lowmem_es.kv_cache import cache_bytes

    tiny = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 16, "sliding_window": 8, "vocab_size": 128}
    rows, prompt, completion = 3, 16, 8
    cache = StaticCache(config=_pretrained(tiny), max_cache_len=prompt + completion)
    states = torch.zeros(rows, 1, 1, 16, dtype=torch.bfloat16)
    for layer in cache.layers:
        layer.lazy_initialization(states, states)
    for backend in ("loop", "generate"):
        result = predict(tiny, _profile(), 8, ["q_proj"], 30, 8, rows_per_chunk=rows,
                         max_prompt_length=prompt, max_completion_length=completion,
                         generation_backend=backend)
        assert result.phases["decode"]["kv_cache"] == cache_bytes(cache) == \
            rows * (5 * 8 + 1 * 24) * 2 * 16 * 2
    assert result.kv_bytes_per_token * (prompt + completion) * rows > cache_bytes(cache)
    # Gemma-3-4B's text model at 52 rows of 1024 + 1024 tokens: 7.92 GiB, not 13.81.
    gemma = predict(GEMMA3_4B_TEXT, load_profile("24gb"), 8, ["q_proj", "v_proj"], 30, 8,
                    rows_per_chunk=52, max_prompt_length=1024, max_completion_length=1024)
    per_layer_token = 2 * 4 * 256 * 2
    assert gemma.phases["decode"]["kv_cache"] == 52 * (5 * 2048 + 29 * 1024) * per_layer_token
    assert gemma.phases["prefill"]["kv_cache"] == gemma.phases["decode"]["kv_cache"]
    assert gemma.phases["decode"]["kv_cache"] / GIB == pytest.approx(7.92, abs=0.005)
    assert any("29 of 34 layers attend to a sliding window" in n for n in gemma.notes)


def test_eager_attention_counts_the_scores_and_their_fp32_softmax():
    from transformers import Gemma2ForCausalLM

    # The attention the model loads with, as transformers decides for the installed version.
    expected = "sdpa" if Gemma2ForCausalLM._supports_sdpa else "eager"
    assert model_shape(GEMMA2_2B).attn_implementation == expected
    assert model_shape(LLAMA31_8B).attn_implementation == "sdpa"
    eager_config = dict(LLAMA31_8B, attn_implementation="eager")
    assert model_shape(_pretrained(eager_config)).attn_implementation == "eager"
    rows, prompt, completion = 4, 1024, 1024  # long enough for the scores to dominate
    args = dict(rows_per_chunk=rows, max_prompt_length=prompt,
                max_completion_length=completion)
    profile = load_profile("24gb")
    sdpa = predict(LLAMA31_8B, profile, 8, ATTENTION, 30, 8, **args)
    eager = predict(eager_config, profile, 8, ATTENTION, 30, 8, **args)
    keys = prompt + completion
    scores = rows * 32 * prompt * keys  # rows x heads x queries x keys
    # bf16 scores + their fp32 cast + the fp32 softmax, and the float mask (2 B/element)
    floor = scores * (2 + 4 + 4) + rows * prompt * keys * 2
    assert eager.phases["prefill"]["activations"] >= floor
    assert sdpa.phases["prefill"]["activations"] < floor
    assert eager.phases["decode"]["activations"] > sdpa.phases["decode"]["activations"]
    assert any("eager attention" in note for note in eager.notes)
    assert not any("eager" in note for note in sdpa.notes)


def test_prefill_mask_counts_the_float_mask_sdpa_makes_of_it():
    """SDPA turns the boolean mask into a float mask in the query dtype (torch's
    convert_boolean_attn_mask), so a mask element costs 1 + c bytes, not 1."""
    from lowmem_es.planner.estimate import _layer_peak

    rows, prompt, completion = 4, 256, 256
    result = predict(QWEN25_7B, _profile(), 8, ATTENTION, 30, 8, rows_per_chunk=rows,
                     max_prompt_length=prompt, max_completion_length=completion,
                     lora_kernel=True)  # no member copies to build: the terms are exact
    shape = model_shape(QWEN25_7B)
    keys, tokens = prompt + completion, rows * prompt
    layer = _layer_peak(shape, tokens, 2, frozenset(ATTENTION), prefill=True,
                        kv_tokens=rows * keys)
    rotary = 2 * tokens * shape.head_dim * 2
    mask = result.phases["prefill"]["activations"] - layer - rotary
    assert mask == rows * prompt * keys * (1 + 2)


def test_per_layer_intermediate_sizes_are_accepted():
    """Gemma 3n gives intermediate_size per layer (a list, legal in transformers); the size
    checks refused it as "not a positive integer", so no plan could be made."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING["gemma3n_text"](
        hidden_size=64, num_hidden_layers=2, intermediate_size=[128, 96],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
        vocab_size_per_layer_input=300, hidden_size_per_layer_input=8, laurel_rank=4,
        altup_num_inputs=4, num_kv_shared_layers=0,
        layer_types=["sliding_attention", "full_attention"],
        activation_sparsity_pattern=[0.0, 0.0]).to_dict()
    assert model_shape(config).num_layers == 2
    with pytest.raises(ValueError, match=r"`intermediate_size` should be a positive integer"):
        model_shape({**config, "intermediate_size": [128, 0]})
