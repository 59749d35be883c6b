"""Row plans: which population member each flat row of a batch belongs to, in blocks.

The fused noisy LoRA kernels (``kernels/noisy_lora.py``) regenerate a member's noise once
per block of its rows, so rows are grouped into blocks of one member on the host, once
per batch layout (``RowPlan``, ``plan_rows``), and handed to the launcher. With the
antithetic pairs known (``pairs=``), a member's block and its partner's sit side by side
in one program, which then generates their shared noise once (docs/kernels.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowmem_es.kernels._runtime import INT32_LIMIT

__all__ = ["RowPlan", "plan_rows"]


class RowPlan:
    """Which member each flat row belongs to, grouped into blocks of one member each.

    Built once per batch layout on the host (no device sync): ``member_index`` (rows,)
    gives each row's member, and each row holds ``tokens_per_row`` flat rows of ``x``
    (a (rows, T, d_in) input has T tokens per row). Rows are sorted by member (stable),
    so any mapping works; contiguous segments of one member keep the identity order and
    read ``x`` sequentially. Block tensors are built per block height and cached.
    """

    def __init__(self, member_index: torch.Tensor | Sequence[int], num_members: int,
                 tokens_per_row: int = 1, device: torch.device | str = "cpu",
                 pairs: Sequence[int] | None = None) -> None:
        index = _member_index_cpu(member_index, num_members)
        self.partner = _partners(pairs, num_members)
        if isinstance(tokens_per_row, bool) or not isinstance(tokens_per_row, int) \
                or tokens_per_row < 1:
            raise ValueError(f"`tokens_per_row` must be a positive integer, got "
                             f"{tokens_per_row!r}")
        self.device = torch.device(device)
        self.rows = int(index.numel())
        self.tokens_per_row = tokens_per_row
        self.num_rows = self.rows * tokens_per_row  # flat rows of x
        self.num_members = num_members
        if self.num_rows >= INT32_LIMIT:
            raise ValueError(f"{self.num_rows} flat rows is more than the kernel's int32 row "
                             "indices hold (2**31 - 1); split the batch")
        order = torch.argsort(index, stable=True)
        sorted_members = index[order]
        self.identity = bool(torch.equal(order, torch.arange(self.rows)))
        members, counts = torch.unique_consecutive(sorted_members, return_counts=True)
        counts = counts * tokens_per_row
        starts = torch.cumsum(counts, 0) - counts
        # Runs of one member in sorted flat-row order, on the host (the twin walks them).
        self.run_members: list[int] = members.tolist()
        self.run_starts: list[int] = starts.tolist()
        self.run_lengths: list[int] = counts.tolist()
        self.max_run = max(self.run_lengths, default=0)
        flat = (order[:, None] * tokens_per_row
                + torch.arange(tokens_per_row)[None, :]).reshape(-1)
        self.row_order_cpu = flat  # sorted position -> flat row of x, int64
        self.row_order = flat.to(torch.int32).to(self.device)
        present = set(self.run_members)
        # Paired blocks when some member and its partner both have rows here.
        self.paired = any(self.partner[m] in present for m in present)
        self._blocks: dict[int, tuple[torch.Tensor, int]] = {}

    def blocks(self, block_m: int) -> tuple[torch.Tensor, int]:
        """Block table (an int32 device tensor) and its block count.

        Each run of one member is cut into blocks of at most ``block_m`` flat rows
        (positions into ``row_order``). Unpaired plans: (3, blocks) rows (member, start,
        stop). Paired plans (``paired``): (6, blocks), a block of a member and one of its
        partner side by side (member, start, stop, partner, start, stop), so a program
        generates the pair's shared noise once for both; a block with no partner block
        (a longer run, a member without partner) repeats its member with no rows.
        """
        if block_m not in self._blocks:
            cuts = {m: [(first + offset, first + min(offset + block_m, length))
                        for offset in range(0, length, block_m)]
                    for m, first, length in zip(self.run_members, self.run_starts,
                                                self.run_lengths, strict=True)}
            columns: list[tuple[int, ...]] = []
            done: set[int] = set()
            for m in self.run_members:
                if m in done:
                    continue
                other = self.partner[m] if self.paired else -1
                mine, theirs = cuts[m], cuts.get(other, [])
                done.update((m, other))
                for i in range(max(len(mine), len(theirs))):
                    if i < len(mine) and i < len(theirs):
                        columns.append((m, *mine[i], other, *theirs[i]))
                    else:
                        owner, (start, stop) = (m, mine[i]) if i < len(mine) else (other,
                                                                                   theirs[i])
                        columns.append((owner, start, stop, owner, stop, stop))
            height = 6 if self.paired else 3
            table = torch.tensor([column[:height] for column in columns],
                                 dtype=torch.int32).reshape(-1, height).t().contiguous()
            self._blocks[block_m] = (table.to(self.device), len(columns))
        return self._blocks[block_m]


def plan_rows(member_index: torch.Tensor | Sequence[int], num_members: int,
              tokens_per_row: int = 1, device: torch.device | str = "cpu",
              pairs: Sequence[int] | None = None) -> RowPlan:
    """A ``RowPlan`` for rows with these member ids (see ``RowPlan``).

    ``pairs`` (optional, one entry per member): members with the same pair id share their
    noise keys (antithetic pairs, ``es.member_schedule``'s pair of each member), and the
    kernel then generates a pair's noise once for both. It is a scheduling hint only:
    the kernel compares the two keys and regenerates when they differ.
    """
    return RowPlan(member_index, num_members, tokens_per_row, device, pairs)


def _partners(pairs: Sequence[int] | None, num_members: int) -> list[int]:
    """Each member's partner (the other member of its pair) or -1, validated."""
    partner = [-1] * num_members
    if pairs is None:
        return partner
    if isinstance(pairs, torch.Tensor):
        pairs = pairs.tolist()
    pairs = list(pairs)
    if len(pairs) != num_members:
        raise ValueError(f"`pairs` has {len(pairs)} entries; expected one pair id per "
                         f"member ({num_members})")
    first: dict[int, int] = {}
    for member, pair in enumerate(pairs):
        if isinstance(pair, bool) or not isinstance(pair, int):
            raise TypeError(f"`pairs` must hold integer pair ids, got {pair!r} for member "
                            f"{member}")
        if pair not in first:
            first[pair] = member
        elif partner[first[pair]] != -1:
            raise ValueError(f"`pairs` gives pair id {pair} to more than two members "
                             f"({first[pair]}, {partner[first[pair]]}, {member}); an "
                             "antithetic pair has two")
        else:
            partner[first[pair]], partner[member] = member, first[pair]
    return partner


def _member_index_cpu(member_index: torch.Tensor | Sequence[int], num_members: int
                      ) -> torch.Tensor:
    """Validated int64 CPU copy of per-row member ids (one sync if it lives on a GPU)."""
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
        raise ValueError(f"`num_members` must be a positive integer, got {num_members!r}")
    if not isinstance(member_index, torch.Tensor):
        member_index = torch.tensor(list(member_index), dtype=torch.int64)
    if member_index.is_floating_point() or member_index.is_complex() \
            or member_index.dtype == torch.bool:
        raise TypeError(f"`member_index` must be an integer tensor of shape (rows,), got "
                        f"dtype {member_index.dtype}")
    if member_index.dim() != 1:
        raise ValueError(f"`member_index` must have shape (rows,), got "
                         f"{tuple(member_index.shape)}")
    index = member_index.detach().to("cpu", torch.int64)
    if index.numel():
        bad = ((index < 0) | (index >= num_members)).nonzero()
        if bad.numel():
            row = int(bad[0])
            raise ValueError(f"`member_index` holds member {int(index[row])} at row {row}, "
                             f"outside [0, {num_members}): `keys_A`, `keys_B` and `steps` "
                             f"have {num_members} entries")
    return index
