"""Checkpoints, exact resume, journal replay, signals and the guards around output_dir."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_es import ESTrainer, checkpoint, journal, run_dir
from lowmem_es.cli import main
from lowmem_es.example import example_config, tiny_dataset
from lowmem_es.rewards import target_fraction

SMALL = dict(population_size=4, batch_size=2, max_completion_length=4, lora_rank=2,
             lora_alpha=4.0, sigma=0.05, learning_rate=0.1, iterations=9, save_steps=3)


def _trainer(model_dir, out, reward=target_fraction, resume=False, **overrides):
    values = dict(SMALL, **overrides)
    return ESTrainer(str(model_dir), [reward], train_dataset=tiny_dataset(8),
                     args=example_config(str(out), **values), resume=resume)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _assert_same_adapter(first: Path, second: Path) -> None:
    a, b = _adapter(first), _adapter(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _iterations(out: Path, name: str = "journal.jsonl") -> list[int]:
    return [json.loads(line)["iteration"] for line in (out / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """An uninterrupted run of SMALL, with Adam (so optimizer state must resume too)."""
    out = tmp_path_factory.mktemp("reference")
    trainer = _trainer(tiny_llama_dir, out, optimizer="adam")
    trainer.train()
    return out


def test_layout_and_checksums(reference):
    steps = [s for s, _ in checkpoint.list_checkpoints(reference)]
    assert steps == [0, 3, 6, 9]  # initial adapter kept; save_total_limit=3 keeps 3, 6, 9
    state = checkpoint.read_state(checkpoint.step_dir(reference, 9))
    assert state["step"] == 9
    assert set(state["files"]) == {"adapter_model.safetensors", "adapter_config.json",
                                   "optimizer.safetensors"}
    for name in ("run.toml", "journal.jsonl", "metrics.jsonl", "adapter"):
        assert (reference / name).exists(), name
    assert _iterations(reference) == list(range(9))
    _assert_same_adapter(reference / "adapter", checkpoint.step_dir(reference, 9))


def test_resume_after_graceful_signal_is_exact(tiny_llama_dir, reference, tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(tiny_llama_dir, out, optimizer="adam")

    def interrupt(entry):
        if entry["iteration"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    trainer.train(callback=interrupt)
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    assert trainer.stopped_early
    assert _iterations(out) == list(range(5))
    assert checkpoint.list_checkpoints(out)[-1][0] == 5  # checkpoint of the stop
    assert not (out / "adapter").exists()
    resumed = _trainer(tiny_llama_dir, out, optimizer="adam", resume=True)
    resumed.train()
    assert _iterations(out) == list(range(9))
    assert _iterations(out, "metrics.jsonl") == list(range(9))
    _assert_same_adapter(out / "adapter", reference / "adapter")


def test_second_signal_aborts_at_once(tiny_llama_dir, tmp_path):
    trainer = _trainer(tiny_llama_dir, tmp_path / "run")

    def double(entry):
        if entry["iteration"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt, match="second signal"):
        trainer.train(callback=double)
    assert _iterations(tmp_path / "run") == [0, 1]  # nothing torn


def test_resume_replays_journal_past_newest_checkpoint(tiny_llama_dir, reference, tmp_path):
    """Kill after iteration 7 (checkpoint at 6): resume replays line 7 without re-running."""
    out = tmp_path / "run"
    trainer = _trainer(tiny_llama_dir, out, optimizer="adam", iterations=8)
    trainer.train()
    shutil.rmtree(checkpoint.step_dir(out, 8))  # as if it died before its final checkpoint
    resumed = _trainer(tiny_llama_dir, out, optimizer="adam", resume=True)
    calls = []
    original = resumed.step
    resumed.step = lambda it: calls.append(it) or original(it)
    resumed.train()
    assert calls == [8]  # iterations 6 and 7 came from the checkpoint + journal
    _assert_same_adapter(out / "adapter", reference / "adapter")


def test_corrupt_checkpoint_falls_back(tiny_llama_dir, reference, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, optimizer="adam", iterations=6).train()
    weights = checkpoint.step_dir(out, 6) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated by a crash of the disk
    with pytest.warns(UserWarning, match="sha256"):
        resumed = _trainer(tiny_llama_dir, out, optimizer="adam", resume=True)
        resumed.train()
    _assert_same_adapter(out / "adapter", reference / "adapter")


def test_torn_journal_line_is_repaired(tiny_llama_dir, reference, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, optimizer="adam", iterations=5).train()
    with open(out / "journal.jsonl", "a") as handle:
        handle.write('{"iteration": 5, "run_se')  # killed mid-write
    _trainer(tiny_llama_dir, out, optimizer="adam", resume=True).train()
    assert _iterations(out) == list(range(9))
    _assert_same_adapter(out / "adapter", reference / "adapter")


def test_damaged_run_files_give_checkpoint_errors(reference, tmp_path):
    """A journal record without what the update needs, and a trainer_state.json that is no
    object, are CheckpointErrors naming the damage (they were KeyError/AttributeError)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    lines = (run / "journal.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    del record["fitness"]
    lines[1] = json.dumps(record)
    (run / "journal.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(checkpoint.CheckpointError, match=r"iteration 1 lacks fitness.*edited"):
        journal.replay_journal(run, 3)
    state = checkpoint.step_dir(run, 3) / checkpoint.STATE_FILE
    state.write_text("[1]")
    with pytest.raises(checkpoint.CheckpointError, match=r"not a checkpoint state"):
        checkpoint.read_state(state.parent)


def test_damaged_metrics_do_not_stop_a_resume(tiny_llama_dir, tmp_path, caplog):
    """metrics.jsonl is a log: a bad line in its middle is set aside with a warning and the
    run resumes (it used to refuse, calling the metrics "the journal")."""
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, iterations=3).train()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    damaged = "\n".join([lines[0], "{oops", *lines[1:]]) + "\n"
    (out / "metrics.jsonl").write_text(damaged)
    with caplog.at_level("WARNING", logger="lowmem_es"):
        _trainer(tiny_llama_dir, out, resume=True, iterations=4).train()
    assert any("metrics" in r.message and "damaged" in r.message for r in caplog.records)
    [aside] = out.glob("metrics.jsonl.damaged-*")
    assert aside.read_text() == damaged
    assert _iterations(out, "metrics.jsonl") == [0, 1, 2, 3]
    # A record without an integer iteration is damage too (it raised a TypeError).
    lines = (out / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["iteration"] = None
    lines[1] = json.dumps(record)
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _trainer(tiny_llama_dir, out, resume=True, iterations=5).train()
    assert _iterations(out, "metrics.jsonl") == [0, 1, 2, 3, 4]  # 1 rebuilt from the journal


def test_metrics_line_lost_by_a_kill_is_rebuilt_from_the_journal(tiny_llama_dir, tmp_path):
    """A kill after an iteration's journal line, before its metrics line: resume rebuilds
    the metrics line from the journal (it used to stay missing for good)."""
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, iterations=4).train()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # iteration 3 lost
    _trainer(tiny_llama_dir, out, resume=True, iterations=5).train()
    assert _iterations(out, "metrics.jsonl") == [0, 1, 2, 3, 4]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert metrics[3]["rebuilt_from_journal"] is True
    assert metrics[3]["reward_mean"] == journal[3]["reward_mean"]
    assert not any("rebuilt_from_journal" in m for m in metrics[:3] + metrics[4:])


def test_full_disk_while_journaling_says_what_failed_and_resumes(tiny_llama_dir, tmp_path,
                                                                monkeypatch):
    out = tmp_path / "run"
    real_fsync = os.fsync
    calls = []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("journal.jsonl"):
            calls.append(fd)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=r"could not append iteration 3 to .*journal\.jsonl' "
                       r"\(No space left on device\); .*up to iteration 2 are intact.*--resume"):
        _trainer(tiny_llama_dir, out, iterations=4).train()
    monkeypatch.setattr(os, "fsync", real_fsync)
    _trainer(tiny_llama_dir, out, resume=True, iterations=4).train()
    assert _iterations(out) == [0, 1, 2, 3]


