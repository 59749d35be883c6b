"""Tests of ESConfig (lowmem_es/config.py): validation messages, TOML round trips, result_hash.

Every user-facing error must name the field in backticks, quote the bad value and say what
to do instead (../shared/STYLE.md). CPU only, no model, no torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from pathlib import Path

import pytest

from lowmem_es.config import (
    BOOL_FIELDS,
    DEFAULT_TARGET_MODULES,
    FLOAT_FIELDS,
    MAX_SEED,
    NON_RESULT_FIELDS,
    ESConfig,
    read_toml_values,
    to_toml,
)


def test_defaults_are_valid_and_documented():
    config = ESConfig()
    config.validate()  # idempotent: validating a valid config again changes nothing
    assert config.antithetic and config.population_size % 2 == 0
    assert config.lora_target_modules == list(DEFAULT_TARGET_MODULES)
    # Each instance owns its list: mutating one must not leak into the next default.
    config.lora_target_modules.append("gate_proj")
    assert ESConfig().lora_target_modules == list(DEFAULT_TARGET_MODULES)
    for field in dataclasses.fields(ESConfig):
        assert field.metadata.get("help"), f"field {field.name} has no help text"


# (overrides, field named in backticks, the bad value as repr'd, words of the fix)
BAD_VALUES = [
    ({"population_size": 1}, "population_size", "1", "at least 2"),
    ({"population_size": 0}, "population_size", "0", "positive integer"),
    ({"population_size": -4}, "population_size", "-4", "positive integer"),
    ({"sigma": 0.0}, "sigma", "0.0", "positive number"),
    ({"sigma": -0.01}, "sigma", "-0.01", "positive number"),
    ({"sigma": math.nan}, "sigma", "nan", "positive number"),
    ({"sigma": True}, "sigma", "True", "positive number"),
    ({"learning_rate": 0}, "learning_rate", "0", "positive number"),
    ({"learning_rate": -1e-3}, "learning_rate", "-0.001", "positive number"),
    ({"fitness_shaping": "rank"}, "fitness_shaping", "'rank'", "centered_rank"),
    ({"optimizer": "adamw"}, "optimizer", "'adamw'", "'sgd', 'adam'"),
    ({"compute_dtype": "fp16"}, "compute_dtype", "'fp16'", "bfloat16"),
    ({"num_generations": 4}, "num_generations", "4", "temperature > 0"),
    ({"lora_target_modules": []}, "lora_target_modules", "[]", "non-empty list"),
    ({"lora_target_modules": ["q_proj", ""]}, "lora_target_modules", "['q_proj', '']",
     "non-empty list"),
    ({"population_size": True}, "population_size", "True", "positive integer"),
    ({"iterations": True}, "iterations", "True", "positive integer"),
    ({"seed": False}, "seed", "False", "non-negative integer"),
    ({"batch_size": 8.0}, "batch_size", "8.0", "positive integer"),
    ({"save_steps": -1}, "save_steps", "-1", "non-negative integer"),
    ({"temperature": -0.5}, "temperature", "-0.5", "0 means greedy"),
    ({"temperature": 1e-40}, "temperature", "1e-40", "at least 1e-30"),
    ({"weight_decay": -0.1}, "weight_decay", "-0.1", ">= 0"),
    ({"device": "gpu"}, "device", "'gpu'", "'cuda' or 'cuda:N'"),
    ({"device": "tpu:0"}, "device", "'tpu:0'", "'cuda' or 'cuda:N'"),
    ({"noise_backend": "triton"}, "noise_backend", "'triton'", "compiled"),
    ({"reward_weights": [1.0, "2"]}, "reward_weights", "[1.0, '2']", "list of numbers"),
    # Bools: a TOML string "false" is truthy and must not silently mean True.
    ({"antithetic": "false"}, "antithetic", "'false'", "`antithetic = false` without quotes"),
    ({"antithetic": 0}, "antithetic", "0", "true or false"),
    ({"load_in_4bit": "false"}, "load_in_4bit", "'false'", "true or false"),
    ({"pass_at_k": "no"}, "pass_at_k", "'no'", "true or false"),
    ({"nf4_kernel": 1}, "nf4_kernel", "1", "true or false"),
    # Non-finite floats pass "> 0" / ">= 0" and used to fail mid-run.
    ({"learning_rate": math.inf}, "learning_rate", "inf", "finite number"),
    ({"sigma": math.inf}, "sigma", "inf", "finite number"),
    ({"lora_alpha": math.inf}, "lora_alpha", "inf", "finite number"),
    ({"weight_decay": math.inf}, "weight_decay", "inf", "finite number"),
    ({"temperature": math.inf}, "temperature", "inf", "finite number"),
    ({"correct_threshold": -math.inf}, "correct_threshold", "-inf", "finite number"),
    ({"correct_threshold": math.nan}, "correct_threshold", "nan", "finite number"),
    ({"distributed_timeout": math.inf}, "distributed_timeout", "inf", "finite number"),
    ({"max_hours": math.inf}, "max_hours", "inf", "0 means no limit"),
    ({"reward_weights": [1.0, math.inf]}, "reward_weights", "[1.0, inf]", "finite"),
    ({"seed": MAX_SEED + 1}, "seed", str(MAX_SEED + 1), "at most 2**63 - 1"),
    ({"seed": 10**20}, "seed", str(10**20), "at most 2**63 - 1"),
    ({"lora_target_modules": 5}, "lora_target_modules", "5", "non-empty list"),
    ({"lora_target_modules": {"q_proj": 1}}, "lora_target_modules", "{'q_proj': 1}",
     "non-empty list"),
    ({"output_dir": 5}, "output_dir", "5", "directory path"),
    ({"output_dir": ""}, "output_dir", "''", "directory path"),
    ({"profile": 5}, "profile", "5", "profile name"),
    ({"profile": ""}, "profile", "''", "profile name"),
]


@pytest.mark.parametrize(("overrides", "name", "shown", "fix"), BAD_VALUES,
                         ids=[f"{next(iter(o))}={next(iter(o.values()))!r}"
                              for o, *_ in BAD_VALUES])
def test_bad_value_names_field_value_and_fix(overrides, name, shown, fix):
    with pytest.raises(ValueError) as caught:
        ESConfig(**overrides)
    message = str(caught.value)
    assert f"`{name}`" in message
    assert f"the value passed is {shown}" in message
    assert fix in message


def test_odd_population_with_antithetic_suggests_even_or_antithetic_false():
    with pytest.raises(ValueError) as caught:
        ESConfig(population_size=7)
    message = str(caught.value)
    assert "`population_size`" in message and "7" in message
    assert "antithetic=False" in message
    suggested = [int(word) for word in message.replace(",", " ").split() if word.isdigit()]
    assert any(n % 2 == 0 and n >= 7 for n in suggested), message
    # The fix it prescribes works both ways.
    assert ESConfig(population_size=7, antithetic=False).population_size == 7
    assert ESConfig(population_size=8).population_size == 8


def test_sampling_fixes_num_generations():
    config = ESConfig(num_generations=4, temperature=0.7)
    assert (config.num_generations, config.temperature) == (4, 0.7)


def test_single_target_module_string_becomes_list():
    assert ESConfig(lora_target_modules="q_proj").lora_target_modules == ["q_proj"]
    assert ESConfig(lora_target_modules=("q_proj", "v_proj")).lora_target_modules == [
        "q_proj", "v_proj"]


def test_typed_field_lists_cover_every_bool_and_float_field():
    """A new bool or float field gets the type and finiteness checks without extra code."""
    hints = typing.get_type_hints(ESConfig)
    assert set(BOOL_FIELDS) == {name for name, hint in hints.items() if hint is bool}
    assert set(FLOAT_FIELDS) == {name for name, hint in hints.items() if hint is float}


def test_largest_seed_is_accepted_and_round_trips(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(ESConfig(seed=MAX_SEED).to_dict()))
    assert ESConfig.from_toml(path).seed == MAX_SEED == 2**63 - 1


def test_path_objects_become_strings():
    config = ESConfig(output_dir=Path("runs/x"), profile=Path("cards/mine.toml"))
    assert (config.output_dir, config.profile) == ("runs/x", "cards/mine.toml")
    assert to_toml(config.to_dict())  # writable, as run.toml is


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:10"])
def test_good_devices_are_accepted(device):
    assert ESConfig(device=device).device == device


@pytest.mark.parametrize("device", ["cuda:x", "cuda:", "cuda:-1", "cuda:01", "cuda:1.0",
                                    "cudnn", "cuda:0 "])
def test_malformed_cuda_device_is_a_value_error(device):
    """Anything starting with "cuda" used to pass, and torch.device then raised a
    RuntimeError (a traceback, not a `lowmem-es: error:` line) when the run started."""
    with pytest.raises(ValueError) as caught:
        ESConfig(device=device)
    message = str(caught.value)
    assert "`device` should be 'auto', 'cpu', 'cuda' or 'cuda:N'" in message
    assert f"the value passed is {device!r}" in message


def test_non_string_device_is_a_value_error():
    with pytest.raises(ValueError, match="`device`"):
        ESConfig(device=0)  # e.g. `device = 0` in a TOML file


def test_scalar_reward_weights_is_a_value_error():
    with pytest.raises(ValueError, match="`reward_weights`"):
        ESConfig(reward_weights=1.0)  # e.g. `reward_weights = 1.0` in a TOML file


def test_validate_catches_later_mutation():
    config = ESConfig()
    config.sigma = -1.0
    with pytest.raises(ValueError, match="`sigma`"):
        config.validate()


# --- from_dict / TOML ---

def test_from_dict_unknown_keys_lists_them_and_the_valid_keys():
    with pytest.raises(ValueError) as caught:
        ESConfig.from_dict({"sigma": 0.1, "lr": 0.5, "popsize": 4})
    message = str(caught.value)
    assert "['lr', 'popsize']" in message
    for name in ("population_size", "learning_rate", "sigma", "output_dir"):
        assert name in message


def test_from_dict_builds_and_validates():
    assert ESConfig.from_dict({"sigma": 0.2}).sigma == 0.2
    with pytest.raises(ValueError, match="`sigma`"):
        ESConfig.from_dict({"sigma": -0.2})


def _non_default_config() -> ESConfig:
    return ESConfig(population_size=6, sigma=0.025, learning_rate=1e-4, antithetic=False,
                    fitness_shaping="centered_rank", optimizer="adam", weight_decay=0.01,
                    num_generations=2, temperature=0.7, reward_weights=[1.0, 0.5, 2],
                    lora_alpha=32.0, lora_target_modules=["q_proj", "v_proj"],
                    load_in_4bit=False, device="cuda:1", output_dir='runs/with "quotes"\\é',
                    profile="h200", seed=12345678901)


@pytest.mark.parametrize("config", [ESConfig(), _non_default_config()],
                         ids=["defaults", "non-defaults"])
def test_toml_round_trip(tmp_path, config):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config.to_dict()))
    loaded = ESConfig.from_toml(path)
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()
    # Types survive, not just values that compare equal (True == 1, 2.0 == 2).
    for name, value in config.to_dict().items():
        assert type(getattr(loaded, name)) is type(value), name


def test_to_toml_omits_none_and_writes_toml_types():
    text = to_toml({"profile": None, "antithetic": False, "sigma": 0.01, "seed": 3,
                    "lora_target_modules": ["q_proj", "v_proj"], "output_dir": "a b"})
    assert "profile" not in text
    assert tomllib.loads(text) == {"antithetic": False, "sigma": 0.01, "seed": 3,
                                   "lora_target_modules": ["q_proj", "v_proj"],
                                   "output_dir": "a b"}
    # None fields are omitted and come back as their default (None).
    config = ESConfig()
    assert config.profile is None and config.reward_weights is None
    assert "profile" not in to_toml(config.to_dict())
    assert "reward_weights" not in to_toml(config.to_dict())


def test_to_toml_rejects_unsupported_types():
    with pytest.raises(TypeError, match="dict"):
        to_toml({"nested": {"a": 1}})


def test_toml_round_trip_non_bmp_string(tmp_path):
    config = ESConfig(output_dir="runs/\U0001f600")
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config.to_dict()), encoding="utf-8")
    assert ESConfig.from_toml(path) == config


def test_es_table_and_overrides(tmp_path):
    path = tmp_path / "es.toml"
    path.write_text('[es]\npopulation_size = 10\nsigma = 0.2\nantithetic = false\n'
                    'lora_target_modules = ["q_proj"]\n')
    assert read_toml_values(path) == {"population_size": 10, "sigma": 0.2,
                                      "antithetic": False, "lora_target_modules": ["q_proj"]}
    config = ESConfig.from_toml(path, overrides={"sigma": 0.3})
    assert (config.population_size, config.sigma, config.antithetic) == (10, 0.3, False)
    assert config.lora_target_modules == ["q_proj"]
    assert config.learning_rate == ESConfig().learning_rate  # unset keys keep defaults


def test_top_level_keys_next_to_es_table_are_an_error(tmp_path):
    """They used to be dropped silently, valid and unknown keys alike."""
    path = tmp_path / "mixed.toml"
    path.write_text("sigma = 0.5\nbogus_key = 1\n[es]\niterations = 3\n")
    with pytest.raises(ValueError) as caught:
        read_toml_values(path)
    message = str(caught.value)
    assert "['bogus_key', 'sigma']" in message and str(path) in message
    assert "move them under the [es] line" in message
    with pytest.raises(ValueError, match=r"\['sigma'\]"):
        ESConfig.from_toml(_write(tmp_path, "sigma = 0.5\n[es]\niterations = 3\n"))


def test_es_key_that_is_not_a_table_is_a_value_error(tmp_path):
    path = _write(tmp_path, "es = 5\n")
    with pytest.raises(ValueError) as caught:
        read_toml_values(path)
    message = str(caught.value)
    assert "`es`" in message and "should be a table" in message and "5" in message
    assert str(path) in message


def test_toml_string_for_a_bool_is_a_value_error(tmp_path):
    path = _write(tmp_path, 'antithetic = "false"\npopulation_size = 3\n')
    with pytest.raises(ValueError, match=r"`antithetic`.*without quotes.*'false'"):
        ESConfig.from_toml(path)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_unknown_key_names_file_and_valid_keys(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("sigam = 0.1\n")
    with pytest.raises(ValueError) as caught:
        read_toml_values(path)
    message = str(caught.value)
    assert "['sigam']" in message and str(path) in message and "sigma" in message


def test_toml_bad_value_names_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("population_size = 5\n")
    with pytest.raises(ValueError, match=r"`population_size`.*5"):
        ESConfig.from_toml(path)


def test_toml_bad_value_names_the_file(tmp_path):
    """The CLI merges a --config file's values with a profile and flags before building
    the ESConfig, so each value is checked as the file is read, naming the file."""
    path = _write(tmp_path, 'sigma = "x"\n')
    with pytest.raises(ValueError) as caught:
        read_toml_values(path)
    assert str(caught.value) == (f"in config file {str(path)!r}: `sigma` should be a "
                                 "positive number, but the value passed is 'x'")
    with pytest.raises(ValueError, match=r"^in config file .*run\.toml.*`sigma`"):
        ESConfig.from_toml(path)
    with pytest.raises(ValueError, match=r"^`sigma` should be a positive number"):
        ESConfig(sigma="x")  # values given directly keep the message without a file


def test_toml_fields_checked_together_wait_for_the_other_sources(tmp_path):
    """An odd population is fine in a file whose antithetic may come from a flag; built
    from the file alone (run.toml of a resumed run), the error names the file."""
    path = _write(tmp_path, "population_size = 5\n")
    assert read_toml_values(path) == {"population_size": 5}
    flagged = {**read_toml_values(path), "antithetic": False}  # as --no-antithetic would
    assert ESConfig.from_dict(flagged).population_size == 5
    with pytest.raises(ValueError, match=rf"^in config file {re.escape(repr(str(path)))}: "
                                         r"`population_size` should be even"):
        ESConfig.from_toml(path)
    with pytest.raises(ValueError, match=r"^in config file .* with overrides of "
                                         r"\['antithetic'\]: `population_size`"):
        ESConfig.from_toml(path, overrides={"antithetic": True})


def test_non_utf8_toml_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("sigma = 0.1\n# café\n".encode("latin-1"))
    for read in (read_toml_values, ESConfig.from_toml):
        with pytest.raises(ValueError) as caught:
            read(path)
        assert str(caught.value) == (f"config file {str(path)!r} is not UTF-8 text (byte 0xe9 "
                                     "on line 2 cannot be decoded); save it with UTF-8 "
                                     "encoding")
        assert isinstance(caught.value.__cause__, UnicodeDecodeError)


def test_toml_with_a_byte_order_mark_is_read(tmp_path):
    """Windows editors save "UTF-8 with BOM"; tomllib called it an invalid statement."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbfsigma = 0.2\n")
    assert read_toml_values(path) == {"sigma": 0.2}
    assert ESConfig.from_toml(path).sigma == 0.2


