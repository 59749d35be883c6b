"""lowmem-es: fine-tune LLMs with Evolution Strategies on LoRA adapters of a frozen NF4 model.

Public API: ``ESConfig``, ``load_profile``, ``ESTrainer`` (imported lazily: the trainer
pulls in transformers and bitsandbytes, which take seconds to import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowmem_es._version import __version__
from lowmem_es.config import ESConfig
from lowmem_es.profiles import load_profile

__all__ = ["ESConfig", "ESTrainer", "__version__", "load_profile"]

if TYPE_CHECKING:
    from lowmem_es.trainer import ESTrainer


def __getattr__(name: str) -> object:
    if name == "ESTrainer":
        from lowmem_es.trainer import ESTrainer

        return ESTrainer
    raise AttributeError(f"module 'lowmem_es' has no attribute {name!r}")