def test_replay_onto_a_damaged_checkpoint_says_so(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    weights = checkpoint.step_dir(run, 6) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.warns(UserWarning, match="fails its sha256"):
        assert main(["replay", str(run), "--step", "6", "--out", str(tmp_path / "r")]) == 0
    assert "checkpoint at step 6 is damaged" in capsys.readouterr().out


def test_replay_matches_checkpoints(reference, tmp_path, capsys):
    for step in (3, 9):
        result = journal.replay_journal(reference, step)
        assert result.start_step == 0
        assert result.max_abs_diff == 0.0
    nearest = journal.replay_journal(reference, 8, start="nearest")
    assert nearest.start_step == 6 and nearest.verified_against is None
    assert main(["replay", str(reference), "--out", str(tmp_path / "r")]) == 0
    assert "bit-identical" in capsys.readouterr().out
    _assert_same_adapter(tmp_path / "r", reference / "adapter")
    with pytest.raises(ValueError, match="beyond the journal"):
        journal.replay_journal(reference, 99)


def test_changed_config_is_refused_unless_forced(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, iterations=2).train()
    with pytest.raises(ValueError, match=r"sigma: 0\.05 -> 0\.07.*--force"):
        _trainer(tiny_llama_dir, out, resume=True, sigma=0.07, iterations=3).train()
    _trainer(tiny_llama_dir, out, resume=True, iterations=3, logging_steps=5).train()  # harmless
    assert _iterations(out) == [0, 1, 2]
    forced = ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(8),
                       args=example_config(str(out), **dict(SMALL, sigma=0.07, iterations=4)),
                       resume=True, force=True)
    forced.train()
    assert _iterations(out) == [0, 1, 2, 3]