def test_invalid_toml_names_file_and_position(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("sigma = 0.1\npopulation_size = = 4\n")
    with pytest.raises(ValueError) as caught:
        read_toml_values(path)
    message = str(caught.value)
    assert str(path) in message and "not valid TOML" in message and "line 2" in message
    assert isinstance(caught.value.__cause__, tomllib.TOMLDecodeError)


def test_missing_toml_is_file_not_found(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(FileNotFoundError) as caught:
        ESConfig.from_toml(path)
    assert str(path) in str(caught.value) and "--config" in str(caught.value)
    with pytest.raises(FileNotFoundError):
        read_toml_values(tmp_path)  # a directory is not a config file


# --- result_hash ---

def test_result_hash_tracks_result_fields_only():
    base = ESConfig()
    assert base.result_hash() == ESConfig().result_hash()
    assert len(base.result_hash()) == 16
    assert ESConfig(sigma=0.02).result_hash() != base.result_hash()
    assert ESConfig(seed=1).result_hash() != base.result_hash()
    assert ESConfig(lora_target_modules=["q_proj"]).result_hash() != base.result_hash()
    assert ESConfig(output_dir="elsewhere", logging_steps=10, save_steps=5, eval_steps=5,
                    iterations=7).result_hash() == base.result_hash()


def test_every_result_field_changes_the_hash():
    base = ESConfig(population_size=4, temperature=0.5)
    changed = dict(population_size=6, sigma=0.5, learning_rate=0.5, antithetic=False,
                   fitness_shaping="none", optimizer="adam", weight_decay=0.1, seed=9,
                   batch_size=3, num_generations=2, max_prompt_length=9,
                   max_completion_length=9, temperature=0.9, rows_per_chunk=2,
                   reward_weights=[2.0], lora_rank=2, lora_alpha=3.0,
                   lora_target_modules=["v_proj"], load_in_4bit=False,
                   compute_dtype="float32", device="cpu", profile="x", pass_at_k=True,
                   pass_at_k_fraction=0.5, correct_threshold=0.5, noise_backend="compiled",
                   generation_backend="generate", nf4_kernel=False,
                   lr_schedule="cosine", lr_min_ratio=0.5, kv_cache_dtype="int8",
                   prompt_assignment="per_pair", prompts_per_pair=2,
                   fitness_baseline="prompt", sigma_growth=2.0, anchor_decay=0.5,
                   noise_scaling="relative")
    # (distributed_timeout and max_hours are in NON_RESULT_FIELDS)
    # A new field must be classified: either it changes results or it is in NON_RESULT_FIELDS.
    assert set(changed) | NON_RESULT_FIELDS == set(ESConfig.field_names())
    for name, value in changed.items():
        start = base  # prompts_per_pair applies to per-pair prompts only
        if name == "prompts_per_pair":
            start = dataclasses.replace(base, prompt_assignment="per_pair")
        other = dataclasses.replace(start, **{name: value})
        assert other.result_hash() != start.result_hash(), name


def test_numpy_and_torch_scalars_are_plain_numbers(tmp_path):
    """np.logspace(...)[1] is an np.float64: it used to be written to run.toml as
    `np.float64(0.03)` (unreadable, so the run could not resume); np.int64 was refused
    as "not a positive integer"; a tuple of reward weights never equalled its run.toml."""
    import numpy as np
    import torch

    from lowmem_es.config import to_toml

    config = ESConfig(learning_rate=np.logspace(-2, -1, 3)[1], population_size=np.int64(8),
                      sigma=np.float32(0.5), seed=torch.tensor(3), antithetic=np.bool_(True),
                      reward_weights=(np.float64(1.0), 0.5))
    assert type(config.learning_rate) is float and type(config.population_size) is int
    assert type(config.sigma) is float and config.seed == 3 and type(config.seed) is int
    assert config.antithetic is True and config.reward_weights == [1.0, 0.5]
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config.to_dict()))
    assert "np." not in path.read_text()
    assert ESConfig.from_toml(path) == config
    with pytest.raises(ValueError, match="population_size` should be a positive integer"):
        ESConfig(population_size=np.array([8, 9]))
    with pytest.raises(ValueError, match="population_size` should be a positive integer"):
        ESConfig(population_size=np.bool_(True))


