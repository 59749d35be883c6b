"""ES-LoRA layer: PEFT equivalence at sigma = 0, per-row member perturbations, adapter I/O."""

from __future__ import annotations

import pytest
import torch
from conftest import LORA_TARGETS as TARGETS

from lowmem_es import noise, noise_batch
from lowmem_es.es import Member
from lowmem_es.lora import ESLoraLinear, PopulationSlot, attach_es_lora
from lowmem_es.model import load_model


def _inputs(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_layers_replace_targets_and_are_frozen(es_model):
    model, _ = es_model
    assert len(model.layers) == 2 * len(TARGETS)  # 2 decoder layers
    assert all(name.rpartition(".")[2] in TARGETS for name in model.layers)
    assert not any(p.requires_grad for p in model.model.parameters())
    assert all(t.dtype == torch.float32 for t in model.parameters().values())
    import bitsandbytes as bnb

    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in model.layers.values())


def test_sigma_zero_and_no_population_match_peft(es_model, tiny_llama_dir, tmp_path):
    from peft import PeftModel

    model, tokenizer = es_model
    batch = _inputs(tokenizer, ["sun 1:", "a longer prompt 22:"])
    with torch.no_grad():
        ours = model.model(**batch).logits
        members = [Member(0, 1), Member(0, -1)]
        with model.population(7, 3, 0.0, members, [(0, 1), (1, 1)]):
            ours_sigma0 = model.model(**batch).logits
    model.save_adapter(tmp_path / "adapter")
    base, _, _ = load_model(tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_sigma0, theirs, atol=1e-5, rtol=1e-5)


def _reference_layer_output(layer: ESLoraLinear, x, run_seed, iteration, sigma, member):
    """Dense reference: materialise A + s sigma eps and B + s sigma eps for one member."""
    key_a = noise.member_key(run_seed, iteration, member.pair, layer.tensor_id_A)
    key_b = noise.member_key(run_seed, iteration, member.pair, layer.tensor_id_B)
    a = layer.lora_A + member.sign * sigma * noise_batch.noise(key_a, layer.lora_A.shape)
    b = layer.lora_B + member.sign * sigma * noise_batch.noise(key_b, layer.lora_B.shape)
    return layer.base_layer(x) + layer.scaling * (x @ a.t()) @ b.t()


@pytest.mark.parametrize("counts", [(2, 2, 2), (1, 3, 2)])  # equal (bmm) and ragged segments
def test_population_rows_match_dense_reference(es_model, counts):
    model, _ = es_model
    layer = model.layers["model.layers.1.self_attn.v_proj"]
    members = [Member(0, 1), Member(0, -1), Member(5, 1)]
    order = [2, 0, 1]  # members need not appear in index order
    segments = [(m, c) for m, c in zip(order, counts, strict=True)]
    x = torch.randn(sum(counts), 3, layer.lora_A.shape[1],
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.population(11, 4, 0.1, members, segments):
        out = layer(x)
    row = 0
    for index, count in segments:
        expected = _reference_layer_output(layer, x[row:row + count], 11, 4, 0.1, members[index])
        torch.testing.assert_close(out[row:row + count], expected, atol=1e-5, rtol=1e-5)
        row += count


def test_member_output_independent_of_batch_mates(es_model):
    """A member's logits are the same alone or batched with other members' rows."""
    model, tokenizer = es_model
    batch = _inputs(tokenizer, ["sun 1:", "rain 2:"])
    members = [Member(0, 1), Member(0, -1), Member(1, 1)]
    both = {k: torch.cat([v, v, v]) for k, v in batch.items()}
    with torch.no_grad():
        with model.population(3, 0, 0.05, members, [(0, 2), (1, 2), (2, 2)]):
            together = model.model(**both).logits
        for index in range(3):
            with model.population(3, 0, 0.05, members, [(index, 2)]):
                alone = model.model(**batch).logits
            torch.testing.assert_close(together[2 * index:2 * index + 2], alone,
                                       atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0:2], together[2:4])  # antithetic twins differ


