"""Memory planner: a run's peak memory from the model config alone, and the rows that fit.

``plan(config, profile, ...)`` builds the model on the meta device (shapes only: no
weights, no memory, no download), counts what stays resident (NF4 weights, embeddings,
LoRA masters and member copies, optimizer state, workspace) and what one chunk of
generation rows adds at the larger of prefill and decode (KV cache, activations, logits),
and picks the largest rows-per-chunk under the profile's budget, prefilling the prompt in
chunks when that is the limit. If not even one row fits it raises ``PlanError`` before
anything is loaded, saying by how much and what would fit. ``shape`` reads the model,
``estimate`` counts the bytes, ``fit`` searches the rows; the model of memory, term by
term, is in docs/planner.md.
"""

from lowmem_es.planner.estimate import GENERATION_BACKENDS, LOGITS_TEMPORARIES, PREFILL_CHUNKS
from lowmem_es.planner.fit import MIN_LENGTH, SHIPPED_FALLBACKS, Plan, PlanError, plan, predict
from lowmem_es.planner.shape import (
    DTYPE_BYTES,
    NESTED_BLOCKSIZE,
    NF4_BITS_PER_VALUE,
    NF4_BLOCKSIZE,
    ModelShape,
    model_shape,
    nf4_bytes,
    read_model_config,
)

__all__ = [
    "DTYPE_BYTES", "GENERATION_BACKENDS", "LOGITS_TEMPORARIES", "MIN_LENGTH",
    "NESTED_BLOCKSIZE", "NF4_BITS_PER_VALUE", "NF4_BLOCKSIZE", "PREFILL_CHUNKS",
    "SHIPPED_FALLBACKS", "ModelShape", "Plan", "PlanError", "model_shape", "nf4_bytes",
    "plan", "predict", "read_model_config",
]
