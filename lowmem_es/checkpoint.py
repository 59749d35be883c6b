"""Checkpoints and the journal: what makes a run survive a power cut.

Layout (../shared/DESIGN.md, "Output directory"):

    output_dir/checkpoints/step_000012/
        adapter_model.safetensors  adapter_config.json   PEFT adapter (fp32 masters)
        optimizer.safetensors                            Adam moments, when Adam is on
        trainer_state.json                               step, config hash, sha256 of files

``step`` is the number of iterations already applied (the next iteration to run).
``step_000000`` is the initial adapter; it is never rotated away, so the journal can
always be replayed from it. A checkpoint is written into a temporary sibling directory,
fsynced and renamed (lowmem_es.atomic.atomic_directory), so it is complete or absent.

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
import shutil
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from lowmem_es import es
from lowmem_es.adapter_io import ADAPTER_WEIGHTS
from lowmem_es.atomic import atomic_directory
from lowmem_es.errors import CheckpointError

logger = logging.getLogger("lowmem_es")

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1



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


def rotate_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (step 0, the replay origin, stays)."""
    if keep <= 0:
        return
    removable = [(s, p) for s, p in list_checkpoints(output_dir) if s != 0]
    for _, path in removable[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# --- adapter tensors without a model (replay) ---

# --- journal ---
