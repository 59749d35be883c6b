"""Where the kernel tests run their Triton kernels: shared by every kernel test file.

CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it), CUDA when Triton is compiled
and a GPU is present, else nowhere (the tests are skipped).
"""

import pytest
import torch

from lowmem_es.kernels._runtime import HAS_TRITON, INTERPRETED

if INTERPRETED:
    DEVICE: str | None = "cpu"
elif HAS_TRITON and torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None

needs_kernel = pytest.mark.skipif(
    DEVICE is None, reason="Triton kernels need triton plus CUDA, or TRITON_INTERPRET=1 set "
                           "before triton is imported (tests/conftest.py does that)")
