"""bench/tune_sweep.py: the summary a candidate default is judged by, and sweep resumption."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "tune_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("tune_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tune_sweep"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("tune_sweep", None)


def _write(folder: Path, task: str, seed: int, threads: int, points: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}-s{seed}-t{threads}.json").write_text(
        json.dumps({"task": task, "seed": seed, "points": points}))


def test_summary_is_mean_and_spread_over_seeds_and_threads(sweep, tmp_path):
    for seed, threads, acc in ((0, 1, 0.2), (1, 1, 0.4), (0, 2, 0.6)):
        _write(tmp_path / "cand", "yesno", seed, threads,
               [{"iteration": 30, "eval": {"accuracy": acc}}])
    _write(tmp_path / "cand", "default", 0, 1,
           [{"iteration": 30, "eval": {"accuracy": 0.5}, "transfer": {"accuracy": 0.1}}])
    (tmp_path / "cand" / "default-s1-t1.json").write_text("{ half written")
    (tmp_path / "cand" / "candidate.json").write_text(json.dumps({"set": ["sigma=0.1"]}))
    rows = {(r["task"], r["split"]): r for r in sweep.summarize(tmp_path)}
    yesno = rows[("yesno", "eval")]
    assert yesno["runs"] == 3
    assert yesno["mean"] == pytest.approx(0.4)
    assert yesno["std"] == pytest.approx((0.08 / 3) ** 0.5)
    assert (yesno["min"], yesno["max"]) == (0.2, 0.6)
    assert yesno["mean_by_threads"] == {1: pytest.approx(0.3), 2: pytest.approx(0.6)}
    assert rows[("default", "transfer")]["mean"] == pytest.approx(0.1)
    assert rows[("default", "eval")]["runs"] == 1  # the half-written file is skipped


def test_a_run_counts_as_finished_only_with_every_point(sweep, tmp_path):
    path = tmp_path / "yesno-s0-t1.json"
    assert not sweep._finished(path, [15, 30])
    path.write_text(json.dumps({"points": [{"iteration": 15}]}))
    assert not sweep._finished(path, [15, 30])
    assert sweep._finished(path, [15])
    assert sweep._finished(path, None)
