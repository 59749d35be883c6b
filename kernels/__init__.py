"""Triton kernels, each with a pure-torch twin of the same contract.

CUDA tensors run the kernels; CPU tensors run the twins (the real CPU path, vectorised
torch). Tests run the kernels on CPU under ``TRITON_INTERPRET=1`` and compare them with
the twins. One op per module, one stem everywhere: ``kernels/noise.py``,
``tests/test_noise.py``, ``bench/bench_noise.py``.

Importing this package is cheap and never imports Triton, which may be absent (off Linux)
or fail to import: Triton reads ``TRITON_INTERPRET`` once, at its own import, so importing
it here would fix that choice for everyone who imports the package. ``HAS_TRITON`` (bool)
tries ``import triton`` on first access, and the op modules fall back to their twins when
it fails.
"""

from __future__ import annotations

HAS_TRITON: bool  # computed lazily by __getattr__ below, then cached as a plain global

__all__ = ["HAS_TRITON"]


def __getattr__(name: str) -> bool:
    if name == "HAS_TRITON":
        try:
            import triton  # noqa: F401
        except Exception:  # ImportError, or a broken install raising anything at import
            available = False
        else:
            available = True
        globals()["HAS_TRITON"] = available
        return available
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
