"""Tests of lowmem_es/evaluate.py and the ``eval`` sub-command on the tiny random 4-bit Llama."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from lowmem_es.adapter_io import adapter_settings
from lowmem_es.cli.eval import add_eval_parser, run_eval
from lowmem_es.evaluate import (
    evaluate,
    evaluate_rows,
    format_report,
    summarize,
)
from lowmem_es.rewards import target_fraction
from lowmem_es.tasks import arithmetic

# --- metrics from literal rewards ---


def test_summarize_literals():
    totals = [1.0, 0.1, 1.1, 0.0, 0.99]
    texts = ["56", "words", "7 * 8 = 56.", "x", "3"]
    result = summarize(totals, texts, arithmetic.well_formed, correct_threshold=1.0)
    assert result["count"] == 5
    assert result["accuracy"] == pytest.approx(2 / 5)        # 1.0 and 1.1 reach 1.0
    assert result["mean_reward"] == pytest.approx(3.19 / 5)
    assert result["well_formed"] == pytest.approx(3 / 5)     # "56", "... = 56.", "3"
    assert result["accuracy_well_formed"] == pytest.approx(2 / 3)


def test_summarize_no_well_formed_is_undefined_not_zero():
    result = summarize([0.0, 1.0], ["a", "b"], arithmetic.well_formed, 1.0)
    assert result["accuracy"] == 0.5
    assert result["well_formed"] == 0.0 and result["accuracy_well_formed"] is None
    assert "well_formed" not in summarize([1.0], ["a"], None, 1.0)
    with pytest.raises(ValueError, match=r"2 rewards for 1 completions"):
        summarize([1.0, 0.0], ["a"], None, 1.0)


def test_format_report_lines():
    report = {"model": "m", "adapter": "a", "task": "arithmetic", "correct_threshold": 1.0,
              "splits": {"eval": {"base": {"count": 4, "accuracy": 0.25, "mean_reward": 0.25,
                                           "well_formed": 0.5, "accuracy_well_formed": 0.5},
                                  "adapter": {"count": 4, "accuracy": 0.75, "mean_reward": 0.75,
                                              "well_formed": 1.0,
                                              "accuracy_well_formed": None}}}}
    text = format_report(report)
    assert "eval" in text and "0.250 -> 0.750" in text and "0.500 -> -" in text


# --- with a model ---

ROWS = [{"prompt": f"word {i}:", "target": "a", "answer": str(i)} for i in range(6)]


def _adapter(model_dir, path, seed=0):
    """A PEFT adapter for the tiny model with large random B (so outputs visibly change)."""
    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    base, _, _ = load_model(model_dir)
    es_model = attach_es_lora(base, ["q_proj", "v_proj"], 4, 8.0, seed=seed,
                              base_model_name_or_path=str(model_dir))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in es_model.parameters().items():
        if name.endswith("lora_B"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return es_model.save_adapter(path)


def test_evaluate_base_and_adapter_side_by_side(tiny_llama_dir, tmp_path):
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
    assert adapter_settings(adapter)["rank"] == 4
    splits = {"eval": ROWS, "train": ROWS[:1]}
    report = evaluate(tiny_llama_dir, adapter=adapter, splits=splits, split_names=["eval"],
                      reward_funcs=[target_fraction], correct_threshold=0.5,
                      max_completion_length=6, samples=2)
    result = report["splits"]["eval"]
    assert set(result) == {"base", "adapter"} and set(report["splits"]) == {"eval"}
    base, tuned = result["base"], result["adapter"]
    assert base["count"] == tuned["count"] == 6
    assert [s["completion"] for s in base["samples"]] != [
        s["completion"] for s in tuned["samples"]]
    assert "well_formed" not in base  # plain splits have no well-formed test
    # The base numbers do not depend on an adapter being evaluated after them.
    alone = evaluate(tiny_llama_dir, splits=splits, split_names=["eval"],
                     reward_funcs=[target_fraction], correct_threshold=0.5,
                     max_completion_length=6, samples=2)
    assert set(alone["splits"]["eval"]) == {"base"}
    assert alone["splits"]["eval"]["base"]["samples"] == base["samples"]
    assert alone["splits"]["eval"]["base"]["mean_reward"] == base["mean_reward"]


def test_evaluate_bad_input(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"needs `reward_funcs` or a `scorer`"):
        evaluate_rows(None, None, ROWS)
    with pytest.raises(ValueError, match=r"give a `task`"):
        evaluate(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"none of the splits \['transfer'\] exist"):
        evaluate(tiny_llama_dir, splits={"eval": ROWS}, split_names=["transfer"],
                 reward_funcs=[target_fraction])
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json"):
        evaluate(tiny_llama_dir, adapter=tmp_path, splits={"eval": ROWS},
                 reward_funcs=[target_fraction])
    with pytest.raises(ValueError, match=r"unknown task 'nope'"):
        evaluate(tiny_llama_dir, task="nope")


# --- the eval sub-command ---


def _parse(argv):
    parser = argparse.ArgumentParser(prog="lowmem-es")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_cli_eval_json_on_a_jsonl_dataset(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} plus 1:", "solution": f"#### {i + 1}"})
                            + "\n" for i in range(4)))
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
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


def test_long_prompts_warn_with_the_fix(caplog):
    from lowmem_es.data import warn_long_prompts
    from lowmem_es.example import char_tokenizer

    tokenizer = char_tokenizer()  # one token per character
    with caplog.at_level("WARNING", logger="lowmem_es"):
        assert warn_long_prompts(["abc", "abcdefgh", "ab"], tokenizer, 4) == 1
    assert "1 of 3 prompts are longer than max_prompt_length=4 tokens (longest 8)" in caplog.text
    assert "--max-prompt-length" in caplog.text
    assert warn_long_prompts(["abc"], tokenizer, 4) == 0


def test_evaluate_under_a_profile_plans_rows_and_takes_its_kv_cache(tiny_llama_dir, tmp_path):
    from lowmem_es.planner import plan, read_model_config
    from lowmem_es.profiles import load_profile

    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
    settings = adapter_settings(adapter)
    common = dict(adapter=adapter, splits={"eval": ROWS}, split_names=["eval"],
                  reward_funcs=[target_fraction], correct_threshold=0.5,
                  max_completion_length=6, include_base=False, samples=len(ROWS))
    plain = evaluate(tiny_llama_dir, **common)
    assert plain["rows_per_chunk"] == 0 and plain["kv_cache_dtype"] == "auto"
    # A profile that allows at most 4 rows in flight: the planner picks the chunk (3 + 3).
    text = tmp_path / "small.toml"
    body = (Path(load_profile("cpu").source).read_text()
            .replace("max_rows_in_flight = 256", "max_rows_in_flight = 4"))
    assert "max_rows_in_flight = 4" in body
    text.write_text(body)
    expected = plan(read_model_config(str(tiny_llama_dir)), load_profile(str(text)),
                    settings["rank"], settings["target_modules"], 1, len(ROWS),
                    max_prompt_length=256, max_completion_length=6)
    assert 1 <= expected.rows_per_chunk < len(ROWS)
    planned = evaluate(tiny_llama_dir, profile=str(text), **common)
    assert planned["rows_per_chunk"] == expected.rows_per_chunk
    # Chunking never changes greedy completions.
    texts = [[x["completion"] for x in r["splits"]["eval"]["adapter"]["samples"]]
             for r in (plain, planned)]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1
    int8 = evaluate(tiny_llama_dir, profile="cpu", kv_cache_dtype="int8", **common)
    assert int8["kv_cache_dtype"] == "int8"
    assert 0.0 <= int8["splits"]["eval"]["adapter"]["accuracy"] <= 1.0


def test_evaluate_prefills_in_the_chunks_its_plan_assumed(tiny_llama_dir, tmp_path,
                                                          monkeypatch):
    """The plan's rows per chunk hold only with its prefill chunking, so evaluation
    prefills that way too (and says so in the report)."""
    import dataclasses

    from lowmem_es import generate, planner

    real_plan, real_generate = planner.plan, generate.generate_population
    monkeypatch.setattr(planner, "plan", lambda *a, **k: dataclasses.replace(
        real_plan(*a, **k), rows_per_chunk=2, prefill_chunk=3))
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("prefill_chunk"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_population", spy)
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
    report = evaluate(tiny_llama_dir, adapter=adapter, splits={"eval": ROWS},
                      split_names=["eval"], reward_funcs=[target_fraction],
                      max_completion_length=4, include_base=False, profile="cpu")
    assert report["rows_per_chunk"] == 2 and report["prefill_chunk"] == 3
    assert seen == [3]


def test_cli_eval_profile_and_kv_cache_flags(tiny_llama_dir, capsys):
    ns = _parse(["--model", str(tiny_llama_dir), "--task", "arithmetic", "--split", "eval",
                 "--limit", "3", "--max-completion-length", "4", "--profile", "cpu",
                 "--kv-cache-dtype", "int8", "--json"])
    assert run_eval(ns) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv_cache_dtype"] == "int8" and report["rows_per_chunk"] >= 1
    assert report["splits"]["eval"]["base"]["count"] == 3


# --- train and eval agree; arguments are checked before any model work ---


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

    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
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


def test_load_adapter_refuses_tensors_of_layers_the_model_lacks(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
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


def test_no_other_model_warning_for_the_same_directory_named_another_way(
        tiny_llama_dir, tmp_path, caplog):
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
    other_spelling = f"{tiny_llama_dir}/../{Path(tiny_llama_dir).name}/"
    with caplog.at_level("WARNING", logger="lowmem_es"):
        evaluate(other_spelling, adapter=adapter, splits={"eval": ROWS[:1]},
                 reward_funcs=[target_fraction], max_completion_length=1, include_base=False)
    assert "was trained on" not in caplog.text


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("r"), r"has r=None; it must be a positive number"),
    (lambda c: c.update(target_modules=None), r"has target_modules=None; it must be a "
                                              r"non-empty list"),
    (lambda c: c.update(lora_alpha=None), r"has lora_alpha=None; it must be a positive"),
    (None, r"adapter_config.json' is not valid JSON"),
])
def test_adapter_settings_errors_name_the_file_and_field(tiny_llama_dir, tmp_path, change,
                                                         message):
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
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


def test_sharded_evaluation_generates_this_ranks_rows_and_gathers_all(tiny_llama_dir,
                                                                      monkeypatch):
    """``sharded=True`` under torchrun: rank 1 of 2 generates rows 1, 3, 5 only, hands its
    rewards and well-formed flags to the gather, and reports the metrics of all rows."""
    from lowmem_es import distributed, generate
    from lowmem_es.evaluate import evaluate_rows
    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    model, tokenizer, _ = load_model(tiny_llama_dir)
    es_model = attach_es_lora(model, ["q_proj"], 2, 4.0, seed=0)
    rows = [dict(row, target="b") for row in ROWS]
    def well_formed(text):
        return "b" in text

    options = dict(reward_funcs=[target_fraction], well_formed=well_formed,
                   correct_threshold=0.2, max_completion_length=6)
    alone = evaluate_rows(es_model, tokenizer, rows, **options)
    full = evaluate_rows(es_model, tokenizer, rows, samples=len(rows), **options)["samples"]
    generated, handed = [], []
    real = generate.generate_population

    def spy(model_, tokenizer_, prompts, spec, **kwargs):
        generated.append([p for _, p in spec])
        return real(model_, tokenizer_, prompts, spec, **kwargs)

    def gather(indices, columns, count):  # what the other rank would contribute
        handed.append((list(indices), [list(c) for c in columns]))
        totals = [s["reward"] for s in full]
        return [totals, [float(well_formed(s["completion"])) for s in full]]

    monkeypatch.setattr(generate, "generate_population", spy)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "gather_rows", gather)
    sharded = evaluate_rows(es_model, tokenizer, rows, sharded=True, **options)
    assert generated == [[1, 3, 5]]
    [(indices, columns)] = handed
    assert indices == [1, 3, 5] and columns[0] == [full[i]["reward"] for i in indices]
    assert columns[1] == [float(well_formed(full[i]["completion"])) for i in indices]
    for key in ("count", "accuracy", "mean_reward", "well_formed", "accuracy_well_formed"):
        assert sharded[key] == alone[key], key
    assert evaluate_rows(es_model, tokenizer, rows, **options)["count"] == 6  # not sharded


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
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter")
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


def test_long_evaluation_logs_its_progress(tiny_llama_dir, monkeypatch, caplog):
    """Chunk by chunk, at most every PROGRESS_SECONDS (0 here): an evaluation of minutes
    says how far it is instead of looking hung."""
    from lowmem_es import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "PROGRESS_SECONDS", 0.0)
    rows = [dict(row, target="a") for row in ROWS]
    with caplog.at_level("INFO", logger="lowmem_es"):
        evaluate(tiny_llama_dir, splits={"eval": rows}, split_names=["eval"],
                 reward_funcs=[target_fraction], max_completion_length=2, rows_per_chunk=2)
    messages = [r.getMessage() for r in caplog.records]
    assert "evaluating the base model on eval (6 rows)" in messages
    progress = [m for m in messages if m.startswith("base on eval: ")]
    assert [m.split(" rows")[0] for m in progress] == ["base on eval: 2/6", "base on eval: 4/6"]


def test_cli_eval_trusts_remote_code_only_when_asked(tiny_llama_dir, monkeypatch):
    calls = _capture_evaluate(monkeypatch)
    base = ["--model", str(tiny_llama_dir), "--task", "arithmetic"]
    assert run_eval(_parse(base)) == 0
    assert run_eval(_parse([*base, "--trust-remote-code"])) == 0
    assert [call["trust_remote_code"] for call in calls] == [False, True]
