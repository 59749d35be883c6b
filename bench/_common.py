"""Helpers the bench scripts share: timing, copy bandwidth, the machine, the command line.

The scripts run as ``python bench/<script>.py``, so bench/ is on ``sys.path`` and they
``from _common import ...``; a script that tests import puts its own folder on
``sys.path`` first (as bench_noisy_lora.py does). Every benchmark note should say on which
machine it ran: ``machine_info`` gives the CPU model (and AVX-512 or not: Zen 3 and
Zen 5 machines differ ~2x, ../shared/ENVIRONMENT.md) with the library versions.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["ENV_SHOWN", "command_line", "copy_bandwidth", "cpu_model", "device_seconds",
           "has_avx512", "machine_info", "median_seconds"]

# Environment variables that change what a benchmark measures, shown in its command line.
ENV_SHOWN = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "TRITON_INTERPRET", "LOWMEM_ES_NOISE_BACKEND")


def median_seconds(fn: Callable[[], object], repeats: int,
                   device: str | torch.device = "cpu") -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run.

    On CUDA every timed run ends with a device synchronisation, so it counts the work
    the call queued, not just its launch.
    """
    cuda = torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_seconds(fn: Callable[[], object], device: str | torch.device,
                   repeats: int) -> float:
    """Median seconds per call: on CUDA by CUDA events (``triton.testing.do_bench``, L2
    cleared before each call), elsewhere ``median_seconds``'s wall time."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=max(20, 4 * repeats),
                                       return_mode="median") / 1e3
    return median_seconds(fn, repeats, device)


def copy_bandwidth(device: str | torch.device, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted): 1 GiB on CUDA,
    128 MiB elsewhere, timed by ``device_seconds``."""
    cuda = torch.device(device).type == "cuda"
    numel = (1 << 30) // 2 if cuda else (1 << 27) // 2
    src = torch.empty(numel, dtype=torch.float16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = device_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * numel * 2 / seconds


def command_line(env_shown: Sequence[str] = ENV_SHOWN) -> str:
    """This run's command, ``VAR=value python bench/x.py ...``, with the variables of
    ``env_shown`` that are set."""
    env = " ".join(f"{name}={os.environ[name]}" for name in env_shown if name in os.environ)
    argv = " ".join(shlex.quote(arg) for arg in sys.argv)
    return f"{env} python {argv}".strip()


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of /proc/cpuinfo, or None (not Linux, or absent)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def has_avx512() -> bool | None:
    """Whether the CPU has AVX-512 (``avx512f``), or None where /proc/cpuinfo is absent."""
    flags = _cpuinfo_field("flags")
    return None if flags is None else "avx512f" in flags.split()


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except Exception as exc:  # reported, the table says which providers ran
        return f"unavailable ({type(exc).__name__})"


def machine_info(device: str | torch.device | None = None,
                 packages: Sequence[str] = ()) -> list[str]:
    """Markdown lines for a benchmark note: platform, CPU, load, torch/triton (and the
    versions of ``packages``), GPU. The GPU line is written when ``device`` is CUDA
    (``None``: whenever CUDA is available)."""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") \
        else "n/a"
    from lowmem_es.kernels._runtime import HAS_TRITON, INTERPRETED

    triton_version = "absent"
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__ + (" (interpreter)" if INTERPRETED else "")
    avx512 = {True: "AVX-512", False: "no AVX-512", None: "AVX-512 unknown"}[has_avx512()]
    versions = "".join(f", {package} {_version(package)}" for package in packages)
    lines = [
        f"- platform: {platform.platform()}, Python {platform.python_version()}",
        f"- CPU: {cpu_model()} ({avx512})",
        f"- CPUs: {os.cpu_count()} (torch threads {torch.get_num_threads()}), "
        f"load average {load}",
        f"- torch {torch.__version__}, triton {triton_version}{versions}",
    ]
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
        lines.append(f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    return lines
