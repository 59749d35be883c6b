"""PEFT adapter directories (lowmem_es/adapter_io.py): round trips, refusals, atomic saves."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LORA_TARGETS as TARGETS
from tiny_models import save_random_adapter

from lowmem_es import adapter_io
from lowmem_es.adapter_io import ADAPTER_WEIGHTS, adapter_settings
from lowmem_es.lora import attach_es_lora
from lowmem_es.model import load_model


def test_replay_tensors_round_trip_without_a_model(es_model, tmp_path):
    """What replay reads and writes (no model loaded) is what the model saved, and the
    tensor ids it derives from the names are the model's own."""
    model, _ = es_model
    path = model.save_adapter(tmp_path / "adapter")
    params = adapter_io.adapter_params(path)
    assert sorted(params) == sorted(model.parameters())
    assert all(torch.equal(params[n], t) for n, t in model.parameters().items())
    assert adapter_io.param_tensor_ids(params) == model.tensor_ids()
    params = {n: t + 1.0 for n, t in params.items()}
    out = adapter_io.write_adapter_tensors(params, path, tmp_path / "replayed")
    model.load_adapter(out)
    assert all(torch.equal(params[n], t) for n, t in model.parameters().items())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\].*replaces the whole"):
        adapter_io.write_adapter_tensors(params, path, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


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


def test_load_adapter_refuses_tensors_of_layers_the_model_lacks(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if ".layers.0." in k)
    tensors[key.replace(".layers.0.", ".layers.99.")] = tensors[key].clone()  # a deeper model
    save_file(tensors, str(weights))
    base, _, _ = load_model(tiny_llama_dir)
    es_model = attach_es_lora(base, ["q_proj", "v_proj"], 4, 8.0)
    before = {name: t.clone() for name, t in es_model.parameters().items()}
    with pytest.raises(ValueError, match=r"no LoRA layer for, e.g. '.*layers\.99\."):
        es_model.load_adapter(adapter)
    assert all(torch.equal(before[name], t) for name, t in es_model.parameters().items())


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("r"), r"has r=None; it must be a positive number"),
    (lambda c: c.update(target_modules=None), r"has target_modules=None; it must be a "
                                              r"non-empty list"),
    (lambda c: c.update(lora_alpha=None), r"has lora_alpha=None; it must be a positive"),
    (None, r"adapter_config.json' is not valid JSON"),
])
def test_adapter_settings_errors_name_the_file_and_field(tiny_llama_dir, tmp_path, change,
                                                         message):
    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter")
    config_file = adapter / "adapter_config.json"
    if change is None:
        config_file.write_text("{not json")
    else:
        config = json.loads(config_file.read_text())
        change(config)
        config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as caught:
        adapter_settings(adapter)
    assert str(config_file) in str(caught.value)


def test_save_adapter_refuses_a_directory_with_other_files(tiny_llama_dir, tmp_path):
    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    base, _, _ = load_model(str(tiny_llama_dir))
    es_model = attach_es_lora(base, ["q_proj"], rank=2, alpha=4.0)
    target = tmp_path / "dir"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        es_model.save_adapter(target)
    assert (target / "notes.txt").read_text() == "keep"
    es_model.save_adapter(tmp_path / "fresh")
    es_model.save_adapter(tmp_path / "fresh")  # replacing an adapter directory is fine
