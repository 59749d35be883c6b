"""The static-cache decode loop: same greedy tokens as generate(), fixed cache, sampling."""

from __future__ import annotations

import pytest
import torch
from tiny_models import es_model_and_batch

from lowmem_es import decode as decode_module
from lowmem_es.decode import DecodeStats, UnsupportedModelError, decode, supports_loop
from lowmem_es.es import Member
from lowmem_es.kernels._runtime import INTERPRETED

PROMPTS = ["sun 1:", "a much longer prompt here 2:", "x", "rain and more rain 33:"]
MEMBERS = [Member(0, 1), Member(0, -1), Member(3, 1)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_llama_dir, tiny_qwen2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    return es_model_and_batch(path, ["q_proj", "v_proj", "o_proj"], PROMPTS * 3)


def _reference(es_model, tokenizer, batch, new, eos):
    output = es_model.model.generate(**batch, max_new_tokens=new, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    return output[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("new_tokens", [1, 12])
def test_greedy_matches_generate_with_mixed_members(setup, new_tokens):
    es_model, tokenizer, batch = setup
    segments = [(2, 4), (0, 4), (1, 4)]  # three members, rows of each contiguous
    with es_model.population(5, 1, 0.3, MEMBERS, segments):
        reference = _reference(es_model, tokenizer, batch, new_tokens, tokenizer.eos_token_id)
        ours = decode(es_model.model, batch["input_ids"], batch["attention_mask"], new_tokens,
                      [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert torch.equal(ours[:, :reference.shape[1]], reference)
    assert len({tuple(r) for r in ours.tolist()}) > 3  # members really differ


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_prefill_gives_the_same_tokens(setup, chunk):
    """Prefill in pieces of `chunk` prompt tokens: the same greedy tokens and (up to float
    rounding) the same logits as one pass, with ragged left-padded prompts and members."""
    es_model, tokenizer, batch = setup
    segments = [(2, 4), (0, 4), (1, 4)]
    seen = []

    def keep(ids, scores):
        seen.append(scores.clone())
        return scores

    with es_model.population(5, 1, 0.3, MEMBERS, segments):
        whole = decode(es_model.model, batch["input_ids"], batch["attention_mask"], 8,
                       [tokenizer.eos_token_id], tokenizer.pad_token_id, logits_processor=keep)
        pieces = decode(es_model.model, batch["input_ids"], batch["attention_mask"], 8,
                        [tokenizer.eos_token_id], tokenizer.pad_token_id, prefill_chunk=chunk,
                        logits_processor=keep)
    assert torch.equal(whole, pieces)
    half = len(seen) // 2
    for a, b in zip(seen[:half], seen[half:], strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prefill_chunk"):
        decode(es_model.model, batch["input_ids"], batch["attention_mask"], 2, [], 0,
               prefill_chunk=-1)


def test_eos_in_different_rows(setup):
    """Pick a token the rows emit at different steps as EOS: rows stop at different times
    and are padded afterwards, exactly like generate()."""
    es_model, tokenizer, batch = setup
    segments = [(0, 6), (1, 6)]
    with es_model.population(2, 0, 0.3, MEMBERS[:2], segments):
        free = decode(es_model.model, batch["input_ids"], batch["attention_mask"], 10, [],
                      tokenizer.pad_token_id)
        rows = free.tolist()
        tokens = {t for r in rows for t in r}
        first_steps = {t: {r.index(t) for r in rows if t in r} for t in tokens}
        eos = max(first_steps, key=lambda t: (len(first_steps[t]), -min(first_steps[t])))
        reference = _reference(es_model, tokenizer, batch, 10, eos)
        stats = DecodeStats()
        ours = decode(es_model.model, batch["input_ids"], batch["attention_mask"], 10, [eos],
                      tokenizer.pad_token_id, stats=stats)
    stop_steps = {row.index(eos) for row in ours.tolist() if eos in row}
    assert len(stop_steps) > 1
    assert torch.equal(ours[:, :reference.shape[1]], reference)
    assert (ours[:, reference.shape[1]:] == tokenizer.pad_token_id).all()
    assert stats.rows == 12


def test_cache_is_sized_once(setup, monkeypatch):
    es_model, tokenizer, batch = setup
    from transformers import StaticCache

    caches = []
    original = StaticCache.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(StaticCache, "__init__", record)
    stats = DecodeStats()
    decode(es_model.model, batch["input_ids"], batch["attention_mask"], 7, [],
           tokenizer.pad_token_id, stats=stats)
    total = batch["input_ids"].shape[1] + 7
    assert len(caches) == 1
    assert stats.cache_tokens == total and stats.steps == 7
    for layer in caches[0].layers:
        assert layer.keys.shape[0] == 12 and layer.keys.shape[2] == total


def test_sampling_is_reproducible(setup):
    es_model, tokenizer, batch = setup

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return decode(es_model.model, batch["input_ids"], batch["attention_mask"], 8, [],
                      tokenizer.pad_token_id, temperature=1.0, generator=generator)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_unsupported_model_is_named():
    class Plain(torch.nn.Module):
        pass

    assert not supports_loop(Plain())
    with pytest.raises(UnsupportedModelError, match=r"Plain.*generation_backend='generate'"):
        decode(Plain(), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), 2, [], 0)


def test_fallback_warning_once(caplog):
    class Odd(torch.nn.Module):
        pass

    with caplog.at_level("WARNING", logger="lowmem_es"):
        decode_module.warn_fallback(Odd())
        decode_module.warn_fallback(Odd())
    assert sum("Odd does not support" in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------ robustness


def test_cache_keyword_follows_the_forward_signature():
    """transformers 5.24 takes the cache as `cache`, older releases as `past_key_values`;
    passing the wrong name is silently ignored by `**kwargs` (every step then runs
    without the cache), so the loop reads the signature, through wrappers too."""
    import functools

    class New:
        def forward(self, input_ids=None, cache=None, **kwargs):
            pass

    class Old:
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            pass

    class Wrapped:
        @functools.wraps(New.forward)
        def forward(self, *args, **kwargs):
            pass

    class Neither:
        def forward(self, input_ids=None, **kwargs):
            pass

    keyword = decode_module._cache_keyword
    assert (keyword(New), keyword(Old), keyword(Wrapped), keyword(Neither)) == (
        "cache", "past_key_values", "cache", None)


def test_model_taking_past_key_values_decodes_the_same(setup):
    """A model class whose forward names the cache `past_key_values` (transformers
    before 5.24) gets the cache under that name: the same tokens as the current API."""
    es_model, tokenizer, batch = setup
    model = es_model.model
    base_class = type(model)

    class OldApi(base_class):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                    past_key_values=None, use_cache=None, inputs_embeds=None,
                    logits_to_keep=0, **kwargs):
            assert "cache" not in kwargs  # the loop must not pass the new name here
            kwargs[decode_module._cache_keyword(base_class)] = past_key_values
            return base_class.forward(self, input_ids=input_ids,
                                      attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=use_cache,
                                      inputs_embeds=inputs_embeds,
                                      logits_to_keep=logits_to_keep, **kwargs)

    args = (batch["input_ids"], batch["attention_mask"], 6, [tokenizer.eos_token_id],
            tokenizer.pad_token_id)
    with es_model.population(5, 1, 0.3, MEMBERS, [(2, 4), (0, 4), (1, 4)]):
        expected = decode(model, *args)
        model.__class__ = OldApi
        try:
            assert decode_module._cache_keyword(OldApi) == "past_key_values"
            old = decode(model, *args)
        finally:
            model.__class__ = base_class
    assert torch.equal(old, expected)


def test_zero_new_tokens_and_empty_prompts(setup):
    es_model, tokenizer, batch = setup
    stats = DecodeStats()
    out = decode(es_model.model, batch["input_ids"], batch["attention_mask"], 0,
                 [tokenizer.eos_token_id], tokenizer.pad_token_id, stats=stats)
    assert out.shape == (batch["input_ids"].shape[0], 0) and stats.steps == 0
    with pytest.raises(ValueError, match="non-negative integer"):
        decode(es_model.model, batch["input_ids"], batch["attention_mask"], -1,
               [tokenizer.eos_token_id], tokenizer.pad_token_id)
    empty = batch["input_ids"][:, :0]
    with pytest.raises(ValueError, match="every prompt is empty"):
        decode(es_model.model, empty, batch["attention_mask"][:, :0], 3,
               [tokenizer.eos_token_id], tokenizer.pad_token_id)


def test_positions_kept_restores_counters_when_a_step_fails_part_way(setup):
    """A warm-up or capture step that raises after some layers wrote their slot must
    not leave those layers one position ahead (the eager fallback would then write
    every later token one slot too far)."""
    from lowmem_es.kv_cache import make_static_cache

    es_model, _, batch = setup
    model = es_model.model
    cache = make_static_cache(model.config, batch["input_ids"].shape[1] + 4)
    mask = torch.zeros(batch["input_ids"].shape[0], batch["input_ids"].shape[1] + 4,
                       dtype=batch["attention_mask"].dtype)
    mask[:, :batch["input_ids"].shape[1]] = batch["attention_mask"]
    positions = (batch["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
    decode_module._prefill(model, cache, batch["input_ids"], mask, positions, 0)
    before = [int(layer.cumulative_length) for layer in cache.layers]
    with pytest.raises(RuntimeError, match="out of memory half-way"):
        with decode_module._positions_kept(cache):
            cache.layers[0].cumulative_length += 1  # the first layer wrote its slot
            raise RuntimeError("out of memory half-way")
    assert [int(layer.cumulative_length) for layer in cache.layers] == before


def test_only_plain_static_layers_are_capturable(tiny_llama_dir):
    """Full-attention static layers (and their int8 form) can be captured; a sliding-
    window layer keeps Python-side state and rolls its buffer, so it runs eagerly."""
    from transformers import AutoConfig, MistralConfig

    from lowmem_es.kv_cache import make_static_cache

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    assert decode_module.capturable(make_static_cache(config, 16))
    assert decode_module.capturable(make_static_cache(config, 16, "int8"))
    sliding = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, sliding_window=6)
    cache = make_static_cache(sliding, 16)
    assert any(type(layer).__name__ != "StaticLayer" for layer in cache.layers)
    assert not decode_module.capturable(cache)


# ------------------------------------------------------------------ CUDA graph capture


@pytest.mark.skipif(not INTERPRETED, reason="simulates capture with the kernels in the "
                    "interpreter (TRITON_INTERPRET=1); on a GPU, test_model.py captures for real")
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_captured_decode_replays_the_eager_tokens(model_type, tiny_llama_dir, tiny_qwen2_dir,
                                                   monkeypatch):
    """The decode step as the GPU runs it (fused noisy-LoRA and NF4 kernels, captured
    once, replayed each step), simulated on CPU: the recording of the step replays to
    the eager loop's tokens for mixed members, ragged prompts and rows stopping at
    different steps, and the step has no host sync (a real capture would refuse it).
    Replay re-runs the recorded ops and kernel launches, not the Python: any per-step
    state kept in Python would be frozen at its capture value and change the tokens.
    (Llama with the 16-bit cache, Qwen2 with the int8 one: the interpreter is slow.)"""
    from capture_sim import simulated_capture

    from lowmem_es import backends
    from lowmem_es.kernels import nf4_matmul

    # A fresh model: once bitsandbytes' CPU path has run a layer, it has repacked the
    # weight for AVX512, which the NF4 kernel does not read.
    path = tiny_llama_dir if model_type == "llama" else tiny_qwen2_dir
    es_model, tokenizer, batch = es_model_and_batch(path, ["q_proj", "v_proj", "o_proj"],
                                                    PROMPTS * 3)
    kv_cache_dtype = "auto" if model_type == "llama" else "int8"
    backends.set_force(backends.NOISY_LORA, "kernel")
    backends.set_force(backends.NF4_MATMUL, "kernel")
    launches = {"nf4": 0}
    original = nf4_matmul.nf4_matmul_triton

    def counted(*args, **kwargs):
        launches["nf4"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(nf4_matmul, "nf4_matmul_triton", counted)
    args = (batch["input_ids"], batch["attention_mask"], 7)
    with es_model.population(5, 1, 0.3, MEMBERS, [(2, 4), (0, 4), (1, 4)]):
        eager_stats, captured_stats = DecodeStats(), DecodeStats()
        free = decode(es_model.model, *args, [], tokenizer.pad_token_id,
                      kv_cache_dtype=kv_cache_dtype, stats=eager_stats)
        rows = free.tolist()
        firsts = {t: {r.index(t) for r in rows if t in r} for r in rows for t in r}
        eos = max(firsts, key=lambda t: (len(firsts[t]), -min(firsts[t])))  # ragged stops
        with simulated_capture(monkeypatch, decode_module) as graphs:
            captured = decode(es_model.model, *args, [eos], tokenizer.pad_token_id,
                              kv_cache_dtype=kv_cache_dtype, capture=True,
                              stats=captured_stats)
    # The eager tokens with this EOS: each row's free run up to its first EOS, then padding.
    eager = free.clone()
    for row, tokens in enumerate(rows):
        if eos in tokens:
            eager[row, tokens.index(eos) + 1:] = tokenizer.pad_token_id
    assert len({r.index(eos) for r in rows if eos in r}) > 1
    assert launches["nf4"] > 0  # the NF4 kernel ran inside the step
    assert captured_stats.captured and not eager_stats.captured
    assert len(graphs) == 1
    graph = graphs[0]
    assert graph.syncs == []
    assert graph.launches >= 2 * 3 + 3  # shrink + expand per LoRA layer, the NF4 bases
    assert graph.replays == captured_stats.steps - 1 > 1
    assert torch.equal(captured, eager)


def test_simulated_capture_sees_syncs_and_python_state(monkeypatch):
    """The simulation fails a step the way a real capture would: a host sync is listed,
    and state kept in Python is frozen at its capture value on replay."""
    from capture_sim import SimulatedGraph

    counter = {"step": 0}
    x = torch.zeros(3)
    out = torch.zeros(3)

    def step():
        counter["step"] += 1
        out.copy_(x + counter["step"])  # Python-side state: baked in by capture
        if x.sum().item() > 5:  # a host sync
            pass

    graph = SimulatedGraph()
    with graph.capture():
        step()
    assert any("_local_scalar_dense" in s or "Tensor.item" in s for s in graph.syncs)
    x.fill_(10.0)
    graph.replay()
    assert out.tolist() == [11.0] * 3  # the input buffer is read again: 10 + 1
    step()
    assert out.tolist() == [12.0] * 3  # eager would have moved on; the replay did not
