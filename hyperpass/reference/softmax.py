"""Softmax attention over a part of the keys, and the log-sum-exp merge of disjoint parts.

The building blocks of the reference's methods (``hyper``, ``select``): each
part of a query's keys gives a normalized partial output and its log-sum-exp; merging them is exact
softmax over the union. Imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, log_weight: float = 0.0):
    """Softmax attention of q [..., M, D] over k [..., S, D] restricted to ``keep`` [..., M, S].

    Returns (out [..., M, Dv] normalized, lse [..., M]); rows with no key get out 0, lse -inf,
    with finite gradients. ``log_weight`` is added to the lse (the n/m weight of samples).
    """
    scores = q @ k.transpose(-1, -2)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    total = probs.sum(-1)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    out = (probs @ v) / safe_total.unsqueeze(-1)
    lse = torch.where(
        nonempty, row_max.squeeze(-1) + torch.log(safe_total) + log_weight, float("-inf")
    )
    return out, lse


def merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Log-sum-exp merge of partial (out, lse) pairs over disjoint key sets."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = sum(torch.exp(part_lse - safe).unsqueeze(-1) * o for o, part_lse in parts)
    return out, lse


def pad_rows(x: Tensor, rows: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[-2]))


def pad_index(idx: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(idx, (0, length - idx.shape[-1]))


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [..., N, D] indexed along N by idx [..., M] (same leading dims)."""
    return x.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