def test_population_row_count_mismatch_is_an_error(es_model):
    model, tokenizer = es_model
    batch = _inputs(tokenizer, ["sun 1:"])
    with model.population(0, 0, 0.1, [Member(0, 1)], [(0, 2)]), \
            pytest.raises(RuntimeError, match="rows"):
        model.model(**batch)


def test_population_context_restores_and_clears(es_model):
    model, _ = es_model
    with model.population(0, 0, 0.1, [Member(0, 1)], [(0, 1)]):
        assert model.slot.current is not None
    assert model.slot.current is None
    assert all(layer._cache is None for layer in model.layers.values())


def test_tensor_ids_stable_and_distinct(es_model):
    model, _ = es_model
    ids = model.tensor_ids()
    assert len(set(ids.values())) == len(ids)
    name = "model.layers.0.self_attn.q_proj"
    assert ids[f"{name}.lora_A"] == noise.tensor_id(name, "A")
    assert ids[f"{name}.lora_A"] == noise.tensor_id(f"base_model.model.{name}", "A")


def test_unknown_target_module_is_named(tiny_llama_dir):
    model, _, _ = load_model(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"`lora_target_modules`.*qq_proj.*valid names"):
        attach_es_lora(model, ["q_proj", "qq_proj"], rank=4, alpha=8.0)


def test_init_is_seeded_and_leaves_global_rng(tiny_llama_dir):
    state = torch.random.get_rng_state()
    first = attach_es_lora(load_model(tiny_llama_dir)[0], TARGETS, 4, 8.0, seed=5)
    second = attach_es_lora(load_model(tiny_llama_dir)[0], TARGETS, 4, 8.0, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.parameters().values(), second.parameters().values(), strict=True):
        assert torch.equal(a, b)


def test_slot_is_shared():
    slot = PopulationSlot()
    base = torch.nn.Linear(8, 6)
    layer = ESLoraLinear(base, "x.q_proj", torch.zeros(2, 8), torch.zeros(6, 2), 1.0, slot)
    x = torch.randn(1, 8)
    torch.testing.assert_close(layer(x), base(x))


def test_noise_scales_scale_each_tensors_noise(es_model):
    """set_noise_scales: member m runs A + s sigma c_A eps_A and B + s sigma c_B eps_B."""
    model, _ = es_model
    name = "model.layers.1.self_attn.v_proj"
    layer = model.layers[name]
    scales = {key: 1.0 for key in model.parameters()}
    scales[f"{name}.lora_A"], scales[f"{name}.lora_B"] = 0.25, 3.0
    members = [Member(0, 1), Member(0, -1)]
    x = torch.randn(2, 3, layer.lora_A.shape[1], generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            with model.population(11, 4, 0.1, members, [(0, 1), (1, 1)]):
                plain = layer(x)
            model.set_noise_scales(scales)
            assert model.noise_scales() == scales
            with model.population(11, 4, 0.1, members, [(0, 1), (1, 1)]):
                scaled = layer(x)
        key_a = noise.member_key(11, 4, 0, layer.tensor_id_A)
        key_b = noise.member_key(11, 4, 0, layer.tensor_id_B)
        for row, sign in enumerate((1, -1)):
            a = layer.lora_A + sign * 0.1 * 0.25 * noise_batch.noise(key_a, layer.lora_A.shape)
            b = layer.lora_B + sign * 0.1 * 3.0 * noise_batch.noise(key_b, layer.lora_B.shape)
            expected = layer.base_layer(x[row]) + layer.scaling * (x[row] @ a.t()) @ b.t()
            torch.testing.assert_close(scaled[row], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain, scaled)
        with pytest.raises(ValueError, match="every LoRA tensor"):
            model.set_noise_scales({f"{name}.lora_A": 1.0})
    finally:
        model.set_noise_scales(None)
    assert set(model.noise_scales().values()) == {1.0}
