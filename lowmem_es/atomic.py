"""Atomic writes: a crash leaves the old file (or directory) or the new one, never a torn one.

Every file a run writes that a later start reads goes through here: checkpoints and
adapters (``atomic_directory``), run.toml / plan.json / reports (``atomic_write_text``),
a repaired metrics or journal file (``rewrite_jsonl``). Writes go to a fsynced sibling
temporary (``.NAME.tmp-*``) that is renamed over the target; ``remove_stale_temporaries``
clears what a kill in the middle left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("lowmem_es")


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync its files and rename it to path.

    A crash leaves the old directory or the new one, never a half-written one. Files and
    folders get the modes the umask gives (not the owner-only ones of ``mkdtemp`` and
    safetensors). Replacing
    an existing directory takes two renames (old aside to ``.NAME.old-PID``, new in); a
    crash between them leaves ``path`` missing and the old copy aside, and the next
    write to ``path`` (or ``restore_set_aside``) puts it back first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_set_aside(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; a directory gets umask's
    try:
        yield tmp
        for child in sorted(tmp.rglob("*"), reverse=True):  # files, then their folders
            if child.is_file() and not child.is_symlink():
                # safetensors writes its files owner-only (0600) whatever the umask; give
                # every file the mode an ordinary write would, so a shared group can read
                # the adapter and the checkpoints.
                os.chmod(child, 0o666 & ~umask)
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
            elif child.is_dir():
                _fsync_directory(child)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_set_aside(path: Path) -> bool:
    """Put back the copy of ``path`` that ``atomic_directory`` set aside when a crash hit
    between its two renames (``path`` missing, ``.NAME.old-PID`` present); True if it did.
    The newest such copy wins; none of them is deleted otherwise."""
    path = Path(path)
    if path.exists():
        return False
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not aside:
        return False
    os.replace(aside[-1], path)
    _fsync_directory(path.parent)
    return True


def _fsync_directory(path: Path) -> None:
    """Make a directory's entries durable (names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced sibling and a rename: a crash leaves
    the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomically replace a JSONL file with ``records``, one JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the ``.NAME.tmp-*`` directories a killed conversion of ``target`` left
    (a model conversion's are ~260 MB each); call it only while holding the lock that
    guards ``target``'s writers, when none of them can be in use."""
    removed = []
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    if removed:
        logger.info("removed %d unfinished conversion(s) next to %s", len(removed), target)
    return removed
