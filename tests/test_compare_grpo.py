"""Fast tests of bench/compare_grpo.py's pure parts: budget accounting, options, the table.

Nothing here trains or loads a model. The script is loaded from its file (bench/ is not
a package); importing it must not import TRL, torch or transformers, because CI installs
no TRL and the driver process should stay light. The one TRL-dependent test is skipped
when TRL is not installed.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compare_grpo.py"


@pytest.fixture(scope="module")
def cg():
    spec = importlib.util.spec_from_file_location("compare_grpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_grpo"] = module  # dataclasses look the module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("compare_grpo", None)


def test_no_heavy_imports_at_module_level():
    tree = ast.parse(SCRIPT.read_text())
    heavy = {"trl", "torch", "transformers", "peft", "datasets", "bitsandbytes", "lowmem_es"}
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not top & heavy, f"module-level imports of {sorted(top & heavy)}"


def test_both_sides_generate_the_same_completions_per_step(cg):
    assert cg.completions_per_step("es") == 8 * 16
    assert cg.completions_per_step("grpo") == 16 * 8
    with pytest.raises(ValueError, match="unknown side"):
        cg.completions_per_step("ppo")


def test_steps_for_budget_rounds_down_to_whole_steps(cg):
    assert cg.steps_for_budget(1024, 128) == 8
    assert cg.steps_for_budget(1100, 128) == 8
    assert cg.steps_for_budget(128, 128) == 1
    with pytest.raises(ValueError, match="--budget 100"):
        cg.steps_for_budget(100, 128)
    with pytest.raises(ValueError, match="positive"):
        cg.steps_for_budget(100, 0)


@pytest.mark.parametrize(("steps", "points", "expected"), [
    (8, 4, [2, 4, 6, 8]), (24, 4, [6, 12, 18, 24]), (3, 4, [1, 2, 3]), (1, 4, [1]),
    (10, 3, [3, 7, 10]), (5, 1, [5])])
def test_checkpoint_steps_are_spread_and_end_at_the_last_step(cg, steps, points, expected):
    assert cg.checkpoint_steps(steps, points) == expected


def test_checkpoint_steps_rejects_nonsense(cg):
    with pytest.raises(ValueError):
        cg.checkpoint_steps(0, 4)
    with pytest.raises(ValueError):
        cg.checkpoint_steps(4, 0)


def test_run_names(cg):
    assert cg.run_name("es", 0.01) == "es_lr0.01"
    assert cg.run_name("grpo", 5e-5) == "grpo_lr5e-05"
    # An ES run's schedule is part of its name unless constant (runs never overwrite each
    # other across schedules); GRPO's is always TRL's linear decay, so never named.
    assert cg.run_name("es", 0.02, "cosine") == "es_lr0.02_cosine"
    assert cg.run_name("es", 0.02, "constant") == "es_lr0.02"
    assert cg.run_name("grpo", 5e-4, "linear") == "grpo_lr0.0005"


def test_parse_args_defaults(cg):
    args = cg.parse_args([])
    assert args.sides == ["es", "grpo"]
    assert args.es_lr == [0.005, 0.01, 0.02]
    assert args.grpo_lr == [1e-5, 5e-5, 2e-4]
    assert args.budget == 1024 and args.points == 4 and args.threads == 1
    assert args.grpo_micro_batch == 16 and args.grpo_gradient_checkpointing is True


def test_parse_args_options(cg):
    args = cg.parse_args(["--sides", "grpo", "--grpo-lr", "1e-4,3e-4", "--budget", "256",
                          "--no-grpo-gradient-checkpointing", "--grpo-micro-batch", "32"])
    assert args.sides == ["grpo"] and args.grpo_lr == [1e-4, 3e-4]
    assert args.grpo_gradient_checkpointing is False and args.grpo_micro_batch == 32


@pytest.mark.parametrize("argv", [
    ["--sides", "ppo"], ["--es-lr", "-0.01"], ["--es-lr", "abc"], ["--budget", "100"],
    ["--budget", "0"], ["--points", "0"], ["--threads", "0"], ["--grpo-micro-batch", "24"],
    ["--eval-limit", "0"]])
def test_parse_args_rejects_bad_values(cg, argv, capsys):
    with pytest.raises(SystemExit) as raised:
        cg.parse_args(argv)
    assert raised.value.code == 2
    assert "error" in capsys.readouterr().err


def _spec(**overrides):
    spec = {"device": "cpu", "micro_batch": 16, "run_dir": "/tmp/x", "learning_rate": 5e-5,
            "steps": 8, "gradient_checkpointing": True, "seed": 0}
    spec.update(overrides)
    return spec


def test_grpo_config_kwargs_keep_one_group_of_128_per_optimizer_step(cg):
    kwargs = cg.grpo_config_kwargs(_spec())
    assert kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"] == 128
    assert kwargs["num_generations"] == 8 and kwargs["max_completion_length"] == 10
    assert kwargs["max_steps"] == 8 and kwargs["report_to"] == "none"
    assert kwargs["use_cpu"] is True and kwargs["bf16"] is False
    assert cg.grpo_config_kwargs(_spec(micro_batch=32))["gradient_accumulation_steps"] == 4
    with pytest.raises(ValueError, match="divide"):
        cg.grpo_config_kwargs(_spec(micro_batch=24))


def test_grpo_config_accepts_the_arguments(cg, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (bench extra)")
    config = trl.GRPOConfig(**cg.grpo_config_kwargs(_spec(run_dir=str(tmp_path))))
    assert config.generation_batch_size == 128  # 16 prompts x 8 generations per step
    assert config.steps_per_generation == config.gradient_accumulation_steps
    assert config.beta == 0.0 and config.num_iterations == 1


def _results():
    def metrics(acc, formed=0.8):
        return {"accuracy": acc, "accuracy_well_formed": acc / formed, "well_formed": formed}

    def run(side, lr, acc, transfer):
        return {"side": side, "learning_rate": lr, "completions": 1024,
                "train_seconds": 100.0, "train_cpu_seconds": 90.0,
                "completions_per_second": 10.24, "peak_rss_mb": 1700.0,
                "peak_cuda_mb": None,
                "curve": [{"step": 4, "completions": 512, "eval": metrics(acc / 2)},
                          {"step": 8, "completions": 1024, "eval": metrics(acc)}],
                "final": {"eval": metrics(acc), "transfer": metrics(transfer)}}

    return {"base": {"eval": metrics(0.178), "transfer": metrics(0.112)},
            "runs": {"grpo_lr5e-05": run("grpo", 5e-5, 0.30, 0.20),
                     "es_lr0.02": run("es", 0.02, 0.25, 0.10),
                     "es_lr0.01": run("es", 0.01, 0.40, 0.15),
                     "grpo_lr1e-05": run("grpo", 1e-5, 0.20, 0.25)}}


def test_best_per_side_uses_eval_accuracy(cg):
    best = cg.best_per_side(cg.table_rows(_results()))
    assert best["es"].name == "es_lr0.01"
    assert best["grpo"].name == "grpo_lr5e-05"  # not the run with the best transfer


def test_format_table(cg):
    lines = cg.format_table(_results()).splitlines()
    assert lines[0].startswith("| run | side | lr |")
    assert lines[2].startswith("| base model |") and "0.178" in lines[2] and "0.112" in lines[2]
    names = [line.split("|")[1].strip().strip("*") for line in lines[3:]]
    assert names == ["es_lr0.01", "es_lr0.02", "grpo_lr1e-05", "grpo_lr5e-05"]
    bold = [line for line in lines[3:] if line.startswith("| **")]
    assert len(bold) == 2 and "**0.400**" in bold[0] and "**0.300**" in bold[1]
    es_line = [cell.strip() for cell in lines[3].split("|")]
    assert es_line[4] == "1024" and es_line[9] == "100" and es_line[10] == "90"
    assert es_line[11] == "10.24" and es_line[12] == "1700" and es_line[13] == "-"


def test_format_table_without_final_numbers(cg):
    results = {"runs": {"es_lr0.01": {"side": "es", "learning_rate": 0.01}}}
    line = cg.format_table(results).splitlines()[-1]
    assert line.startswith("| es_lr0.01 |") and "| - |" in line
    assert cg.best_per_side(cg.table_rows(results)) == {}


def test_format_curves_starts_at_the_base_model(cg):
    text = cg.format_curves(_results())
    assert "- es_lr0.01: 0: 0.178, 512: 0.200, 1024: 0.400" in text.splitlines()


def test_results_round_trip(cg, tmp_path):
    path = tmp_path / "sub" / "results.json"
    assert cg.load_results(path) == {"runs": {}}
    cg.save_results(path, _results())
    assert json.loads(path.read_text()) == _results()
    assert cg.load_results(path) == _results()
    assert not list(path.parent.glob("*.tmp"))


def test_plot_is_written(cg, tmp_path):
    pytest.importorskip("matplotlib")
    path = cg.plot_curves(_results(), tmp_path / "plot.png")
    assert path is not None and path.stat().st_size > 1000


def test_random_model_excludes_model(cg, capsys):
    with pytest.raises(SystemExit):
        cg.parse_args(["--random-model", "--model", "some/dir"])
    assert "exclude each other" in capsys.readouterr().err


def _write_run(root, side, lr, accuracies):
    run_dir = root / cg_name(side, lr)
    run_dir.mkdir(parents=True)
    steps = 2 * len(accuracies)
    (run_dir / "train_spec.json").write_text(json.dumps(
        {"side": side, "learning_rate": lr, "steps": steps}))
    (run_dir / "train.json").write_text(json.dumps(
        {"train_seconds": 64.0, "train_cpu_seconds": 50.0, "peak_rss_mb": 1500.0,
         "rss_after_load_mb": 800.0, "peak_rss_train_mb": 1500.0, "peak_cuda_mb": None,
         "checkpoints": [], "train_log": []}))
    points = [{"step": 2 * (i + 1), "completions": 256 * (i + 1),
               "eval": {"accuracy": acc}} for i, acc in enumerate(accuracies)]
    points[-1]["transfer"] = {"accuracy": accuracies[-1] / 2}
    (run_dir / "eval.json").write_text(json.dumps({"points": points}))
    return run_dir


def cg_name(side, lr):
    return f"{side}_lr{lr:g}"


def test_collect_rebuilds_results_from_run_directories(cg, tmp_path):
    cg.save_results(tmp_path / "results.json", {"base": {"eval": {"accuracy": 0.1}},
                                                "runs": {}})
    _write_run(tmp_path, "es", 0.02, [0.2, 0.3])
    _write_run(tmp_path, "grpo", 5e-5, [0.25])
    unfinished = tmp_path / "grpo_lr0.0002"
    unfinished.mkdir()
    (unfinished / "train.json").write_text("{}")  # trained, not yet evaluated: skipped
    results = cg.collect(tmp_path)
    assert sorted(results["runs"]) == ["es_lr0.02", "grpo_lr5e-05"]
    es = results["runs"]["es_lr0.02"]
    assert es["completions"] == 4 * 128 and es["steps"] == 4
    assert es["completions_per_second"] == 8.0 and es["train_cpu_seconds"] == 50.0
    assert [p["eval"]["accuracy"] for p in es["curve"]] == [0.2, 0.3]
    assert es["final"]["transfer"]["accuracy"] == 0.15
    assert results["base"]["eval"]["accuracy"] == 0.1  # kept
    assert cg.load_results(tmp_path / "results.json") == results
