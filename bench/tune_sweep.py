"""Judge a candidate default on several seeds, thread counts and tasks, never on one run.

    python bench/tune_sweep.py --name rel05 --tasks default yesno antonym --seeds 0 1 2 \
        --threads 1 2 --eval-at 30 --set noise_scaling=relative --set sigma=0.05 \
        --out /tmp/sweep
    python bench/tune_sweep.py --summary /tmp/sweep

Each (task, seed, threads) combination is one ``bench/tune_default.py`` run in its own
process (``--threads`` torch threads; as many runs at once as the cores allow, so a
1-thread run shares the box with another as it would on a loaded machine). Results go to
``OUT/NAME/TASK-sSEED-tTHREADS.json``; a finished combination is not run again, so a
sweep that was stopped continues where it left off. ``--summary`` reads every candidate
under OUT and prints, per task and evaluation point, the held-out accuracy's mean,
population standard deviation, minimum and maximum over all runs, and the per-thread
means (a default whose result changes with the thread count changes with the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN_FILE = re.compile(r"(?P<task>[a-z]+)-s(?P<seed>[0-9]+)-t(?P<threads>[0-9]+)")


def run_name(task: str, seed: int, threads: int) -> str:
    return f"{task}-s{seed}-t{threads}"


def accuracy(point: dict, split: str = "eval") -> float | None:
    """Held-out accuracy of one tune_default.py evaluation point (None if absent)."""
    value = point.get(split)
    return value.get("accuracy") if isinstance(value, dict) else None


def summarize(root: Path) -> list[dict]:
    """Rows of (candidate, task, iteration, split) with mean/spread over every run."""
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for path in sorted(root.glob("*/*.json")):
        name = RUN_FILE.fullmatch(path.stem)
        if name is None:  # candidate.json and anything else that is not a run's result
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a run still writing, or killed mid-write
        threads = int(name["threads"])
        for point in result.get("points", []):
            for split in ("eval", "transfer"):
                value = accuracy(point, split)
                if value is not None:
                    key = (path.parent.name, result["task"], point["iteration"], split)
                    groups.setdefault(key, []).append((threads, value))
    rows = []
    for (name, task, iteration, split), values in sorted(groups.items(), key=str):
        accs = [v for _, v in values]
        by_threads = {t: statistics.mean(v for tt, v in values if tt == t)
                      for t in sorted({t for t, _ in values})}
        rows.append({"candidate": name, "task": task, "iteration": iteration, "split": split,
                     "runs": len(accs), "mean": statistics.mean(accs),
                     "std": statistics.pstdev(accs), "min": min(accs), "max": max(accs),
                     "mean_by_threads": by_threads})
    return rows


def print_summary(rows: list[dict]) -> None:
    print("| candidate | task | iteration | split | runs | mean | std | min | max | "
          "mean by threads |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        threads = ", ".join(f"{t}t {m:.3f}" for t, m in r["mean_by_threads"].items())
        print(f"| {r['candidate']} | {r['task']} | {r['iteration']} | {r['split']} | "
              f"{r['runs']} | {r['mean']:.3f} | {r['std']:.3f} | {r['min']:.3f} | "
              f"{r['max']:.3f} | {threads} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--summary", metavar="OUT", help="only summarize the sweeps in OUT")
    parser.add_argument("--name", help="candidate name (a folder under --out)")
    parser.add_argument("--tasks", nargs="+", default=["default"],
                        choices=("default", "yesno", "sentiment", "antonym"))
    parser.add_argument("--reward", default=None,
                        help="user tasks' training reward (tune_default.py --reward)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--eval-at", type=int, nargs="+", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores to fill with concurrent runs")
    parser.add_argument("--out", default="/tmp/sweep")
    args = parser.parse_args(argv)
    if args.summary:
        print_summary(summarize(Path(args.summary)))
        return 0
    if not args.name:
        parser.error("--name is required to run a sweep (or pass --summary OUT)")
    folder = Path(args.out) / args.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "candidate.json").write_text(json.dumps({"set": args.set}, indent=1) + "\n")
    todo = [(task, seed, threads) for threads in args.threads for task in args.tasks
            for seed in args.seeds
            if not _finished(folder / f"{run_name(task, seed, threads)}.json", args.eval_at)]
    running: list[tuple[subprocess.Popen, int, str]] = []
    while todo or running:
        busy = sum(threads for _, threads, _ in running)
        if todo and busy + todo[0][2] <= max(args.cores, todo[0][2]):
            task, seed, threads = todo.pop(0)
            name = run_name(task, seed, threads)
            command = [sys.executable, str(HERE / "tune_default.py"), "--task", task,
                       "--seed", str(seed), "--threads", str(threads),
                       "--out", str(folder / f"{name}.json")]
            if args.eval_at:
                command += ["--eval-at", *map(str, args.eval_at)]
            if args.reward and task != "default":
                command += ["--reward", args.reward]
            for item in args.set:
                command += ["--set", item]
            log = open(folder / f"{name}.log", "w")  # the child holds it until it exits
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
                            threads, name))
            print(f"started {name}", flush=True)
            continue
        time.sleep(2)
        for entry in list(running):
            if entry[0].poll() is not None:
                running.remove(entry)
                print(f"finished {entry[2]} (exit {entry[0].returncode})", flush=True)
    print_summary([r for r in summarize(Path(args.out)) if r["candidate"] == args.name])
    return 0


def _finished(path: Path, eval_at: list[int] | None) -> bool:
    """Whether ``path`` holds every requested evaluation point already."""
    try:
        points = json.loads(path.read_text()).get("points", [])
    except (OSError, json.JSONDecodeError):
        return False
    done = {p["iteration"] for p in points}
    return bool(points) and (eval_at is None or set(eval_at) <= done)


if __name__ == "__main__":
    sys.exit(main())
