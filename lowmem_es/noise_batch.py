"""The fast generators of the noise contract: one key, or a batch of keys at once.

``noise(key, shape)`` is the whole tensor of one key; ``noise_batch(keys, shape)`` the same
for many keys stacked; ``perturbed_rows(keys, master, steps)`` each key's
``master + step * noise`` without holding the noise. The contract they implement, its
reference Philox and the eager/compiled backend switch are in ``lowmem_es.noise``.

A population needs the same tensor's noise under many keys (one per member), and the
twin of the fused LoRA kernel needs it on every call. Two generators serve these
batches, each bit for bit equal to ``_randn_eager`` (tests/test_noise_batch.py checks both)
with fewer operations per value:

* Philox words are masked lazily. Only the low 32 bits of each word matter, so high
  words of products (``>> 32``) and low words (the product itself) keep junk above bit
  31, and each multiplicand is masked right before its multiply, the only place junk
  could reach the low 32 bits: 10 ops a round, not 12.
* uint32 word -> Triton's uniform (bit-cast to int32, ``~x`` of negatives):
  ``s = (w << 32) >> 32`` is that int32 value, ``s ^ (s >> 63)`` the non-negative one:
  4 ops, not 6, and junk above bit 31 is ignored. The integer converted to float is
  the same, and the float operations are exactly ``_randn_eager``'s.
* Compiled (``_tile_block``): offsets are below 2**32, so the counter's high word is 0
  and round 1's ``c0`` is the key word itself, a per-row scalar (so is round 2's
  product of it): ~4 % faster again. ~1.1x ``torch.randn`` per value on one core.
* Eager (``_randn_block``): every op writes into one of a few buffers reused block
  after block, so nothing of the block's size is allocated per op (about 3.5x faster
  than ``_randn_eager``, and not at the mercy of the allocator; see its docstring).

The compiled batch path (``_batch_tiled``) cuts the (keys x elements) stream into
tiles of ``_TILE`` consecutive elements of one key and runs one compiled function over
a fixed block of tiles: static shapes (one compile per block height, no recompiles
whatever the tensor shape or key count), no padding of each key to a chunk (a key's
partial last tile and the last block's padding are all the waste), offsets made
inside the compiled loop, and ``master + step * noise`` fused into the same pass, so
perturbed weights are written once and the noise never exists on its own.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from lowmem_es.noise import (
    _PHILOX_KEY_A,
    _PHILOX_KEY_B,
    _PHILOX_ROUND_A,
    _PHILOX_ROUND_B,
    _TWO_PI,
    _UNIFORM_SCALE,
    DEFAULT_CHUNK,
    MASK32,
    MASK63,
    PHILOX_ROUNDS,
    _fill,
    get_backend,
)

_TILE = 1024
# Block heights in tiles, each its own compile (lazily, on first use). 256 (262,144
# values a call) for the bulk, so the ~17 us a compiled call costs in guards and
# wrappers is ~2 % of it; 64 and 16 to cover a remainder with little padding.
_BLOCK_TILES = (256, 64, 16)
_BLOCK_TILES_BULK = _BLOCK_TILES[0]
# One compiled call's fixed cost, in tiles of generation (~17 us vs ~2.5 us a tile).
_CALL_COST_TILES = 7
# Eager blocks of the batch generator: elements per pass (all keys of the batch together).
# The buffered generator's per-op cost (~3 us) is amortised over this many values; its
# buffers (5 int64, 2 fp32) then take 6 MiB.
_EAGER_BATCH_CHUNK = 1 << 17


def _philox_words_low(key: torch.Tensor, offsets: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``philox4x32(key, offsets)`` for offsets in [0, 2**32), lazily masked.

    ``key`` (int64 holding a value in [0, 2**63)) broadcasts against ``offsets``. The two
    returned int64 words equal Philox's first two in their low 32 bits and carry junk
    above (see the section comment). Functional form, for ``torch.compile``.
    """
    k0, k1 = key & MASK32, key >> 32
    # Round 1 with c1 = c2 = c3 = 0 and a zero high counter word folded in.
    p = offsets * _PHILOX_ROUND_A
    c0 = k0.expand(torch.broadcast_shapes(key.shape, offsets.shape))
    c2 = (p >> 32) ^ k1

    # Round 2 with c1 = 0; c0 is a per-row scalar, and so are pa and hence the new c3.
    k0 = k0 + _PHILOX_KEY_A  # no mask: only the low 32 bits reach the result
    k1 = k1 + _PHILOX_KEY_B
    pb = (c2 & MASK32) * _PHILOX_ROUND_B
    pa = (c0 & MASK32) * _PHILOX_ROUND_A
    c0, c1, c2, c3 = (pb >> 32) ^ k0, pb, (pa >> 32) ^ (p ^ k1), pa
    for _ in range(PHILOX_ROUNDS - 2):
        k0 = k0 + _PHILOX_KEY_A
        k1 = k1 + _PHILOX_KEY_B
        pb = (c2 & MASK32) * _PHILOX_ROUND_B
        pa = (c0 & MASK32) * _PHILOX_ROUND_A
        c0 = (pb >> 32) ^ c1 ^ k0
        c2 = (pa >> 32) ^ (c3 ^ k1)  # c3 ^ k1 is a per-row scalar in round 3
        c1, c3 = pb, pa
    return c0, c1


