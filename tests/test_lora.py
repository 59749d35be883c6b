"""ES-LoRA layer: PEFT equivalence at sigma = 0, per-row member perturbations, adapter I/O."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem_es import noise, noise_batch
from lowmem_es.adapter_io import ADAPTER_WEIGHTS
from lowmem_es.lora import ESLoraLinear, Member, PopulationSlot, attach_es_lora
from lowmem_es.model import load_model

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture()
def es_model(tiny_llama_dir):
    model, tokenizer, _ = load_model(tiny_llama_dir)
    es_model = attach_es_lora(model, TARGETS, rank=4, alpha=8.0, seed=0,
                              base_model_name_or_path=str(tiny_llama_dir))
    # B starts at zero; give the adapter some weight so LoRA changes the output.
    generator = torch.Generator().manual_seed(123)
    for tensor in es_model.parameters().values():
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return es_model, tokenizer


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


def test_adapter_round_trip_and_errors(es_model, tiny_llama_dir, tmp_path):
    model, _ = es_model
    path = model.save_adapter(tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    base, _, _ = load_model(tiny_llama_dir)
    other = attach_es_lora(base, TARGETS, rank=4, alpha=8.0, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters().values(),
                                                      other.parameters().values(), strict=True))
    other.load_adapter(path)
    for a, b in zip(model.parameters().values(), other.parameters().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS):
        other.load_adapter(tmp_path / "nowhere")
    base, _, _ = load_model(tiny_llama_dir)
    wrong_rank = attach_es_lora(base, TARGETS, rank=2, alpha=8.0)
    with pytest.raises(ValueError, match="lora_rank"):
        wrong_rank.load_adapter(path)
    weights = path / ADAPTER_WEIGHTS
    for damage in (weights.read_bytes()[:50], b"\x00" * 64 + b"junk"):  # truncated, garbage
        weights.write_bytes(damage)
        with pytest.raises(ValueError, match=r"not a readable safetensors file.*damaged"):
            other.load_adapter(path)


@pytest.mark.parametrize(("change", "match"), [
    ({"lora_alpha": 16.0}, "lora_alpha=16.0 but this run uses lora_alpha=8.0"),
    ({"use_rslora": True}, "rsLoRA"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 4.0}}, "alpha_pattern"),
    ({"bias": "lora_only"}, "biases"),
], ids=["alpha", "rslora", "rank_pattern", "alpha_pattern", "bias"])
def test_adapter_with_another_scaling_is_refused(es_model, tmp_path, change, match):
    """An adapter this layer would compute differently from PEFT (another alpha, rsLoRA,
    per-layer patterns, LoRA biases) is refused by name instead of loading silently."""
    model, _ = es_model
    path = model.save_adapter(tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(change)
    (path / "adapter_config.json").write_text(json.dumps(config))
    before = [tensor.clone() for tensor in model.parameters().values()]
    with pytest.raises(ValueError, match=match):
        model.load_adapter(path)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters().values(),
                                                  strict=True))


def test_atomic_directory_permissions_subfolders_and_crash_between_renames(tmp_path):
    """The directory gets the umask's permissions (not mkdtemp's 0700), subfolders are
    fine, and a copy set aside by a crash between the two renames is put back."""
    import os

    from safetensors.torch import save_file

    from lowmem_es.atomic import atomic_directory, restore_set_aside

    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "file.txt").write_text("new")
            (tmp / "top.txt").write_text("new")
            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # writes 0600
    finally:
        os.umask(umask)
    out = tmp_path / "out"
    assert (out / "sub" / "file.txt").read_text() == "new"
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "w.safetensors").stat().st_mode & 0o777 == 0o644  # group can read it
    # A crash after the old copy was moved aside and before the new one moved in.
    os.replace(out, tmp_path / ".out.old-12345")
    assert not out.exists()
    assert restore_set_aside(out) and (out / "top.txt").read_text() == "new"
    assert not restore_set_aside(out)  # nothing set aside any more
    os.replace(out, tmp_path / ".out.old-12345")
    with atomic_directory(out) as tmp:  # the next write restores first, then replaces
        (tmp / "top.txt").write_text("newer")
    assert (out / "top.txt").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_is_atomic_on_failure(es_model, tmp_path, monkeypatch):
    """A failure while writing leaves the previous adapter intact and no temp dirs."""
    model, _ = es_model
    path = model.save_adapter(tmp_path / "adapter")
    before = (path / ADAPTER_WEIGHTS).read_bytes()
    for tensor in model.parameters().values():
        tensor.add_(1.0)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lowmem_es.adapter_io.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(path)
    assert (path / ADAPTER_WEIGHTS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


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
