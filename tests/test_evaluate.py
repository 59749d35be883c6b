"""Tests of lowmem_es/evaluate.py on the tiny random 4-bit Llama (the ``eval`` command:
tests/test_cli_eval.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import save_random_adapter

from lowmem_es.adapter_io import adapter_settings
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




def test_evaluate_base_and_adapter_side_by_side(tiny_llama_dir, tmp_path):
    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter")
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


def test_evaluate_under_a_profile_plans_rows_and_takes_its_kv_cache(tiny_llama_dir, tmp_path):
    from lowmem_es.planner import plan, read_model_config
    from lowmem_es.profiles import load_profile

    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter")
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
    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter")
    report = evaluate(tiny_llama_dir, adapter=adapter, splits={"eval": ROWS},
                      split_names=["eval"], reward_funcs=[target_fraction],
                      max_completion_length=4, include_base=False, profile="cpu")
    assert report["rows_per_chunk"] == 2 and report["prefill_chunk"] == 3
    assert seen == [3]


# --- train and eval agree; arguments are checked before any model work ---


def test_no_other_model_warning_for_the_same_directory_named_another_way(
        tiny_llama_dir, tmp_path, caplog):
    adapter = save_random_adapter(tiny_llama_dir, tmp_path / "adapter")
    other_spelling = f"{tiny_llama_dir}/../{Path(tiny_llama_dir).name}/"
    with caplog.at_level("WARNING", logger="lowmem_es"):
        evaluate(other_spelling, adapter=adapter, splits={"eval": ROWS[:1]},
                 reward_funcs=[target_fraction], max_completion_length=1, include_base=False)
    assert "was trained on" not in caplog.text


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
