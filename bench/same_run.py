"""Check that two runs of one command gave the same result: the refactor's "no behaviour
change" test, and a quick one for any change that should not move numbers.

    python bench/same_run.py RUN_DIR_A RUN_DIR_B

Compared: every journal.jsonl and metrics.jsonl line with the wall-clock fields left
out (timings and peak memory differ from run to run), the adapter tensors of adapter/
and of every checkpoint bit for bit, run.toml and adapter_config.json as text, and
default_report.json when both runs have one. Each run's own directory path is read as
``<run>``, so two runs written to different directories compare. Two things differ from
process to process whatever the code, so they are compared by content, not bytes: the
safetensors header writes its metadata map in a per-process order (the tensors are
compared), and PEFT keeps ``target_modules`` in a set (compared sorted). Prints one line
per item and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

# Fields that measure the machine, not the run.
WALL_CLOCK = frozenset({"generate_s", "update_s", "iteration_s", "tokens_per_s",
                        "peak_memory_mb", "seconds", "train_seconds"})


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in WALL_CLOCK}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _text(path: Path, run: Path) -> str:
    """The file's text with the run's own directory read as ``<run>``."""
    return path.read_text().replace(str(run), "<run>")


def _lines(path: Path, run: Path) -> list[object]:
    return [_strip(json.loads(line)) for line in _text(path, run).splitlines() if line.strip()]


def _adapter_config(path: Path, run: Path) -> dict:
    """adapter_config.json with target_modules as a sorted list: PEFT keeps them in a set,
    whose order changes from process to process (PYTHONHASHSEED)."""
    config = json.loads(_text(path, run))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


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
            left, right = _lines(a / name, a), _lines(b / name, b)
            if len(left) != len(right):
                results.append((name, f"{len(left)} vs {len(right)} lines"))
                continue
            bad = [i + 1 for i, (x, y) in enumerate(zip(left, right, strict=True)) if x != y]
            results.append((f"{name} ({len(left)} lines, wall-clock fields aside)",
                            f"lines {bad[:5]} differ" if bad else None))
    if (a / "run.toml").is_file():
        same = (b / "run.toml").is_file() and (
            _text(a / "run.toml", a) == _text(b / "run.toml", b))
        results.append(("run.toml", None if same else "text differs"))
    for rel in sorted(p.relative_to(a) for p in a.rglob("adapter_config.json")
                      if "base-model" not in p.parts):
        same = (b / rel).is_file() and _adapter_config(a / rel, a) == _adapter_config(b / rel, b)
        results.append((str(rel), None if same else "differs"))
    weights = sorted(p.relative_to(a) for p in a.rglob("adapter_model.safetensors")
                     if "base-model" not in p.parts)
    for rel in weights:
        if not (b / rel).is_file():
            results.append((str(rel), "missing in the second run"))
        else:
            results.append((f"{rel} (bit for bit)", _tensors_equal(a / rel, b / rel)))
    if (a / "default_report.json").is_file() and (b / "default_report.json").is_file():
        left = _strip(json.loads(_text(a / "default_report.json", a)))
        right = _strip(json.loads(_text(b / "default_report.json", b)))
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
