"""Tests of the ``lowmem-es`` command line (lowmem_es/cli/).

Flags come from ESConfig fields; precedence is defaults < config file < flags; user errors
exit with code 2 and one message on stderr. One end-to-end smoke runs the tiny built-in
example for 2 iterations (~10 s on 2 CPU cores). CPU only.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_es.cli import build_parser, main
from lowmem_es.cli.common import resolve_config
from lowmem_es.config import ESConfig
from lowmem_es.tasks.jsonl import read_jsonl as read_jsonl_lines


def read_jsonl(path):
    return [{k: v for k, v in row.items() if k != "_line"} for row in read_jsonl_lines(path)]


def _parse(*args: str):
    return build_parser().parse_args(["train", *args])


# --- flags and precedence ---

def test_no_flags_gives_defaults():
    assert resolve_config(_parse()) == ESConfig()


def test_precedence_defaults_file_flags(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text("sigma = 0.2\nlearning_rate = 0.3\nlora_rank = 2\n")
    defaults = {"sigma": 0.1, "learning_rate": 0.1, "seed": 5, "batch_size": 2}
    ns = _parse("--config", str(config_file), "--learning-rate", "0.4", "--batch-size", "3")
    config = resolve_config(ns, defaults=defaults)
    assert config.seed == 5  # defaults dict only
    assert config.sigma == 0.2  # file beats defaults dict
    assert config.lora_rank == 2  # file beats ESConfig defaults
    assert config.learning_rate == 0.4  # flag beats file
    assert config.batch_size == 3  # flag beats defaults dict
    assert config.population_size == ESConfig().population_size  # untouched


def test_es_table_config_file(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text("[es]\npopulation_size = 4\n")
    assert resolve_config(_parse("--config", str(config_file))).population_size == 4


def test_typed_flags():
    ns = _parse("--population-size", "12", "--sigma", "0.05", "--lora-alpha", "32",
                "--lora-target-modules", "q_proj", "v_proj", "--reward-weights", "1", "0.5",
                "--antithetic", "false", "--load-in-4bit", "no", "--device", "cpu",
                "--profile", "cpu")
    config = resolve_config(ns)
    assert config.population_size == 12 and type(config.population_size) is int
    assert config.sigma == 0.05
    assert config.lora_alpha == 32.0 and type(config.lora_alpha) is float
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.reward_weights == [1.0, 0.5]
    assert config.antithetic is False and config.load_in_4bit is False
    assert (config.device, config.profile) == ("cpu", "cpu")


@pytest.mark.parametrize(("text", "value"), [("true", True), ("False", False), ("1", True),
                                             ("0", False), ("yes", True), ("off", False)])
def test_bool_flag_values(text, value):
    assert resolve_config(_parse("--antithetic", text)).antithetic is value


def test_false_flag_overrides_true_in_file(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text("antithetic = true\npopulation_size = 5\n")
    # population_size = 5 alone is invalid; the flag's antithetic=False makes it valid.
    config = resolve_config(_parse("--config", str(config_file), "--antithetic", "false"))
    assert (config.antithetic, config.population_size) == (False, 5)


def test_every_field_has_a_flag(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--help"])
    assert caught.value.code == 0
    help_text = capsys.readouterr().out
    for name in ESConfig.field_names():
        assert "--" + name.replace("_", "-") in help_text


@pytest.mark.parametrize("args", [["--antithetic", "maybe"], ["--population-size", "ten"],
                                  ["--sigma", "big"]])
def test_unparseable_flag_exits_2(capsys, args):
    with pytest.raises(SystemExit) as caught:
        main(["train", *args])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert args[0] in err and repr(args[1]) in err


# --- user errors: exit code 2, message on stderr ---

def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("lowmem-es: error: ")
    return captured.err


def test_model_without_dataset(capsys):
    assert "--dataset" in _error(capsys, ["train", "--model", "X"])


def test_model_without_reward(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    # Without --reward the rows are scored GSM8K-style, so they need an answer field.
    assert "--answer-field" in _error(capsys, ["train", "--model", "X", "--dataset",
                                               str(data)])


def test_dataset_without_model(capsys):
    err = _error(capsys, ["train", "--dataset", "f.jsonl"])
    assert "--dataset/--task need --model" in err


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "missing.toml"
    err = _error(capsys, ["train", "--config", str(missing)])
    assert str(missing) in err and "does not exist" in err


def test_missing_dataset_file(capsys, tmp_path):
    missing = tmp_path / "missing.jsonl"
    err = _error(capsys, ["train", "--model", "X", "--dataset", str(missing),
                          "--reward", "exact_match"])
    assert str(missing) in err


def test_bad_jsonl_line_names_file_and_line(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    err = _error(capsys, ["train", "--model", "X", "--dataset", str(data),
                          "--reward", "exact_match"])
    assert f"{data}:3" in err


def test_invalid_config_value_names_field(capsys, tmp_path):
    err = _error(capsys, ["train", "--population-size", "3",
                          "--output-dir", str(tmp_path / "run")])
    assert "`population_size`" in err and "the value passed is 3" in err
    assert not (tmp_path / "run").exists()  # nothing written before the config is valid


def test_invalid_config_file_value(capsys, tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text("sigma = -1.0\n")
    err = _error(capsys, ["train", "--config", str(config_file)])
    assert "`sigma`" in err and "-1.0" in err


# --- read_jsonl ---

def test_read_jsonl_rows_skip_blank_lines(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "answer": 1}\n\n  \n{"prompt": "b"}\n')
    assert read_jsonl(str(data)) == [{"prompt": "a", "answer": 1}, {"prompt": "b"}]


@pytest.mark.parametrize(("bad_line", "what"), [('{"prompt": ', "not valid JSON"),
                                                ('["a", "b"]', "not an object"),
                                                ('"text"', "not an object")])
def test_read_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, what):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a"}\n\n' + bad_line + '\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{data}:3 is ") + ".*" + re.escape(what)):
        read_jsonl(str(data))


def test_read_jsonl_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        read_jsonl(str(missing))


# --- end to end ---

def test_train_tiny_example_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--example", "tiny", "--output-dir", str(out), "--iterations", "2",
                 "--population-size", "4"]) == 0

    saved = ESConfig.from_toml(out / "run.toml")
    assert (saved.iterations, saved.population_size, saved.output_dir) == (2, 4, str(out))
    assert saved.sigma == 0.05  # the example's tuned value, not the ESConfig default

    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert len(journal) == 2
    for record in journal:
        assert len(record["fitness"]) == 4
        assert all(0.0 <= f <= 1.0 for f in record["fitness"])  # target_fraction range
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    for entry, record in zip(metrics, journal, strict=True):  # metrics summarise the journal
        assert entry["reward_mean"] == pytest.approx(sum(record["fitness"]) / 4)

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_module_help_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lowmem_es.cli", "train", "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "--population-size" in result.stdout
    assert "--lora-target-modules" in result.stdout


def test_profile_sits_between_defaults_and_config_file(tmp_path):
    from lowmem_es.cli import build_parser
    from lowmem_es.cli.common import resolve_config

    config_file = tmp_path / "run.toml"
    config_file.write_text("max_completion_length = 20\n")
    ns = build_parser().parse_args(["train", "--profile", "cpu", "--config", str(config_file),
                                    "--max-prompt-length", "99"])
    config = resolve_config(ns, defaults={"max_prompt_length": 7, "rows_per_chunk": 5})
    assert config.profile == "cpu"
    assert config.rows_per_chunk == 256  # the cpu profile's cap beats the defaults
    assert config.max_completion_length == 20  # the file beats the profile
    assert config.max_prompt_length == 99  # the flag beats everything
    assert main(["train", "--profile", "no-such-profile"]) == 2


def test_plan_and_profiles_commands(tiny_llama_dir, capsys):
    assert main(["profiles"]) == 0
    assert "8gb" in capsys.readouterr().out
    assert main(["plan", "--model", str(tiny_llama_dir), "--profile", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


def test_train_on_a_task_and_on_a_jsonl_dataset(tiny_llama_dir, tmp_path):
    small = ["--iterations", "1", "--population-size", "2", "--batch-size", "2",
             "--max-completion-length", "3", "--lora-rank", "2"]
    out = tmp_path / "task"
    assert main(["train", "--model", str(tiny_llama_dir), "--task", "arithmetic",
                 "--output-dir", str(out), *small]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1 =", "solution": i + 1}) + "\n"
                            for i in range(10)))
    out = tmp_path / "jsonl"
    assert main(["train", "--model", str(tiny_llama_dir), "--dataset", str(data),
                 "--prompt-field", "question", "--answer-field", "solution",
                 "--output-dir", str(out), *small]) == 0
    journal = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    assert len(journal) == 1 and len(journal[0]["fitness"]) == 2


# --- flags that do not apply, the resume command, output_dir checks before evaluation ---

@pytest.mark.parametrize(("argv", "flag", "run"), [
    (["--example", "tiny", "--reward", "exact_match"], "--reward", "--example tiny"),
    (["--example", "tiny", "--prompt-field", "q"], "--prompt-field", "--example tiny"),
    (["--example", "tiny", "--answer-field", "a"], "--answer-field", "--example tiny"),
    (["--example", "tiny", "--eval-dataset", "e.jsonl"], "--eval-dataset", "--example tiny"),
    (["--reward", "exact_match"], "--reward", "the embedded default run"),
    (["--model", "X", "--example", "tiny", "--task", "arithmetic"], "--example tiny",
     "--model"),
    (["--model", "X", "--task", "arithmetic", "--eval-dataset", "e.jsonl"], "--eval-dataset",
     "--task arithmetic"),
    (["--model", "X", "--task", "arithmetic", "--prompt-field", "q"], "--prompt-field",
     "--task arithmetic"),
])
def test_flags_that_would_be_ignored_are_errors(capsys, tmp_path, monkeypatch, argv, flag,
                                                run):
    from lowmem_es import default_model, example

    def fail(*args, **kwargs):
        raise AssertionError(f"the run started although {flag} does not apply to it")

    monkeypatch.setattr(default_model, "run_default", fail)
    monkeypatch.setattr(example, "build_tiny_model", fail)
    out = tmp_path / "run"
    err = _error(capsys, ["train", *argv, "--output-dir", str(out)])
    assert f"{flag} does not apply" in err and run in err and "drop" in err
    assert not out.exists()  # refused before anything was built or written


def test_resume_command_drops_overwrite_keeps_globals_and_quotes():
    from lowmem_es.cli.train import resume_command

    argv = ["-v", "train", "--example", "tiny", "--overwrite", "--output-dir", "my runs/a b",
            "--iterations", "5"]
    command = resume_command(argv)
    assert shlex.split(command) == ["lowmem-es", "-v", "train", "--example", "tiny",
                                    "--output-dir", "my runs/a b", "--iterations", "5",
                                    "--resume"]
    assert "--overw" not in resume_command(["train", "--overw"])  # argparse's prefix of it
    assert shlex.split(resume_command(["train", "--resume"], resume_given=True)) == [
        "lowmem-es", "train", "--resume"]
    build_parser().parse_args(shlex.split(command)[1:])  # a command line argparse accepts


def test_resume_command_under_torchrun_names_the_launcher(monkeypatch, caplog):
    """A torchrun job stopped early prints a torchrun command (a plain `lowmem-es` one
    would silently continue it in one process)."""
    import argparse

    from lowmem_es import distributed
    from lowmem_es.cli.train import _log_resume_command

    monkeypatch.setattr(distributed, "world_size", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    ns = argparse.Namespace(argv=["train", "--model", "m", "--overwrite"], resume=False)
    with caplog.at_level("WARNING", logger="lowmem_es"):
        _log_resume_command(ns, 3)
    [message] = [r.getMessage() for r in caplog.records]
    assert ("torchrun --nnodes=2 --nproc_per_node=4 -m lowmem_es.cli train --model m "
            "--resume\n") in message and "rendezvous" in message


def test_printed_resume_command_continues_a_run_started_with_overwrite(tmp_path, caplog):
    """--max-hours stops an --overwrite run after one of two iterations; the printed
    command (global -v, a path with a space) must run as printed and finish the run."""
    out = tmp_path / "my run"
    small = ["--iterations", "2", "--population-size", "4", "--batch-size", "2",
             "--max-completion-length", "3"]
    with caplog.at_level("WARNING", logger="lowmem_es"):
        assert main(["-v", "train", "--example", "tiny", "--overwrite", "--output-dir",
                     str(out), "--max-hours", "1e-9", *small]) == 0
    messages = [r.getMessage() for r in caplog.records if "continue with:" in r.getMessage()]
    assert len(messages) == 1 and not (out / "adapter").exists()
    argv = shlex.split(messages[0].split("continue with:", 1)[1])
    assert argv[:3] == ["lowmem-es", "-v", "train"]
    assert "--overwrite" not in argv and argv.count("--resume") == 1
    assert argv[argv.index("--output-dir") + 1] == str(out)
    assert main(argv[1:]) == 0
    journal = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    assert [j["iteration"] for j in journal] == [0, 1]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _fake_run(out, **config):
    """An output_dir that holds a run as far as the guards can tell (no model needed)."""
    from lowmem_es.config import to_toml

    out.mkdir(parents=True)
    (out / "journal.jsonl").write_text('{"iteration": 0}\n')
    (out / "run.toml").write_text(to_toml(ESConfig(output_dir=str(out), **config).to_dict()))


@pytest.mark.parametrize(("extra", "message"), [
    ([], "already holds a run"),
    (["--resume", "--sigma", "0.3"], r"configuration changed .*sigma"),
])
def test_output_dir_clash_is_reported_before_any_model_work(
        tiny_llama_dir, tmp_path, monkeypatch, capsys, extra, message):
    """The before-training evaluation can take hours: an output_dir that cannot be used
    must be reported first, for --model runs and for the tiny example alike."""
    from lowmem_es import example, trainer

    def fail(*args, **kwargs):
        raise AssertionError("model work ran before the output_dir check")

    monkeypatch.setattr(trainer.ESTrainer, "evaluate", fail)
    monkeypatch.setattr(trainer, "load_model", fail)
    monkeypatch.setattr(example, "build_tiny_model", fail)
    out = tmp_path / "model-run"
    _fake_run(out)
    err = _error(capsys, ["train", "--model", str(tiny_llama_dir), "--task", "arithmetic",
                          "--output-dir", str(out), *extra])
    assert re.search(message, err)
    out = tmp_path / "example-run"
    _fake_run(out, **example.EXAMPLE_CONFIG)
    err = _error(capsys, ["train", "--example", "tiny", "--output-dir", str(out), *extra])
    assert re.search(message, err)
    assert not (out / "base-model").exists()


def test_output_dir_that_is_a_file_is_refused_before_any_model_work(
        tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from lowmem_es import trainer

    def fail(*args, **kwargs):
        raise AssertionError("model work ran before the output_dir check")

    monkeypatch.setattr(trainer.ESTrainer, "evaluate", fail)
    monkeypatch.setattr(trainer, "load_model", fail)
    out = tmp_path / "afile"
    out.write_text("mine")
    for extra in ([], ["--resume"], ["--overwrite"]):
        err = _error(capsys, ["train", "--model", str(tiny_llama_dir), "--task", "arithmetic",
                              "--output-dir", str(out), *extra])
        assert "is a file, not a directory" in err and "--output-dir" in err
    assert out.read_text() == "mine"


def test_empty_splits_of_a_small_dataset_are_explained(tiny_llama_dir, tmp_path, monkeypatch,
                                                      capsys, caplog):
    """A file too small for the hashed hold-out: no training rows is an error saying why
    (it was "`train_dataset` is empty"); no held-out rows is a warning for train (its
    evaluations then score the training rows) and an error for eval."""
    from lowmem_es import trainer
    from lowmem_es.tasks.jsonl import dataset_task

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(12)]
    splits = [dataset_task(_jsonl(tmp_path / f"r{i}.jsonl", [row])).splits(seed=0)
              for i, row in enumerate(rows)]
    held = next(i for i, s in enumerate(splits) if s["eval"])
    trained = next(i for i, s in enumerate(splits) if s["train"])

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(trainer.ESTrainer, "__init__", stop)
    base = ["--model", str(tiny_llama_dir), "--output-dir", str(tmp_path / "run")]
    err = _error(capsys, ["train", *base, "--dataset", str(tmp_path / f"r{held}.jsonl")])
    assert re.search(r"train split of .*r\d+\.jsonl' is empty \(1 rows in all; about 20% "
                     r".*--eval-dataset", err)
    with caplog.at_level("WARNING", logger="lowmem_es"), pytest.raises(Stop):
        main(["train", *base, "--dataset", str(tmp_path / f"r{trained}.jsonl")])
    assert any("held-out split" in r.getMessage() and "score the training rows"
               in r.getMessage() for r in caplog.records)
    err = _error(capsys, ["eval", "--model", str(tiny_llama_dir), "--dataset",
                          str(tmp_path / f"r{trained}.jsonl")])
    assert "the eval split of" in err and "is empty" in err


def test_default_run_stopped_early_prints_the_resume_command(monkeypatch, caplog):
    from lowmem_es import default_model

    calls = []
    monkeypatch.setattr(default_model, "run_default", lambda config, **flags: calls.append(
        flags) or {"stopped_early": True, "iterations_done": 3})
    with caplog.at_level("WARNING", logger="lowmem_es"):
        assert main(["train", "--overwrite", "--max-hours", "1"]) == 0
    assert calls == [{"resume": False, "overwrite": True, "force": False}]
    assert any(r.getMessage().endswith("continue with:\n  lowmem-es train --max-hours 1 "
                                       "--resume") for r in caplog.records)


def test_yes_no_flags_stand_alone_or_take_a_value():
    """`--pass-at-k` alone used to fail ("expected one argument"), as the README wrote it."""
    parser = build_parser()
    ns = parser.parse_args(["train", "--pass-at-k", "--antithetic", "false",
                            "--nf4-kernel", "yes"])
    assert ns.pass_at_k is True and ns.antithetic is False and ns.nf4_kernel is True
    assert parser.parse_args(["train"]).pass_at_k is None  # not given: the config's
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--antithetic", "maybe"])


def test_a_closed_stdout_is_no_error(tmp_path):
    """`lowmem-es profiles --json | head`: the reader leaving is not a lowmem-es error."""
    result = subprocess.run(f"{shlex.quote(sys.executable)} -m lowmem_es.cli profiles --json "
                            "| true; echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stdout.strip() == "141" and "error" not in result.stderr


def test_a_second_start_is_refused_before_any_model_work(tiny_llama_dir, tmp_path,
                                                         monkeypatch, capsys, lock_holder):
    """While a run holds output_dir, another start is refused before it builds, loads or
    evaluates anything (it was refused only in train(), after all that), for each kind
    of run; the lock is released when the command returns."""
    from lowmem_es import default_model, example, run_dir, trainer

    def fail(*args, **kwargs):
        raise AssertionError("model work ran before the lock was checked")

    monkeypatch.setattr(trainer, "load_model", fail)
    monkeypatch.setattr(example, "build_tiny_model", fail)
    monkeypatch.setattr(default_model, "ensure_default_model", fail)
    out = tmp_path / "run"
    holder = lock_holder(out)
    for argv in (["--example", "tiny"], [], ["--model", str(tiny_llama_dir), "--task",
                                             "arithmetic"]):
        err = _error(capsys, ["train", "--output-dir", str(out), *argv])
        assert f"another lowmem-es process (pid {holder.pid}" in err
    holder.kill()
    holder.wait()
    assert run_dir.lock_run(out) is True  # no lock left behind by the refused starts
    run_dir.unlock_run(out)


def test_sigterm_before_training_ends_like_ctrl_c(tiny_llama_dir, tmp_path, monkeypatch,
                                                  capsys):
    """A SIGTERM while the model loads (before the trainer's own handlers) used to kill
    the process silently; now it is reported, the lock is released and the previous
    handler comes back."""
    import os
    import signal

    from lowmem_es import run_dir, trainer

    def load_and_get_terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(trainer, "load_model", load_and_get_terminated)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--task", "arithmetic",
                 "--output-dir", str(out)]) == 130
    assert "lowmem-es: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
    assert run_dir.lock_run(out) is True  # released
    run_dir.unlock_run(out)
