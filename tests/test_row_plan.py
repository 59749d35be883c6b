"""Row plans (kernels/row_plan.py): rows grouped into blocks of one member, partners paired.

Pure host-side bookkeeping, so these run without a kernel; the kernels that read the
plans are tested against their twin in tests/test_noisy_lora.py.
"""

from __future__ import annotations

import pytest

from lowmem_es.kernels.row_plan import plan_rows


def test_paired_block_table_puts_partners_side_by_side() -> None:
    """Blocks of a member and of its partner share a column; leftovers stand alone with
    an empty partner side; the plan is unpaired when no partner has rows."""
    plan = plan_rows([0] * 5 + [1] * 2 + [3], 4, pairs=[7, 7, 9, 9])
    table, count = plan.blocks(2)
    assert plan.paired and count == 4
    assert table.tolist() == [[0, 0, 0, 3],   # member
                              [0, 2, 4, 7],   # start
                              [2, 4, 5, 8],   # stop
                              [1, 0, 0, 3],   # partner (itself when it has none)
                              [5, 4, 5, 8],   # partner start
                              [7, 4, 5, 8]]   # partner stop (empty: start == stop)
    assert not plan_rows([0, 0, 2], 4, pairs=[0, 0, 1, 1]).paired
    assert plan_rows([0, 0, 2], 4, pairs=[0, 0, 1, 1]).blocks(2)[0].shape == (3, 2)


@pytest.mark.parametrize(("pairs", "error", "match"), [
    ([0, 0, 0, 1], ValueError, "more than two members"),
    ([0, 0, 1], ValueError, "one pair id per member"),
    ([0, 0, 1.0, 1], TypeError, "integer pair ids"),
])
def test_bad_pairs_raise_clear_errors(pairs, error, match) -> None:
    with pytest.raises(error, match=match):
        plan_rows([0, 1], 4, pairs=pairs)
