"""The journal (lowmem_es/journal.py): reading it back, and the one update path."""

from __future__ import annotations

import pytest
import torch

from lowmem_es import es, journal
from lowmem_es.errors import CheckpointError
from lowmem_es.noise import tensor_id

PARAMS = {"layers.0.q_proj.lora_A": (2, 6), "layers.0.q_proj.lora_B": (5, 2)}


def _params() -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    generator = torch.Generator().manual_seed(0)
    params = {name: torch.randn(shape, generator=generator) for name, shape in PARAMS.items()}
    ids = {name: tensor_id(name.rpartition(".lora_")[0], name[-1]) for name in params}
    return params, ids


def _record(**changes) -> dict:
    record = {"iteration": 3, "run_seed": 7, "learning_rate": 0.1, "fitness_shaping": "zscore",
              "optimizer": "sgd", "weight_decay": 0.0,
              "members": [[0, 1], [0, -1], [1, 1], [1, -1]], "fitness": [0.5, 0.1, 0.0, 0.3]}
    record.update(changes)
    return record


def test_apply_record_is_the_es_update_of_its_fields():
    """What the training step and replay both call equals es_update on the record's fields."""
    params, ids = _params()
    expected = {name: tensor.clone() for name, tensor in params.items()}
    record = _record()
    shaped, stats = journal.apply_record(params, ids, record, None)
    reference = es.es_update(expected, ids, run_seed=7, iteration=3,
                             shaped_fitness=es.shape_fitness(record["fitness"], "zscore"),
                             schedule=es.member_schedule(4, True), learning_rate=0.1)
    assert stats == reference and stats["update_norm"] > 0
    assert shaped == [float(f) for f in es.shape_fitness(record["fitness"], "zscore")]
    assert all(torch.equal(params[name], expected[name]) for name in params)


def test_apply_record_skips_a_skipped_iteration_and_names_what_is_missing():
    params, ids = _params()
    before = {name: tensor.clone() for name, tensor in params.items()}
    assert journal.apply_record(params, ids, _record(skipped=True), None) is None
    assert all(torch.equal(params[name], before[name]) for name in params)
    damaged = _record()
    del damaged["fitness"]
    with pytest.raises(CheckpointError, match=r"iteration 3 lacks fitness.*--overwrite"):
        journal.apply_record(params, ids, damaged, None)


def test_is_record():
    assert journal.is_record({"iteration": 0})
    assert not journal.is_record({"iteration": True}) and not journal.is_record([1])
    assert not journal.is_record({"iteration": "1"})


def test_damaged_journal_middle_is_an_error(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"iteration": 0}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(CheckpointError, match=r"journal\.jsonl:2"):
        journal.read_journal(path)


@pytest.mark.parametrize("line", ['5', '[1, 2]', '{"fitness": [1.0]}', '{"iteration": "1"}'])
def test_journal_line_that_is_no_record_is_an_error(tmp_path, line):
    path = tmp_path / "journal.jsonl"
    path.write_text(f'{{"iteration": 0}}\n{line}\n{{"iteration": 2}}\n')
    with pytest.raises(CheckpointError, match=r"journal\.jsonl:2 is not a journal "
                       r"record.*integer iteration.*--overwrite"):
        journal.read_journal(path)
    path.write_text(f'{{"iteration": 0}}\n{line}\n')  # last and complete: no torn line
    with pytest.raises(CheckpointError, match=r"journal\.jsonl:2"):
        journal.read_journal(path)


def test_read_journal_repair_adds_only_the_missing_newline(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"iteration": 0}\n{"iteration": 1}')
    assert journal.read_journal(path) == [{"iteration": 0}, {"iteration": 1}]
    assert path.read_bytes() == b'{"iteration": 0}\n{"iteration": 1}'  # read-only: untouched
    assert journal.read_journal(path, repair=True) == [{"iteration": 0}, {"iteration": 1}]
    assert path.read_bytes() == b'{"iteration": 0}\n{"iteration": 1}\n'
    assert journal.read_journal(path, repair=True) == [{"iteration": 0}, {"iteration": 1}]
    assert path.read_bytes() == b'{"iteration": 0}\n{"iteration": 1}\n'  # idempotent