def _uniform_low(word: torch.Tensor) -> torch.Tensor:
    """``_uniform`` of a word of which only the low 32 bits count."""
    signed = (word << 32) >> 32  # the low 32 bits bit-cast to int32
    return (signed ^ (signed >> 63)).to(torch.float32) * _UNIFORM_SCALE


def _randn_low(key: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``_randn_eager(key, offsets)`` for offsets in [0, 2**32), bit for bit."""
    i1, i2 = _philox_words_low(key, offsets)
    u1 = torch.clamp_min(_uniform_low(i1), 1.0e-7)
    theta = _uniform_low(i2) * _TWO_PI
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def _tile_block(keys: torch.Tensor, starts: torch.Tensor, steps: torch.Tensor,
                master: torch.Tensor, out: torch.Tensor) -> None:
    """``out[t] = master[t] + steps[t] * noise(keys[t])[starts[t] : starts[t] + TILE]``.

    The body the compiled batch path runs on a (tiles, ``_TILE``) block; compiled with
    static shapes, ``out`` is written in place (inductor writes the mutated input).
    Multiplying and adding stay two roundings (inductor compiles with
    ``-ffp-contract=off``), as in eager ``master + step * eps``.
    """
    offsets = starts[:, None] + torch.arange(out.shape[1], dtype=torch.int64,
                                             device=out.device)
    eps = _randn_low(keys[:, None], offsets)
    out.copy_(master + steps[:, None] * eps)


def _tile_block_pair(keys: torch.Tensor, starts: torch.Tensor, steps: torch.Tensor,
                     master: torch.Tensor, out: torch.Tensor) -> None:
    """``out[j, t] = master[t] + steps[t, j] * noise(keys[t])[starts[t] : + TILE]``, j = 0, 1.

    ``_tile_block`` for a key two members share (an antithetic pair): the noise of a tile
    is generated once and both members' rows are written from it; ``out`` is
    (2, tiles, ``_TILE``) and ``steps`` (tiles, 2). Same roundings as ``_tile_block``.
    """
    offsets = starts[:, None] + torch.arange(out.shape[2], dtype=torch.int64,
                                             device=out.device)
    eps = _randn_low(keys[:, None], offsets)
    out.copy_(torch.stack((master + steps[:, 0:1] * eps, master + steps[:, 1:2] * eps)))


_tile_kernels: dict[tuple[int, bool], Callable[..., None] | None] = {}


def _get_tile_kernel(tiles: int, paired: bool = False) -> Callable[..., None] | None:
    """The compiled ``_tile_block`` (``paired``: ``_tile_block_pair``) for blocks of
    ``tiles`` tiles (None if compiling failed)."""
    if (tiles, paired) not in _tile_kernels:
        try:
            body = _tile_block_pair if paired else _tile_block
            fn = torch.compile(body, dynamic=False, fullgraph=True)
            with torch.no_grad():
                fn(torch.ones(tiles, dtype=torch.int64), torch.zeros(tiles, dtype=torch.int64),
                   torch.ones(tiles, 2) if paired else torch.ones(tiles),
                   torch.zeros(tiles, _TILE),
                   torch.empty(2, tiles, _TILE) if paired else torch.empty(tiles, _TILE))
            _tile_kernels[tiles, paired] = fn
        except Exception as error:
            warnings.warn(f"torch.compile of the batched noise generator failed ({error!r}); "
                          "noise_batch generates key by key instead", stacklevel=3)
            _tile_kernels[tiles, paired] = None
    return _tile_kernels[tiles, paired]


@functools.cache
def _tail_plan(left: int) -> tuple[int, ...]:
    """Block heights covering ``left`` (< bulk) tiles at the least modelled cost.

    Cost of a call: its height plus ``_CALL_COST_TILES``; padding past ``left`` counts
    as work. A tiny knapsack over ``_BLOCK_TILES``.
    """
    if left <= 0:
        return ()
    options = [(height, *_tail_plan(left - height)) for height in _BLOCK_TILES]
    return min(options, key=lambda plan: sum(h + _CALL_COST_TILES for h in plan))


@functools.lru_cache(maxsize=64)
def _tile_layout(count: int, per_key: int
                 ) -> tuple[tuple[tuple[int, int], ...], torch.Tensor, torch.Tensor]:
    """Calls, and each tile's key index and first offset, for ``count`` keys of
    ``per_key`` tiles. Cached: a model has a few LoRA shapes and one population size.

    Calls are (first tile, block height): full bulk blocks, then ``_tail_plan`` for the
    remainder. Tiles past the last real one (the last block's padding) reuse the last
    key; their values are discarded.
    """
    tiles = count * per_key
    heights = [_BLOCK_TILES_BULK] * (tiles // _BLOCK_TILES_BULK)
    heights += _tail_plan(tiles % _BLOCK_TILES_BULK)
    calls, first = [], 0
    for height in heights:
        calls.append((first, height))
        first += height
    tile = torch.arange(first, dtype=torch.int64)
    member = torch.clamp(tile // per_key, max=count - 1)
    starts = (tile - member * per_key) * _TILE
    return tuple(calls), member, starts


@functools.cache
def _zeros_block() -> torch.Tensor:
    """The master block of a batch with no master (plain noise): zeros, never written."""
    return torch.zeros(_BLOCK_TILES_BULK, _TILE)


SharedKeys = tuple[list[int], list[tuple[list[int], list[int]]]]


def _shared_keys(keys: list[int]) -> SharedKeys | None:
    """How a batch's keys share noise streams, or None when every key is distinct.

    With antithetic sampling members 2k and 2k+1 share pair k's key (signs +1 and -1),
    so the batch generators draw each distinct key once and write both members' rows
    from the same noise: half the generation, the same bits. Keys are compared modulo
    2**63 (the generator's domain). Returns the distinct keys (first-seen order) and, for
    the first and the second occurrence of a key, (indices into the distinct keys,
    positions in ``keys``). None as well if a key occurs more than twice (no population
    layout does; the key-by-key path then serves it).
    """
    index: dict[int, int] = {}
    occurrences: list[tuple[list[int], list[int]]] = [([], []), ([], [])]
    seen_twice: set[int] = set()
    for position, key in enumerate(keys):
        key &= MASK63
        if key not in index:
            index[key] = len(index)
            occurrences[0][0].append(index[key])
            occurrences[0][1].append(position)
        elif index[key] in seen_twice:
            return None
        else:
            seen_twice.add(index[key])
            occurrences[1][0].append(index[key])
            occurrences[1][1].append(position)
    if not occurrences[1][1]:
        return None
    return list(index), occurrences


def _batch_tiled(keys: list[int], numel: int, master: torch.Tensor | None,
                 steps: torch.Tensor | None) -> torch.Tensor | None:
    """CPU, compiled: (keys, numel) fp32, row p = ``master + steps[p] * noise(keys[p])``.

    ``master`` is a flat fp32 tensor of ``numel`` elements (None: zeros) and ``steps`` a
    (keys,) fp32 tensor (None: ones; ``0 + 1 * eps`` is ``eps`` exactly, as eps is never
    zero). Returns a contiguous (keys, numel) tensor, or None if the compiled kernel is
    unavailable (or for tensors of more than 2**32 elements, which no LoRA matrix has).
    """
    count = len(keys)
    per_key = -(-numel // _TILE)
    if per_key * _TILE > 1 << 32:  # the kernel takes offsets below 2**32
        return None
    shared = _shared_keys(keys)
    distinct = keys if shared is None else shared[0]
    calls, member, starts = _tile_layout(len(distinct), per_key)
    kernels = {height: _get_tile_kernel(height, shared is not None) for _, height in calls}
    if any(kernel is None for kernel in kernels.values()):
        return None
    key_t = torch.tensor([k & MASK63 for k in distinct], dtype=torch.int64)[member]
    if shared is None:
        step_t = torch.ones(len(member)) if steps is None else steps.to(torch.float32)[member]
    else:  # (tiles, 2): the steps of a distinct key's first and second member
        step_t = torch.ones(len(distinct), 2)
        for j, (picks, positions) in enumerate(shared[1]):
            if steps is not None:
                step_t[picks, j] = steps.to(torch.float32)[positions]
        step_t = step_t[member]
        copies = _pair_copies(len(distinct), tuple(tuple(map(tuple, o)) for o in shared[1]),
                              per_key, len(member), calls)
        scratch = torch.empty(2, _BLOCK_TILES_BULK, _TILE)
    # Block rows of master: tile first % per_key, then the next ones modulo per_key. A
    # block that wraps past the last tile gets a copy; with few tiles a key, every block
    # does, so a ring (tiles repeated past the end) is built once instead.
    grid, ring = None, _zeros_block()
    if master is not None:
        if numel == per_key * _TILE:
            grid = master.reshape(per_key, _TILE)
        else:
            grid = torch.zeros(per_key, _TILE)
            grid.view(-1)[:numel] = master.reshape(-1)
        if per_key < _BLOCK_TILES_BULK:  # repeat: a plain copy, ~3x faster than a gather
            ring = grid.repeat(-(-(per_key + _BLOCK_TILES_BULK) // per_key), 1)
            grid = None
    out = torch.empty(len(member) if shared is None else count * per_key, _TILE)
    with torch.no_grad():
        for first, height in calls:
            row, stop = first % per_key, first + height
            if grid is None:
                window = ring[row:row + height] if master is not None else ring[:height]
            elif row + height <= per_key:
                window = grid[row:row + height]
            else:
                window = torch.cat([grid[row:], grid[:row + height - per_key]])
            if shared is None:
                kernels[height](key_t[first:stop], starts[first:stop], step_t[first:stop],
                                window, out[first:stop])
                continue
            block = scratch[:, :height]
            kernels[height](key_t[first:stop], starts[first:stop], step_t[first:stop],
                            window, block)
            for j, (source, dest) in enumerate(copies[first]):  # into the members' rows
                out.index_copy_(0, dest, block[j] if source is None else block[j, source])
    rows = out[:count * per_key].view(count, per_key * _TILE)
    # Whole tiles: a view. Otherwise a compact copy, so that member p's tensor starts at
    # p * numel as in any (keys, numel) tensor: BLAS results can depend on where an
    # operand starts (alignment), and the twin's must not change with the tiling.
    return rows if numel == per_key * _TILE else rows[:, :numel].contiguous()


@functools.lru_cache(maxsize=64)
def _pair_copies(distinct: int, occurrences: tuple[tuple[tuple[int, ...], ...], ...],
                 per_key: int, tiles: int, calls: tuple[tuple[int, int], ...]
                 ) -> dict[int, list[tuple[torch.Tensor | None, torch.Tensor]]]:
    """Where a paired block's rows go: per call (by first tile), for each occurrence j,
    (block rows to take, or None for all; rows of the members' (count * per_key) tile
    grid). Tiles past the last real one, and keys with no second member, are dropped.
    ``occurrences`` is ``_shared_keys``'s second item as tuples; cached like
    ``_tile_layout`` (a model has a few LoRA shapes and one population layout)."""
    tile = torch.arange(tiles)
    key = tile // per_key
    valid_tile = key < distinct
    targets = []
    for picks, positions in occurrences:
        position = torch.full((distinct + 1,), -1, dtype=torch.int64)
        position[list(picks)] = torch.tensor(positions)
        owner = position[torch.clamp(key, max=distinct)]
        valid = valid_tile & (owner >= 0)
        targets.append((valid, owner * per_key + (tile - key * per_key)))
    copies = {}
    for first, height in calls:
        stop, plan = first + height, []
        for valid, dest in targets:
            keep = valid[first:stop]
            if bool(keep.all()):
                plan.append((None, dest[first:stop]))
            else:
                plan.append((torch.nonzero(keep).view(-1), dest[first:stop][keep]))
        copies[first] = plan
    return copies


def _randn_block(key: torch.Tensor, start: int, width: int, work: list[torch.Tensor]
                 ) -> torch.Tensor:
    """Eager ``_randn_eager(key, start + arange(width))`` for a (keys, 1) ``key``, bit for bit.

    Written for the eager batch path: every operation writes into one of ``work``'s
    buffers (5 int64 and 2 float32, flat, >= keys * width elements each, reused block
    after block), so a block allocates nothing of its size. Each temporary of the
    functional form would be a fresh allocation, and glibc returns freed blocks above its
    trim threshold to the OS, so every one would be page-faulted in again (up to 3x
    slower, depending on the allocator's state). The formulas are those of
    ``_philox_words_low`` for any int64 offsets, and ``_uniform_low``. Returns a
    (keys, width) view of a float buffer.
    """
    shape = (key.shape[0], width)
    count = shape[0] * width
    c0, c1, c2, c3, spare = (buf[:count].view(shape) for buf in work[:5])
    f1, f2 = (buf[:count].view(shape) for buf in work[5:7])
    offsets = torch.arange(start, start + width, dtype=torch.int64, device=key.device)
    k0, k1 = key & MASK32, key >> 32
    low = torch.bitwise_and(offsets, MASK32).mul_(_PHILOX_ROUND_A)
    torch.bitwise_xor(torch.bitwise_right_shift(offsets, 32), k0, out=c0)
    torch.bitwise_xor(torch.bitwise_right_shift(low, 32), k1, out=c2)
    c3.copy_(low.expand(shape))
    for round_ in range(PHILOX_ROUNDS - 1):
        k0 = k0 + _PHILOX_KEY_A
        k1 = k1 + _PHILOX_KEY_B
        pb = torch.bitwise_and(c2, MASK32, out=spare).mul_(_PHILOX_ROUND_B)
        if round_ < PHILOX_ROUNDS - 2:  # the last round's c2, c3 are never read
            pa = c0.bitwise_and_(MASK32).mul_(_PHILOX_ROUND_A)
            torch.bitwise_right_shift(pa, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1)
        new_c0 = torch.bitwise_right_shift(pb, 32, out=c3).bitwise_xor_(k0)  # c3 is dead
        if round_ > 0:  # c1 = 0 after round 1
            new_c0.bitwise_xor_(c1)
        c0, c1, c3, spare = new_c0, pb, c0, c1

    def uniform(word: torch.Tensor, scratch: torch.Tensor, result: torch.Tensor
                ) -> torch.Tensor:  # ``_uniform_low``, in place (``word`` is dead after)
        signed = word.bitwise_left_shift_(32).bitwise_right_shift_(32)
        signed.bitwise_xor_(torch.bitwise_right_shift(signed, 63, out=scratch))
        return result.copy_(signed).mul_(_UNIFORM_SCALE)  # copy_: int -> float, as .to

    u1 = uniform(c0, c2, f1).clamp_min_(1.0e-7)
    theta = uniform(c1, c3, f2).mul_(_TWO_PI)
    return u1.log_().mul_(-2.0).sqrt_().mul_(theta.cos_())


def _batch_eager(keys: list[int], numel: int, master: torch.Tensor | None,
                 steps: torch.Tensor | None, device: torch.device | str, chunk: int
                 ) -> torch.Tensor:
    """Any device, eager: (keys, numel) fp32, row p = ``master + steps[p] * noise(keys[p])``.

    Philox runs once over a (keys x columns) block of about ``chunk`` elements, so many
    small tensors cost one set of torch ops, not one per key; the perturbation is applied
    to the block while it is in cache. ``master`` None means zeros, ``steps`` None ones.
    A key that occurs twice (an antithetic pair) is generated once and both rows are
    written from it (``_shared_keys``).
    """
    count = len(keys)
    out = torch.empty(count, numel, dtype=torch.float32, device=device)
    if count == 0 or numel == 0:
        return out
    shared = _shared_keys(keys)
    distinct = keys if shared is None else shared[0]
    key_t = torch.tensor([k & MASK63 for k in distinct], dtype=torch.int64,
                         device=device)[:, None]
    steps32 = None if steps is None else steps.to(device, torch.float32)
    flat = None if master is None else master.reshape(-1)
    width = max(1, min(numel, chunk // len(distinct)))
    size = len(distinct) * width
    work = [torch.empty(size, dtype=torch.int64, device=device) for _ in range(5)]
    work += [torch.empty(size, dtype=torch.float32, device=device) for _ in range(2)]
    if shared is None:
        step_col = None if steps32 is None else steps32[:, None]
        for pos in range(0, numel, width):
            stop = min(pos + width, numel)
            eps = _randn_block(key_t, pos, stop - pos, work)
            if step_col is not None:
                eps.mul_(step_col)
            if flat is not None:
                eps.add_(flat[pos:stop])
            out[:, pos:stop] = eps
        return out
    # (rows of the block to read, or None for all; rows of ``out``; steps) per occurrence.
    groups = []
    for picks, positions in shared[1]:
        select = None if picks == list(range(len(distinct))) else torch.tensor(
            picks, device=device)
        dest = torch.tensor(positions, device=device)
        groups.append((select, dest, None if steps32 is None else steps32[dest][:, None]))
    scratch = torch.empty(size, dtype=torch.float32, device=device)
    for pos in range(0, numel, width):
        stop = min(pos + width, numel)
        eps = _randn_block(key_t, pos, stop - pos, work)
        for select, dest, step_col in groups:
            src = eps if select is None else eps[select]
            value = scratch[:src.numel()].view(src.shape)
            if step_col is not None:  # the same two roundings as the path above
                torch.mul(src, step_col, out=value)
                if flat is not None:
                    value.add_(flat[pos:stop])
            elif flat is not None:
                torch.add(src, flat[pos:stop], out=value)
            else:
                value = src
            out[dest, pos:stop] = value
    return out


def noise(key: int, shape: tuple[int, ...] | torch.Size, device: torch.device | str = "cpu",
          chunk: int = DEFAULT_CHUNK, backend: str | None = None) -> torch.Tensor:
    """The whole noise tensor of one key: element ``i`` (row-major) is ``tl.randn(key, i)``.

    Runs the batch generators with one key (eager: buffers reused block after block, ~3x
    faster than ``_fill``'s functional ops; compiled on CPU: the tile kernel), which are
    bit for bit ``_randn_eager``; ``_fill`` remains for what they do not take.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    backend = backend or get_backend()
    if numel:
        if backend == "compiled" and torch.device(device).type == "cpu":
            rows = _batch_tiled([key], numel, None, None)
        else:
            rows = _batch_eager([key], numel, None, None, device, chunk)
        if rows is not None:
            return rows[0].reshape(tuple(shape))
    out = torch.empty(numel, dtype=torch.float32, device=device)
    _fill(out, key, 0, numel, None, chunk, backend)
    return out.reshape(tuple(shape))


def noise_batch(keys: list[int], shape: tuple[int, ...] | torch.Size,
                device: torch.device | str = "cpu", chunk: int = DEFAULT_CHUNK,
                backend: str | None = None) -> torch.Tensor:
    """Noise tensors of several keys stacked: ``out[i] == noise(keys[i], shape)``.

    Bit for bit equal to ``noise`` key by key, on either backend. Eager (or off CPU):
    Philox over (keys x elements) blocks of ``chunk`` elements. Compiled, on CPU: fixed
    blocks of tiles (``_batch_tiled``; ``chunk`` is not used), which waste at most one
    partial tile per key instead of padding every key to a whole compiled chunk.
    """
    backend = backend or get_backend()
    numel = 1
    for size in shape:
        numel *= int(size)
    if not keys or numel == 0:
        return torch.empty(len(keys), *shape, dtype=torch.float32, device=device)
    if backend == "compiled" and torch.device(device).type == "cpu":
        rows = _batch_tiled(keys, numel, None, None)
        if rows is None:  # compiling failed (warned), or > 2**32 elements: key by key
            return torch.stack([noise(k, shape, device, chunk, backend) for k in keys])
        return rows.view(len(keys), *shape)
    return _batch_eager(keys, numel, None, None, device, chunk).reshape(len(keys), *shape)


def perturbed_rows(keys: list[int], master: torch.Tensor, steps: torch.Tensor,
                   backend: str | None = None) -> torch.Tensor:
    """``master + steps[p] * noise(keys[p], master.shape)`` for each key p: (keys, numel).

    fp32, contiguous, row p holding member p's perturbed ``master`` flattened (row-major),
    so ``rows[p].view(master.shape)`` is its weight. Bit for bit equal to
    ``master.float() + steps[:, None, None] * noise_batch(keys, master.shape)`` (one
    rounding for the product, one for the sum, no FMA) without ever holding the noise:
    the generator pass writes the perturbed weights directly. The torch twin of the fused
    LoRA kernel builds its members' weights with it on every call.
    """
    backend = backend or get_backend()
    flat = master.reshape(-1).to(torch.float32)
    numel = flat.numel()
    if keys and numel and backend == "compiled" and master.device.type == "cpu":
        rows = _batch_tiled(keys, numel, flat, steps)
        if rows is None:  # compiling failed (warned), or > 2**32 elements: key by key
            eps = noise_batch(keys, (numel,), master.device, backend=backend)
            rows = flat + steps.to(torch.float32)[:, None] * eps
        return rows
    return _batch_eager(keys, numel, flat, steps, master.device, _EAGER_BATCH_CHUNK)
