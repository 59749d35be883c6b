"""A run's output directory (lowmem_es/run_dir.py): what may start there, its lock, its files."""

from __future__ import annotations

import json
import threading

import pytest

from lowmem_es import run_dir
from lowmem_es.config import ESConfig


def test_check_output_dir_refuses_what_training_would_refuse(tmp_path):
    out = tmp_path / "run"
    args = ESConfig(output_dir=str(out), iterations=4)
    assert run_dir.check_output_dir(args) is False  # nothing there: a new run
    out.mkdir()
    (out / run_dir.JOURNAL).write_text('{"iteration": 0}\n{"iteration": 1}\n')
    with pytest.raises(ValueError, match=r"already holds a run; pass --resume.*--overwrite"):
        run_dir.check_output_dir(args)
    assert run_dir.check_output_dir(args, overwrite=True) is True
    with pytest.raises(ValueError, match="exclude each other"):
        run_dir.check_output_dir(args, resume=True, overwrite=True)
    (out / run_dir.RUN_CONFIG).write_text('seed = 1\niterations = 4\n')
    with pytest.raises(ValueError, match=r"configuration changed.*seed: 1 -> 0.*--force"):
        run_dir.check_output_dir(args, resume=True)
    assert run_dir.check_output_dir(args, resume=True, force=True) is True
    short = ESConfig(output_dir=str(out), iterations=1)
    with pytest.raises(ValueError, match="already done 2 iterations"):
        run_dir.check_output_dir(short, resume=True, force=True)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        run_dir.check_output_dir(ESConfig(output_dir=str(afile)))


def test_clear_run_deletes_the_run_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000000").mkdir(parents=True)
    (out / run_dir.ADAPTER).mkdir()
    for name in (run_dir.JOURNAL, run_dir.METRICS, run_dir.RUN_CONFIG, run_dir.PLOT,
                 "notes.txt"):
        (out / name).write_text("x")
    run_dir.clear_run(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_metrics_entry_and_damaged_metrics_are_salvaged(tmp_path, caplog):
    record = {"iteration": 2, "reward_mean": 0.5, "reward_max": 1.0, "fitness": [1.0],
              "tokens_per_s": 3.0}
    assert run_dir.metrics_entry(record) == {"iteration": 2, "reward_mean": 0.5,
                                             "reward_max": 1.0, "tokens_per_s": 3.0}
    path = tmp_path / run_dir.METRICS
    path.write_text('{"iteration": 0}\nnot json\n{"iteration": 1}\n')
    assert run_dir.read_metrics(tmp_path) == [{"iteration": 0}, {"iteration": 1}]
    with caplog.at_level("WARNING", logger="lowmem_es"):
        assert run_dir.read_metrics(tmp_path, repair=True) == [{"iteration": 0},
                                                               {"iteration": 1}]
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"iteration": 0}, {"iteration": 1}]
    assert len(list(tmp_path.glob("metrics.jsonl.damaged-*"))) == 1
    assert "kept the damaged file" in caplog.text


def test_lock_probes_never_refuse_each_other(tmp_path, monkeypatch):
    """The ranks of one job probe the lock at once: a probe (a shared lock for a moment)
    must not refuse another probe, only a holder of the run lock; ranks other than 0 do
    not probe at all."""
    import fcntl

    out = tmp_path / "run"
    assert run_dir.lock_run(out)
    run_dir.unlock_run(out)
    with open(out / run_dir.LOCK_FILE) as probe:  # another rank's probe, mid-way
        fcntl.flock(probe, fcntl.LOCK_SH)
        run_dir.check_unlocked(out)
        # lock_run waits a probe out (here released after 0.2 s) instead of refusing.
        threading.Timer(0.2, probe.close).start()
        assert run_dir.lock_run(out) is True
    run_dir.unlock_run(out)
    with open(out / run_dir.LOCK_FILE) as holder:  # another process's run
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another lowmem-es process"):
            run_dir.check_unlocked(out)
        monkeypatch.setenv("RANK", "1")
        run_dir.check_unlocked(out)  # rank 1 of a job: its rank 0 locks and decides
