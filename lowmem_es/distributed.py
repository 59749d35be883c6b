"""Scale-out with torchrun: the population sharded across ranks, only fitnesses cross.

Every rank holds the full model and the same fp32 masters. Iteration t: rank r evaluates
the members of its share of antithetic pairs, the member fitnesses are all-gathered, and
every rank applies the identical update (the noise comes from seeds, so no weights
travel). Rank 0 alone writes files. Decisions that must be unanimous (stop on a signal,
--max-hours) are all-reduced, so no rank waits for a peer that already left. Evaluations
of the centre are sharded too (each rank generates every world-th row, the rows' rewards
are gathered), so no rank idles through another's evaluation against the timeout.

torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) starts the
processes; NCCL is used on CUDA, gloo on CPU. Multi-node is torchrun's own rendezvous.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Sequence

import torch

from lowmem_es.errors import DistributedError

logger = logging.getLogger("lowmem_es")


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and logs."""
    return rank() == 0


def launched_distributed() -> bool:
    """Whether a launcher (torchrun) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(timeout_s: float = 600.0, device: torch.device | None = None) -> bool:
    """Join the process group when launched by torchrun; idempotent. Returns True if joined.

    The backend is NCCL when this rank uses CUDA, gloo otherwise. ``timeout_s`` bounds how
    long a collective waits for a dead or stuck peer before failing.
    """
    if not launched_distributed():
        return False
    if not torch.distributed.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.distributed.is_initialized():
        return True
    use_cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    if rank() != 0:
        # Other ranks stay quiet except for errors (rank 0 reports progress).
        logging.getLogger("lowmem_es").setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        except ImportError:
            pass
    logger.info("distributed: %d ranks, backend %s", world_size(), backend)
    return True


def shard_members(schedule: Sequence[tuple[int, int]], world: int, this_rank: int
                  ) -> list[int]:
    """Member indices of this rank: a contiguous block of whole antithetic pairs.

    Pairs are split as evenly as possible (the last ``pairs % world`` ranks, roughly,
    get one more: rank r takes pairs [r * P // world, (r + 1) * P // world)); a rank may
    get none when there are more ranks than pairs.
    """
    pairs = sorted({pair for pair, _ in schedule})
    start = this_rank * len(pairs) // world
    stop = (this_rank + 1) * len(pairs) // world
    mine = set(pairs[start:stop])
    return [m for m, (pair, _) in enumerate(schedule) if pair in mine]


def gather_members(local: dict[int, Sequence[float]], population_size: int, width: int
                   ) -> list[list[float]]:
    """Per-member values of every rank, in member order: ``local`` maps each of this
    rank's members to its ``width`` values (fitness, completion digest, ...); column c of
    the result holds value c of every member. One collective, exact (float64 slots with
    one addend each: no reduction math). A rank without members passes ``{}``."""
    members = list(local)
    columns = [[local[m][c] for m in members] for c in range(width)]
    return gather_rows(members, columns, population_size, what="member values")


# Handles of the latest collectives. gloo's worker thread drops its reference to a
# finished collective a moment after wait() returns; if that reference is the last, it
# frees the tensors, which needs the GIL, and a process that has begun to exit meanwhile
# aborts ("terminate called without an active exception": Python ends any thread that
# asks for the GIL during finalization). Holding the handles here makes the main thread,
# with the GIL, free them (at the latest when the module is torn down).
_RECENT_WORK: list[object] = []


def all_reduce(tensor: torch.Tensor, op: object = None) -> None:
    """``torch.distributed.all_reduce`` (in place, waited for), keeping its handle."""
    work = torch.distributed.all_reduce(
        tensor, op=op if op is not None else torch.distributed.ReduceOp.SUM, async_op=True)
    work.wait()
    _RECENT_WORK.append(work)
    del _RECENT_WORK[:-16]


def collective_device() -> torch.device:
    """Where a small tensor for a collective must live: NCCL reduces CUDA tensors only
    (a CPU tensor fails with "No backend type associated with device type cpu"), gloo
    reduces CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True when any rank says True (for unanimous stop decisions)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=collective_device())
    try:
        all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    except Exception as error:
        raise DistributedError(_lost_peer(error)) from error
    return bool(value.item())


def total(value: int) -> int:
    """The sum of an integer over all ranks (e.g. tokens generated this iteration)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=collective_device())
    try:
        all_reduce(tensor)
    except Exception as error:
        raise DistributedError(_lost_peer(error)) from error
    return int(tensor.item())


def shard_rows(count: int) -> list[int]:
    """This rank's rows of ``count`` (r, r + world, ...): all of them in one process."""
    return list(range(rank(), count, world_size()))


def gather_rows(indices: Sequence[int], columns: Sequence[Sequence[float | None]],
                count: int, what: str = "rows") -> list[list[float | None]]:
    """Columns of ``count`` rows, each row held by exactly one rank, merged in row order.

    This rank holds rows ``indices`` and, for each column, their values (``None`` for
    none); every rank gets every column whole. One all-reduce of float64 sums in which
    each slot has one non-zero addend, so the values arrive exactly. In one process the
    rows are just put in order (the same code path, so every test runs the merge).
    """
    width = len(columns)
    values = torch.zeros((width, count), dtype=torch.float64)
    present = torch.zeros((width, count), dtype=torch.float64)
    owned = torch.zeros(count, dtype=torch.float64)
    for c, column in enumerate(columns):
        for position, row in enumerate(indices):
            if column[position] is not None:
                values[c, row] = column[position]
                present[c, row] = 1.0
    owned[list(indices)] = 1.0
    if world_size() > 1:
        packed = torch.cat([values.reshape(-1), present.reshape(-1), owned])
        packed = packed.to(collective_device())
        try:
            all_reduce(packed)
        except Exception as error:  # gloo/NCCL raise RuntimeError subclasses of many kinds
            raise DistributedError(_lost_peer(error)) from error
        values, present, owned = packed.cpu().split([width * count, width * count, count])
        values, present = values.view(width, count), present.view(width, count)
    if not torch.equal(owned, torch.ones_like(owned)):
        raise DistributedError(f"{what} were not covered exactly once by the ranks; all "
                               "ranks must run the same configuration")
    return [[value if flag else None for value, flag in zip(row_values, row_flags, strict=True)]
            for row_values, row_flags in zip(values.tolist(), present.tolist(), strict=True)]


def gather_json(items: Sequence[object]) -> list[object]:
    """Every rank's ``items`` (small JSON values, e.g. sample texts), concatenated in rank
    order; in one process, ``items`` itself. Sent as UTF-8 JSON through ``all_reduce``
    (each rank fills its own slot of a zeroed byte buffer): no pickle, and the handles are
    kept as for every collective here (``all_gather_object`` would drop them)."""
    if world_size() == 1:
        return list(items)
    mine = torch.frombuffer(bytearray(json.dumps(list(items)).encode()), dtype=torch.uint8)
    try:
        sizes = torch.zeros(world_size(), dtype=torch.int64, device=collective_device())
        sizes[rank()] = mine.numel()
        all_reduce(sizes)
        offsets = [0, *torch.cumsum(sizes, 0).tolist()]
        packed = torch.zeros(offsets[-1], dtype=torch.int32)  # sums of bytes, one addend
        packed[offsets[rank()]:offsets[rank() + 1]] = mine
        packed = packed.to(collective_device())
        all_reduce(packed)
    except Exception as error:
        raise DistributedError(_lost_peer(error)) from error
    data = packed.to(device="cpu", dtype=torch.uint8).numpy().tobytes()
    return [item for r in range(world_size())
            for item in json.loads(data[offsets[r]:offsets[r + 1]].decode())]


def barrier() -> None:
    if world_size() > 1:
        try:
            torch.distributed.barrier()
        except Exception as error:
            raise DistributedError(_lost_peer(error)) from error


def _lost_peer(error: BaseException) -> str:
    return (f"rank {rank()}/{world_size()}: a collective failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Another rank probably died "
            "or hung past the timeout; the last checkpoint and the journal are intact: "
            "restart the job with --resume (any number of ranks)")


def leave() -> None:
    """At the end of a command under torchrun: wait for every rank, then close the
    process group (NCCL warns at exit about a group left open; see also ``all_reduce``
    on exiting right after a collective). Nothing in one process."""
    barrier()
    cleanup()


def cleanup() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
