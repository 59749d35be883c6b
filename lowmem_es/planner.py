"""Memory planner: a run's peak memory from the model config alone, and the rows that fit.

``plan(config, profile, ...)`` builds the model on the meta device (shapes only: no
weights, no memory, no download), counts what stays resident and what one chunk of
generation rows adds, and picks the largest rows-per-chunk under the profile's budget.
If not even one row fits it raises ``PlanError`` before anything is loaded, saying by
how much and what would fit.

The model of memory (bytes; c = bytes of the compute dtype; T = tokens in one forward):

resident for the whole run
  nf4_linear_weights   every nn.Linear but lm_head, as bitsandbytes stores NF4 with double
                       quant: 4 bits/value + 1 uint8 absmax per 64 values + 1 fp32 per 256
                       absmax (= 4.127 bits/value) + the 16- and 256-entry code books
  embedding, lm_head   vocab x hidden in c (once when tied; embedding 0 when kept on CPU)
  norms_and_biases     everything else (norm weights, q/k/v biases) in c; fp32 buffers
  lora_masters         fp32 A and B of every adapted linear
  lora_member_copies   the CPU path of lowmem_es.lora caches each chunk member's perturbed
                       A and B (fp32) for the whole generate call; the fused CUDA kernel
                       (``lora_kernel=True``) regenerates noise in place and caches none
  optimizer_state      Adam's two fp32 moments (0 for SGD)
  workspace            the profile's allowance for what is not modelled term by term
per chunk of R rows, prompt P and completion C tokens, at the larger of two moments:
  prefill  KV cache + the last layer's activations at T = R*P (residual stream,
           RMSNorm in fp32, projections with the ES-LoRA fp32 term, repeat_kv'd K/V of the
           masked SDPA, the MLP's gate/up/product, bitsandbytes' dequantized weight) +
           the 4D boolean mask (1 byte per element, + c for the float mask SDPA converts it
           to inside each call) + the last position's logits. With the static-cache decode
           loop (``generation_backend="loop"``, the default) the cache is allocated in full,
           P + C tokens, before the first layer writes to it, and the mask and the keys span
           it; with ``generate()`` (a DynamicCache) they span the P prompt tokens. When that
           is what limits the
           rows (or keeps one row from fitting), the prompt is prefilled in chunks of K < P
           tokens (``prefill_chunk``): activations at T = R*K, mask and repeated K/V over
           the whole (P + C)-token static cache, which is allocated in full
  decode   KV cache of P + C tokens + one decode step's activations (T = R) + its logits,
           + with ``generate()`` one layer's K/V copy as its DynamicCache grows (torch.cat)
  logits   the model's output in c plus generate()'s fp32 copy and the sampling processor's
           temporaries; transformers >= 4.45 computes prefill logits for the last position
           only (``logits_to_keep=1``); models without it get R x P x vocab
  sliding  a sliding-window layer (Mistral v0.1, Phi-3, Gemma 2/3; transformers'
           StaticSlidingWindowLayer) holds min(window, P + C) tokens of K/V, and its mask
           and keys span its window (or the prompt while a longer prompt is prefilled)
  eager    models that load with eager attention (Gemma 2: no SDPA with softcapping)
           hold rows x heads x queries x keys scores in c, cast to fp32 for the softmax,
           + its fp32 result, and a float mask (c per element) instead of a boolean one
The activation walk assumes a Llama-style decoder layer (Llama, Qwen2, Mistral, ...);
multimodal configs (a text decoder under ``text_config``) are refused: plan the text model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from lowmem_es.profiles import GIB, MIB, Profile

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
NF4_BLOCKSIZE = 64  # values per absmax (bitsandbytes default for 4-bit)
NESTED_BLOCKSIZE = 256  # absmax values per fp32 scale of the double quantization
NF4_BITS_PER_VALUE = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * NESTED_BLOCKSIZE)  # 4.127
LOGITS_TEMPORARIES = 16  # bytes per vocab entry per row: fp32 copy, /T, Gumbel noise, sum
# Prefill chunk sizes the planner tries, largest first, when a whole prompt does not fit.
PREFILL_CHUNKS = (1024, 512, 256, 128, 64, 32, 16)
MIN_LENGTH = 8  # shortest prompt/completion the planner will shrink a profile's length to
SHIPPED_FALLBACKS = ("8gb", "12gb", "16gb", "24gb")  # suggested, smallest first
GENERATION_BACKENDS = ("loop", "generate")  # ESConfig.generation_backend


class PlanError(ValueError):
    """Nothing fits the budget even at one row: ``over_bytes`` says by how much."""

    def __init__(self, message: str, over_bytes: int, suggestions: list[str]) -> None:
        super().__init__(message)
        self.over_bytes = over_bytes
        self.suggestions = suggestions


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


# --- activations of one forward pass (Llama-style decoder layer) ---

def _linear_peak(tokens: int, d_in: int, d_out: int, c: int, lora: bool) -> int:
    """Peak bytes of one linear's forward beyond its input (its output included)."""
    out = tokens * d_out * c
    base = out + d_in * d_out * c  # bitsandbytes dequantizes the weight for batched input
    if not lora:
        return base
    # ES-LoRA: x in fp32 (a copy unless c is fp32), the fp32 rank-r result, its scaled copy
    # and the cast back, next to the base output (lowmem_es.lora.ESLoraLinear.forward).
    x32 = tokens * d_in * 4 if c != 4 else 0
    return max(base, out + x32 + tokens * d_out * (8 + c))


