"""Model loading extras: the input embedding kept in CPU memory (profile ``embedding_on_cpu``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import es_model_and_batch

from lowmem_es import decode as decode_module
from lowmem_es.decode import decode
from lowmem_es.es import Member
from lowmem_es.lora import attach_es_lora
from lowmem_es.model import (
    OffloadedEmbedding,
    load_model,
    offload_input_embedding,
    offloaded_embedding,
    restore_input_embedding,
)
from lowmem_es.trainer import ESTrainer

PROMPTS = ["sun 1:", "a much longer prompt here 2:", "x", "rain 33:"]
MEMBERS = [Member(0, 1), Member(0, -1)]


def _es_model(path):
    return es_model_and_batch(path, ["q_proj", "v_proj"], PROMPTS * 2, seed=1)


def _generate(es_model, tokenizer, batch, loop: bool):
    with es_model.population(7, 2, 0.3, MEMBERS, [(0, 4), (1, 4)]):
        if loop:
            return decode(es_model.model, batch["input_ids"], batch["attention_mask"], 10,
                          [tokenizer.eos_token_id], tokenizer.pad_token_id)
        out = es_model.model.generate(**batch, max_new_tokens=10, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
        return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_offloaded_embedding_gives_the_same_tokens_and_hides_the_weight(
        which, tiny_llama_dir, tiny_qwen2_dir):
    path = tiny_llama_dir if which == "llama" else tiny_qwen2_dir
    es_model, tokenizer, batch = _es_model(path)
    model = es_model.model
    with torch.no_grad():
        model(**batch)  # bitsandbytes repacks CPU weights at the first forward: warm up
        logits_before = model(**batch).logits
    loop_before = _generate(es_model, tokenizer, batch, loop=True)
    generate_before = _generate(es_model, tokenizer, batch, loop=False)
    weight = model.get_input_embeddings().weight
    params_before = sum(p.numel() for p in model.parameters())

    assert offload_input_embedding(model, "cpu") is True
    embedding = offloaded_embedding(model)
    assert isinstance(embedding, OffloadedEmbedding)
    assert torch.equal(embedding.weight, weight)
    # The host weight is not a parameter, not in the state dict, not moved by .to().
    assert sum(p.numel() for p in model.parameters()) == params_before - weight.numel()
    assert next(model.parameters()).device.type == "cpu"
    # (state_dict() would say the same, but on CPU bitsandbytes' state_dict undoes its
    # inference repacking, which changes the rounding of the next forward.)
    assert not any("embed_tokens" in name for name, _ in
                   [*model.named_parameters(), *model.named_buffers()])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_before)
    assert torch.equal(_generate(es_model, tokenizer, batch, loop=True), loop_before)
    assert torch.equal(_generate(es_model, tokenizer, batch, loop=False), generate_before)
    assert offload_input_embedding(model, "cpu") is False  # already offloaded: a no-op
    assert restore_input_embedding(model) is True
    assert model.get_input_embeddings().weight is not None
    assert offloaded_embedding(model) is None and restore_input_embedding(model) is False
    assert sum(p.numel() for p in model.parameters()) == params_before
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_before)


def test_tied_embedding_is_left_in_place(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with caplog.at_level("INFO", logger="lowmem_es"):
        assert offload_input_embedding(model, "cpu") is False
    assert offloaded_embedding(model) is None
    assert "tied to lm_head" in caplog.text


def test_load_model_ignores_embedding_on_cpu_off_cuda(tiny_llama_dir):
    model, _, device = load_model(tiny_llama_dir, device="cpu", embedding_on_cpu=True)
    assert device.type == "cpu"
    assert offloaded_embedding(model) is None  # everything is in CPU memory already


def test_captured_step_feeds_the_graph_embedded_rows(tiny_llama_dir):
    """With the embedding offloaded, a captured step takes inputs_embeds: the ids are
    looked up on the host and copied into the graph's static buffer before each replay.
    (The CUDA graph itself is replaced by a recorder: no GPU here.)"""
    model, _, _ = load_model(tiny_llama_dir)
    offload_input_embedding(model, "cpu")
    embed = offloaded_embedding(model)
    embeds = torch.zeros(3, 1, embed.embedding_dim)
    positions = torch.zeros(3, 1, dtype=torch.long)
    seen = []
    graph = SimpleNamespace(replay=lambda: seen.append((embeds.clone(), positions.clone())))
    step = decode_module._CapturedStep(graph, torch.zeros(3, 1, dtype=torch.long), positions,
                                       torch.zeros(3, 50), embed, embeds)
    tokens = torch.tensor([[4], [9], [1]])
    step(tokens, torch.tensor([[5], [6], [7]]), 0)
    assert len(seen) == 1
    assert torch.equal(seen[0][0], embed(tokens))
    assert seen[0][1].flatten().tolist() == [5, 6, 7]


def test_trainer_reads_embedding_on_cpu_from_the_profile(tmp_path, tiny_llama_dir,
                                                         monkeypatch):
    """The trainer hands the profile's embedding_on_cpu to the loader (which ignores it
    off CUDA): captured here at the load_model call."""
    from lowmem_es import trainer as trainer_module
    from lowmem_es.config import ESConfig
    from lowmem_es.profiles import profile_dir
    from lowmem_es.rewards import target_fraction

    profile = tmp_path / "card.toml"
    text = (profile_dir() / "8gb.toml").read_text().replace("embedding_on_cpu = false",
                                                            "embedding_on_cpu = true")
    profile.write_text(text)

    class Loaded(Exception):
        pass

    def reads(name):
        seen = {}

        def fake_load(*args, **kwargs):
            seen.update(kwargs)
            raise Loaded

        monkeypatch.setattr(trainer_module, "load_model", fake_load)
        args = ESConfig(profile=name, output_dir=str(tmp_path / "run"), device="cpu")
        with pytest.raises(Loaded):
            ESTrainer(str(tiny_llama_dir), [target_fraction],
                      train_dataset=[{"prompt": "a", "target": "a"}], args=args)
        return seen["embedding_on_cpu"]

    assert reads(str(profile)) is True
    assert reads("24gb") is False
    assert reads(None) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_frees_vram_and_capture_matches_eager(tiny_llama_dir):
    es_model, tokenizer, batch = _es_model(tiny_llama_dir)
    device = torch.device("cuda")
    model, _, _ = load_model(tiny_llama_dir, device="cuda")
    es_model = attach_es_lora(model, ["q_proj", "v_proj"], 4, 8.0, seed=0)
    batch = {k: v.to(device) for k, v in batch.items()}
    eager = _generate_cuda(es_model, tokenizer, batch, capture=False)
    before = torch.cuda.memory_allocated()
    assert offload_input_embedding(model, device) is True
    assert torch.cuda.memory_allocated() < before
    assert offloaded_embedding(model).weight.device.type == "cpu"
    assert torch.equal(_generate_cuda(es_model, tokenizer, batch, capture=True), eager)


def _generate_cuda(es_model, tokenizer, batch, capture):
    stats = decode_module.DecodeStats()
    with es_model.population(7, 2, 0.3, MEMBERS, [(0, 4), (1, 4)]):
        out = decode(es_model.model, batch["input_ids"], batch["attention_mask"], 10,
                     [tokenizer.eos_token_id], tokenizer.pad_token_id, capture=capture,
                     stats=stats)
    assert stats.captured == capture
    return out


# ------------------------------------------------------------------ device and path


@pytest.fixture()
def two_gpus(monkeypatch):
    """Pretend CUDA is there with two cards, current device 0 (no tensor is made)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_each_torchrun_rank_takes_its_own_gpu(two_gpus, monkeypatch):
    """Under torchrun 'auto' and 'cuda' mean cuda:LOCAL_RANK: a fixed cuda:0 would load
    every rank's model onto one card (and NCCL refuses duplicate GPUs)."""
    from lowmem_es.model import resolve_device

    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but this machine has 2 CUDA"):
        resolve_device("auto")


