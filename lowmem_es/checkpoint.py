"""Checkpoints and the journal: what makes a run survive a power cut.

Layout (../shared/DESIGN.md, "Output directory"):

    output_dir/checkpoints/step_000012/
        adapter_model.safetensors  adapter_config.json   PEFT adapter (fp32 masters)
        optimizer.safetensors                            Adam moments, when Adam is on
        trainer_state.json                               step, config hash, sha256 of files

``step`` is the number of iterations already applied (the next iteration to run).
``step_000000`` is the initial adapter; it is never rotated away, so the journal can
always be replayed from it. A checkpoint is written into a temporary sibling directory,
fsynced and renamed (lowmem_es.lora.atomic_directory), so it is complete or absent.

The journal (``journal.jsonl``) holds one line per applied iteration with everything the
update needs (seed, iteration, member schedule, fitness, learning rate, optimizer
settings). Resume = newest valid checkpoint + replay of the journal lines after it, so a
kill costs at most the iteration in flight. ``replay_journal`` is also the recovery path
when checkpoints are corrupt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file, save_file

from lowmem_es import es
from lowmem_es.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    atomic_directory,
    check_adapter_destination,
)
from lowmem_es.noise import tensor_id

logger = logging.getLogger("lowmem_es")

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing files, truncated or fails its checksums."""


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete-looking checkpoint directory, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for child in root.iterdir():
            name = child.name
            if child.is_dir() and name.startswith("step_") and name[5:].isdigit():
                found.append((int(name[5:]), child))
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_free_space(directory: Path, needed_bytes: int) -> None:
    """Refuse to start writing when the disk cannot hold the checkpoint (plus 10%)."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * 1.1:
        raise OSError(f"not enough free disk space in {str(directory)!r} for a checkpoint: "
                      f"{needed_bytes / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free. "
                      "Free some space (older checkpoints can go: lower save_total_limit) "
                      "and resume with --resume; nothing was lost")


def save_checkpoint(output_dir: Path, step: int, es_model: Any, state: dict[str, Any],
                    adam_state: es.AdamState | None = None) -> Path:
    """Write checkpoint ``step`` atomically with sha256 checksums of its files."""
    path = step_dir(output_dir, step)
    params = es_model.parameters()
    needed = sum(t.numel() * 4 for t in params.values()) * (3 if adam_state else 1) + 65536
    check_free_space(path.parent, needed)
    with atomic_directory(path) as tmp:
        es_model.write_adapter(tmp)
        if adam_state is not None:
            save_file(adam_state.state_dict(), str(tmp / OPTIMIZER_FILE))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        full_state = dict(state, format=FORMAT_VERSION, step=step, files=files)
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2, sort_keys=True) + "\n")
    return path


def read_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint, verified against its file checksums."""
    path = Path(path)
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot read {STATE_FILE} "
                              f"({error})") from error
    if not isinstance(state, dict) or not isinstance(state.get("files", {}), dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: {STATE_FILE} is not a checkpoint "
                              "state (a JSON object with a 'files' object); it was edited or "
                              "damaged")
    for name, digest in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} fails its sha256 "
                                  "checksum (truncated or corrupted)")
    if ADAPTER_WEIGHTS not in state.get("files", {}):
        raise CheckpointError(f"checkpoint {str(path)!r} lists no {ADAPTER_WEIGHTS}")
    return state


def load_adam(path: Path) -> es.AdamState | None:
    file = Path(path) / OPTIMIZER_FILE
    return es.AdamState.from_state_dict(load_file(str(file))) if file.is_file() else None


def newest_valid_checkpoint(output_dir: Path) -> tuple[int, Path, dict[str, Any]] | None:
    """The newest checkpoint whose checksums verify; corrupt ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(output_dir)):
        try:
            return step, path, read_state(path)
        except CheckpointError as error:
            warnings.warn(f"{error}; falling back to the previous checkpoint and the journal",
                          stacklevel=2)
    return None


def newest_state(output_dir: Path) -> dict[str, Any] | None:
    """trainer_state.json of the newest checkpoint that has a readable one, for its
    metadata only: the checksums are not verified (``newest_valid_checkpoint`` does that)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(state, dict):
            return state
    return None


LOCK_FILE = ".lowmem-es.lock"  # in output_dir: held (flock) by the process training there
_HELD_LOCKS: dict[Path, IO[str]] = {}


def lock_run(output_dir: Path) -> bool:
    """Hold an exclusive lock on ``output_dir`` until ``unlock_run`` (or this process
    ends: the kernel drops the lock of a killed process, so none goes stale).

    Two processes training in one directory (a requeued job while the old one still
    runs) would interleave their journals and delete each other's checkpoint
    temporaries, leaving a run that cannot be resumed; the second one is refused. On a
    filesystem without locks (some network mounts) it warns and goes on. Returns whether
    this call took the lock (False: this process held it already, or no lock exists here).
    """
    path = Path(output_dir).resolve()
    if path in _HELD_LOCKS:
        return False
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return False
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / LOCK_FILE, "a+")
    for attempt in range(20):  # another process's check_unlocked probe holds it a moment
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt < 19:
                time.sleep(0.05)
                continue
            handle.seek(0)
            owner = handle.read().strip()
            handle.close()
            raise ValueError(_locked_message(output_dir, owner)) from None
        except OSError as error:
            handle.close()
            logger.warning("could not lock %s (%s); make sure no other process trains there",
                           output_dir, error)
            return False
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _HELD_LOCKS[path] = handle
    return True