def test_prompt_assignment_and_baseline_fields_are_checked():
    with pytest.raises(ValueError, match=r"prompt_assignment.*one of"):
        ESConfig(prompt_assignment="per_member")
    with pytest.raises(ValueError, match=r"fitness_baseline.*one of"):
        ESConfig(fitness_baseline="group")
    with pytest.raises(ValueError, match="'pair' needs antithetic=True"):
        ESConfig(fitness_baseline="pair", antithetic=False, population_size=3)
    with pytest.raises(ValueError, match=r"prompts_per_pair.*prompt_assignment='per_pair'"):
        ESConfig(prompts_per_pair=4)
    with pytest.raises(ValueError, match=r"prompts_per_pair.*non-negative integer"):
        ESConfig(prompt_assignment="per_pair", prompts_per_pair=-1)
    ESConfig(prompt_assignment="per_pair", prompts_per_pair=4, fitness_baseline="prompt")


def test_no_signal_remedy_and_anchor_fields_are_checked():
    for bad in (0.5, 17.0, float("nan"), True):
        with pytest.raises(ValueError, match=r"sigma_growth.*\[1, 16\]"):
            ESConfig(sigma_growth=bad)
    for bad in (-0.1, float("inf")):
        with pytest.raises(ValueError, match=r"anchor_decay.*>= 0"):
            ESConfig(anchor_decay=bad)
    ESConfig(sigma_growth=2, anchor_decay=0.1)
    with pytest.raises(ValueError, match=r"noise_scaling.*'none', 'relative'"):
        ESConfig(noise_scaling="rms")
    assert ESConfig(noise_scaling="relative").noise_scaling == "relative"


def test_prompts_per_member_follows_the_assignment():
    assert ESConfig(batch_size=8).prompts_per_member == 8  # shared
    per_pair = dict(batch_size=8, prompt_assignment="per_pair")
    assert ESConfig(**per_pair, prompts_per_pair=2).prompts_per_member == 2
    assert ESConfig(**per_pair).prompts_per_member == 8  # 0: batch_size


def test_fields_added_later_keep_result_hash_at_their_old_behaviour():
    """A run written before prompt_assignment/fitness_baseline existed resumes: at their
    defaults they leave the hash alone; set, they change it."""
    from lowmem_es.config import LATER_FIELDS

    plain = ESConfig(seed=3)
    values = {k: v for k, v in plain.to_dict().items() if k not in LATER_FIELDS}
    assert plain.result_hash() == ESConfig.from_dict(values).result_hash()
    assert ESConfig(seed=3, fitness_baseline="prompt").result_hash() != plain.result_hash()
    assert ESConfig(seed=3, prompt_assignment="per_pair").result_hash() != plain.result_hash()
