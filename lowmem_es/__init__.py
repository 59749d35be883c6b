"""lowmem-es: fine-tune LLMs with Evolution Strategies on LoRA adapters of a frozen NF4 model.

Public API: ``ESConfig``, ``ESTrainer`` (imported lazily: the trainer pulls in
transformers and bitsandbytes, which take seconds to import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowmem_es.config import ESConfig

__version__ = "0.1.0"
__all__ = ["ESConfig", "ESTrainer", "__version__"]

if TYPE_CHECKING:
    from lowmem_es.trainer import ESTrainer


def __getattr__(name: str) -> object:
    if name == "ESTrainer":
        from lowmem_es.trainer import ESTrainer

        return ESTrainer
    raise AttributeError(f"module 'lowmem_es' has no attribute {name!r}")