def unlock_run(output_dir: Path) -> None:
    """Release ``lock_run``'s lock (nothing if this process does not hold it)."""
    handle = _HELD_LOCKS.pop(Path(output_dir).resolve(), None)
    if handle is not None:
        handle.close()  # closing the file releases its flock


def check_unlocked(output_dir: Path) -> None:
    """Refuse, as ``lock_run`` would, when another process holds ``output_dir``'s lock (a
    cheap probe for checks that run before any model work). It takes a shared lock for a
    moment: probes never refuse each other (the ranks of one job probe at once), only an
    exclusive holder refuses them. Ranks other than 0 of a launcher's job do not probe:
    their rank 0 locks for them."""
    path = Path(output_dir).resolve()
    if path in _HELD_LOCKS or not (path / LOCK_FILE).is_file() \
            or os.environ.get("RANK", "0") != "0":
        return
    try:
        import fcntl
    except ImportError:
        return
    try:
        with open(path / LOCK_FILE) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(_locked_message(output_dir, handle.read().strip())) from None
    except OSError:  # unreadable or no locks here: lock_run decides
        return


def _locked_message(output_dir: Path, owner: str) -> str:
    return (f"another lowmem-es process ({owner or 'owner unknown'}) is training in "
            f"{str(output_dir)!r}; two runs in one output_dir would interleave their "
            "journals. Wait for it to finish, or stop it (Ctrl-C or SIGTERM: it "
            "checkpoints) and then --resume, or pass another --output-dir")


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete the temporaries a kill in the middle of a write left: checkpoint
    directories, and the files and directories of atomic writes in output_dir itself
    (run.toml, plan.json, reward.png, adapter/). Call it holding ``lock_run``'s lock, when
    no other process can be writing them."""
    for root in (Path(output_dir) / CHECKPOINTS, Path(output_dir)):
        if not root.is_dir():
            continue
        for child in root.iterdir():
            if not (child.name.startswith(".") and ".tmp-" in child.name):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            elif child.is_file():
                child.unlink(missing_ok=True)


def rotate_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (step 0, the replay origin, stays)."""
    if keep <= 0:
        return
    removable = [(s, p) for s, p in list_checkpoints(output_dir) if s != 0]
    for _, path in removable[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# --- adapter tensors without a model (replay) ---

def adapter_params(path: Path) -> dict[str, torch.Tensor]:
    """fp32 masters of a PEFT adapter dir keyed like ESLoraModel.parameters()."""
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    params = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise CheckpointError(f"adapter {str(path)!r}: unexpected tensor {key!r}")
        params[name[: -len(".weight")]] = value.to(torch.float32).contiguous()
    return params


def param_tensor_ids(params: Iterable[str]) -> dict[str, int]:
    """Noise-contract tensor id of each ``<module>.lora_A|B`` name (as lowmem_es.lora does)."""
    ids = {}
    for name in params:
        module, _, matrix = name.rpartition(".lora_")
        ids[name] = tensor_id(module, matrix)
    return ids


def write_adapter_tensors(params: dict[str, torch.Tensor], config_source: Path,
                          destination: Path) -> Path:
    """Write replayed masters as a PEFT adapter dir, copying adapter_config.json."""
    check_adapter_destination(Path(destination))
    with atomic_directory(Path(destination)) as tmp:
        tensors = {f"{PEFT_PREFIX}{name}.weight": t.contiguous() for name, t in params.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt", "producer": "lowmem-es replay"})
        shutil.copyfile(Path(config_source) / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
    return Path(destination)


# --- journal ---

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


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomically replace a JSONL file with ``records``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# What apply_journal_record reads from a journal record (besides "skipped").
JOURNAL_UPDATE_KEYS = ("members", "fitness", "fitness_shaping", "run_seed", "iteration",
                       "learning_rate", "optimizer", "weight_decay")


def apply_journal_record(params: dict[str, torch.Tensor], ids: dict[str, int],
                         record: dict[str, Any], adam_state: es.AdamState | None,
                         noise_backend: str | None = None) -> None:
    """Redo one journaled update exactly as the trainer did it."""
    if record.get("skipped"):
        return
    missing = [key for key in JOURNAL_UPDATE_KEYS if key not in record]
    if missing:
        raise CheckpointError(f"journal record of iteration {record.get('iteration')!r} lacks "
                              f"{', '.join(missing)}: the journal was edited or damaged, and "
                              "the update cannot be redone; restore it from a backup or "
                              "start over with --overwrite")
    schedule = [tuple(m) for m in record["members"]]
    shaped = es.shape_fitness(record["fitness"], record["fitness_shaping"])
    es.es_update(params, ids, run_seed=record["run_seed"], iteration=record["iteration"],
                 shaped_fitness=shaped, schedule=schedule,
                 learning_rate=record["learning_rate"], optimizer=record["optimizer"],
                 adam_state=adam_state, weight_decay=record["weight_decay"],
                 noise_backend=noise_backend)


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
    adam_state = load_adam(start_path)
    by_iteration = {r["iteration"]: r for r in records}
    for iteration in range(start_step, step):
        if iteration not in by_iteration:
            raise CheckpointError(f"journal has no line for iteration {iteration}; cannot "
                                  "replay past it")
        record = by_iteration[iteration]
        if record.get("optimizer") == "adam" and adam_state is None:
            adam_state = es.AdamState()
        apply_journal_record(params, ids, record, adam_state, noise_backend)
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
