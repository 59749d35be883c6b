"""The noise contract: seeded Gaussian perturbations that any device can regenerate.

Every ES perturbation is a pure function ``noise(run_seed, iteration, pair, tensor_id)[element]``:

* ``member_key`` mixes the four integers into one 63-bit Philox key (splitmix64 finaliser
  applied after each field), so tensors, pairs and iterations get unrelated streams. The
  paper's reference code reuses one seed for every tensor; we never do.
* The element's flat index (row-major, as the tensor is stored) is the Philox counter, so a
  value does not depend on block sizes, row order or which process computes it.
* The value is Triton's ``tl.randn(key, offset)``: Philox4x32-10 on the counter
  ``(offset_lo, offset_hi, 0, 0)`` with key ``(key_lo, key_hi)``, the first two words turned
  into uniforms and one Box-Muller output. ``randn`` below is its pure-torch twin (the CPU
  path, the update step and the reference for kernels); it agrees with the Triton
  interpreter to ~5e-7 (tests/test_noise.py).
* ``tensor_id`` comes from a module's qualified name and the adapter matrix (A or B), with
  PEFT's wrapper prefixes stripped, never from dict iteration order.

What a run calls to generate noise, ``noise`` (one key's whole tensor), ``noise_batch`` and
``perturbed_rows`` (many keys at once), lives in ``lowmem_es.noise_batch``: faster forms of
``randn``, bit for bit equal to it, built on this module.

Integer arithmetic runs in int64 holding uint32 values: a 32x32-bit product fits 64 bits
exactly as unsigned, and int64 multiplication wraps, so its bit pattern is the unsigned
product; ``& MASK32`` / ``>> 32 & MASK32`` then give the low and high words (``umulhi``).
"""

from __future__ import annotations

import hashlib
import os
import warnings

import torch

MASK32 = 0xFFFFFFFF
MASK63 = (1 << 63) - 1
MASK64 = (1 << 64) - 1

# Philox4x32 constants (Salmon et al. 2011), as in triton.language.random.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10

# Triton's uint_to_uniform_float scale for 32-bit ints: largest value with MAX_INT * s < 1.
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586

# Elements generated per pass of the vectorised generator: small enough that the ~130
# intermediate int64 tensors of one pass stay in cache (see bench/bench_noise.py).
DEFAULT_CHUNK = 1 << 16

# The prefix PEFT's PeftModel puts in front of the wrapped model's module names. Only this
# one is stripped: stripping more (e.g. a leading "model.") would make ids depend on how
# deep the causal LM sits, and two different modules could collide.
_PEFT_PREFIX = "base_model.model."


