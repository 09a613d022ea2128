"""Tile sizes and warps of the HyperAttention kernels: one table, chosen by measurement on
H100/H200 GPUs. Launchers take an explicit ``tuning=`` (tests pin small tiles);
there is no module state to overwrite."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tuning:
    """Tile sizes and warps. ``block_m``/``block_n`` also shape the plan's tile tables."""

    block_m: int = 128  # sorted queries per forward / dQ program
    block_n: int = 64  # keys per inner step; samples per dK/dV program
    bwd_block_m: int = 64  # query rows per inner step of the dK/dV kernels
    fwd_warps: int = 8
    bwd_warps: int = 8
    stages: int = 2
    # the approximated forward of a one-level call (non-causal, flat causal): query rows per
    # program (a divisor of block_m) and pipeline stages; None: block_m and stages
    one_level_fwd_rows: int | None = None
    one_level_fwd_stages: int | None = None
    # registers per thread allowed to that forward (ptxas .maxnreg): None lets ptxas choose
    one_level_fwd_maxnreg: int | None = None

    def __post_init__(self):
        rows = self.one_level_fwd_rows
        if rows is not None and (rows <= 0 or self.block_m % rows):
            raise ValueError(f"one_level_fwd_rows={rows} must divide block_m={self.block_m}")


# (largest head dim, dtypes) -> tiles; the first row that fits is taken
_TABLE = (
    # 64-row programs with 2 stages for the one-level forward; 128 rows elsewhere
    (64, (torch.float16, torch.bfloat16), Tuning(
        block_m=128, block_n=64, bwd_block_m=64, fwd_warps=4, bwd_warps=4, stages=3,
        one_level_fwd_rows=64, one_level_fwd_stages=2,
    )),
    (128, (torch.float16, torch.bfloat16), Tuning(
        block_m=64, block_n=64, bwd_block_m=64, fwd_warps=4, bwd_warps=4,
    )),
    (256, (torch.float16, torch.bfloat16, torch.float32), Tuning(
        block_m=64, block_n=32, bwd_block_m=32, fwd_warps=4, bwd_warps=4,
    )),
)  # fmt: skip


def tuning_for(head_dim: int, dtype: torch.dtype) -> Tuning:
    """The table's tiles for a head dim (the larger of Q's and V's) and dtype."""
    for max_dim, dtypes, tuning in _TABLE:
        if head_dim <= max_dim and dtype in dtypes:
            return tuning
    return _TABLE[-1][2]