def test_existing_run_is_not_clobbered(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, iterations=2).train()
    before = (out / "journal.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        _trainer(tiny_llama_dir, out, iterations=2).train()
    assert (out / "journal.jsonl").read_text() == before
    ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(8),
              args=example_config(str(out), **dict(SMALL, iterations=1)),
              overwrite=True).train()
    assert _iterations(out) == [0]
    with pytest.raises(ValueError, match="exclude each other"):
        ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(8),
                  args=example_config(str(out)), resume=True, overwrite=True)


def test_kill_during_first_checkpoint_starts_over(tiny_llama_dir, reference, tmp_path):
    """Only a temp dir of step_000000 exists (killed mid-write): --resume starts afresh."""
    out = tmp_path / "run"
    partial = out / "checkpoints" / ".step_000000.tmp-abc"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    # Temporaries of other atomic writes killed midway (run.toml, the final adapter).
    leftovers = [out / ".run.toml.tmp-123", out / ".adapter.tmp-xyz"]
    leftovers[0].write_text("half")
    leftovers[1].mkdir()
    keep = out / ".notes.txt"
    keep.write_text("mine")
    _trainer(tiny_llama_dir, out, optimizer="adam", resume=True).train()
    assert not partial.exists() and not any(p.exists() for p in leftovers)
    assert keep.read_text() == "mine"
    _assert_same_adapter(out / "adapter", reference / "adapter")


def test_max_hours_stops_with_a_checkpoint(tiny_llama_dir, tmp_path):
    trainer = _trainer(tiny_llama_dir, tmp_path / "run", max_hours=1e-7)
    trainer.train()
    assert trainer.stopped_early and trainer.iteration == 1
    assert checkpoint.list_checkpoints(tmp_path / "run")[-1][0] == 1


def test_full_disk_fails_before_writing(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = _trainer(tiny_llama_dir, out, iterations=3)
    trainer.train()
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())

    class Usage:
        free = 10

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: Usage)
    resumed = _trainer(tiny_llama_dir, out, resume=True, iterations=6)
    with pytest.raises(OSError, match=r"not enough free disk space.*--resume"):
        resumed.train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == saved


def test_all_none_rewards_skip_the_update(tiny_llama_dir, tmp_path):
    def abstain(completions, **kwargs):
        return [None] * len(completions)

    trainer = _trainer(tiny_llama_dir, tmp_path / "run", reward=abstain, iterations=2)
    before = {k: v.clone() for k, v in trainer.es_model.parameters().items()}
    trainer.train()
    for key, value in trainer.es_model.parameters().items():
        assert torch.equal(value, before[key])
    lines = [json.loads(x) for x in (tmp_path / "run" / "journal.jsonl").read_text().split("\n")
             if x]
    assert all(line["skipped"] for line in lines)
    assert journal.replay_journal(tmp_path / "run").max_abs_diff == 0.0


