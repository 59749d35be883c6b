"""What the ``lowmem-es`` commands share: ESConfig flags and the configuration merge.

Every ESConfig field is a ``--kebab-case`` flag (``add_config_flags``); yes/no fields take
true/false or stand alone for true. ``resolve_config`` merges by the one precedence
(``profiles.resolve_es_values``): ESConfig defaults < profile < config file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from typing import Any

from lowmem_es.config import ESConfig, read_toml_values
from lowmem_es.profiles import resolve_es_values

logger = logging.getLogger("lowmem_es")


def _field_type(field: dataclasses.Field) -> tuple[Any, bool]:
    """(element parser, is_list) for an ESConfig field, from its annotation."""
    hints = typing.get_type_hints(ESConfig)
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--kebab-case`` flag per ESConfig field (default None: not given)."""
    group = parser.add_argument_group("ES configuration (ESConfig fields)")
    for field in dataclasses.fields(ESConfig):
        element, is_list = _field_type(field)
        kind = _parse_bool if element is bool else element
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if is_list:
            group.add_argument(flag, dest=field.name, type=kind, nargs="+", default=None,
                               help=help_text)
        elif element is bool:  # `--pass-at-k` alone means true; `--antithetic false` too
            group.add_argument(flag, dest=field.name, type=kind, nargs="?", const=True,
                               default=None, metavar="true|false",
                               help=f"{help_text} (alone: true; or true/false, yes/no, 1/0)")
        else:
            group.add_argument(flag, dest=field.name, type=kind, default=None, help=help_text)


def resolve_config(ns: argparse.Namespace, defaults: dict[str, Any] | None = None) -> ESConfig:
    """ESConfig from (ESConfig defaults < ``defaults`` < profile < config file < flags)."""
    file_values = read_toml_values(ns.config) if ns.config else {}
    flag_values = {name: getattr(ns, name, None) for name in ESConfig.field_names()}
    values: dict[str, Any] = dict(defaults or {})
    profile_name = flag_values.get("profile") or file_values.get("profile") or values.get(
        "profile")
    profile = None
    if profile_name:
        from lowmem_es.profiles import load_profile

        profile = load_profile(profile_name)
    values.update(resolve_es_values(profile, file_values, flag_values))
    if profile_name:
        values["profile"] = profile_name  # a path stays a path in run.toml
    return ESConfig.from_dict(values, source="configuration")
