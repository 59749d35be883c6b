"""``lowmem-es eval`` (lowmem_es/cli/eval.py): flags, reports, the same held-out rows as train."""

from __future__ import annotations

import argparse
import json

import pytest
from test_evaluate import ROWS
from tiny_models import save_random_adapter

from lowmem_es.cli.eval import add_eval_parser, run_eval
from lowmem_es.evaluate import evaluate
from lowmem_es.rewards import target_fraction


def _parse(argv):
    parser = argparse.ArgumentParser(prog="lowmem-es")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_cli_eval_json_on_a_jsonl_dataset(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} plus 1:", "solution": f"#### {i + 1}"})
                            + "\n" for i in range(4)))
    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter")
    ns = _parse(["--model", str(tiny_llama_dir), "--adapter", str(adapter), "--dataset",
                 str(data), "--eval-dataset", str(data), "--prompt-field", "question",
                 "--answer-field", "solution", "--max-completion-length", "4", "--json"])
    assert ns.handler is run_eval
    assert run_eval(ns) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] == str(adapter) and report["task"] == "jsonl:d.jsonl"
    eval_split = report["splits"]["eval"]
    assert eval_split["base"]["count"] == eval_split["adapter"]["count"] == 4
    for metrics in eval_split.values():
        assert set(metrics) >= {"accuracy", "mean_reward", "well_formed",
                                "accuracy_well_formed"}


def test_cli_eval_table_and_errors(tiny_llama_dir, tmp_path, capsys):
    ns = _parse(["--model", str(tiny_llama_dir), "--task", "arithmetic", "--limit", "2",
                 "--max-completion-length", "2", "--split", "transfer"])
    assert run_eval(ns) == 0
    out = capsys.readouterr().out
    assert "transfer" in out and "accuracy" in out
    with pytest.raises(ValueError, match=r"--no-base needs --adapter"):
        run_eval(_parse(["--model", str(tiny_llama_dir), "--task", "arithmetic", "--no-base"]))
    with pytest.raises(ValueError, match=r"--limit must be positive, got 0"):
        run_eval(_parse(["--model", str(tiny_llama_dir), "--task", "countdown",
                         "--limit", "0"]))
    with pytest.raises(SystemExit):  # --task and --dataset are exclusive
        _parse(["--task", "arithmetic", "--dataset", "x.jsonl"])


def test_cli_eval_profile_and_kv_cache_flags(tiny_llama_dir, capsys):
    ns = _parse(["--model", str(tiny_llama_dir), "--task", "arithmetic", "--split", "eval",
                 "--limit", "3", "--max-completion-length", "4", "--profile", "cpu",
                 "--kv-cache-dtype", "int8", "--json"])
    assert run_eval(ns) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv_cache_dtype"] == "int8" and report["rows_per_chunk"] >= 1
    assert report["splits"]["eval"]["base"]["count"] == 3


def _capture_evaluate(monkeypatch):
    """Replace ``evaluate`` (as run_eval imports it) by a spy returning an empty report."""
    import lowmem_es.evaluate as evaluate_module

    calls = []

    def spy(model, **kwargs):
        calls.append(dict(kwargs, model=model))
        return {"model": str(model), "adapter": None, "task": kwargs["task"].name,
                "correct_threshold": 1.0, "splits": {}}

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    return calls


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_train_and_eval_hold_out_the_same_jsonl_rows(tiny_llama_dir, tmp_path, monkeypatch):
    import lowmem_es.trainer as trainer_module
    from lowmem_es.cli import build_parser
    from lowmem_es.cli.train import cmd_train

    data = _jsonl(tmp_path / "d.jsonl", [{"q": f"What is {i} + 1?", "answer": str(i + 1)}
                                         for i in range(40)])
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(model, rewards, train_dataset, eval_dataset, **kwargs):
        seen.update(train=train_dataset, eval=eval_dataset)
        raise Stop

    monkeypatch.setattr(trainer_module, "ESTrainer", fake_trainer)
    with pytest.raises(Stop):
        cmd_train(build_parser().parse_args(
            ["train", "--model", str(tiny_llama_dir), "--dataset", str(data),
             "--prompt-field", "q", "--seed", "3", "--output-dir", str(tmp_path / "run")]))
    calls = _capture_evaluate(monkeypatch)
    assert run_eval(_parse(["--model", str(tiny_llama_dir), "--dataset", str(data),
                            "--prompt-field", "q", "--seed", "3"])) == 0
    splits = calls[0]["splits"]
    assert 0 < len(seen["eval"]) < 40
    assert splits["eval"] == seen["eval"] and splits["train"] == seen["train"]
    assert isinstance(splits["eval"][0]["prompt"], str)  # the same prompt format as train


def test_eval_dataset_with_reward_needs_no_answer_field(tiny_llama_dir, tmp_path,
                                                        monkeypatch):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"word {i}:", "target": "a"}
                                         for i in range(10)])
    calls = _capture_evaluate(monkeypatch)
    assert run_eval(_parse(["--model", str(tiny_llama_dir), "--dataset", str(data),
                            "--reward", "target_fraction"])) == 0
    rows = calls[0]["splits"]["train"] + calls[0]["splits"]["eval"]
    assert len(rows) == 10 and all("answer" not in row for row in rows)