def test_reward_plot_is_written(reference):
    pytest.importorskip("matplotlib")
    checkpoint_plot = reference / "reward.png"
    assert checkpoint_plot.is_file() and checkpoint_plot.stat().st_size > 1000


def _spawn(out: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "lowmem_es.cli", "train", "--example", "tiny",
            "--output-dir", str(out),
            "--iterations", "24", "--population-size", "4", "--batch-size", "2",
            "--max-completion-length", "6", "--save-steps", "5", "--optimizer", "adam",
            # every option whose state comes from the journal or step 0, on
            "--prompt-assignment", "per_pair", "--fitness-baseline", "prompt",
            "--sigma-growth", "2", "--anchor-decay", "0.5", "--noise-scaling", "relative"]
    if resume:
        args.append("--resume")
    return subprocess.Popen(args, cwd=out.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _journal_lines(out: Path) -> int:
    try:
        return (out / "journal.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    """Six SIGKILLs at random moments (mid-iteration, mid-checkpoint, at startup), with the
    options that rebuild state from the journal on: each run resumed; the final adapter
    equals an uninterrupted run's, and the journal has every iteration exactly once."""
    rng = random.Random(20261129)
    reference_out = tmp_path / "uninterrupted"
    done = _spawn(reference_out, resume=False)
    assert done.wait(timeout=300) == 0, done.stderr.read()
    out = tmp_path / "killed"
    kills = 0
    resume = False
    while kills < 6:
        process = _spawn(out, resume=resume)
        target = min(_journal_lines(out) + rng.randint(1, 4), 23)
        deadline = time.monotonic() + 240
        while _journal_lines(out) < target and process.poll() is None:
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))  # land anywhere inside the next iteration
        if process.poll() is not None:
            assert process.returncode == 0, process.stderr.read()[-3000:]
            break  # finished before we could kill it
        process.kill()
        process.wait()
        kills += 1
        resume = True
    final = _spawn(out, resume=True)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert kills >= 5
    assert _iterations(out) == list(range(24))
    _assert_same_adapter(out / "adapter", reference_out / "adapter")


def test_raising_reward_names_function_and_completion(tiny_llama_dir, tmp_path):
    state = {"calls": 0, "poison": None}

    def fragile(completions, **kwargs):
        state["calls"] += 1
        if state["calls"] == 3:  # fine for two iterations, then chokes on one text
            state["poison"] = completions[-1]
        if state["poison"] is not None and state["poison"] in completions:
            raise ZeroDivisionError("boom")
        return [0.0] * len(completions)

    out = tmp_path / "run"
    trainer = _trainer(tiny_llama_dir, out, reward=fragile, iterations=5, save_steps=1)
    with pytest.raises(RuntimeError, match=r"'fragile' raised ZeroDivisionError: boom on "
                       r"completion \d+: '.*'.*--resume"):
        trainer.train()
    assert _iterations(out) == [0, 1]
    assert checkpoint.read_state(checkpoint.step_dir(out, 2))["step"] == 2


def test_journal_without_final_newline_resumes_twice(tiny_llama_dir, reference, tmp_path):
    """A complete last record without its newline: resume adds the newline before appending,
    so the next resume (and replay) still reads one record per line."""
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, optimizer="adam", iterations=5).train()
    journal_file = out / "journal.jsonl"
    journal_file.write_bytes(journal_file.read_bytes().rstrip(b"\n"))
    _trainer(tiny_llama_dir, out, optimizer="adam", resume=True, iterations=7).train()
    assert _iterations(out) == list(range(7))
    _trainer(tiny_llama_dir, out, optimizer="adam", resume=True).train()
    assert _iterations(out) == list(range(9))
    assert journal_file.read_bytes().endswith(b"}\n")
    assert journal.replay_journal(out).max_abs_diff == 0.0
    _assert_same_adapter(out / "adapter", reference / "adapter")


