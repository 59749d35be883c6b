"""The journal: one line per applied iteration, and the one place its update is applied.

``journal.jsonl`` holds, per iteration, everything the ES update needs (seed, iteration,
member schedule, fitness, learning rate, optimizer settings) plus its statistics and
timings. ``apply_record`` turns a record into the update: the training step calls it on
the record it has just built, and resume and ``replay_journal`` call it on records read
back, so the two cannot drift apart and a replayed adapter equals the trained one bit
for bit. Resume = newest valid checkpoint + ``apply_record`` of the lines after it;
``replay_journal`` is also the recovery path when checkpoints are corrupt.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowmem_es import es
from lowmem_es.adapter_io import adapter_params, param_tensor_ids
from lowmem_es.checkpoint import list_checkpoints, load_adam, read_state, step_dir
from lowmem_es.config import NOISE_SCALINGS
from lowmem_es.errors import CheckpointError

logger = logging.getLogger("lowmem_es")


def is_record(record: object) -> bool:
    """Whether a parsed journal or metrics line is a record: an object with its integer
    iteration."""
    iteration = record.get("iteration") if isinstance(record, dict) else None
    return isinstance(iteration, int) and not isinstance(iteration, bool)


def read_journal(path: Path, repair: bool = False, what: str = "journal"
                 ) -> list[dict[str, Any]]:
    """Records of a JSON-lines file in order (the journal, or ``what`` names another, such
    as the metrics). A torn last line (a kill mid-write) is dropped, and with ``repair``
    cut from the file; a bad line elsewhere, or one that is no record (``is_record``), is
    an error naming the line.

    A complete last record without its newline (a kill between the record and its
    newline, or an editor that strips it) is kept; with ``repair`` the newline is
    appended, so the next record appended to the file starts on a line of its own."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    good_bytes = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            if number >= len(lines) - 1 and not any(x.strip() for x in lines[number:]):
                logger.warning("%s %s: dropping a torn last line (a kill mid-write)", what,
                               path)
                if repair:
                    with open(path, "r+b") as handle:
                        handle.truncate(good_bytes)
                        handle.flush()
                        os.fsync(handle.fileno())
                break
            raise CheckpointError(f"{path}:{number} is not valid JSON ({error}); the {what} "
                                  "is damaged in the middle, not just at its end: restore the "
                                  "line from a backup (one JSON object per iteration) or start "
                                  "over with --overwrite") from error
        if not is_record(record):
            raise CheckpointError(f"{path}:{number} is not a {what} record (a JSON object "
                                  "with an integer iteration; got "
                                  f"{line[:60].decode(errors='replace')!r}): the {what} "
                                  "was edited or damaged; restore the line from a backup or "
                                  "start over with --overwrite")
        records.append(record)
        good_bytes += len(line) + 1
    else:  # every line parsed: the last one may lack its newline
        if repair and raw and not raw.endswith(b"\n"):
            _end_with_newline(path)
    return records


def _end_with_newline(path: Path) -> None:
    """Append the missing final newline, durably. Appending one byte cannot lose a record:
    a kill leaves the file either as it was or with the newline."""
    with open(path, "ab") as handle:
        handle.write(b"\n")
        handle.flush()
        os.fsync(handle.fileno())


# What apply_record reads from a journal record (besides "skipped").
JOURNAL_UPDATE_KEYS = ("members", "fitness", "fitness_shaping", "run_seed", "iteration",
                       "learning_rate", "optimizer", "weight_decay")


