"""FlexAttention's query-major lists (``query_major``, interpreted) against the ones
``BlockMask.from_kv_blocks`` computes by its dense transpose and sort, on random key-major lists:
odd tile counts, more tiles than one compaction step, lists longer than one scatter step,
poisoned entries past the counts."""

from __future__ import annotations

import pytest
import torch

from hyperpass.kernels.query_major import query_major_lists


def _random_lists(batch, heads, tiles, blocks, gen):
    """Key-major partial and full lists: disjoint, ascending, entries past the counts poisoned."""
    shape = (batch, heads, tiles)
    part_num = torch.zeros(shape, dtype=torch.int32)
    full_num = torch.zeros(shape, dtype=torch.int32)
    part_idx = torch.full((*shape, blocks), 2**31 - 1, dtype=torch.int32)
    full_idx = torch.full((*shape, blocks), -7, dtype=torch.int32)
    for b in range(batch):
        for h in range(heads):
            for t in range(tiles):
                kind = torch.randint(0, 3, (blocks,), generator=gen)  # 0 none, 1 part, 2 full
                kind[torch.rand(blocks, generator=gen) < 0.5] = 0
                for value, num, idx in ((1, part_num, part_idx), (2, full_num, full_idx)):
                    ids = (kind == value).nonzero().flatten().to(torch.int32)
                    num[b, h, t] = ids.numel()
                    idx[b, h, t, : ids.numel()] = ids
    return part_num, part_idx, full_num, full_idx


@pytest.mark.parametrize(
    "batch,heads,tiles,blocks",
    [(1, 1, 5, 3), (2, 3, 37, 29), (1, 2, 300, 9), (1, 1, 6, 150)],
    ids=["tiny", "batch2-heads3-odd", "tiles300", "blocks150"],
)
def test_query_major_lists_equal_flex_attentions_transpose(batch, heads, tiles, blocks):
    from torch.nn.attention.flex_attention import BlockMask

    gen = torch.Generator().manual_seed(tiles * 1000 + blocks)
    lists = _random_lists(batch, heads, tiles, blocks, gen)
    got = query_major_lists(*lists, blocks)
    clean = [t.clamp(0, blocks - 1) if t.dim() == 4 else t for t in lists]  # flex reads them all
    want = BlockMask.from_kv_blocks(*clean, BLOCK_SIZE=16, compute_q_blocks=True)
    for (num, idx), (want_num, want_idx) in (
        (got[:2], (want.q_num_blocks, want.q_indices)),
        (got[2:], (want.full_q_num_blocks, want.full_q_indices)),
    ):
        torch.testing.assert_close(num, want_num, rtol=0, atol=0)
        for row in range(num.numel()):
            n = int(num.flatten()[row])
            torch.testing.assert_close(
                idx.flatten(0, -3)[row // blocks, row % blocks, :n],
                want_idx.flatten(0, -3)[row // blocks, row % blocks, :n],
                rtol=0, atol=0,
            )  # fmt: skip
