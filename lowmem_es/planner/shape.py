"""What the planner knows of a model: its shape, read from the config on the meta device.

``model_shape`` builds the model with no weights (shapes only: no memory, no download) and
keeps its layer sizes, where its parameters sit and what its cache layers hold;
``read_model_config`` reads and checks a local config.json; ``nf4_bytes`` is what
bitsandbytes keeps for one NF4 weight. The terms these feed are in docs/planner.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lowmem_es.config import read_utf8

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
NF4_BLOCKSIZE = 64  # values per absmax (bitsandbytes default for 4-bit)
NESTED_BLOCKSIZE = 256  # absmax values per fp32 scale of the double quantization
NF4_BITS_PER_VALUE = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * NESTED_BLOCKSIZE)  # 4.127


def nf4_bytes(numel: int, cpu_packed: bool = False) -> int:
    """Bytes bitsandbytes keeps for one NF4 weight of ``numel`` values (double quant).

    ``cpu_packed``: bitsandbytes >= 0.48 repacks a weight for its CPU kernel at the first
    inference forward (on CPUs with AVX512-BF16), un-nesting the absmax into bf16.
    """
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    packed = math.ceil(numel / 2)  # two 4-bit codes per byte
    if cpu_packed:
        return packed + 2 * blocks + 4 * 16
    absmax = blocks  # uint8 after the second quantization
    nested_absmax = 4 * math.ceil(blocks / NESTED_BLOCKSIZE)  # fp32
    code_books = 4 * 16 + 4 * 256 + 4  # NF4 code, nested dynamic code, fp32 offset
    return packed + absmax + nested_absmax + code_books


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a model: layer sizes and where its parameters sit."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    linears: tuple[tuple[str, int, int], ...]  # (qualified name, in, out), quantized to NF4
    embedding_params: int
    lm_head_params: int  # 0 when tied to the embedding
    other_params: int  # norms, biases
    buffer_values: int  # rotary tables and other buffers (fp32, not parameters)
    supports_logits_to_keep: bool
    supports_static_cache: bool = True  # the decode loop can run it (else generate())
    # Per decoder layer, the tokens its cache holds at most: the window of a sliding-window
    # (or chunked) attention layer, None for full attention. () = every layer full.
    layer_windows: tuple[int | None, ...] = ()
    # transformers' StaticCache layer class of every layer ("StaticLayer", ...).
    cache_layers: tuple[str, ...] = ()
    attn_implementation: str = "sdpa"  # what from_pretrained picks ("eager" for Gemma-2)

    @property
    def linear_params(self) -> int:
        return sum(d_in * d_out for _, d_in, d_out in self.linears)

    @property
    def total_params(self) -> int:
        """Parameters as transformers counts them (tied embedding once, buffers excluded)."""
        return self.linear_params + self.embedding_params + self.lm_head_params + \
            self.other_params

    def kv_bytes_per_token(self, dtype_bytes: int, int8_scale_bytes: int = 0) -> int:
        """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x bytes;
        with ``int8_scale_bytes`` > 0 the int8 cache: 1-byte codes + one scale per head."""
        if int8_scale_bytes:
            return 2 * self.num_layers * self.num_kv_heads * (self.head_dim + int8_scale_bytes)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def kv_bytes(self, tokens: int, kv_per_token: int) -> int:
        """K and V of one row holding ``tokens`` tokens (``kv_per_token`` as
        ``kv_bytes_per_token``): a sliding-window layer holds at most its window
        (transformers' StaticSlidingWindowLayer allocates min(window, cache length))."""
        if not self.layer_windows:
            return tokens * kv_per_token
        held = sum(tokens if window is None else min(window, tokens)
                   for window in self.layer_windows)
        return held * (kv_per_token // self.num_layers)

    @property
    def sliding_window(self) -> int | None:
        """The largest sliding window of any layer (None: no sliding-window layer)."""
        return max((w for w in self.layer_windows if w is not None), default=None)

    @property
    def has_full_attention(self) -> bool:
        """Whether some layer attends to the whole cache (every layer, without windows)."""
        return not self.layer_windows or None in self.layer_windows

    def lora_values(self, rank: int, target_modules: list[str] | tuple[str, ...]) -> int:
        """fp32 values of LoRA A (r x in) and B (out x r) on every targeted linear."""
        return sum(rank * (d_in + d_out) for name, d_in, d_out in self.linears
                   if name.rpartition(".")[2] in target_modules)


def model_shape(config: Any) -> ModelShape:
    """ModelShape of a transformers config (a dict as in config.json, or a PretrainedConfig)."""
    if isinstance(config, dict):
        if "model_type" not in config:
            raise ValueError("the model config has no `model_type`; pass the model's "
                             "config.json (its `model_type` names the architecture)")
        text = json.dumps(config, sort_keys=True)
    else:
        values = json.loads(config.to_json_string(use_diff=False))
        # A loaded model's config knows the attention it runs, which the JSON leaves out;
        # keep "eager" (the one that changes the count; others resolve as from_pretrained)
        if getattr(config, "_attn_implementation_internal", None) == "eager":
            values["attn_implementation"] = "eager"
        text = json.dumps(values, sort_keys=True)
    return _model_shape(text)


# Sizes of the model the planner builds tensors with or divides by: each must be a positive
# integer. transformers fails on a bad one deep inside (a TypeError of its strict config
# classes for "64", ZeroDivisionError for 0 heads, RuntimeError for a negative vocab).
_SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
# The same, where null means "derive it" (head_dim = hidden_size / heads ...).
_OPTIONAL_SIZE_KEYS = ("num_key_value_heads", "head_dim", "intermediate_size")


def _check_sizes(values: dict[str, Any], aliases: dict[str, str]) -> None:
    """Raise ValueError naming the key and value of any size in ``values`` (a config.json
    dict) that is not a positive integer. ``aliases`` is the config class's attribute_map:
    GPT-2's config.json spells hidden_size ``n_embd``, num_attention_heads ``n_head`` ..."""
    for name in (*_SIZE_KEYS, *_OPTIONAL_SIZE_KEYS):
        for key in dict.fromkeys((name, aliases.get(name, name))):
            value = values.get(key)
            if key not in values or (value is None and name in _OPTIONAL_SIZE_KEYS):
                continue
            if name == "intermediate_size" and isinstance(value, list) and value and all(
                    _positive_int(v) for v in value):
                continue  # per-layer sizes (Gemma 3n): legal in transformers
            if not _positive_int(value):
                raise ValueError(f"`{key}` should be a positive integer (a JSON number, no "
                                 f"quotes), but the value is {json.dumps(value)}; copy the "
                                 "value from the model's published config.json")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _unbuildable(model_type: str, error: Exception) -> ValueError:
    """The error for a config transformers rejects while building it or its model."""
    detail = " ".join(f"{type(error).__name__}: {error}".split())  # one line
    return ValueError(f"transformers cannot build a {model_type!r} model from the model "
                      f"config ({detail}); check its values against the model's published "
                      "config.json")


@lru_cache(maxsize=16)
def _model_shape(config_json: str) -> ModelShape:
    import torch
    from torch import nn
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    values = json.loads(config_json)
    model_type = values.pop("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        try:
            AutoConfig.for_model(model_type)  # raises, listing the known model types
        except (ValueError, TypeError) as error:
            raise ValueError(f"transformers does not know `model_type` {model_type!r}: "
                             f"{error}") from error
    _check_sizes(values, getattr(CONFIG_MAPPING[model_type], "attribute_map", {}))
    try:
        config = AutoConfig.for_model(model_type, **values)
    except Exception as error:  # a value transformers rejects (strict fields, validators)
        raise _unbuildable(model_type, error) from error
    text = config.get_text_config(decoder=True)
    if text is not config:  # e.g. Gemma 3 (vision tower + text decoder under text_config)
        raise ValueError(
            f"`model_type` {model_type!r} nests its text decoder under a sub-config "
            f"({type(text).__name__}): it is not a plain causal LM (a multimodal or "
            "encoder-decoder model). The planner counts a text decoder only, not a vision "
            "tower, projector or encoder; plan the text model instead: pass its "
            f"`text_config` as the config (model_type {getattr(text, 'model_type', '?')!r})")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):  # shapes only: no memory, no weights
            model = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # a value only the model's layers reject (e.g. rope_theta)
        raise _unbuildable(model_type, error) from error
    finally:
        hf_logging.set_verbosity(verbosity)
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    linear_weights: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output:
            linear_weights[f"{name}.weight"] = (module.in_features, module.out_features)
    embedding_params = lm_head_params = other_params = 0
    for name, param in model.named_parameters():  # shared (tied) parameters appear once
        if name in linear_weights:
            continue
        if param is embedding.weight:
            embedding_params += param.numel()
        elif output is not None and param is output.weight:
            lm_head_params += param.numel()
        else:
            other_params += param.numel()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = text.num_hidden_layers
    windows, cache_layers = _cache_layers(config, layers)
    return ModelShape(
        architecture=type(model).__name__, hidden_size=hidden,
        num_layers=layers, num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=getattr(text, "intermediate_size", None) or 4 * hidden,
        vocab_size=text.vocab_size, tied_embeddings=tied,
        linears=tuple((name[: -len(".weight")], d_in, d_out)
                      for name, (d_in, d_out) in linear_weights.items()),
        embedding_params=embedding_params, lm_head_params=lm_head_params,
        other_params=other_params,
        buffer_values=sum(buffer.numel() for buffer in model.buffers()),
        supports_logits_to_keep=model._supports_logits_to_keep(),
        supports_static_cache=bool(getattr(model, "_can_compile_fullgraph", False)
                                   or getattr(model, "_supports_static_cache", False)),
        layer_windows=windows, cache_layers=cache_layers,
        # from_config resolves the attention as from_pretrained does (sdpa where the model
        # supports it, else eager), for the transformers installed
        attn_implementation=str(getattr(model.config, "_attn_implementation", None)
                                or "sdpa"))


def _cache_layers(config: Any, num_layers: int
                  ) -> tuple[tuple[int | None, ...], tuple[str, ...]]:
    """(window per layer, StaticCache layer class per layer) of ``config``.

    Asks transformers' own ``StaticCache`` (what the decode loop and
    ``lowmem_es.kv_cache.make_static_cache`` build), so layer types and windows follow the
    installed transformers exactly. Its layers allocate lazily, on the first write, so
    building one costs nothing; with an unbounded length a sliding-window layer's
    ``max_cache_len`` is its window. Windows are () (every layer full) when transformers
    cannot build a static cache for the config.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticSlidingWindowLayer

    try:
        cache = StaticCache(config=config, max_cache_len=2**40)
    except (AttributeError, KeyError, TypeError, ValueError, NotImplementedError):
        return (), ()
    names = tuple(type(layer).__name__ for layer in cache.layers)
    windows = tuple(int(layer.max_cache_len) if isinstance(layer, StaticSlidingWindowLayer)
                    else None for layer in cache.layers)
    if len(windows) != num_layers or all(w is None for w in windows):
        windows = ()
    return windows, names


def read_model_config(model: str) -> dict[str, Any]:
    """The config dict of a local model directory or config.json file (never downloads),
    checked by building its model on the meta device (no memory, no weights): a bad value
    is a ValueError naming the file, the key and the value, not a traceback from deep in
    transformers later in the plan. (The plan builds the same model again from a cache.)
    """
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model directory {model!r} has no config.json; pass the "
                                    "directory save_pretrained wrote, or a config.json file")
    elif not path.is_file():
        raise FileNotFoundError(f"--model {model!r} is neither a local model directory nor a "
                                "config.json file; `plan` reads the config only and downloads "
                                "nothing (copy the hub model's config.json locally)")
    # transformers reads config.json as UTF-8 without a BOM (from_pretrained would then fail
    # on one), so `plan` does too
    text = read_utf8(path, f"model config {str(path)!r}", encoding="utf-8")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object of config fields")
    try:
        model_shape(values)
    except ValueError as error:
        raise ValueError(f"in model config {str(path)!r}: {error}") from error
    return values
