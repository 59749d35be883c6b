"""A population decode loop over a preallocated static KV cache.

``model.generate()`` is general and pays for it on every step: logits processors,
stopping criteria, cache growth, Python dispatch. Population decoding is narrow: a fixed
set of rows (their member ids never change during the loop), greedy or plain temperature
sampling, per-row EOS. This loop does exactly that, using the model's own modules and
transformers' ``StaticCache`` (no re-implementation of any architecture):

* prefill: the left-padded prompts in one forward pass, or in chunks of
  ``prefill_chunk`` prompt tokens (all rows, consecutive columns) so that the prefill's
  activations stay inside the memory plan, writing the static cache;
* decode: one token per step for every row; a finished row keeps running on padding
  (masked, not reshaped), so every step has the same shapes and buffers;
* on CUDA the decode step can be captured once as a CUDA graph and replayed, removing the
  per-step launch overhead of a 28-32 layer model (``capture=True``; unverified on a GPU
  in this repository's CI, which has none; it falls back to eager with a warning if
  capture fails).

The cache is sized once (rows x (prompt + completion)) and never grows. Architectures
whose transformers class does not support a static cache fall back to ``generate()``
with a message naming the class.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger("lowmem_es")

_fallback_warned: set[str] = set()


class UnsupportedModelError(ValueError):
    """The model cannot use the static-cache decode loop."""


def supports_loop(model: nn.Module) -> bool:
    """Whether ``model`` declares static-cache support (transformers' own flag) and its
    ``forward`` takes a cache argument this loop knows how to pass."""
    return bool(getattr(model, "_can_compile_fullgraph", False)
                or getattr(model, "_supports_static_cache", False)) \
        and _cache_keyword(type(model)) is not None


@functools.cache
def _cache_keyword(model_class: type) -> str | None:
    """The name under which ``model_class.forward`` takes the KV cache, or None.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works
    there, with a deprecation warning, until 5.40). Passing ``cache=`` to an older model
    is not an error: the keyword vanishes into ``**kwargs``, every step then runs without
    the cache and the tokens are silently wrong. So the loop asks the signature (which
    follows ``functools.wraps`` through transformers' deprecation decorators).
    """
    try:
        parameters = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


@dataclass
class DecodeStats:
    """What one call did: steps run, cache shape, time split (filled by ``decode``)."""

    steps: int = 0
    cache_tokens: int = 0
    rows: int = 0
    captured: bool = False
    cache_bytes: int = 0  # what the KV cache held at the end (codes + scales for int8)


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           max_new_tokens: int, eos_token_ids: list[int], pad_token_id: int, *,
           temperature: float = 0.0, generator: torch.Generator | None = None,
           prefill_chunk: int = 0, capture: bool | None = None,
           stats: DecodeStats | None = None, logits_processor: object | None = None,
           kv_cache_dtype: str = "auto") -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens for every row; returns (rows, max_new_tokens).

    ``input_ids``/``attention_mask``: (rows, prompt_len), left-padded. Rows that produced
    an EOS are filled with ``pad_token_id`` afterwards, as ``generate()`` does. Greedy
    when ``temperature == 0``; otherwise softmax(logits / temperature) sampled with
    ``generator``. ``prefill_chunk`` > 0 prefills the prompts that many tokens at a time
    (same tokens as one pass, up to float rounding; activation memory scales with it).
    ``capture`` (default: on CUDA) replays the decode step as a CUDA graph.
    ``logits_processor`` (a transformers ``LogitsProcessor(List)``) is applied to each
    step's scores before the choice, with the sequence so far, as ``generate()`` does.
    ``kv_cache_dtype="int8"`` stores the cache as int8 + per-vector scales
    (``lowmem_es.kv_cache``: half the memory, outputs equal up to the quantization error).
    """
    from lowmem_es.kv_cache import cache_bytes, make_static_cache

    if not supports_loop(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not support a static KV cache (or its forward "
            "takes no `cache`/`past_key_values` argument), which the lowmem-es decode "
            "loop needs; use generation_backend='generate'")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be a non-negative integer, got "
                         f"{max_new_tokens!r}")
    rows, prompt_len = input_ids.shape
    device = input_ids.device
    if max_new_tokens == 0:  # nothing to generate: no cache, no prefill
        if stats is not None:
            stats.steps, stats.cache_tokens, stats.rows = 0, 0, rows
        return torch.full((rows, 0), pad_token_id, dtype=torch.long, device=device)
    if prompt_len == 0:
        raise ValueError("every prompt is empty (0 tokens after tokenization and "
                         "truncation): give each row at least one prompt token, e.g. a "
                         "chat template or a BOS token, or a larger max_prompt_length")
    total = prompt_len + max_new_tokens
    cache = make_static_cache(model.config, total, kv_cache_dtype)
    # Full-length 2D mask: future columns are 0 until their token exists, so the step's
    # inputs keep one shape (graph capture needs static shapes and addresses).
    mask = torch.zeros(rows, total, dtype=attention_mask.dtype, device=device)
    mask[:, :prompt_len] = attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (rows, prompt_len)
    next_position = positions[:, -1:] + 1  # (rows, 1)
    eos = torch.tensor(eos_token_ids or [-1], device=device)
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 0:
        raise ValueError(f"`prefill_chunk` must be a non-negative number of tokens (0 = the "
                         f"whole prompt at once), got {prefill_chunk!r}")
    logits = _prefill(model, cache, input_ids, mask, positions, prefill_chunk)
    out = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    step_fn = _EagerStep(model, cache, mask)
    use_capture = capture_supported(device) if capture is None else capture
    if use_capture and capture_supported(device) and max_new_tokens > 1:  # 1: no step runs
        step_fn = _captured_or_eager(step_fn, rows, device)
    for step in range(max_new_tokens):
        if logits_processor is not None:
            logits = logits_processor(torch.cat([input_ids, out[:, :step]], dim=1), logits)
        token = _choose(logits, temperature, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        out[:, step] = token
        finished |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or (step % 8 == 7 and bool(finished.all())):
            break  # the all() check syncs with the device, so only every 8 steps
        column = prompt_len + step
        mask[:, column] = 1  # the new token is visible from now on (finished rows too:
        # their padding tokens only ever attend within their own row and are discarded)
        logits = step_fn(token[:, None], next_position + step, column)
    if stats is not None:
        stats.steps, stats.cache_tokens, stats.rows = step + 1, total, rows
        stats.captured = isinstance(step_fn, _CapturedStep)
        stats.cache_bytes = cache_bytes(cache)
    return out


def capture_supported(device: torch.device) -> bool:
    """Whether decode steps on ``device`` can be captured as a CUDA graph (CUDA only; the
    tests replace this to run the capture path on CPU, see tests/capture_sim.py)."""
    return device.type == "cuda"


def _prefill(model: nn.Module, cache: object, input_ids: torch.Tensor, mask: torch.Tensor,
             positions: torch.Tensor, chunk: int) -> torch.Tensor:
    """Run the prompts through the model into the static cache; last-position logits.

    With ``chunk`` > 0 the prompt columns go in ``chunk`` at a time: each piece attends to
    the cache written by the pieces before it (the cache's own position counter places it),
    so the result is that of one pass while the activations are those of ``chunk`` tokens.
    """
    prompt_len = input_ids.shape[1]
    step = chunk if 0 < chunk < prompt_len else prompt_len
    keyword = _cache_keyword(type(model))
    for start in range(0, prompt_len, step):
        stop = min(start + step, prompt_len)
        output = model(input_ids=input_ids[:, start:stop], attention_mask=mask,
                       position_ids=positions[:, start:stop], use_cache=True,
                       logits_to_keep=1, **{keyword: cache})
    return output.logits[:, -1, :]


class _EagerStep:
    """One decode step: feed (rows, 1) tokens at their positions, return next logits."""

    def __init__(self, model: nn.Module, cache: object, mask: torch.Tensor) -> None:
        self.model, self.cache, self.mask = model, cache, mask
        self.keyword = _cache_keyword(type(model))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, column: int
                 ) -> torch.Tensor:
        output = self.model(input_ids=tokens, attention_mask=self.mask,
                            position_ids=positions, use_cache=True,
                            **{self.keyword: self.cache})
        return output.logits[:, -1, :]


class _CapturedStep:
    """The decode step as a CUDA graph over static input buffers (full-length mask).

    With the input embedding in host memory (``model.OffloadedEmbedding``) the graph
    takes the embedded rows (``inputs_embeds``) instead of token ids: the host-side
    lookup cannot run inside a graph, so it runs before each replay and its result is
    copied into the static buffer.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, tokens: torch.Tensor,
                 positions: torch.Tensor, logits: torch.Tensor,
                 embed: object | None = None, embeds: torch.Tensor | None = None) -> None:
        self.graph, self.tokens, self.positions, self.logits = graph, tokens, positions, logits
        self.embed, self.embeds = embed, embeds

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, column: int
                 ) -> torch.Tensor:
        if self.embed is not None:
            self.embeds.copy_(self.embed.host_lookup(tokens))
        else:
            self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


def capturable(cache: object) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention static layer whose only
    position state is the ``cumulative_length`` tensor (``StaticLayer`` or
    ``kv_cache.Int8StaticLayer``), so that warm-up and capture can be undone exactly.

    Sliding-window or chunked layers (Mistral, Gemma 2/3, Llama 4) keep a Python-side
    counter, roll their buffers in place once full and branch on device values (a sync,
    which capture forbids): their steps run eagerly.
    """
    from transformers.cache_utils import StaticLayer

    from lowmem_es.kv_cache import Int8StaticLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (StaticLayer, Int8StaticLayer)
                                for layer in layers)


