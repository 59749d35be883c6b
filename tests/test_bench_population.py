"""bench/bench_population.py and bench/check_profile_fit.py: pure parts and tiny CPU runs.

The benchmarks time things; these tests check only what they compute and compare (row
layout, ratios, the no-EOS tokenizer, the base-layer swap, the planner comparison), and
run both scripts' whole code paths on the tiny random-weight shape. No timing thresholds.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_population as bp
import check_profile_fit as cpf

# --- bench_population: pure parts ---

def test_population_rows_keep_each_member_contiguous():
    rows = bp.population_rows(4, 3)
    assert len(rows) == 12
    assert [m for m, _ in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [p for _, p in rows[:3]] == [0, 1, 2]


@pytest.mark.parametrize("count, size, expected", [
    (10, 4, [range(0, 4), range(4, 8), range(8, 10)]),
    (10, 0, [range(0, 10)]),
    (6, 6, [range(0, 6)]),
    (3, 5, [range(0, 3)]),
])
def test_chunks_cover_every_row_once(count, size, expected):
    parts = bp.chunks(count, size)
    assert parts == expected
    assert [i for part in parts for i in part] == list(range(count))


def test_median_summary_and_ratios():
    summary = bp.median_summary([3.0, 1.0, 2.0], tokens=100)
    assert summary["median_s"] == 2.0 and summary["min_s"] == 1.0
    assert summary["tokens_per_s"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="repeats"):
        bp.median_summary([], tokens=1)
    results = {"mixed": {"tokens_per_s": 90.0}, "plain": {"tokens_per_s": 100.0},
               "member": {"tokens_per_s": 30.0}}
    assert bp.ratios(results) == {"mixed/plain": pytest.approx(0.9),
                                  "mixed/member": pytest.approx(3.0)}
    assert bp.ratios({"plain": {"tokens_per_s": 1.0}}) == {}


def test_no_eos_tokenizer_hides_eos_and_forwards_everything_else():
    from lowmem_es.example import char_tokenizer

    inner = char_tokenizer()
    assert inner.eos_token_id is not None
    wrapped = bp.NoEosTokenizer(inner)
    assert wrapped.eos_token_id is None
    assert wrapped.pad_token_id == inner.pad_token_id
    wrapped.padding_side = "left"  # generate_population sets these on the tokenizer
    assert inner.padding_side == "left"
    assert wrapped("ab", add_special_tokens=False)["input_ids"] == \
        inner("ab", add_special_tokens=False)["input_ids"]


def test_validate_rejects_unusable_options():
    parser = bp.build_parser()
    for argv, message in ((["--population", "3"], "even"), (["--sigma", "0"], "sigma"),
                          (["--completion", "0"], "completion"),
                          (["--rows-per-chunk", "-1"], "rows-per-chunk")):
        with pytest.raises(ValueError, match=message):
            bp.validate(parser.parse_args(argv))
    bp.validate(parser.parse_args([]))


def test_make_prompts_are_deterministic_and_about_the_asked_length():
    from lowmem_es.example import char_tokenizer

    tokenizer = char_tokenizer()
    prompts = bp.make_prompts(tokenizer, 5, 12)
    assert prompts == bp.make_prompts(tokenizer, 5, 12)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert max(lengths) <= 12 and min(lengths) >= 9


# --- bench_population: the model parts on the tiny shape ---

@pytest.fixture(scope="module")
def tiny_bench():
    args = bp.build_parser().parse_args(["--population", "4", "--batch", "2", "--prompt", "6",
                                         "--completion", "3", "--repeats", "1"])
    return bp.Bench(args, torch.device("cpu"))


def test_base_switch_swaps_es_layers_out_and_back(tiny_bench):
    from lowmem_es.lora import ESLoraLinear

    model = tiny_bench.es_model.model
    count = sum(isinstance(m, ESLoraLinear) for m in model.modules())
    assert count == len(tiny_bench.es_model.layers) > 0
    with tiny_bench.switch.bare() as bare:
        assert not any(isinstance(m, ESLoraLinear) for m in bare.modules())
    assert sum(isinstance(m, ESLoraLinear) for m in model.modules()) == count
    with tiny_bench.switch.bare(bp.NF4KernelBase) as bare:
        assert sum(isinstance(m, bp.NF4KernelBase) for m in bare.modules()) == count
    assert sum(isinstance(m, ESLoraLinear) for m in model.modules()) == count


def test_variants_generate_full_length_and_mixed_matches_member(tiny_bench):
    plain = tiny_bench.plain()
    mixed = tiny_bench.mixed()
    member = tiny_bench.member()
    assert len(plain) == len(mixed) == len(tiny_bench.rows) == 8
    assert all(len(ids) == 3 for ids in plain)
    assert mixed == member  # completions do not depend on the chunking
    hf = tiny_bench.hf_generate()
    assert all(len(ids) == 3 for ids in hf)


def test_check_rejects_short_or_missing_rows(tiny_bench):
    with pytest.raises(RuntimeError, match="completions for"):
        tiny_bench._check("plain", [[1, 2, 3]])
    with pytest.raises(RuntimeError, match="lengths"):
        tiny_bench._check("plain", [[1, 2]] * len(tiny_bench.rows))
    with pytest.raises(RuntimeError, match="lengths"):
        tiny_bench._check("mixed", [[1, 2, 3, 4]] * len(tiny_bench.rows))
    tiny_bench._check("mixed", [[1, 2]] * len(tiny_bench.rows))  # trailing pads dropped


def test_bench_population_main_smoke(tmp_path, capsys):
    out = tmp_path / "population.json"
    payload = bp.main(["--population", "2", "--batch", "2", "--prompt", "6", "--completion",
                       "3", "--repeats", "1", "--threads", "1", "--json-out", str(out)])
    text = capsys.readouterr().out
    assert "| mixed |" in text and "| plain |" in text and "| member |" in text
    assert "command: " in text and "torch" in text
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"plain", "mixed", "member"}
    for result in saved["results"].values():
        assert result["tokens"] == 2 * 2 * 3
        assert len(result["seconds"]) == 1 and result["tokens_per_s"] > 0
    assert set(saved["ratios"]) == {"mixed/plain", "mixed/member"}
    assert payload["extra"]["mixed_equals_member"] is True
    assert payload["extra"]["noise_build_s"] > 0


# --- check_profile_fit ---

def test_error_cap_and_rows_helpers():
    assert cpf.error_fraction(110, 100) == pytest.approx(0.10)
    assert cpf.error_fraction(90, 100) == pytest.approx(-0.10)
    with pytest.raises(ValueError):
        cpf.error_fraction(1, 0)
    gib = 2**30
    assert cpf.cap_fraction(int(7.5 * gib), 140 * gib) == pytest.approx(7.5 / 140)
    with pytest.raises(ValueError, match="cannot cap"):
        cpf.cap_fraction(200 * gib, 140 * gib)
    assert cpf.rows_to_run(240, 27, 2) == 54
    assert cpf.rows_to_run(240, 27, 0) == 240
    assert cpf.rows_to_run(40, 27, 2) == 40


def test_make_plan_matches_the_trainers_plan():
    from bench_memory import SHAPES

    from lowmem_es.planner import plan
    from lowmem_es.profiles import load_profile

    args = cpf.build_parser().parse_args(["--shape", "qwen7b"])
    profile, planned, as_run = cpf.make_plan(args, "8gb")
    expected = plan(dict(SHAPES["qwen7b"]), load_profile("8gb"), 8, args.targets, 30, 8,
                    max_prompt_length=256, max_completion_length=256)
    assert planned.rows_per_chunk == expected.rows_per_chunk
    assert planned.predicted_peak_bytes == expected.predicted_peak_bytes
    assert planned.predicted_peak_bytes <= profile.target_bytes
    # The fused kernel keeps no per-member copies: the as-run prediction drops them.
    assert as_run.static["lora_member_copies"] == 0 < planned.static["lora_member_copies"]


def test_format_records_flags_the_targets():
    gib = 2**30
    record = {"shape": "qwen7b", "profile": "8gb", "rows_per_chunk": 27, "num_chunks": 9,
              "rows_run": 54, "prompt": 256, "completion": 256, "cap_bytes": int(7.5 * gib),
              "peak_bytes": int(7.4 * gib), "peak_reserved_bytes": int(7.45 * gib),
              "plan_peak_bytes": int(6.5 * gib), "as_run_peak_bytes": int(6.6 * gib),
              "plan_error": (6.5 - 7.4) / 7.4, "as_run_error": (6.6 - 7.4) / 7.4,
              "plan_error_no_workspace": (6.3 - 7.4) / 7.4,
              "peak_within_usable": False, "usable_bytes": int(7.2 * gib), "events": [{}],
              "oom": None, "seconds": 12.0}
    text = cpf.format_records([record])
    assert "| qwen7b | 8gb | 27 (2/9) |" in text
    assert "OUTSIDE" in text and "completed: NO" in text and "| NO (usable 7.20) |" in text
    record.update(peak_bytes=int(6.9 * gib), plan_error=(6.5 - 6.9) / 6.9,
                  peak_within_usable=True)
    text = cpf.format_records([record])
    assert "within 10%" in text and "completed: yes" in text


def test_check_profile_fit_cpu_dry_run(tmp_path, capsys):
    records = cpf.main(["--device", "cpu", "--shape", "tiny", "--profiles", "cpu",
                        "--population", "2", "--batch", "2", "--prompt", "8",
                        "--completion", "4", "--out-dir", str(tmp_path)])
    assert len(records) == 1
    record = records[0]
    assert "error" not in record, record.get("error")
    assert record["oom"] is None and record["events"] == []
    assert record["rows_run"] == record["rows_total"] == 4
    assert record["completion_tokens"] <= 4 * 4
    assert record["peak_bytes"] > record["resident_bytes"] > 0
    assert math.isfinite(record["plan_error"])
    assert record["plan_error_no_workspace"] < record["plan_error"]
    saved = json.loads((tmp_path / "profile_fit_tiny.json").read_text())
    assert saved["records"][0]["profile"] == "cpu"
    assert "| tiny | cpu |" in (tmp_path / "profile_fit_tiny.md").read_text()
    assert "planner error" in capsys.readouterr().out
