"""Exact softmax attention with its log-sum-exp, by query chunks (the reference's leaves and
the quality harness's baseline). Imports torch only."""

from __future__ import annotations

import torch
from torch import Tensor

from hyperpass.reference.softmax import attend

_QUERY_CHUNK = 1024  # queries per step: bounds the score matrix's memory


def exact_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, q_offset: int = 0, k_offset: int = 0
):
    """Exact softmax attention with its lse; q [..., nq, D] pre-scaled, k/v [..., nk, D].

    ``causal`` masks keys whose global position (``k_offset + j``) is after the query's
    (``q_offset + i``). Queries are processed in chunks to bound memory.
    """
    outs, lses = [], []
    k_pos = k_offset + torch.arange(k.shape[-2], device=q.device)
    for start in range(0, q.shape[-2], _QUERY_CHUNK):
        q_chunk = q[..., start : start + _QUERY_CHUNK, :]
        keep = None
        if causal:
            q_pos = q_offset + start + torch.arange(q_chunk.shape[-2], device=q.device)
            keep = k_pos <= q_pos.unsqueeze(-1)
        out, lse = attend(q_chunk, k, v, keep)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, -2), torch.cat(lses, -1)
