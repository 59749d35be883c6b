"""What a long run shows while it runs: a progress bar or log lines, the reward plot, memory.

A run of hours must say where it is, how fast it goes, when it ends and whether it is
learning: ``Progress`` (a tqdm bar on a terminal, one concise log line per
``logging_steps`` iterations otherwise, with the ETA), ``plot_rewards`` (reward.png from
metrics.jsonl, redrawn at each checkpoint; off without matplotlib) and
``peak_memory_mb`` (CUDA peak, or the process's peak resident memory on CPU).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from lowmem_es.run_dir import PLOT, read_metrics

logger = logging.getLogger("lowmem_es")


class Progress:
    """A tqdm bar on a terminal; one concise log line per ``every`` iterations otherwise."""

    def __init__(self, total: int, initial: int, every: int) -> None:
        self.total, self.every, self.started = total, max(every, 1), time.perf_counter()
        self.initial = initial
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)

    def update(self, entry: dict[str, Any], record: dict[str, Any]) -> None:
        stats = ("skipped (no rewards)" if entry.get("skipped") else
                 f"reward {entry['reward_mean']:.3f}/{entry['reward_max']:.3f}")
        if "eval_reward" in entry:
            stats += f" eval {entry['eval_reward']:.3f}"
        note = " | no signal" if entry.get("no_signal") else ""  # all members alike
        if self.bar is not None:
            self.bar.set_postfix_str(f"{stats}{note} | {record['tokens_per_s']:.0f} tok/s | "
                                     f"{record['peak_memory_mb']:.0f} MiB")
            self.bar.update(1)
            return
        done = entry["iteration"] + 1
        if done % self.every == 0 or done == self.total:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / (done - self.initial) * (self.total - done)
            logger.info("iter %d/%d | %s (mean/max)%s | %.1f s/it | %.0f tok/s | %.0f MiB | "
                        "ETA %s", done, self.total, stats, note, record["iteration_s"],
                        record["tokens_per_s"], record["peak_memory_mb"],
                        _format_seconds(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_plot_warned = False


def plot_rewards(out: Path) -> Path | None:
    """reward.png: train mean/max reward and eval reward against iteration (matplotlib)."""
    global _plot_warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _plot_warned:
            logger.info("matplotlib is not installed: reward.png is off "
                        "(pip install 'lowmem-es[plot]')")
            _plot_warned = True
        return None
    metrics = read_metrics(out)  # damage is skipped: a picture never stops a run
    if not metrics:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    its = [m["iteration"] + 1 for m in metrics if m.get("reward_mean") is not None]
    axis.plot(its, [m["reward_mean"] for m in metrics if m.get("reward_mean") is not None],
              label="train mean")
    axis.plot(its, [m["reward_max"] for m in metrics if m.get("reward_max") is not None],
              label="train max", alpha=0.4)
    evals = [(m["iteration"] + 1, m["eval_reward"]) for m in metrics if "eval_reward" in m]
    if evals:
        axis.plot(*zip(*evals, strict=True), "o-", label="eval (centre)")
    axis.set_xlabel("iteration")
    axis.set_ylabel("reward")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    tmp = out / f".reward.png.tmp-{os.getpid()}.png"
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, out / PLOT)
    return out / PLOT


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's peak resident memory on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # not on Linux/macOS: current RSS is the best we have
        return psutil.Process().memory_info().rss / 2**20


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
