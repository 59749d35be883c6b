"""What a long run shows (lowmem_es/progress.py): log lines with ETA, reward.png, memory."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem_es import progress


def test_progress_logs_every_n_iterations_with_rate_and_eta(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)  # no bar: log lines
    bar = progress.Progress(total=4, initial=0, every=2)
    record = {"iteration_s": 1.5, "tokens_per_s": 120.0, "peak_memory_mb": 300.0}
    with caplog.at_level("INFO", logger="lowmem_es"):
        for iteration in range(4):
            entry = {"iteration": iteration, "reward_mean": 0.25, "reward_max": 0.5}
            if iteration == 1:
                entry["no_signal"] = True
            if iteration == 3:
                entry = {"iteration": 3, "skipped": True}
            bar.update(entry, record)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # iterations 2 and 4 of 4
    assert lines[0].startswith("iter 2/4 | reward 0.250/0.500 (mean/max) | no signal | 1.5 s/it")
    assert "120 tok/s" in lines[0] and "ETA 0:00:" in lines[0]
    assert lines[1].startswith("iter 4/4 | skipped (no rewards)")


def test_plot_rewards_draws_train_and_eval(tmp_path):
    pytest.importorskip("matplotlib")
    assert progress.plot_rewards(tmp_path) is None  # no metrics yet: nothing to draw
    lines = [{"iteration": i, "reward_mean": i / 10, "reward_max": i / 5} for i in range(5)]
    lines[4]["eval_reward"] = 0.7
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    path = progress.plot_rewards(tmp_path)
    assert path == tmp_path / "reward.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "reward.png"]


def test_peak_memory_on_cpu_is_the_process_peak():
    assert progress.peak_memory_mb(torch.device("cpu")) > 10
