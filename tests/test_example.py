"""Tests of the tiny built-in example (lowmem_es/example.py)."""

import pytest


def test_tiny_example_base_model_is_built_once_and_write_errors_are_clear(tmp_path,
                                                                          monkeypatch):
    """The tiny example's base model is written atomically on the first start and reused
    afterwards; a failed write (a full disk) names the directory and the fix."""
    from safetensors import SafetensorError

    from lowmem_es import example

    base = tmp_path / "run" / "base-model"
    builds = []
    real = example.build_tiny_model
    monkeypatch.setattr(example, "build_tiny_model",
                        lambda path: builds.append(path) or real(path))
    example.ensure_tiny_model(base)
    example.ensure_tiny_model(base)
    assert len(builds) == 1 and (base / "model.safetensors").is_file()
    assert sorted(p.name for p in base.parent.iterdir()) == ["base-model"]  # no temporaries
    # A directory without the marker (torn by the earlier in-place writes, here: no
    # tokenizer) is rebuilt whole, and a killed build's temporary is removed.
    (base / example.TINY_MODEL_MARKER).unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink(missing_ok=True)
    (base.parent / ".base-model.tmp-dead").mkdir()
    example.ensure_tiny_model(base)
    assert len(builds) == 2 and (base / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in base.parent.iterdir()) == ["base-model"]

    def full_disk(path):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(example, "build_tiny_model", full_disk)
    other = tmp_path / "other" / "base-model"
    with pytest.raises(OSError, match=r"other.*No space left.*free some space"):
        example.ensure_tiny_model(other)
    assert not other.exists()
