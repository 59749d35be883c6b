"""The static-cache decode loop: same greedy tokens as generate(), fixed cache, sampling."""

from __future__ import annotations

import pytest
import torch
from tiny_models import es_model_and_batch

from lowmem_es import decode as decode_module
from lowmem_es.decode import DecodeStats, UnsupportedModelError, decode, supports_loop
from lowmem_es.lora import Member

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