def _attention_peak(shape: ModelShape, tokens: int, c: int, lora: frozenset[str],
                    prefill: bool, kv_tokens: int | None = None, scores: int = 0) -> int:
    """Peak bytes of one attention block beyond its input. ``scores``: elements of the
    rows x heads x queries x keys score matrix that eager attention materialises (0 for
    SDPA, which never holds it)."""
    hidden = shape.hidden_size
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    q, kv = tokens * q_width * c, tokens * kv_width * c
    projections = max(_linear_peak(tokens, hidden, q_width, c, "q_proj" in lora),
                      q + _linear_peak(tokens, hidden, kv_width, c, "k_proj" in lora),
                      q + kv + _linear_peak(tokens, hidden, kv_width, c, "v_proj" in lora))
    rotary = q + 2 * kv + 3 * q  # q*cos, rotate_half(q), *sin before the sum replaces q
    # Masked SDPA in prefill repeats K and V to every query head (transformers' repeat_kv);
    # decode packs the query heads instead (pack_gqa) and repeats nothing.
    # (In a chunked prefill the keys are the whole cache, ``kv_tokens``, not the chunk.)
    repeated = (2 * (kv_tokens if kv_tokens is not None else tokens) * q_width * c
                if prefill or scores else 0)  # eager repeats K/V in decode too
    sdpa = q + 2 * kv + repeated + 2 * q  # output and its contiguous transpose
    output = q + 2 * kv + q + _linear_peak(tokens, q_width, hidden, c, "o_proj" in lora)
    # Eager attention (transformers' eager_attention_forward): the scores in c, then
    # softmax(dtype=float32) casts them to fp32 and writes its fp32 result beside them
    # (no cast when c is fp32) before .to(c); then the scores x V output and its transpose.
    eager = q + 2 * kv + repeated + max(scores * (c + 4 + (4 if c != 4 else 0)),
                                        scores * c + 2 * q) if scores else 0
    return max(projections, rotary, sdpa, output, eager)


def _mlp_peak(shape: ModelShape, tokens: int, c: int, lora: frozenset[str]) -> int:
    hidden, inner = shape.hidden_size, shape.intermediate_size
    g = tokens * inner * c
    return max(_linear_peak(tokens, hidden, inner, c, "gate_proj" in lora),
               2 * g,  # gate output and its activation
               g + _linear_peak(tokens, hidden, inner, c, "up_proj" in lora),
               3 * g,  # act(gate), up and their product
               g + _linear_peak(tokens, inner, hidden, c, "down_proj" in lora))


def _layer_peak(shape: ModelShape, tokens: int, c: int, lora: frozenset[str],
                prefill: bool, kv_tokens: int | None = None, scores: int = 0) -> int:
    stream = tokens * shape.hidden_size * c  # residual stream entering the layer
    norm = tokens * shape.hidden_size * (8 + c)  # RMSNorm works in fp32
    block = max(_attention_peak(shape, tokens, c, lora, prefill, kv_tokens, scores),
                _mlp_peak(shape, tokens, c, lora))
    return stream + max(norm, stream + block)  # + the normed input of the block


# --- the plan ---