def _splitmix64(value: int) -> int:
    """splitmix64 finaliser: a bijective 64-bit mix with full avalanche."""
    z = (value + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def member_key(run_seed: int, iteration: int, pair: int, tensor_id: int) -> int:
    """The Philox key of one (run, iteration, antithetic pair, tensor) noise stream.

    Returns an integer in [0, 2**63) so it passes to a Triton kernel as a plain int64.
    """
    for name, value in (("run_seed", run_seed), ("iteration", iteration), ("pair", pair),
                        ("tensor_id", tensor_id)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MASK64:
            raise ValueError(f"`{name}` must be an integer in [0, 2**64), got {value!r}")
    h = _splitmix64(run_seed & MASK64)
    for value in (iteration, pair, tensor_id):
        h = _splitmix64(h ^ (value & MASK64))
    return h & MASK63


def canonical_module_name(name: str) -> str:
    """A module's name as inside the causal LM: PEFT's wrapper prefix removed, if present."""
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def tensor_id(module_name: str, matrix: str) -> int:
    """Stable 63-bit id of a LoRA matrix (``matrix`` is ``"A"`` or ``"B"``) of a module.

    Derived from the canonical qualified name with BLAKE2b, so it is the same in every
    process and Python version (unlike ``hash``), and independent of module order.
    """
    if matrix not in ("A", "B"):
        raise ValueError(f"`matrix` must be 'A' or 'B', got {matrix!r}")
    text = f"{canonical_module_name(module_name)}:lora_{matrix}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & MASK63


def philox4x32(key: int | torch.Tensor, offsets: torch.Tensor, rounds: int = PHILOX_ROUNDS
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """First two output words of Philox4x32 for counters ``(offset_lo, offset_hi, 0, 0)``.

    ``offsets`` is an int64 tensor of non-negative element indices and ``key`` an int in
    [0, 2**63) or an int64 tensor broadcastable against it; returns two int64 tensors
    holding uint32 values, bit-identical to ``tl.randint4x(key, offsets)[:2]``.
    """
    if not isinstance(key, torch.Tensor):
        key = torch.tensor(key & MASK63, dtype=torch.int64, device=offsets.device)
    k0, k1 = key & MASK32, key >> 32
    c0 = offsets & MASK32
    c1 = offsets >> 32
    # Round 1 with c2 = c3 = 0 folded in (umulhi(B, 0) = 0, B * 0 = 0).
    p = c0 * _PHILOX_ROUND_A
    c0, c1, c2, c3 = c1 ^ k0, torch.zeros_like(c0), ((p >> 32) & MASK32) ^ k1, p & MASK32
    for _ in range(rounds - 1):
        k0 = (k0 + _PHILOX_KEY_A) & MASK32
        k1 = (k1 + _PHILOX_KEY_B) & MASK32
        pb = c2 * _PHILOX_ROUND_B
        pa = c0 * _PHILOX_ROUND_A
        c0 = ((pb >> 32) & MASK32) ^ c1 ^ k0
        c2 = ((pa >> 32) & MASK32) ^ c3 ^ k1
        c1 = pb & MASK32
        c3 = pa & MASK32
    return c0, c1


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: uint32 word -> float32 in [0, 1)."""
    signed = torch.where(word >= 0x80000000, word - (1 << 32), word)  # bitcast to int32
    signed = torch.where(signed < 0, ~signed, signed)
    return signed.to(torch.float32) * _UNIFORM_SCALE


def _randn_eager(key: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """tl.randn on a block of offsets: one Box-Muller output of the first two words."""
    i1, i2 = philox4x32(key, offsets)
    u1 = torch.clamp_min(_uniform(i1), 1.0e-7)
    theta = _uniform(i2) * _TWO_PI
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


_compiled: dict[str, object] = {}
_backend = os.environ.get("LOWMEM_ES_NOISE_BACKEND", "eager")
BACKENDS = ("eager", "compiled")


def set_backend(name: str) -> str:
    """Choose how the CPU twin runs: ``"eager"`` torch ops or ``"compiled"`` (torch.compile).

    ``"compiled"`` fuses the ~130 integer ops of Philox into one vectorised C++ loop
    (about 5x faster than the eager generator on one thread, bench/bench_noise.py) at the
    price of a one-off compile (3-9 s, cached on disk by inductor). Its transcendental functions
    (Sleef) may differ from eager in the last float bit, so a run uses one backend
    throughout. If compiling fails, this warns and stays on eager. Returns the backend
    now in use.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"`noise_backend` must be one of {BACKENDS}, got {name!r}")
    if name == "compiled" and _get_compiled() is None:
        name = "eager"
    _backend = name
    return _backend


def get_backend() -> str:
    """The backend ``randn`` and ``lowmem_es.noise_batch`` use when not told otherwise."""
    return _backend


def _get_compiled():
    if "fn" not in _compiled:
        try:
            fn = torch.compile(_randn_eager, dynamic=False, fullgraph=True)
            probe = torch.arange(DEFAULT_CHUNK, dtype=torch.int64)
            key = torch.tensor(1, dtype=torch.int64)
            fn(key, probe)
            _compiled["fn"] = fn
        except Exception as error:
            warnings.warn(f"torch.compile of the noise generator failed ({error!r}); "
                          "using the eager torch generator instead", stacklevel=3)
            _compiled["fn"] = None
    return _compiled["fn"]


def _fill(out: torch.Tensor, key: int, start: int, numel: int, offsets: torch.Tensor | None,
          chunk: int, backend: str | None) -> None:
    """Write tl.randn(key, offset) for the flat offsets into ``out`` (flat), chunk by chunk."""
    backend = backend or _backend
    device = out.device
    fn = _get_compiled() if backend == "compiled" and device.type == "cpu" else None
    if fn is None:
        fn = _randn_eager
        chunk = max(1, min(chunk, numel))  # eager: no need for static shapes
    key_t = torch.tensor(key & MASK63, dtype=torch.int64, device=device)
    if offsets is None:
        base = torch.arange(chunk, dtype=torch.int64, device=device)
    for pos in range(0, numel, chunk):
        stop = min(pos + chunk, numel)
        if offsets is None:
            block = base + (start + pos)  # full-size block keeps compiled shapes static
        else:
            block = offsets[pos:stop]
            if fn is not _randn_eager and block.numel() != chunk:
                block = torch.nn.functional.pad(block, (0, chunk - block.numel()))
        out[pos:stop] = fn(key_t, block)[: stop - pos]


def randn(key: int, offsets: torch.Tensor, chunk: int = DEFAULT_CHUNK,
          backend: str | None = None) -> torch.Tensor:
    """Standard normals ``tl.randn(key, offsets)`` (float32, same shape/device as offsets)."""
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise TypeError(f"noise offsets must be an integer tensor, got {offsets.dtype}")
    flat = offsets.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError("noise offsets must be non-negative element indices")
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    _fill(out, key, 0, flat.numel(), flat, chunk, backend)
    return out.reshape(offsets.shape)
