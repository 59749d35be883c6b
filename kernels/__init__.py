"""Triton kernels, each with a pure-torch twin of the same contract.

CUDA tensors run the kernels; CPU tensors run the twins (the real CPU path, vectorised
torch). Tests run the kernels on CPU under ``TRITON_INTERPRET=1`` and compare them with
the twins. One op per module, one stem everywhere: ``kernels/noise.py``,
``tests/test_noise.py``, ``bench/bench_noise.py``.

Importing this package is cheap and never imports Triton, which may be absent (off Linux)
or fail to import: Triton reads ``TRITON_INTERPRET`` once, at its own import, so importing
it here would fix that choice for everyone who imports the package. ``HAS_TRITON`` (bool)
is ``kernels/_runtime.py``'s, imported (with triton) on first access, and the op modules
fall back to their twins when triton fails to import. The shared runtime (``HAS_TRITON``,
``INTERPRETED``, the kernel-or-twin rule ``use_kernel``) lives in ``_runtime``.
"""

from __future__ import annotations

HAS_TRITON: bool  # looked up lazily by __getattr__ below, then cached as a plain global

__all__ = ["HAS_TRITON"]


def __getattr__(name: str) -> bool:
    if name == "HAS_TRITON":
        from lowmem_es.kernels._runtime import HAS_TRITON as available

        globals()["HAS_TRITON"] = available
        return available
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