def test_eval_without_model_applies_default_options_to_the_default_task_only(
        tiny_llama_dir, tmp_path, monkeypatch):
    from lowmem_es import default_model

    monkeypatch.setattr(default_model, "ensure_default_model", lambda: tiny_llama_dir)
    calls = _capture_evaluate(monkeypatch)
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i} + 1 =", "answer": str(i + 1)}
                                         for i in range(30)])
    assert run_eval(_parse(["--dataset", str(data)])) == 0
    assert run_eval(_parse(["--task", "countdown", "--limit", "2"])) == 0
    assert run_eval(_parse([])) == 0
    assert [call["task"].name for call in calls] == ["jsonl:d.jsonl", "countdown", "arithmetic"]
    assert calls[2]["splits"] == default_model.default_datasets(0)  # the run's own levels
    assert calls[2]["max_completion_length"] == default_model.EVAL_COMPLETION_LENGTH


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], r"unknown task 'nope'"),
    (["--split", "eval", "foo"], r"--split 'foo' is not a split of task 'arithmetic'; its "
                                 r"splits are \['eval', 'train', 'transfer'\]"),
    (["--max-prompt-length", "-3"], r"--max-prompt-length must be positive, got -3"),
    (["--adapter", "/nonexistent/adapter"], r"has no adapter_config.json"),
])
def test_eval_arguments_are_checked_before_converting_the_default(monkeypatch, argv, message):
    from lowmem_es import default_model

    def fail():
        raise AssertionError("converted the default model before checking the arguments")

    monkeypatch.setattr(default_model, "ensure_default_model", fail)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_eval(_parse(argv))


def test_repeated_split_runs_once_and_samples_print_after_the_table(tiny_llama_dir, capsys,
                                                                     monkeypatch):
    import lowmem_es.evaluate as evaluate_module

    runs = []
    real = evaluate_module.evaluate_rows
    monkeypatch.setattr(evaluate_module, "evaluate_rows",
                        lambda *a, **k: runs.append(1) or real(*a, **k))
    assert run_eval(_parse(["--model", str(tiny_llama_dir), "--task", "arithmetic",
                            "--split", "eval", "eval", "--limit", "2",
                            "--max-completion-length", "2", "--samples", "1"])) == 0
    out = capsys.readouterr().out
    assert len(runs) == 1 and out.count("\neval ") == 1
    assert "--- eval / base sample 1 (reward" in out and "completion: " in out


def test_adapter_is_checked_before_the_base_model_is_evaluated(tiny_llama_dir, tmp_path,
                                                                monkeypatch):
    from safetensors.torch import load_file, save_file

    import lowmem_es.evaluate as evaluate_module

    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(weights))
    evaluated = []
    monkeypatch.setattr(evaluate_module, "evaluate_rows",
                        lambda *a, **k: evaluated.append(1) or {})
    with pytest.raises(ValueError, match=r"has no tensor"):
        evaluate(tiny_llama_dir, adapter=adapter, splits={"eval": ROWS},
                 reward_funcs=[target_fraction], max_completion_length=2)
    assert evaluated == []  # no minutes spent on the base model first


def test_cli_eval_under_torchrun_shards_and_reports_once(tiny_llama_dir, tmp_path, capsys):
    """``torchrun ... lowmem-es eval``: 3 ranks share the rows, rank 0 alone prints, and the
    report (metrics and the first samples) equals one process's."""
    import os
    import socket
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus 1:", "answer": str(i + 1)})
                            + "\n" for i in range(7)))
    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter")
    argv = ["--model", str(tiny_llama_dir), "--adapter", str(adapter), "--dataset", str(data),
            "--eval-dataset", str(data), "--max-completion-length", "4", "--samples", "5",
            "--json"]
    assert run_eval(_parse(argv)) == 0
    alone = json.loads(capsys.readouterr().out)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3",
         f"--master_port={port}", "-m", "lowmem_es.cli", "eval", *argv],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(result.stdout)  # one report: a second one would not parse
    for report in (alone, sharded):
        for split in report["splits"].values():
            for metrics in split.values():
                metrics.pop("seconds")
    assert sharded == alone
    samples = alone["splits"]["eval"]["adapter"]["samples"]
    assert [s["prompt"].count(f"{i} plus 1:") for i, s in enumerate(samples)] == [1] * 5
    assert len(samples) == 5


def test_cli_eval_trusts_remote_code_only_when_asked(tiny_llama_dir, monkeypatch):
    calls = _capture_evaluate(monkeypatch)
    base = ["--model", str(tiny_llama_dir), "--task", "arithmetic"]
    assert run_eval(_parse(base)) == 0
    assert run_eval(_parse([*base, "--trust-remote-code"])) == 0
    assert [call["trust_remote_code"] for call in calls] == [False, True]
