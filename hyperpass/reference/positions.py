"""Position predicates shared by the reference's methods, named as their Triton twins in
``hyperpass.kernels`` (``in_window``, ``local_span``), which tests check against these.
Imports torch only."""

from __future__ import annotations

import torch
from torch import Tensor


def in_window(d: Tensor, window: int, dilation: int, causal: bool) -> Tensor:
    """Is a key at distance ``d = q_pos - k_pos`` in the (dilated) window? ``|d| < window``
    (``0 <= d < window`` when causal) and ``d % dilation == 0``; ``window == 0``: none."""
    if window == 0:
        return torch.zeros_like(d, dtype=torch.bool)
    near = (d >= 0) & (d < window) if causal else d.abs() < window
    return near & (d % dilation == 0)


def local_span(start: Tensor, window: int, n_keys: int, qb: int, kb: int) -> tuple[Tensor, Tensor]:
    """``[lo, hi)`` of the query block starting at ``start``: at least ``window`` keys around
    it, aligned to key blocks of ``kb`` (``hi`` is the non-causal end; causal stops at the
    query)."""
    lo = ((start + qb - window).clamp(min=0) // kb) * kb
    hi = (torch.div(start + window + kb - 1, kb, rounding_mode="floor") * kb).clamp(max=n_keys)
    return lo, hi
