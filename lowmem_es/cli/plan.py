"""``lowmem-es plan`` and ``lowmem-es profiles``: memory planning before anything loads.

``plan`` reads only the model's config.json (no weights, no download), resolves the run's
settings as training would (ESConfig defaults < profile < config file < flags) and prints
the predicted peak memory, its breakdown and the rows per chunk; exit code 1 when nothing
fits. ``profiles`` lists the shipped profiles and what each sets. Wired into
``lowmem_es.cli`` by ``add_plan_parsers`` / ``run_plan`` / ``run_profiles``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from lowmem_es.config import ESConfig, read_toml_values

# ESConfig fields that change the plan; each gets a --kebab-case flag on `plan`.
PLAN_FIELDS = ("population_size", "batch_size", "num_generations", "max_prompt_length",
               "max_completion_length", "rows_per_chunk", "lora_rank", "lora_target_modules",
               "optimizer", "generation_backend", "kv_cache_dtype")


def add_plan_parsers(subparsers: Any) -> None:
    """Add the ``plan`` and ``profiles`` subcommands to an argparse subparsers object."""
    plan = subparsers.add_parser(
        "plan", help="predict peak memory and rows per chunk for a model and profile",
        description="Predict a run's peak memory from the model's config.json alone "
                    "(nothing is loaded) and choose the rows per chunk that fit the profile.")
    plan.add_argument("--model", required=True,
                      help="local model directory (its config.json is read) or a config.json")
    plan.add_argument("--profile", default=None,
                      help="profile name (see `lowmem-es profiles`) or path of a profile TOML; "
                           "default: the config file's `profile`")
    plan.add_argument("--config", default=None, help="TOML file of ESConfig fields")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    group = plan.add_argument_group("run settings (ESConfig fields that change the plan)")
    fields = {f.name: f for f in dataclasses.fields(ESConfig)}
    for name in PLAN_FIELDS:
        flag = "--" + name.replace("_", "-")
        help_text = fields[name].metadata.get("help", "")
        if name == "lora_target_modules":
            group.add_argument(flag, dest=name, nargs="+", default=None, help=help_text)
        elif name in ("optimizer", "generation_backend", "kv_cache_dtype"):
            group.add_argument(flag, dest=name, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=int, default=None, help=help_text)

    profiles = subparsers.add_parser("profiles", help="list the VRAM profiles and their settings")
    profiles.add_argument("--json", action="store_true", help="print the profiles as JSON")


def resolve_plan_inputs(ns: argparse.Namespace) -> tuple[Any, ESConfig, dict[str, bool]]:
    """(profile, ESConfig, which lengths the user set) by ESConfig < profile < file < flags."""
    from lowmem_es.profiles import load_profile, resolve_es_values

    config_values = read_toml_values(ns.config) if ns.config else {}
    flag_values = {name: getattr(ns, name, None) for name in PLAN_FIELDS}
    profile_name = ns.profile or config_values.get("profile")
    if not profile_name:
        from lowmem_es.profiles import list_profiles

        raise ValueError(f"`plan` needs --profile NAME|PATH (available: {list_profiles()}) "
                         "or a `profile` key in the --config file")
    profile = load_profile(profile_name)
    values = resolve_es_values(profile, config_values, flag_values)
    values["profile"] = profile_name
    config = ESConfig.from_dict(values, source="configuration")
    explicit = {name: name in config_values or flag_values.get(name) is not None
                for name in ("max_prompt_length", "max_completion_length", "rows_per_chunk")}
    return profile, config, explicit


def run_plan(ns: argparse.Namespace) -> int:
    """``lowmem-es plan``: print the plan (or JSON); 0 when it fits, 1 when it does not fit
    as `train` would run it (nothing fits, or only with shorter lengths than the profile's,
    which the plan then shows and names: training keeps the configured lengths)."""
    from lowmem_es.planner import PlanError, plan, read_model_config

    model_config = read_model_config(ns.model)
    profile, config, explicit = resolve_plan_inputs(ns)
    lengths_given = explicit["max_prompt_length"] or explicit["max_completion_length"]
    try:
        result = plan(model_config, profile, config.lora_rank, config.lora_target_modules,
                      config.population_size, config.prompts_per_member,
                      config.num_generations,
                      max_prompt_length=config.max_prompt_length if lengths_given else None,
                      max_completion_length=(config.max_completion_length if lengths_given
                                             else None),
                      rows_per_chunk=config.rows_per_chunk if explicit["rows_per_chunk"] else 0,
                      optimizer=config.optimizer,
                      generation_backend=config.generation_backend,
                      kv_cache_dtype=config.kv_cache_dtype)
    except PlanError as error:
        if ns.json:
            print(json.dumps({"fits": False, "profile": profile.name, "error": str(error),
                              "over_bytes": error.over_bytes,
                              "suggestions": error.suggestions}, indent=2))
        else:
            print(f"lowmem-es: does not fit: {error}", file=sys.stderr)
        return 1
    configured = (config.max_prompt_length, config.max_completion_length)
    lowered = (result.max_prompt_length, result.max_completion_length) != configured
    if ns.json:
        report = result.to_dict()
        if lowered:  # training keeps the configured lengths, so it would stop
            report["fits"] = False
            report["configured_lengths"] = list(configured)
        print(json.dumps(report, indent=2))
    else:
        print(result.format())
    if lowered:
        print(f"lowmem-es: `train` with these settings stops before the first iteration: "
              f"{configured[0]} + {configured[1]} tokens (the profile's lengths) do not fit "
              f"one row. The plan above is for --max-prompt-length "
              f"{result.max_prompt_length} --max-completion-length "
              f"{result.max_completion_length}; pass those to `train` (and `plan`) to use it",
              file=sys.stderr)
        return 1
    return 0


def run_profiles(ns: argparse.Namespace) -> int:
    """``lowmem-es profiles``: each shipped profile and what it sets."""
    from lowmem_es.profiles import list_profiles, load_profile

    profiles = [load_profile(name) for name in list_profiles()]
    if ns.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2))
        return 0
    header = (f"{'name':<6} {'device':<6} {'budget':>7} {'reserve':>7} {'dtype':<9} "
              f"{'rows':>5} {'prompt':>6} {'compl.':>6}  description")
    print(header)
    for p in profiles:
        print(f"{p.name:<6} {p.device:<6} {p.memory_budget_gib:>6.1f}G {p.reserve_gib:>6.1f}G "
              f"{p.compute_dtype:<9} {p.max_rows_in_flight:>5} {p.max_prompt_length:>6} "
              f"{p.max_completion_length:>6}  {p.description}")
    print("\n`--profile NAME` or `--profile path/to/file.toml` selects one; the files are in "
          f"{Path(profiles[0].source).parent}" if profiles else "")
    return 0
