"""VRAM profiles: the shipped TOML files, validation errors, ESConfig overrides, the CLI list."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import pytest

from lowmem_es.config import ESConfig
from lowmem_es.profiles import (
    GIB,
    Profile,
    list_profiles,
    load_profile,
    profile_dir,
    resolve_es_values,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["8gb", "12gb", "16gb", "24gb", "cpu"]


def test_shipped_profiles_load_in_budget_order():
    assert list_profiles() == SHIPPED
    budgets = [load_profile(name).memory_budget_gib for name in SHIPPED[:4]]
    assert budgets == [8.0, 12.0, 16.0, 24.0]
    assert load_profile("cpu").device == "cpu"
    assert load_profile("cpu").compute_dtype == "float32"
    assert all(load_profile(name).device == "cuda" for name in SHIPPED[:4])


def test_8gb_profile_leaves_the_issue_target_for_tensors():
    """8 GiB - 0.8 reserve = 7.2 GiB allocatable (issue 4's target); 5% headroom below it."""
    profile = load_profile("8gb")
    assert profile.usable_bytes == int(7.2 * GIB)
    assert profile.target_bytes == int(int(7.2 * GIB) * 0.95)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_profile_key_is_commented(name):
    """Plain, commented TOML: a comment line sits right above each key (or its block)."""
    lines = (profile_dir() / f"{name}.toml").read_text().splitlines()
    assert set(tomllib.loads("\n".join(lines))) == set(Profile.keys())
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            above = lines[index - 1]
            assert above.startswith("#") or (above and not above.startswith("#")), (
                f"{name}.toml: key on line {index + 1} has no comment: {line!r}")


def test_profiles_ship_as_package_data():
    """The TOML files live in the package and pyproject's package-data installs them."""
    assert profile_dir().resolve() == (ROOT / "lowmem_es" / "profiles").resolve()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["lowmem_es"]
    assert "profiles/*.toml" in package_data
    assert sorted(p.stem for p in profile_dir().glob("*.toml")) == sorted(SHIPPED)


def _write(tmp_path, text, name="card.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
memory_budget_gib = 10.0
reserve_gib = 1.0
workspace_mib = 128
headroom_fraction = 0.05
compute_dtype = "bfloat16"
max_rows_in_flight = 32
max_prompt_length = 128
max_completion_length = 64
"""


def test_profile_from_a_path(tmp_path):
    profile = load_profile(str(_write(tmp_path, BASE)))
    assert profile.memory_budget_gib == 10.0
    assert profile.name.endswith("card.toml")
    assert profile.kv_dtype == "bfloat16"  # auto -> compute dtype
    assert profile.embedding_on_cpu is False


def test_unknown_key_lists_the_valid_keys(tmp_path):
    path = _write(tmp_path, BASE + "vram_gb = 8\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['vram_gb'\].*valid keys are.*"
                                         r"memory_budget_gib"):
        load_profile(str(path))


def test_missing_key_is_named(tmp_path):
    path = _write(tmp_path, BASE.replace("reserve_gib = 1.0\n", ""))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['reserve_gib'\]"):
        load_profile(str(path))


def test_unknown_name_lists_the_shipped_profiles(tmp_path):
    with pytest.raises(ValueError, match=r"unknown profile '6gb'.*\['12gb', '16gb', '24gb', "
                                         r"'8gb', 'cpu'\]"):
        load_profile("6gb")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_profile(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("value", [5, True, None, ""])
def test_profile_that_is_not_a_name_or_path_is_a_value_error(value):
    with pytest.raises(ValueError, match=r"`profile` should be a profile name \(12gb.*path "
                                         r"of a TOML file, but the value is " + repr(value)):
        load_profile(value)


def test_invalid_toml_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="not valid TOML"):
        load_profile(str(_write(tmp_path, "memory_budget_gib = = 3")))


def test_non_utf8_profile_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "card.toml"
    path.write_bytes((BASE + 'description = "carte graphique à 10 Go"\n').encode("cp1252"))
    with pytest.raises(ValueError) as caught:
        load_profile(str(path))
    assert str(caught.value) == (f"profile {str(path)!r} is not UTF-8 text (byte 0xe0 on "
                                 "line 10 cannot be decoded); save it with UTF-8 encoding")


def test_profile_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "card.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_profile(str(path)).memory_budget_gib == 10.0


@pytest.mark.parametrize(("change", "match"), [
    ("reserve_gib = 12.0", r"`reserve_gib`.*below memory_budget_gib"),
    ("compute_dtype = \"fp8\"", r"`compute_dtype`.*one of"),
    ("max_rows_in_flight = 0", r"`max_rows_in_flight`.*positive integer.*0"),
    ("max_prompt_length = 1.5", r"`max_prompt_length`.*positive integer"),
    ("headroom_fraction = 0.7", r"`headroom_fraction`.*\[0, 0.5\)"),
    ("memory_budget_gib = -1", r"`memory_budget_gib`.*non-negative"),
    # Non-finite numbers used to pass and crash later (int(inf) in usable_bytes).
    ("memory_budget_gib = inf", r"`memory_budget_gib`.*finite number.*inf"),
    ("reserve_gib = nan", r"`reserve_gib`.*finite number.*nan"),
    ("workspace_mib = inf", r"`workspace_mib`.*finite number.*inf"),
    ("headroom_fraction = nan", r"`headroom_fraction`.*finite number.*nan"),
])
def test_bad_values_name_key_value_and_fix(tmp_path, change, match):
    key = change.split(" = ")[0]
    text = "\n".join(change if line.startswith(key + " ") else line
                     for line in BASE.splitlines())
    with pytest.raises(ValueError, match=match):
        load_profile(str(_write(tmp_path, text)))


def test_kv_cache_dtype_must_follow_compute_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"`kv_cache_dtype`.*a 16-bit cache in another dtype"):
        load_profile(str(_write(tmp_path, BASE + 'kv_cache_dtype = "float32"\n')))
    assert load_profile(str(_write(tmp_path, BASE + 'kv_cache_dtype = "int8"\n'))
                        ).kv_dtype == "int8"
    assert load_profile(str(_write(tmp_path, BASE + 'kv_cache_dtype = "bfloat16"\n'))
                        ).kv_dtype == "bfloat16"


def test_embedding_on_cpu_only_for_cuda(tmp_path):
    with pytest.raises(ValueError, match=r"`embedding_on_cpu`.*only applies to cuda"):
        load_profile(str(_write(tmp_path, BASE + 'device = "cpu"\nembedding_on_cpu = true\n')))


def test_es_overrides_build_a_valid_esconfig():
    for name in SHIPPED:
        profile = load_profile(name)
        config = ESConfig(**profile.es_overrides())
        assert config.profile == name
        assert config.max_prompt_length == profile.max_prompt_length
        assert config.max_completion_length == profile.max_completion_length
        assert config.rows_per_chunk == profile.max_rows_in_flight
        assert config.compute_dtype == profile.compute_dtype
        assert config.device == profile.device


def test_precedence_profile_then_config_file_then_flags():
    profile = load_profile("8gb")
    values = resolve_es_values(profile, {"max_prompt_length": 100, "sigma": 0.2},
                               {"max_prompt_length": 50, "lora_rank": None, "seed": 3})
    config = ESConfig(**values)
    assert config.max_prompt_length == 50  # flag beats file beats profile
    assert config.sigma == 0.2  # file
    assert config.max_completion_length == 256  # profile beats ESConfig's default (64)
    assert config.lora_rank == ESConfig().lora_rank  # flag None = not given
    assert config.seed == 3


def _cli(*argv):
    from lowmem_es.cli.plan import add_plan_parsers

    parser = argparse.ArgumentParser(prog="lowmem-es")
    add_plan_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_profiles_command_lists_every_profile(capsys):
    from lowmem_es.cli.plan import run_profiles

    assert run_profiles(_cli("profiles")) == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        assert f"\n{name} " in out
    assert run_profiles(_cli("profiles", "--json")) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in listed] == SHIPPED
    assert listed[0]["memory_budget_gib"] == 8.0