def test_cuda_index_must_exist(two_gpus):
    from lowmem_es.model import resolve_device

    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:5' but this machine has 2 CUDA device"):
        resolve_device("cuda:5")


@pytest.mark.parametrize("name", ["tpu", "mps", "cuda:x", "gpu", "cpu:0"])
def test_unknown_device_name_is_a_value_error(name):
    """`lowmem-es eval --device tpu` reached torch.device unchecked: a RuntimeError
    traceback for 'tpu' or 'cuda:x', a device the model never loads onto for 'mps'."""
    from lowmem_es.model import resolve_device

    with pytest.raises(ValueError) as caught:
        resolve_device(name)
    assert str(caught.value) == ("`device` should be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a "
                                 f"GPU index such as 0), but the value passed is {name!r}")


@pytest.mark.parametrize("name", ["cuda:128", "cuda:255", "cuda:2147483648"])
def test_cuda_index_past_torch_range_must_exist_too(two_gpus, name):
    """torch.device wraps an index past 127 (cuda:128 is cuda:-128, cuda:255 is plain
    'cuda') and cannot parse one past 2**31: the index is checked before it."""
    from lowmem_es.model import resolve_device

    with pytest.raises(ValueError, match=rf"'{name}' but this machine has 2 CUDA device"):
        resolve_device(name)


def test_home_relative_model_path_loads(tiny_llama_dir, tmp_path, monkeypatch):
    """'~/...' is expanded for loading too, not only for the existence check."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny").symlink_to(tiny_llama_dir, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    model, tokenizer, device = load_model("~/models/tiny")
    assert device.type == "cpu" and tokenizer.padding_side == "left"
    assert model.config.num_hidden_layers >= 1
