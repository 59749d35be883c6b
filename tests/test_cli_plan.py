"""``lowmem-es plan`` (lowmem_es/cli/plan.py): the plan of a config.json, its exit codes and
the errors that name the file."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from test_planner import LLAMA31_8B, QWEN25_7B, _plan


def plan_command(*argv):
    from lowmem_es.cli.plan import add_plan_parsers

    parser = argparse.ArgumentParser(prog="lowmem-es")
    add_plan_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


@pytest.fixture
def qwen_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    return tmp_path


def test_plan_command_json(qwen_dir, capsys):
    from lowmem_es.cli.plan import run_plan

    assert run_plan(plan_command("plan", "--model", str(qwen_dir), "--profile", "8gb",
                                 "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == _plan(QWEN25_7B).to_dict()


def test_plan_command_generation_backend(qwen_dir, capsys):
    from lowmem_es.cli.plan import run_plan

    assert run_plan(plan_command("plan", "--model", str(qwen_dir), "--profile", "8gb", "--json",
                         "--generation-backend", "generate")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == _plan(QWEN25_7B, generation_backend="generate").to_dict()
    assert data != _plan(QWEN25_7B).to_dict()
    with pytest.raises(ValueError, match=r"`generation_backend` must be one of"):
        _plan(QWEN25_7B, generation_backend="static")


def test_plan_command_precedence_and_text(qwen_dir, tmp_path, capsys):
    from lowmem_es.cli.plan import run_plan

    run_file = tmp_path / "run.toml"
    run_file.write_text('profile = "12gb"\npopulation_size = 8\nbatch_size = 4\n'
                        "max_prompt_length = 300\n")
    ns = plan_command("plan", "--model", str(qwen_dir / "config.json"), "--config", str(run_file),
              "--batch-size", "2", "--lora-target-modules", "q_proj", "v_proj")
    assert run_plan(ns) == 0
    out = capsys.readouterr().out
    expected = _plan(QWEN25_7B, "12gb", population_size=8, batch_size=2,
                     target_modules=["q_proj", "v_proj"], max_prompt_length=300,
                     max_completion_length=512)
    assert out.strip() == expected.format()
    assert "profile 12gb" in out and "prompt 300 + completion 512" in out


def test_plan_command_no_fit_exits_1(qwen_dir, capsys):
    from lowmem_es.cli.plan import run_plan

    ns = plan_command("plan", "--model", str(qwen_dir), "--profile", "8gb", "--max-prompt-length",
              "65536", "--json")
    assert run_plan(ns) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["over_bytes"] > 0 and data["suggestions"]


def test_plan_command_errors(tmp_path):
    from lowmem_es.cli.plan import run_plan

    with pytest.raises(FileNotFoundError, match="neither a local model directory nor"):
        run_plan(plan_command("plan", "--model", "Qwen/Qwen2.5-7B", "--profile", "8gb"))
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        run_plan(plan_command("plan", "--model", str(tmp_path), "--profile", "8gb"))
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    with pytest.raises(ValueError, match="needs --profile"):
        run_plan(plan_command("plan", "--model", str(tmp_path)))


@pytest.mark.parametrize(("change", "match"), [
    ({"hidden_size": "64"}, r"`hidden_size` should be a positive integer .* is \"64\""),
    ({"num_attention_heads": 0}, r"`num_attention_heads` should be .* is 0"),
    ({"vocab_size": -5}, r"`vocab_size` should be .* is -5"),
])
def test_plan_command_bad_model_config_names_the_file(tmp_path, change, match):
    from lowmem_es.cli.plan import run_plan

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**QWEN25_7B, **change}))
    with pytest.raises(ValueError, match=rf"^in model config {re.escape(repr(str(path)))}: "
                                         + match):
        run_plan(plan_command("plan", "--model", str(tmp_path), "--profile", "8gb"))


def test_plan_command_non_utf8_model_config_names_the_file(tmp_path):
    from lowmem_es.cli.plan import run_plan

    path = tmp_path / "config.json"
    path.write_bytes(json.dumps(QWEN25_7B).replace("qwen2", "qwén2").encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^model config {re.escape(repr(str(path)))} is "
                                         r"not UTF-8 text \(byte 0xe9 on line 1"):
        run_plan(plan_command("plan", "--model", str(path), "--profile", "8gb"))


def test_plan_command_bad_config_file_value_names_the_file(qwen_dir, tmp_path):
    """`plan --config` merges the file with the profile and flags: the bad value is
    caught as the file is read, so the error still names it."""
    from lowmem_es.cli.plan import run_plan

    run_file = tmp_path / "run.toml"
    run_file.write_text('sigma = "x"\n')
    with pytest.raises(ValueError, match=rf"^in config file {re.escape(repr(str(run_file)))}: "
                                         r"`sigma` should be a positive number"):
        run_plan(plan_command("plan", "--model", str(qwen_dir), "--profile", "8gb", "--config",
                      str(run_file)))


def test_plan_command_with_lengths_lowered_says_training_would_stop(tmp_path, capsys):
    """When only shorter lengths than the profile's fit one row, `plan` shows that plan but
    exits 1 and names the flags: `train` keeps the configured lengths and would stop."""
    from lowmem_es.cli.plan import run_plan
    from lowmem_es.profiles import load_profile

    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    body = Path(load_profile("8gb").source).read_text()
    body = re.sub(r"(?m)^max_prompt_length = \d+", "max_prompt_length = 32768", body)
    body = re.sub(r"(?m)^max_completion_length = \d+", "max_completion_length = 8192", body)
    profile = tmp_path / "long.toml"
    profile.write_text(body)
    assert run_plan(plan_command("plan", "--model", str(tmp_path), "--profile", str(profile))) == 1
    captured = capsys.readouterr()
    assert "stops before the first iteration" in captured.err
    assert "32768 + 8192 tokens" in captured.err
    prompt = int(re.search(r"--max-prompt-length (\d+)", captured.err).group(1))
    completion = int(re.search(r"--max-completion-length (\d+)", captured.err).group(1))
    assert prompt < 32768 and completion < 8192
    # Those lengths, given explicitly, are a plan that training would run.
    assert run_plan(plan_command("plan", "--model", str(tmp_path), "--profile", str(profile),
                         "--max-prompt-length", str(prompt), "--max-completion-length",
                         str(completion))) == 0
    capsys.readouterr()
    assert run_plan(plan_command("plan", "--model", str(tmp_path), "--profile", str(profile),
                         "--json")) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["configured_lengths"] == [32768, 8192]


def test_plan_sizes_rows_from_the_prompts_each_member_sees(qwen_dir, tmp_path, capsys):
    """With per-pair prompts a member's rows are prompts_per_pair, not batch_size."""
    from lowmem_es.cli.plan import run_plan

    run_file = tmp_path / "run.toml"
    run_file.write_text('profile = "12gb"\nbatch_size = 8\nprompt_assignment = "per_pair"\n'
                        "prompts_per_pair = 2\n")
    assert run_plan(plan_command("plan", "--model", str(qwen_dir), "--config", str(run_file),
                                 "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == _plan(QWEN25_7B, "12gb", batch_size=2).to_dict()
    assert data != _plan(QWEN25_7B, "12gb", batch_size=8).to_dict()
