"""Predicted peak memory of one ES iteration at given rows and lengths.

The per-layer activation peaks of one forward pass (a Llama-style decoder layer) and
``_Estimator``, which adds what stays resident and what one chunk of rows holds in prefill
and in decode. The model of memory, term by term, is in docs/planner.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lowmem_es.planner.shape import (
    DTYPE_BYTES,
    ModelShape,
    _positive_int,
    model_shape,
    nf4_bytes,
)
from lowmem_es.profiles import GIB, MIB, Profile

LOGITS_TEMPORARIES = 16  # bytes per vocab entry per row: fp32 copy, /T, Gumbel noise, sum
# Prefill chunk sizes the planner tries, largest first, when a whole prompt does not fit.
PREFILL_CHUNKS = (1024, 512, 256, 128, 64, 32, 16)
GENERATION_BACKENDS = ("loop", "generate")  # ESConfig.generation_backend


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