@pytest.mark.parametrize("stop", ["max_hours", "signal"])
def test_a_stop_after_the_last_iteration_still_finishes_the_run(tiny_llama_dir, tmp_path,
                                                                   stop):
    """--max-hours running out or Ctrl-C during the last iteration: the run is complete, so
    it ends as one (adapter/, final checkpoint), not as "stopped early"."""
    out = tmp_path / "run"
    trainer = _trainer(tiny_llama_dir, out, iterations=1,
                       **({"max_hours": 1e-9} if stop == "max_hours" else {}))

    def interrupt(entry):
        if stop == "signal":
            os.kill(os.getpid(), signal.SIGINT)

    trainer.train(callback=interrupt)
    assert not trainer.stopped_early and trainer.iteration == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert checkpoint.list_checkpoints(out)[-1][0] == 1
    assert _iterations(out) == [0]


def _strip_identity(out: Path) -> None:
    """Make ``out`` look like a run of a lowmem-es that did not record what it trained on."""
    from lowmem_es.run_dir import IDENTITY_KEY

    for _, path in checkpoint.list_checkpoints(out):
        state_file = path / checkpoint.STATE_FILE
        state = json.loads(state_file.read_text())
        del state[IDENTITY_KEY]
        state_file.write_text(json.dumps(state))


def _other_reward(completions, **kwargs):
    return [0.0 for _ in completions]


def test_resume_on_another_base_model_or_data_is_refused_unless_forced(
        tiny_llama_dir, tmp_path, monkeypatch, caplog):
    from lowmem_es import trainer as trainer_module
    from lowmem_es.example import build_tiny_model

    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, iterations=2).train()
    state = checkpoint.read_state(checkpoint.step_dir(out, 2))[trainer_module.IDENTITY_KEY]
    assert state["base_model"] == str(tiny_llama_dir.resolve()) and state["train_rows"] == 8
    assert state["reward_functions"] == ["lowmem_es.rewards:target_fraction"]
    other = build_tiny_model(tmp_path / "other-model", seed=123)  # same architecture

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output_dir checks")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "load_model", no_loading)
        with pytest.raises(ValueError, match=r"base model .*other-model.*--force"):
            _trainer(other, out, resume=True, iterations=3)
        with pytest.raises(ValueError, match=r"reward functions lowmem_es.rewards:"
                           r"target_fraction -> test_checkpoint:_other_reward.*--reward"):
            _trainer(tiny_llama_dir, out, reward=_other_reward, resume=True, iterations=3)
        with pytest.raises(ValueError, match=r"training data 8 rows .* -> 7 rows.*--force"):
            ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(7),
                      args=example_config(str(out), **dict(SMALL, iterations=3)), resume=True)
    assert _iterations(out) == [0, 1]  # nothing was written
    # Forcing puts the new model on record at once: a crash before the next checkpoint
    # (here: no iteration left to run) does not make the next resume need --force again.
    ESTrainer(str(other), [target_fraction], train_dataset=tiny_dataset(8),
              args=example_config(str(out), **dict(SMALL, iterations=2)), resume=True,
              force=True).train()
    assert checkpoint.read_state(checkpoint.step_dir(out, 2))[trainer_module.IDENTITY_KEY][
        "base_model"] == str(other.resolve())
    _trainer(other, out, resume=True, iterations=2)
    assert _iterations(out) == [0, 1]
    forced = ESTrainer(str(other), [target_fraction], train_dataset=tiny_dataset(8),
                       args=example_config(str(out), **dict(SMALL, iterations=3)),
                       resume=True, force=True)
    forced.train()
    assert _iterations(out) == [0, 1, 2]
    # A run from before the record existed resumes, with one warning.
    _strip_identity(out)
    with caplog.at_level("WARNING", logger="lowmem_es"):
        _trainer(tiny_llama_dir, out, resume=True, iterations=4).train()
    assert sum("did not record the base model" in r.message for r in caplog.records) == 1
    assert _iterations(out) == [0, 1, 2, 3]


