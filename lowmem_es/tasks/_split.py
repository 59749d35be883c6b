"""Seeded, version-stable helpers shared by the task generators.

Splits and draws go through BLAKE2b of explicit strings rather than ``random``'s state or
Python's ``hash``: the same seed gives the same rows on every Python version and
platform, which is what makes "prompts a task renders are stable across versions" true.
"""

from __future__ import annotations

import hashlib


def stable_unit(*parts: object) -> float:
    """A number in [0, 1) that is a pure function of ``parts`` (BLAKE2b, 53 bits)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def stable_int(low: int, high: int, *parts: object) -> int:
    """An integer in [low, high] that is a pure function of ``parts``."""
    return low + int(stable_unit(*parts) * (high - low + 1))


def split_of(key: str, seed: int, fractions: dict[str, float]) -> str:
    """Which split a problem ``key`` belongs to, drawn by (seed, key) against ``fractions``.

    Fractions are taken in dict order and must sum to 1; a key's split never depends on
    which other keys exist, so adding problems never moves old ones between splits.
    """
    draw = stable_unit("split", seed, key)
    edge = 0.0
    name = ""
    for name, fraction in fractions.items():
        edge += fraction
        if draw < edge:
            return name
    return name
