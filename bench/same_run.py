"""Check that two runs of one command gave the same result: the refactor's "no behaviour
change" test, and a quick one for any change that should not move numbers.

    python bench/same_run.py RUN_DIR_A RUN_DIR_B

Compared: every journal.jsonl and metrics.jsonl line with the wall-clock fields left
out (timings and peak memory differ from run to run), the adapter tensors of adapter/
and of every checkpoint bit for bit, run.toml as text, and default_report.json's split
metrics when both runs have one. Prints one line per item and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

# Fields that measure the machine, not the run.
WALL_CLOCK = frozenset({"generate_s", "update_s", "iteration_s", "tokens_per_s",
                        "peak_memory_mb", "seconds", "eval_s", "elapsed_s"})


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in WALL_CLOCK}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _lines(path: Path) -> list[object]:
    return [_strip(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _tensors_equal(a: Path, b: Path) -> str | None:
    left, right = load_file(str(a)), load_file(str(b))
    if sorted(left) != sorted(right):
        return f"tensor names differ ({len(left)} vs {len(right)})"
    for name in left:
        if left[name].dtype != right[name].dtype or not left[name].equal(right[name]):
            diff = (left[name].double() - right[name].double()).abs().max().item()
            return f"{name} differs (max abs {diff:.3e})"
    return None


def compare(a: Path, b: Path) -> list[tuple[str, str | None]]:
    """(item, problem or None) for every item both runs should share."""
    results: list[tuple[str, str | None]] = []
    for name in ("journal.jsonl", "metrics.jsonl"):
        if (a / name).is_file() or (b / name).is_file():
            left, right = _lines(a / name), _lines(b / name)
            if len(left) != len(right):
                results.append((name, f"{len(left)} vs {len(right)} lines"))
                continue
            bad = [i + 1 for i, (x, y) in enumerate(zip(left, right, strict=True)) if x != y]
            results.append((f"{name} ({len(left)} lines, wall-clock fields aside)",
                            f"lines {bad[:5]} differ" if bad else None))
    if (a / "run.toml").is_file():
        same = (a / "run.toml").read_text() == (b / "run.toml").read_text()
        results.append(("run.toml", None if same else "text differs"))
    weights = sorted(p.relative_to(a) for p in a.rglob("adapter_model.safetensors")
                     if "base-model" not in p.parts)
    for rel in weights:
        if not (b / rel).is_file():
            results.append((str(rel), "missing in the second run"))
        else:
            results.append((f"{rel} (bit for bit)", _tensors_equal(a / rel, b / rel)))
    if (a / "default_report.json").is_file() and (b / "default_report.json").is_file():
        left = _strip(json.loads((a / "default_report.json").read_text()))
        right = _strip(json.loads((b / "default_report.json").read_text()))
        results.append(("default_report.json (wall-clock fields aside)",
                        None if left == right else "differs"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    ns = parser.parse_args(argv)
    results = compare(ns.first, ns.second)
    for item, problem in results:
        print(f"{'same' if problem is None else 'DIFFERENT'}  {item}"
              + ("" if problem is None else f": {problem}"))
    return 0 if results and all(p is None for _, p in results) else 1


if __name__ == "__main__":
    sys.exit(main())