def test_replay_out_never_destroys_a_directory(reference, tmp_path, capsys):
    """`replay --out` replaces its destination as a whole: the run itself, a folder
    above it, its checkpoints and a directory holding other files are refused."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = sorted(p.name for p in run.iterdir())
    trained = _adapter(run / "adapter")
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    other = tmp_path / "other-run"
    shutil.copytree(reference, other)
    for out, match in ((run, "the run directory"), (tmp_path, "a folder above"),
                       (run / "checkpoints" / "step_000000", "checkpoints"),
                       (precious, "notes.txt"), (run / "adapter", "trained adapter"),
                       (other / "adapter", "trained adapter of the run")):
        assert main(["replay", str(run), "--out", str(out)]) == 2  # a usage error
        assert match in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
    assert (precious / "notes.txt").read_text() == "keep"
    for name, tensor in _adapter(run / "adapter").items():
        assert torch.equal(tensor, trained[name]), name
    assert main(["replay", str(run), "--out", str(tmp_path / "new")]) == 0
    assert main(["replay", str(run), "--out", str(tmp_path / "new")]) == 0  # an adapter dir
    capsys.readouterr()


def test_replay_uses_the_runs_noise_backend(reference, tmp_path, monkeypatch):
    """Compiled and eager noise differ in the last bits: replay follows run.toml."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    toml = (run / "run.toml").read_text()
    assert 'noise_backend = "eager"' in toml
    (run / "run.toml").write_text(toml.replace('noise_backend = "eager"',
                                               'noise_backend = "compiled"'))
    seen = []
    real = journal.replay_journal

    def spy(*args, **kwargs):
        seen.append(kwargs.get("noise_backend"))
        return real(*args, **{**kwargs, "noise_backend": "eager"})

    monkeypatch.setattr(journal, "replay_journal", spy)
    assert main(["replay", str(run)]) == 0
    assert seen == ["compiled"]


def test_resume_without_run_toml_still_checks_the_configuration(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, iterations=3).train()
    (out / "run.toml").unlink()
    with pytest.raises(ValueError, match=r"no run\.toml.*config_hash.*--force"):
        _trainer(tiny_llama_dir, out, resume=True, sigma=0.07, iterations=4)
    _trainer(tiny_llama_dir, out, resume=True, iterations=4).train()  # unchanged: resumes
    assert _iterations(out) == [0, 1, 2, 3]


def test_a_second_process_in_the_same_output_dir_is_refused(tiny_llama_dir, tmp_path,
                                                           lock_holder):
    """While one process trains in output_dir (it holds the lock), another one is refused
    before it loads the model or touches a file there; a killed holder leaves no stale
    lock."""
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, iterations=1).train()
    holder = lock_holder(out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError, match=rf"another lowmem-es process \(pid {holder.pid} "
                       r"on .*\) is training in .*--output-dir"):
        _trainer(tiny_llama_dir, out, resume=True, iterations=2)
    with pytest.raises(ValueError, match="another lowmem-es process"):
        run_dir.lock_run(out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    holder.kill()
    holder.wait()
    _trainer(tiny_llama_dir, out, resume=True, iterations=2).train()
    assert _iterations(out) == [0, 1]
    assert run_dir.lock_run(out) is True  # released at the end of train()
    assert run_dir.lock_run(out) is False  # held already: a nested train() leaves it
    run_dir.unlock_run(out)


def test_resume_of_a_missing_run_warns_and_starts_one(tiny_llama_dir, tmp_path, caplog):
    """--resume into an empty or missing directory (a typo?) says so, then starts a run
    (restart scripts pass --resume from the first launch on)."""
    out = tmp_path / "typo"
    with caplog.at_level("WARNING", logger="lowmem_es"):
        _trainer(tiny_llama_dir, out, resume=True, iterations=1).train()
    assert any("holds no run to continue" in r.getMessage() for r in caplog.records)
    assert _iterations(out) == [0]


def test_resume_with_fewer_iterations_than_done_is_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_llama_dir, out, iterations=6).train()
    with pytest.raises(ValueError, match=r"already done 6 iterations.*at least 6"):
        _trainer(tiny_llama_dir, out, resume=True, iterations=4)
    # Journaled beyond the newest checkpoint counts too (resume would replay those lines).
    shutil.rmtree(checkpoint.step_dir(out, 6))
    with pytest.raises(ValueError, match=r"already done 6 iterations.*at least 6"):
        _trainer(tiny_llama_dir, out, resume=True, iterations=5)
    assert not checkpoint.step_dir(out, 6).exists()
