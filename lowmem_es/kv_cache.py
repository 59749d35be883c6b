"""An int8 static KV cache: half the KV memory of a 16-bit cache, same fixed shapes.

On an 8 GB card the KV cache is what limits the rows per chunk once the 4-bit weights
are in: Qwen2.5-7B holds 57,344 bytes per token in bf16, so 60 rows of 512 tokens take
1.6 GiB. ``kv_cache_dtype = "int8"`` (profile key, or ESConfig field) stores keys and
values as int8 with one scale per (row, head, token): symmetric absmax quantization of
each head's vector, ``q = round(x / s)``, ``s = max|x| / 127``. Per-token scales let
tokens be written one at a time into a preallocated cache (no re-quantization of what is
stored, fixed shapes for CUDA-graph replay), and per-head vectors keep an outlier head
from coarsening the others. Integer 8-bit per-token, per-head KV quantization is the
scheme LMDeploy ships as its "int8 KV cache"; its error is bounded by ``s / 2`` per
element (about 0.4 % of the vector's largest magnitude).

Cost: each attention call dequantizes the layer's whole cache into the compute dtype
(``keys * scales``), so one layer's 16-bit K and V exist transiently: the planner counts
them. The stored bytes per token are ``head_dim + scale bytes`` per head instead of
``2 * head_dim``: 1.016 B per value with bf16 scales (head_dim 128), a 49 % saving.

Only the decode loop (``lowmem_es.decode``) uses it: transformers' ``generate()`` builds
its own dynamic cache. Layers other than plain full-attention static layers (sliding
window, linear attention) are refused with a clear error rather than silently kept in
16 bits, because the memory plan counted int8.
"""

from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

KV_CACHE_DTYPES = ("auto", "int8")  # "auto" = the compute dtype (a plain StaticCache)
_INT8_MAX = 127.0


def quantize_int8(states: torch.Tensor, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, scales) of ``states`` (..., head_dim): one scale per last-dim vector.

    The scale is computed in fp32 and stored in ``scale_dtype``; the codes are rounded
    against the stored scale, so that ``codes * scale`` reproduces ``states`` to within
    half a step of that scale (an all-zero vector gets scale 0 and codes 0).
    """
    values = states.float()
    scales = (values.abs().amax(dim=-1, keepdim=True) / _INT8_MAX).to(scale_dtype)
    divisor = scales.float().clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(values / divisor).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``codes * scales`` in the scales' dtype (one pass, one output tensor)."""
    return codes * scales


class Int8StaticLayer(StaticLayer):
    """A ``StaticLayer`` whose keys and values are stored as int8 + per-vector scales.

    Same preallocated shape, the same in-place ``index_copy_`` writes at the cache's
    own position counter (capturable in a CUDA graph), the same ``get_mask_sizes``;
    ``update`` returns the dequantized full-length keys and values in the dtype of the
    states written (the compute dtype), as ``StaticLayer.update`` returns its buffers.
    """

    def lazy_initialization(self, key_states: torch.Tensor,
                            value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim = key_states.shape[-1]
        self.v_head_dim = value_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys = torch.zeros((*shape, self.k_head_dim), dtype=torch.int8,
                                device=self.device)
        self.values = torch.zeros((*shape, self.v_head_dim), dtype=torch.int8,
                                  device=self.device)
        self.key_scales = torch.zeros((*shape, 1), dtype=self.dtype, device=self.device)
        self.value_scales = torch.zeros((*shape, 1), dtype=self.dtype, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = key_states.shape[-2]
        position = torch.arange(length, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(length)
        for codes, scales, states in ((self.keys, self.key_scales, key_states),
                                      (self.values, self.value_scales, value_states)):
            new_codes, new_scales = quantize_int8(states, self.dtype)
            codes.index_copy_(2, position, new_codes)
            scales.index_copy_(2, position, new_scales)
        return (dequantize_int8(self.keys, self.key_scales),
                dequantize_int8(self.values, self.value_scales))

    def reset(self) -> None:
        if self.is_initialized:
            for tensor in (self.keys, self.values, self.key_scales, self.value_scales):
                tensor.zero_()
            self.cumulative_length.zero_()

    @property
    def stored_bytes(self) -> int:
        """Bytes this layer holds (codes + scales), 0 before its first write."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in
                   (self.keys, self.values, self.key_scales, self.value_scales))


def make_static_cache(config: object, max_cache_len: int, kv_cache_dtype: str = "auto"
                      ) -> object:
    """transformers' ``StaticCache`` for ``config``, its layers int8 when asked.

    ``kv_cache_dtype``: "auto" (the compute dtype: the states' own) or "int8". Raises
    ValueError for another value, or when the model has cache layers this int8 cache does
    not cover (it names them and says to use "auto").
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"`kv_cache_dtype` must be one of {KV_CACHE_DTYPES}, got "
                         f"{kv_cache_dtype!r}")
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    if kv_cache_dtype == "auto":
        return cache
    others = sorted({type(layer).__name__ for layer in cache.layers
                     if type(layer) is not StaticLayer})
    if others:
        raise ValueError(f"kv_cache_dtype='int8' covers full-attention static cache layers "
                         f"only; this model also has {others}. Set kv_cache_dtype = \"auto\" "
                         "(in the profile or the run config)")
    cache.layers = [Int8StaticLayer(max_cache_len=layer.max_cache_len)
                    for layer in cache.layers]
    return cache


def cache_bytes(cache: object) -> int:
    """Bytes a static cache holds now (allocated layers only)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "stored_bytes"):
            total += layer.stored_bytes
        elif getattr(layer, "is_initialized", False):
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total