def apply_record(params: dict[str, torch.Tensor], ids: dict[str, int],
                 record: dict[str, Any], adam_state: es.AdamState | None,
                 noise_backend: str | None = None,
                 anchor: dict[str, torch.Tensor] | None = None,
                 noise_scales: dict[str, float] | None = None
                 ) -> tuple[list[float], dict[str, float]] | None:
    """Apply the ES update a journal record describes to ``params`` (in place).

    The training step builds its record and calls this; resume and replay call it on
    records read back: one code path, so a replay is the training run bit for bit.
    Returns the shaped fitness and ``es.es_update``'s statistics, or None for a skipped
    iteration (no reward at all: no update). A record with ``anchor_decay`` needs
    ``anchor``, the initial adapter's tensors (step_000000); one with
    ``noise_scaling: relative`` needs ``noise_scales``, ``es.relative_noise_scales`` of
    that adapter.
    """
    if record.get("skipped"):
        return None
    missing = [key for key in JOURNAL_UPDATE_KEYS if key not in record]
    if missing:
        raise CheckpointError(f"journal record of iteration {record.get('iteration')!r} lacks "
                              f"{', '.join(missing)}: the journal was edited or damaged, and "
                              "the update cannot be redone; restore it from a backup or "
                              "start over with --overwrite")
    scaling = record.get("noise_scaling", "none")
    if scaling not in NOISE_SCALINGS:
        raise CheckpointError(f"journal record of iteration {record.get('iteration')!r} has "
                              f"noise_scaling {scaling!r}, which this lowmem-es does not "
                              f"know ({', '.join(NOISE_SCALINGS)}); replay it with the "
                              "version that wrote it")
    if scaling != "none" and noise_scales is None:
        raise ValueError("a record with noise_scaling needs `noise_scales` "
                         "(es.relative_noise_scales of the initial adapter)")
    schedule = [tuple(m) for m in record["members"]]
    # A baseline (ESConfig.fitness_baseline) journals the fitness the update shaped.
    shaped = es.shape_fitness(record.get("centred_fitness", record["fitness"]),
                              record["fitness_shaping"])
    stats = es.es_update(params, ids, run_seed=record["run_seed"],
                         iteration=record["iteration"], shaped_fitness=shaped,
                         schedule=schedule, learning_rate=record["learning_rate"],
                         optimizer=record["optimizer"], adam_state=adam_state,
                         weight_decay=record["weight_decay"], noise_backend=noise_backend,
                         anchor_decay=record.get("anchor_decay", 0.0), anchor=anchor,
                         noise_scales=noise_scales if scaling != "none" else None)
    return [float(f) for f in shaped], stats


@dataclass
class ReplayResult:
    """Masters rebuilt by replay, the step they correspond to and the checkpoint compared."""

    params: dict[str, torch.Tensor]
    step: int
    start_step: int
    verified_against: Path | None
    max_abs_diff: float | None


def replay_journal(output_dir: Path, step: int | None = None, start: str = "initial",
                   noise_backend: str | None = None) -> ReplayResult:
    """Rebuild the adapter after ``step`` iterations from a checkpoint and the journal.

    ``start="initial"`` replays from step_000000 (the initial adapter), the full check of
    the journal; ``"nearest"`` starts from the newest valid checkpoint at or before
    ``step``. If a checkpoint exists for ``step``, the result is compared with it.
    """
    output_dir = Path(output_dir)
    records = read_journal(output_dir / "journal.jsonl")
    last = records[-1]["iteration"] + 1 if records else 0
    step = last if step is None else step
    if step > last:
        raise ValueError(f"`--step {step}` is beyond the journal, which ends after iteration "
                         f"{last}")
    candidates = [(s, p) for s, p in list_checkpoints(output_dir) if s <= step]
    if start == "initial":
        candidates = [(s, p) for s, p in candidates if s == 0]
    origin = None
    for s, p in reversed(candidates):
        try:
            read_state(p)
            origin = (s, p)
            break
        except CheckpointError as error:
            warnings.warn(f"{error}; trying an older checkpoint", stacklevel=2)
    if origin is None:
        raise CheckpointError(f"no valid checkpoint at or before step {step} in "
                              f"{str(output_dir)!r} to replay from (step_000000 holds the "
                              "initial adapter)")
    start_step, start_path = origin
    params = adapter_params(start_path)
    ids = param_tensor_ids(params)
    anchor = scales = None  # from the initial adapter, for anchor_decay / noise_scaling
    if any(r.get("anchor_decay") or r.get("noise_scaling") for r in records):
        origin = (params if start_step == 0 else adapter_params(step_dir(output_dir, 0)))
        anchor = {name: tensor.clone() for name, tensor in origin.items()}
        scales = es.relative_noise_scales(origin)
    adam_state = load_adam(start_path)
    by_iteration = {r["iteration"]: r for r in records}
    for iteration in range(start_step, step):
        if iteration not in by_iteration:
            raise CheckpointError(f"journal has no line for iteration {iteration}; cannot "
                                  "replay past it")
        record = by_iteration[iteration]
        if record.get("optimizer") == "adam" and adam_state is None:
            adam_state = es.AdamState()
        apply_record(params, ids, record, adam_state, noise_backend, anchor, scales)
    verified, diff = None, None
    target = step_dir(output_dir, step)
    if target.is_dir() and target != start_path:
        try:
            read_state(target)
            saved = adapter_params(target)
            diff = max(float((saved[n] - params[n]).abs().max()) for n in params)
            verified = target
        except CheckpointError as error:
            warnings.warn(f"{error}; cannot verify the replay against it", stacklevel=2)
    return ReplayResult(params, step, start_step, verified, diff)
