"""Atomic writes (lowmem_es/atomic.py): the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lowmem_es import atomic


def test_atomic_write_text_replaces_whole_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "run.toml"
    atomic.atomic_write_text(target, "seed = 1\n")
    atomic.atomic_write_text(target, "seed = 2\n")
    assert target.read_text() == "seed = 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.toml"]

    def crash(src, dst):  # killed before the rename: the old file stays whole
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        atomic.atomic_write_text(target, "seed = 3\n")
    assert target.read_text() == "seed = 2\n"


def test_rewrite_jsonl_writes_one_object_per_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0}\nnot json\n')
    records = [{"iteration": 0, "reward_mean": 0.5}, {"iteration": 1, "note": "é"}]
    atomic.rewrite_jsonl(path, records)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    atomic.rewrite_jsonl(path, [])
    assert path.read_text() == ""


def test_remove_stale_temporaries_removes_only_that_targets_directories(tmp_path):
    target = tmp_path / "base-model"
    (tmp_path / ".base-model.tmp-dead").mkdir()
    (tmp_path / ".base-model.tmp-file").write_text("a file, not a build")
    (tmp_path / ".other.tmp-dead").mkdir()
    removed = atomic.remove_stale_temporaries(target)
    assert [p.name for p in removed] == [".base-model.tmp-dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".base-model.tmp-file",
                                                           ".other.tmp-dead"]


def test_atomic_directory_permissions_subfolders_and_crash_between_renames(tmp_path):
    """The directory gets the umask's permissions (not mkdtemp's 0700), subfolders are
    fine, and a copy set aside by a crash between the two renames is put back."""
    import os

    from safetensors.torch import save_file

    from lowmem_es.atomic import atomic_directory, restore_set_aside

    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "file.txt").write_text("new")
            (tmp / "top.txt").write_text("new")
            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # writes 0600
    finally:
        os.umask(umask)
    out = tmp_path / "out"
    assert (out / "sub" / "file.txt").read_text() == "new"
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "w.safetensors").stat().st_mode & 0o777 == 0o644  # group can read it
    # A crash after the old copy was moved aside and before the new one moved in.
    os.replace(out, tmp_path / ".out.old-12345")
    assert not out.exists()
    assert restore_set_aside(out) and (out / "top.txt").read_text() == "new"
    assert not restore_set_aside(out)  # nothing set aside any more
    os.replace(out, tmp_path / ".out.old-12345")
    with atomic_directory(out) as tmp:  # the next write restores first, then replaces
        (tmp / "top.txt").write_text("newer")
    assert (out / "top.txt").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
