"""bench/same_run.py, the "same result" check: it must pass on equal runs and fail on any
real difference (a changed tensor, fitness or configuration)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "same_run.py"


def _load():
    spec = importlib.util.spec_from_file_location("same_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(out: Path, value: float = 1.0, fitness: float = 0.5) -> Path:
    (out / "adapter").mkdir(parents=True)
    save_file({"w": torch.full((2, 2), value)}, str(out / "adapter" / "adapter_model.safetensors"),
              metadata={"producer": "test"})
    config = {"base_model_name_or_path": str(out / "base-model"),
              "target_modules": ["v_proj", "q_proj"]}
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (out / "journal.jsonl").write_text(json.dumps(
        {"iteration": 0, "fitness": [fitness], "iteration_s": str(out)}) + "\n")
    (out / "run.toml").write_text(f'output_dir = "{out}"\n')
    return out


def test_equal_runs_in_other_directories_are_the_same(tmp_path):
    same_run = _load()
    first = _run(tmp_path / "a")
    second = _run(tmp_path / "b")
    config = json.loads((second / "adapter" / "adapter_config.json").read_text())
    config["target_modules"].reverse()  # PEFT's set order varies by process
    (second / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert same_run.main([str(first), str(second)]) == 0


def test_a_changed_tensor_fitness_or_config_is_found(tmp_path, capsys):
    same_run = _load()
    first = _run(tmp_path / "a")
    assert same_run.main([str(first), str(_run(tmp_path / "b", value=1.0 + 1e-7))]) == 1
    assert "adapter/adapter_model.safetensors (bit for bit): w differs" in capsys.readouterr().out
    assert same_run.main([str(first), str(_run(tmp_path / "c", fitness=0.25))]) == 1
    other = tmp_path / "d"
    shutil.copytree(first, other)
    (other / "run.toml").write_text('output_dir = "elsewhere"\n')
    assert same_run.main([str(first), str(other)]) == 1