@contextlib.contextmanager
def _positions_kept(cache: object) -> Iterator[None]:
    """Run a step that must leave no trace: the cache layers' position counters are put
    back afterwards, also when the step raises part-way (layers before the failure
    would otherwise stay one slot ahead and every later step would write off by one).
    The slot the step wrote is overwritten by the real step before any row reads it."""
    saved = [layer.cumulative_length.clone() for layer in cache.layers]
    try:
        yield
    finally:
        for layer, value in zip(cache.layers, saved, strict=True):
            layer.cumulative_length.copy_(value)


def _captured_or_eager(step: _EagerStep, rows: int, device: torch.device):
    """Capture the step with a full-length mask (static shape); eager if that fails.

    Warm-up and capture each run the step once, which would write a cache slot: the
    cache's position counters are restored after each (``_positions_kept``). A cache
    whose layers cannot be restored that way (``capturable``) is not captured. Out of
    memory during warm-up or capture is raised, not swallowed: the caller's backoff
    halves the chunk, as it does for any other OOM.
    """
    from lowmem_es.model import offloaded_embedding

    model, cache, mask = step.model, step.cache, step.mask
    if not capturable(cache):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        logger.info("decode step not captured as a CUDA graph: cache layers %s keep state "
                    "that capture cannot restore; decoding eagerly", kinds)
        return step
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
    positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
    embed = offloaded_embedding(model)
    embeds = None
    if embed is not None:
        embeds = torch.zeros(rows, 1, embed.embedding_dim, dtype=embed.weight.dtype,
                             device=device)
        inputs = {"inputs_embeds": embeds}
    else:
        inputs = {"input_ids": tokens}
    inputs[step.keyword] = cache
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy init, autotuning, allocator
                with _positions_kept(cache):
                    model(**inputs, attention_mask=mask, position_ids=positions,
                          use_cache=True)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with _positions_kept(cache), torch.cuda.graph(graph):
            logits = model(**inputs, attention_mask=mask, position_ids=positions,
                           use_cache=True).logits[:, -1, :]
        return _CapturedStep(graph, tokens, positions, logits, embed, embeds)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # capture is an optimisation: never fail the run for it
        logger.warning("CUDA graph capture of the decode step failed (%s: %s); decoding "
                       "eagerly", type(error).__name__, str(error).splitlines()[0][:200])
        return step


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None
            ) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def warn_fallback(model: nn.Module) -> None:
    """Say once per architecture that generate() is used instead of the loop."""
    name = type(model).__name__
    if name not in _fallback_warned:
        _fallback_warned.add(name)
        logger.warning("%s does not support the static-cache decode loop; using "
                       "model.generate() (set generation_backend='generate' to silence)", name)
