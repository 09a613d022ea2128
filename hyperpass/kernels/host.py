"""Host-side helpers of the launchers: integer arithmetic and layouts, without Triton's per-call
overhead (``triton.cdiv`` and ``triton.next_power_of_2`` cost ~3 us per call as constexpr
functions, and a launch path calls them often)."""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length() if x > 1 else 1


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous (what the kernels need), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()
