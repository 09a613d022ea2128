"""sortLSH on the GPU: one kernel from rows to Gray-code ranks, then one stable sort per level.

The kernel reads each row once and writes one int32 rank: neither the projections nor a scaled
copy of Q exist in memory. Ranks equal :func:`hyperpass.lsh.lsh_ranks` of the same rows except
where a projection is within rounding of zero (the two sum in different orders).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperpass import lsh


@triton.jit
def _rank_kernel(
    X,
    PLANES,
    RANK,
    stride_xb,
    stride_xh,
    stride_xn,
    heads,
    n_rows,
    scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R: tl.constexpr,
    N_SHIFTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x = tl.load(base + rows[:, None].to(tl.int64) * stride_xn + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32) * scale
    code = tl.zeros([BLOCK], dtype=tl.int32)
    for r in tl.static_range(R):
        plane = tl.load(PLANES + cols * R + r, mask=cols < D, other=0.0)
        proj = tl.sum(x * plane[None, :], axis=1)
        code += (proj > 0).to(tl.int32) << r
    # inverse Gray transform (prefix XOR from the top bit), as lsh.gray_rank
    rank = code
    for s in tl.static_range(N_SHIFTS):
        rank = rank ^ (rank >> (1 << s))
    tl.store(RANK + pid_bh.to(tl.int64) * n_rows + rows, rank, mask=rows < n_rows)


def lsh_rank(x: torch.Tensor, planes: torch.Tensor, scale: float) -> torch.Tensor:
    """Gray-code rank [B, H, N] int32 of the rows of ``x * scale``; x [B, H, N, D]."""
    batch, heads, n, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_projs = planes.shape[1]
    ranks = torch.empty(batch, heads, n, dtype=torch.int32, device=x.device)
    n_shifts = max(0, (num_projs - 1).bit_length())
    block = 64
    grid = (triton.cdiv(n, block), batch * heads)
    _rank_kernel[grid](
        x,
        planes.contiguous(),
        ranks,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        heads,
        n,
        scale,
        D=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        R=num_projs,
        N_SHIFTS=n_shifts,
        BLOCK=block,
    )
    return ranks


def sort_levels(
    ranks: torch.Tensor,
    segments: torch.Tensor | None,
    num_projs: int,
    inverse: bool = False,
    n_segments: int = 1,
):
    """Stable sort of every level at once.

    Args:
        ranks: [B, H, N] int32 Gray-code ranks.
        segments: [L, N] int32 monotone segment ids, or None for a single level of one segment.
        n_segments: one more than the largest segment id (a host int: no device sync).

    Returns:
        (order [L, B, H, N] int32 original positions in sorted order,
         inverse [L, B, H, N] int32 sorted position of each original position, or None)
    """
    if segments is None:
        keys = ranks.unsqueeze(0)
    else:
        keys = (segments[:, None, None, :] << num_projs) + ranks.unsqueeze(0)
    if n_segments << num_projs <= 2**15:  # 16-bit keys halve the radix sort's passes
        keys = keys.to(torch.int16)
    order = torch.sort(keys, dim=-1, stable=True).indices.to(torch.int32)
    if not inverse:
        return order, None
    n = ranks.shape[-1]
    positions = torch.arange(n, device=ranks.device, dtype=torch.int32).expand_as(order)
    return order, torch.empty_like(order).scatter_(-1, order.long(), positions)


_PLANES: dict = {}


def planes_for(head_dim: int, num_projs: int, seed: int, device) -> torch.Tensor:
    """The reference's hyperplanes [D, r] fp32 on ``device`` (cached)."""
    key = (head_dim, num_projs, seed, str(device))
    if key not in _PLANES:
        _PLANES[key] = lsh.hyperplanes(head_dim, num_projs, seed, device).contiguous()
    return _PLANES[key]