@dataclass
class Plan:
    """Predicted peak memory of one ES iteration and the chunking that fits the profile."""

    profile: str
    device: str
    architecture: str
    total_params: int
    lora_values: int
    rows_per_chunk: int
    num_chunks: int
    members_per_chunk: int
    total_rows: int
    max_prompt_length: int
    max_completion_length: int
    kv_bytes_per_token: int
    static: dict[str, int]
    phases: dict[str, dict[str, int]]  # "prefill" / "decode": kv_cache, activations, logits
    peak_phase: str
    predicted_peak_bytes: int
    target_bytes: int
    usable_bytes: int
    budget_bytes: int
    reserve_bytes: int
    limited_by: str  # "memory", "max_rows_in_flight", "rows_per_chunk" or "total_rows"
    notes: list[str] = field(default_factory=list)
    prefill_chunk: int = 0  # prompt tokens per prefill pass (0 = the whole prompt at once)

    @property
    def breakdown(self) -> dict[str, int]:
        """Every term at the peak moment; the values sum to ``predicted_peak_bytes``."""
        return {**self.static, **self.phases[self.peak_phase]}

    @property
    def fits(self) -> bool:
        return self.predicted_peak_bytes <= self.target_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (bytes as integers)."""
        return {"profile": self.profile, "device": self.device,
                "architecture": self.architecture, "total_params": self.total_params,
                "lora_values": self.lora_values, "rows_per_chunk": self.rows_per_chunk,
                "num_chunks": self.num_chunks, "members_per_chunk": self.members_per_chunk,
                "total_rows": self.total_rows, "max_prompt_length": self.max_prompt_length,
                "max_completion_length": self.max_completion_length,
                "kv_bytes_per_token": self.kv_bytes_per_token, "breakdown": self.breakdown,
                "static": dict(self.static), "phases": {k: dict(v) for k, v in
                                                        self.phases.items()},
                "peak_phase": self.peak_phase,
                "predicted_peak_bytes": self.predicted_peak_bytes,
                "target_bytes": self.target_bytes, "usable_bytes": self.usable_bytes,
                "budget_bytes": self.budget_bytes, "reserve_bytes": self.reserve_bytes,
                "fits": self.fits, "limited_by": self.limited_by,
                "prefill_chunk": self.prefill_chunk, "notes": list(self.notes)}

    def format(self) -> str:
        """A human-readable table of the plan."""
        gib = lambda n: f"{n / GIB:8.3f}"  # noqa: E731
        row_tokens = self.max_prompt_length + self.max_completion_length
        lines = [
            f"model {self.architecture}: {self.total_params / 1e9:.2f} B parameters; LoRA "
            f"{self.lora_values / 1e6:.2f} M fp32 values",
            f"profile {self.profile} ({self.device}): budget {self.budget_bytes / GIB:.2f} GiB"
            f" - reserve {self.reserve_bytes / GIB:.2f} = usable {self.usable_bytes / GIB:.2f}"
            f" GiB; planning to {self.target_bytes / GIB:.2f} GiB",
            f"rows per chunk {self.rows_per_chunk} ({self.num_chunks} chunks of "
            f"{self.total_rows} rows, up to {self.members_per_chunk} members each; limited by "
            f"{self.limited_by}); prompt {self.max_prompt_length} + completion "
            f"{self.max_completion_length} tokens"
            + (f"; prefill {self.prefill_chunk} prompt tokens at a time"
               if self.prefill_chunk else ""),
            f"KV cache {self.kv_bytes_per_token / 1024:.1f} KiB/token = "
            f"{self.phases['decode']['kv_cache'] / self.rows_per_chunk / MIB:.1f} MiB per row"
            + (" (sliding-window layers hold their window only)"
               if self.phases["decode"]["kv_cache"] < self.kv_bytes_per_token * row_tokens
               * self.rows_per_chunk else ""),
            "",
            f"{'resident':<22}{'GiB':>8}",
        ]
        lines += [f"  {name:<20}{gib(value)}" for name, value in self.static.items()]
        lines.append(f"{'per chunk':<22}{'prefill':>8}  {'decode':>8}")
        for name in self.phases["prefill"]:
            lines.append(f"  {name:<20}{gib(self.phases['prefill'][name])}  "
                         f"{gib(self.phases['decode'][name])}")
        lines.append(f"{'peak (' + self.peak_phase + ')':<22}{gib(self.predicted_peak_bytes)}"
                     f"  of {self.target_bytes / GIB:.3f} planned: "
                     f"{'fits' if self.fits else 'DOES NOT FIT'}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class _Estimate:
    static: dict[str, int]
    phases: dict[str, dict[str, int]]
    members: int
    prefill_chunk: int = 0

    @property
    def peak_phase(self) -> str:
        prefill, decode = (sum(self.phases[p].values()) for p in ("prefill", "decode"))
        return "prefill" if prefill >= decode else "decode"

    @property
    def peak(self) -> int:
        return sum(self.static.values()) + sum(self.phases[self.peak_phase].values())


class _Estimator:
    """Predicted memory of one ES iteration at given rows and lengths (a model + a profile)."""

    def __init__(self, config: Any, profile: Profile, lora_rank: int,
                 target_modules: list[str], population_size: int, batch_size: int,
                 num_generations: int, optimizer: str, lora_kernel: bool,
                 full_prefill_logits: bool | None, chunked_prefill: bool = True,
                 generation_backend: str = "loop", kv_cache_dtype: str | None = None) -> None:
        shape = model_shape(config)
        if generation_backend not in GENERATION_BACKENDS:
            raise ValueError(f"`generation_backend` must be one of {GENERATION_BACKENDS}, got "
                             f"{generation_backend!r}")
        if not target_modules:
            raise ValueError("`lora_target_modules` is empty; name the linears to adapt, "
                             "e.g. ['q_proj', 'v_proj']")
        known = sorted({name.rpartition(".")[2] for name, _, _ in shape.linears})
        missing = [t for t in target_modules if t not in known]
        if missing:
            raise ValueError(f"`lora_target_modules` contains {missing}, which match no "
                             f"linear layer of {shape.architecture}; valid names are {known}")
        for name, value in (("lora_rank", lora_rank), ("population_size", population_size),
                            ("batch_size", batch_size), ("num_generations", num_generations)):
            if not _positive_int(value):
                raise ValueError(f"`{name}` should be a positive integer, but the value "
                                 f"passed is {value!r}")
        self.config, self.shape, self.profile = config, shape, profile
        self.args = dict(lora_rank=lora_rank, target_modules=list(target_modules),
                         population_size=population_size, batch_size=batch_size,
                         num_generations=num_generations, optimizer=optimizer,
                         lora_kernel=lora_kernel, full_prefill_logits=full_prefill_logits,
                         generation_backend=generation_backend, kv_cache_dtype=kv_cache_dtype)
        self.c = c = DTYPE_BYTES[profile.compute_dtype]
        # The run's kv_cache_dtype ("auto" | "int8") wins over the profile's (None: the
        # profile's); int8 needs the decode loop's static cache (lowmem_es.kv_cache).
        kv_dtype = profile.kv_dtype if kv_cache_dtype is None else (
            profile.compute_dtype if kv_cache_dtype == "auto" else kv_cache_dtype)
        self.int8_kv = kv_dtype == "int8"
        if self.int8_kv and not (generation_backend == "loop" and shape.supports_static_cache):
            raise ValueError(f"kv_cache_dtype 'int8' needs the static-cache decode loop, which "
                             f"{shape.architecture} with generation_backend="
                             f"{generation_backend!r} does not use; set kv_cache_dtype = "
                             "\"auto\"")
        others = sorted({name for name in shape.cache_layers if name != "StaticLayer"})
        if self.int8_kv and others:  # as lowmem_es.kv_cache.make_static_cache refuses them
            raise ValueError(f"kv_cache_dtype='int8' covers full-attention static cache "
                             f"layers only; {shape.architecture} also has {others} (sliding-"
                             "window or other attention). Set kv_cache_dtype = \"auto\" (in "
                             "the profile or the run config)")
        # Eager attention materialises the scores; its mask is a float mask in c (SDPA's is
        # boolean, converted to a float mask in c inside each attention call).
        self.eager = shape.attn_implementation == "eager"
        self.kv_per_token = (shape.kv_bytes_per_token(1, int8_scale_bytes=c) if self.int8_kv
                             else shape.kv_bytes_per_token(DTYPE_BYTES[kv_dtype]))
        self.lora_values = shape.lora_values(lora_rank, target_modules)
        self.largest_lora = max(lora_rank * max(d_in, d_out) for name, d_in, d_out
                                in shape.linears if name.rpartition(".")[2] in target_modules)
        self.lora = frozenset(target_modules)
        self.population_size = population_size
        self.rows_per_member = batch_size * num_generations
        self.total_rows = population_size * self.rows_per_member
        self.lora_kernel = lora_kernel
        self.chunked_prefill = chunked_prefill
        # The decode loop's StaticCache (full length from the start, no copies as it fills)
        # or generate()'s DynamicCache; the loop falls back to generate() for models that
        # cannot use a static cache (lowmem_es.decode.supports_loop).
        self.static_cache = generation_backend == "loop" and shape.supports_static_cache
        self.full_logits = (not shape.supports_logits_to_keep if full_prefill_logits is None
                            else full_prefill_logits)
        self.notes: list[str] = []
        # On CPU, bitsandbytes repacks each weight at its first inference forward; the
        # largest weight's repacking (int32 unpacked codes, uint8 copies) is a one-off peak.
        cpu_packed = profile.device == "cpu"
        self.repack = (7 * max(d_in * d_out for _, d_in, d_out in shape.linears)
                       if cpu_packed else 0)
        embedding = shape.embedding_params * c
        if profile.embedding_on_cpu:
            if shape.tied_embeddings:
                self.notes.append("embedding_on_cpu has no effect: the embedding is tied to "
                                  "lm_head, which must stay on the GPU")
            else:
                embedding = 0
                self.notes.append(f"the input embedding ({shape.embedding_params * c / GIB:.2f}"
                                  " GiB) stays in CPU memory (embedding_on_cpu)")
        if shape.sliding_window is not None:
            self.notes.append(f"{len([w for w in shape.layer_windows if w is not None])} of "
                              f"{shape.num_layers} layers attend to a sliding window of "
                              f"{shape.sliding_window} tokens: their cache holds at most that")
        if self.eager:
            self.notes.append(f"{shape.architecture} runs eager attention: the rows x heads x "
                              "queries x keys scores (and their fp32 softmax) are counted")
        if self.int8_kv:
            self.notes.append("KV cache in int8: 1-byte codes + one scale per head and token "
                              "(kv_cache_dtype; one layer dequantized at a time)")
        self.base_static = {
            "nf4_linear_weights": sum(nf4_bytes(d_in * d_out, cpu_packed)
                                      for _, d_in, d_out in shape.linears),
            "embedding": embedding,
            "lm_head": shape.lm_head_params * c,
            "norms_and_biases": shape.other_params * c + shape.buffer_values * 4,
            "lora_masters": self.lora_values * 4,
            "optimizer_state": 2 * self.lora_values * 4 if optimizer == "adam" else 0,
        }

    def members_per_chunk(self, rows: int) -> int:
        """Members whose rows one chunk holds (chunks start at multiples of ``rows``)."""
        per_member = self.rows_per_member
        if rows % per_member == 0:
            members = rows // per_member
        elif per_member % rows == 0:
            members = 1
        else:  # a window of `rows` consecutive rows meets at most this many row blocks
            members = math.ceil((rows - 1) / per_member) + 1
        return min(self.population_size, members)

    def best(self, rows: int, prompt: int, completion: int) -> _Estimate:
        """The estimate with the whole prompt prefilled in one pass if that fits the
        target, else with the largest prefill chunk that does (fewest passes), else with
        the smallest chunk tried (the lowest peak). Chunking never changes the tokens."""
        whole = self(rows, prompt, completion)
        if not self.chunked_prefill or whole.peak <= self.profile.target_bytes:
            return whole
        chunks = [k for k in PREFILL_CHUNKS if k < prompt]
        tried = whole
        for chunk in chunks:
            tried = self(rows, prompt, completion, chunk)
            if tried.peak <= self.profile.target_bytes:
                return tried
        return tried if tried.peak < whole.peak else whole

    def __call__(self, rows: int, prompt: int, completion: int, prefill_chunk: int = 0
                 ) -> _Estimate:
        shape, c, kv_per_token = self.shape, self.c, self.kv_per_token
        members = self.members_per_chunk(rows)
        copies = 0 if self.lora_kernel else members * self.lora_values * 4
        # Building the copies: noise, perturbed sum and transposed copy of one tensor.
        build = 0 if self.lora_kernel else 3 * members * self.largest_lora * 4
        tokens = rows * prompt
        vocab = shape.vocab_size
        step_logits = rows * vocab * (c + LOGITS_TEMPORARIES)
        heads = shape.num_heads
        if 0 < prefill_chunk < prompt:  # pieces of K tokens against the full static cache
            cache_len = prompt + completion
            chunk_tokens = rows * prefill_chunk
            spans = self.key_spans(cache_len, prompt, prefill_chunk)
            prefill = {
                "kv_cache": rows * shape.kv_bytes(cache_len, kv_per_token),
                "activations": _layer_peak(shape, chunk_tokens, c, self.lora, prefill=True,
                                           kv_tokens=rows * max(spans),
                                           scores=self.scores(chunk_tokens * heads, spans))
                + self.dequantized(rows * cache_len)
                + self.mask_bytes(rows * prefill_chunk, spans)  # 4D mask over the cache
                + 2 * chunk_tokens * shape.head_dim * c  # rotary cos and sin
                + build + self.repack,
                "logits": step_logits + (chunk_tokens * vocab * c if self.full_logits else 0),
            }
        else:
            prefill_chunk = 0
            keys = prompt + completion if self.static_cache else prompt
            spans = self.key_spans(keys, prompt, prompt)
            prefill = {
                "kv_cache": rows * shape.kv_bytes(keys, kv_per_token),
                "activations": _layer_peak(shape, tokens, c, self.lora, prefill=True,
                                           kv_tokens=rows * max(spans),
                                           scores=self.scores(tokens * heads, spans))
                + self.dequantized(rows * keys)
                + self.mask_bytes(rows * prompt, spans)  # 4D attention mask
                + 2 * tokens * shape.head_dim * c  # rotary cos and sin
                + build + self.repack,
                "logits": step_logits + (tokens * vocab * c if self.full_logits else 0),
            }
        layer_kv = kv_per_token // shape.num_layers
        longest = max(self.key_spans(prompt + completion, prompt, 1))  # a decode step's keys
        window = shape.sliding_window
        decode = {
            "kv_cache": rows * shape.kv_bytes(prompt + completion, kv_per_token),
            "activations": _layer_peak(shape, rows, c, self.lora, prefill=False,
                                       kv_tokens=rows * longest,
                                       scores=self.scores(rows * heads, [longest]))
            + self.dequantized(rows * (prompt + completion))
            # generate()'s DynamicCache copies a layer's K/V (torch.cat) at every step
            + (0 if self.static_cache else rows * longest * layer_kv)
            # a full StaticSlidingWindowLayer rolls its window into new K and V each step
            + (rows * window * layer_kv if self.static_cache and window is not None
               and prompt + completion > window else 0),
            "logits": step_logits,
        }
        static = dict(self.base_static, lora_member_copies=copies,
                      workspace=int(self.profile.workspace_mib * MIB))
        return _Estimate(static, {"prefill": prefill, "decode": decode}, members, prefill_chunk)

    def key_spans(self, keys: int, prompt: int, queries: int) -> list[int]:
        """Keys per row that one attention call sees, for each kind of layer the model has
        (full attention, sliding window), in a pass of ``queries`` tokens per row.

        ``keys``: what a full-attention layer attends to (the static cache's length, or the
        tokens a DynamicCache holds). A sliding-window layer of window W attends to its
        window, or, while a prompt longer than W is prefilled, to the cached W - 1 tokens
        plus the pass (at most the prompt): transformers' StaticSlidingWindowLayer.update
        and get_mask_sizes.
        """
        spans = [keys] if self.shape.has_full_attention else []
        window = self.shape.sliding_window
        if window is not None:
            spans.append(max(min(window, keys), min(prompt, window - 1 + queries)))
        return spans

    def scores(self, query_heads: int, spans: list[int]) -> int:
        """Elements of eager attention's score matrix (``query_heads`` = row-tokens x
        heads) against the longest key span; 0 for SDPA."""
        return query_heads * max(spans) if self.eager else 0

    def mask_bytes(self, queries: int, spans: list[int]) -> int:
        """The 4D attention masks of a pass of ``queries`` row-tokens: one per kind of layer,
        all alive through the forward. SDPA's are boolean, and each attention call converts
        its mask into a float mask in the compute dtype (torch's convert_boolean_attn_mask):
        1 byte per element + c for the longest; eager's are float masks in c."""
        if self.eager:
            return sum(queries * span for span in spans) * self.c
        return sum(queries * span for span in spans) + queries * max(spans) * self.c

    def dequantized(self, kv_tokens: int) -> int:
        """The int8 cache's transient: one layer's K and V dequantized to the compute
        dtype for attention (``codes * scales``), over ``kv_tokens`` row-tokens."""
        if not self.int8_kv:
            return 0
        return 2 * kv_tokens * self.shape.num_kv_heads * self.shape.head_dim * self.c

    def make_plan(self, rows: int, prompt: int, completion: int, limited_by: str,
                  notes: list[str], prefill_chunk: int | None = None) -> Plan:
        best = (self.best(rows, prompt, completion) if prefill_chunk is None
                else self(rows, prompt, completion, prefill_chunk))
        profile = self.profile
        if not self.lora_kernel and best.static["lora_member_copies"] > 0.1 * \
                profile.target_bytes:
            notes.append(f"per-member LoRA copies take "
                         f"{best.static['lora_member_copies'] / GIB:.2f} GiB: fewer target "
                         "modules, a lower rank or the fused kernel free it")
        return Plan(
            profile=profile.name, device=profile.device, architecture=self.shape.architecture,
            total_params=self.shape.total_params, lora_values=self.lora_values,
            rows_per_chunk=rows, num_chunks=math.ceil(self.total_rows / rows),
            members_per_chunk=best.members, total_rows=self.total_rows,
            max_prompt_length=prompt, max_completion_length=completion,
            kv_bytes_per_token=self.kv_per_token, static=best.static, phases=best.phases,
            peak_phase=best.peak_phase, predicted_peak_bytes=best.peak,
            target_bytes=profile.target_bytes, usable_bytes=profile.usable_bytes,
            budget_bytes=int(profile.memory_budget_gib * GIB),
            reserve_bytes=int(profile.reserve_gib * GIB), limited_by=limited_by,
            notes=self.notes + notes, prefill_chunk=best.prefill_chunk)


def predict(config: Any, profile: Profile, lora_rank: int, target_modules: list[str],
            population_size: int, batch_size: int, num_generations: int = 1, *,
            rows_per_chunk: int, max_prompt_length: int, max_completion_length: int,
            optimizer: str = "sgd", lora_kernel: bool = False,
            full_prefill_logits: bool | None = None, prefill_chunk: int = 0,
            generation_backend: str = "loop", kv_cache_dtype: str | None = None) -> Plan:
    """The prediction at exactly these rows, lengths and prefill chunk (0 = whole prompt),
    fitting or not (see ``plan``).

    For benchmarks and checks: ``plan`` is what a run uses.
    """
    estimator = _Estimator(config, profile, lora_rank, target_modules, population_size,
                           batch_size, num_generations, optimizer, lora_kernel,
                           full_prefill_logits, generation_backend=generation_backend,
                           kv_cache_dtype=kv_cache_dtype)
    return estimator.make_plan(rows_per_chunk, max_prompt_length, max_completion_length,
                               "rows_per_chunk", [], prefill_chunk)


def plan(config: Any, profile: Profile, lora_rank: int, target_modules: list[str],
         population_size: int, batch_size: int, num_generations: int = 1, *,
         max_prompt_length: int | None = None, max_completion_length: int | None = None,
         rows_per_chunk: int = 0, optimizer: str = "sgd", lora_kernel: bool = False,
         full_prefill_logits: bool | None = None, chunked_prefill: bool = True,
         generation_backend: str = "loop", kv_cache_dtype: str | None = None) -> Plan:
    """Plan one ES iteration of ``population_size`` x ``batch_size`` x ``num_generations``
    rows under ``profile``: the largest rows per chunk whose predicted peak fits.

    Lengths given explicitly are kept (``PlanError`` if one row does not fit); lengths left
    None come from the profile and are lowered together when one row would not fit.
    ``rows_per_chunk`` > 0 caps the rows as the profile's ``max_rows_in_flight`` does.
    ``lora_kernel``: the fused CUDA kernel regenerates noise, so no member copies.
    ``full_prefill_logits``: None = R x P x vocab only if the model lacks logits_to_keep.
    ``chunked_prefill``: when the whole prompt's prefill is what does not fit, prefill it in
    chunks (``Plan.prefill_chunk`` tokens) rather than take fewer rows or shorter lengths.
    ``generation_backend``: "loop" (static cache, allocated in full) or "generate"
    (DynamicCache, grows by copying), as ``ESConfig.generation_backend``.
    ``kv_cache_dtype``: None = the profile's; "auto" (compute dtype) or "int8" (1-byte
    codes + a scale per head and token, and one layer dequantized at a time) override it.
    """
    estimate = _Estimator(config, profile, lora_rank, target_modules, population_size,
                          batch_size, num_generations, optimizer, lora_kernel,
                          full_prefill_logits, chunked_prefill, generation_backend,
                          kv_cache_dtype)
    target = profile.target_bytes
    prompt = max_prompt_length or profile.max_prompt_length
    completion = max_completion_length or profile.max_completion_length
    notes: list[str] = []
    one = estimate.best(1, prompt, completion)
    if one.peak > target:
        fitting = _fitting_lengths(estimate, prompt, completion, target)
        if max_prompt_length is None and max_completion_length is None and fitting:
            notes.append(f"the profile's lengths ({prompt} + {completion} tokens) do not fit "
                         f"one row; lowered to {fitting[0]} + {fitting[1]}")
            prompt, completion = fitting
        else:
            raise _plan_error(estimate, one, prompt, completion, fitting)
    caps = {"max_rows_in_flight": profile.max_rows_in_flight,
            "total_rows": estimate.total_rows}
    if rows_per_chunk:
        caps["rows_per_chunk"] = rows_per_chunk
    cap = min(caps.values())
    low, high = 1, cap  # largest rows with peak <= target (the peak grows with rows)
    while low < high:
        middle = (low + high + 1) // 2
        if estimate.best(middle, prompt, completion).peak <= target:
            low = middle
        else:
            high = middle - 1
    limited_by = "memory" if low < cap else min(caps, key=caps.get)
    rows = _balanced_rows(low, estimate.total_rows, estimate.rows_per_member)
    return estimate.make_plan(rows, prompt, completion, limited_by, notes)


def _balanced_rows(most: int, total_rows: int, rows_per_member: int) -> int:
    """Rows per chunk: the fewest chunks of at most ``most`` rows, sized equally, and made
    of whole members (equal segments take the batched-matmul path) when that costs no chunk.
    """
    chunks = math.ceil(total_rows / most)
    if most >= rows_per_member:
        whole = math.ceil(total_rows // rows_per_member / chunks) * rows_per_member
        if whole <= most:
            return whole
    return math.ceil(total_rows / chunks)


def _fitting_lengths(estimate: _Estimator, prompt: int, completion: int, target: int
                     ) -> tuple[int, int] | None:
    """Largest (prompt, completion), scaled together, that fits at one row; None if none."""
    def lengths(fraction: float) -> tuple[int, int]:
        return (max(MIN_LENGTH, int(prompt * fraction)),
                max(MIN_LENGTH, int(completion * fraction)))

    if estimate.best(1, *lengths(0.0)).peak > target:
        return None
    low, high = 0, 1024  # fraction in 1/1024 steps
    while low < high:
        middle = (low + high + 1) // 2
        if estimate.best(1, *lengths(middle / 1024)).peak <= target:
            low = middle
        else:
            high = middle - 1
    return lengths(low / 1024)


def _plan_error(estimate: _Estimator, one: _Estimate, prompt: int, completion: int,
                fitting: tuple[int, int] | None) -> PlanError:
    """The error for 'not even one row fits': by how much, and what would fit."""
    profile, shape, c = estimate.profile, estimate.shape, estimate.c
    target = profile.target_bytes
    over = one.peak - target
    static = sum(one.static.values())
    needed_budget = one.peak / (1 - profile.headroom_fraction) + profile.reserve_gib * GIB
    suggestions = []
    if fitting:
        suggestions.append(f"max_prompt_length={fitting[0]} and max_completion_length="
                           f"{fitting[1]}")
    if not profile.embedding_on_cpu and not shape.tied_embeddings and profile.device == "cuda":
        saved = shape.embedding_params * c
        if one.peak - saved <= target:
            suggestions.append(f"embedding_on_cpu = true in the profile (frees "
                               f"{saved / GIB:.2f} GiB)")
    copies = one.static["lora_member_copies"]
    if copies and one.peak - copies <= target:
        suggestions.append("the fused LoRA kernel (no per-member copies) or fewer target "
                           "modules / a lower rank")
    if profile.device == "cuda":
        from lowmem_es.profiles import load_profile

        for name in SHIPPED_FALLBACKS:
            bigger = load_profile(name)
            if bigger.memory_budget_gib <= profile.memory_budget_gib:
                continue
            args = dict(estimate.args)
            fits = predict(estimate.config, bigger, args.pop("lora_rank"),
                           args.pop("target_modules"), args.pop("population_size"),
                           args.pop("batch_size"), args.pop("num_generations"),
                           rows_per_chunk=1, max_prompt_length=prompt,
                           max_completion_length=completion, **args).fits
            if fits:
                suggestions.append(f"--profile {name}")
                break
    suggestions.append(f"a card with memory_budget_gib >= {needed_budget / GIB:.2f}")
    resident = (f" (the resident part alone, weights + LoRA + workspace, is "
                f"{static / GIB:.2f} GiB)" if static > target else "")
    message = (f"{shape.architecture} does not fit profile {profile.name!r}: one row of "
               f"{prompt} prompt + {completion} completion tokens peaks at "
               f"{one.peak / GIB:.2f} GiB in {one.peak_phase}{resident}, {over / GIB:.2f} GiB "
               f"over the {target / GIB:.2f} GiB it plans to (budget "
               f"{profile.memory_budget_gib} GiB - reserve {profile.reserve_gib} GiB, "
               f"{profile.headroom_fraction:.0%} headroom). To fit, use: "
               + "; or ".join(suggestions))
    return PlanError(message, over, suggestions)
