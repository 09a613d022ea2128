"""Query-major block lists for FlexAttention's backward, from the key-major lists of a BlockMask.

FlexAttention's backward walks, per key block, the query tiles that read it. ``BlockMask``
computes those lists by a dense transpose and a stable ``argsort`` of every row (2.5 ms at 131072
tokens, 12 heads, on an H200: as long as the selection and the forward together). Here the
same lists come from two launches and no sort: the key-major lists are scattered into a bitmap
``[rows, key blocks, tiles]`` (1 = partial, 2 = full; a block is never both), and one program
per key block compacts its row of the bitmap by a prefix sum, in ascending tile order as
FlexAttention's own lists are. Entries past each count are unset, as in the key-major lists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperpass.kernels.host import next_pow2

_CHUNK = 256  # tiles per step of the compaction
_IDS = 64  # list entries per step of the scatter


def query_major_lists(part_num, part_idx, full_num, full_idx, n_kv_blocks: int):
    """(partial count, partial ids, full count, full ids) per key block, [..., n_kv_blocks] and
    [..., n_kv_blocks, n_tiles] int32, from key-major lists [..., n_tiles] /
    [..., n_tiles, >= n_kv_blocks] (ids past a count are ignored)."""
    part_num, part_idx, full_num, full_idx = (
        t.contiguous() for t in (part_num, part_idx, full_num, full_idx)
    )
    lead = part_num.shape[:-1]
    n_tiles = part_num.shape[-1]
    rows = part_num.numel() // max(n_tiles, 1)
    dev = part_num.device
    bitmap = torch.zeros(rows, n_kv_blocks, n_tiles, dtype=torch.int8, device=dev)
    _scatter_kernel[(n_tiles, rows)](
        part_num, part_idx, full_num, full_idx, bitmap,
        part_idx.stride(-2), part_idx.stride(-1), full_idx.stride(-2), full_idx.stride(-1),
        n_tiles, part_idx.shape[-1], full_idx.shape[-1], n_kv_blocks, IDS=_IDS,
    )  # fmt: skip
    q_part_num = torch.empty(rows, n_kv_blocks, dtype=torch.int32, device=dev)
    q_full_num = torch.empty_like(q_part_num)
    q_part_idx = torch.empty(rows, n_kv_blocks, n_tiles, dtype=torch.int32, device=dev)
    q_full_idx = torch.empty_like(q_part_idx)
    _compact_kernel[(n_kv_blocks, rows)](
        bitmap, q_part_num, q_part_idx, q_full_num, q_full_idx, n_tiles, n_kv_blocks,
        CHUNK=min(_CHUNK, next_pow2(n_tiles)),
    )  # fmt: skip
    return (
        q_part_num.view(*lead, n_kv_blocks),
        q_part_idx.view(*lead, n_kv_blocks, n_tiles),
        q_full_num.view(*lead, n_kv_blocks),
        q_full_idx.view(*lead, n_kv_blocks, n_tiles),
    )


@triton.jit
def _scatter_kernel(PART_NUM, PART_IDX, FULL_NUM, FULL_IDX, BITMAP,
                    stride_pt, stride_pj, stride_ft, stride_fj,
                    n_tiles, width_part, width_full, n_kv_blocks, IDS: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    out = BITMAP + r * n_kv_blocks * n_tiles + t
    _scatter_list(PART_NUM + r * n_tiles + t, PART_IDX + (r * n_tiles + t) * stride_pt,
                  stride_pj, width_part, out, n_tiles, n_kv_blocks, 1, IDS)  # fmt: skip
    _scatter_list(FULL_NUM + r * n_tiles + t, FULL_IDX + (r * n_tiles + t) * stride_ft,
                  stride_fj, width_full, out, n_tiles, n_kv_blocks, 2, IDS)  # fmt: skip


@triton.jit
def _scatter_list(NUM, IDX, stride_j, width, out, n_tiles, n_kv_blocks, kind: tl.constexpr,
                  IDS: tl.constexpr):  # fmt: skip
    """Mark ``kind`` in this tile's column of the bitmap for each id of one list."""
    i = tl.arange(0, IDS)
    count = tl.minimum(tl.load(NUM), width)
    for s in range(0, count, IDS):
        ok = s + i < count
        j = tl.load(IDX + (s + i) * stride_j, mask=ok, other=0)
        ok = ok & (j >= 0) & (j < n_kv_blocks)
        tl.store(out + j.to(tl.int64) * n_tiles, tl.full([IDS], kind, tl.int8), mask=ok)


@triton.jit
def _compact_kernel(BITMAP, Q_PART_NUM, Q_PART_IDX, Q_FULL_NUM, Q_FULL_IDX, n_tiles, n_kv_blocks,
                    CHUNK: tl.constexpr):  # fmt: skip
    j = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    row = (r * n_kv_blocks + j) * n_tiles
    n_part = tl.zeros([], tl.int32)
    n_full = tl.zeros([], tl.int32)
    for t0 in range(0, n_tiles, CHUNK):
        t = t0 + tl.arange(0, CHUNK)
        kind = tl.load(BITMAP + row + t, mask=t < n_tiles, other=0)
        part = kind == 1
        full = kind == 2
        at_p = n_part + tl.cumsum(part.to(tl.int32), axis=0) - 1
        at_f = n_full + tl.cumsum(full.to(tl.int32), axis=0) - 1
        tl.store(Q_PART_IDX + row + at_p, t, mask=part)
        tl.store(Q_FULL_IDX + row + at_f, t, mask=full)
        n_part += tl.sum(part.to(tl.int32), axis=0)
        n_full += tl.sum(full.to(tl.int32), axis=0)
    tl.store(Q_PART_NUM + r * n_kv_blocks + j, n_part)
    tl.store(Q_FULL_NUM + r * n_kv_blocks + j, n_full)
