"""``method="select"``: the large entries found by bounding the scores of key blocks.

HyperAttention's exact part is "the large entries" of the attention matrix; the paper finds them
with sortLSH and allows a predefined mask. On a real model (docs/quality.md) neither finds a far
token a query needs (passkey retrieval is lost), while a score bound does: for a block of keys
with per-channel minimum ``kmin`` and maximum ``kmax``,

    q . k  <=  relu(q) . kmax + min(q, 0) . kmin     for every key k of the block

(the bound Quest, Tang et al. 2024, uses). Each query's keys split into disjoint parts, merged by
log-sum-exp like the other methods:

1. *local*: queries in blocks of ``query_block``; the block starting at ``s`` sees the keys from
   ``lo(s) = floor(max(s + query_block - window, 0) / select_block) * select_block`` up to each
   query (causal), or up to ``hi(s) = ceil((s + window) / select_block) * select_block``
   (non-causal): at least ``window`` keys, aligned to key blocks;
2. *sinks*: the first ``sinks`` keys, minus the local ones;
3. *selected*: per query head and query block, the ``select_topk`` key blocks of
   ``select_block`` keys with the largest bound (max over the block's queries) among the blocks
   wholly outside the local span and not wholly sinks; their keys minus sinks, exact;
4. *samples* (``sample_size > 0``): uniform keys weighted n/m, minus every key above and, when
   causal, the future.

Causal attention is one flat pass (positions from 0; no recursion). Layout as in
``hyperpass.reference``: q [B, Hkv, G, Nq, D] (pre-scaled), k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv].
Must not import the kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hyperpass import lsh
from hyperpass.config import HyperConfig
from hyperpass.softmax_parts import attend, gather_rows, merge, pad_rows

_QUERY_CHUNK = 256  # queries per step of the local part: bounds the score matrix's memory


def select_attention(q: Tensor, k: Tensor, v: Tensor, cfg: HyperConfig, causal: bool):
    """(out [B, Hkv, G, Nq, Dv], lse [B, Hkv, G, Nq]) of ``method="select"``."""
    spans = _LocalSpans(q.shape[-2], k.shape[-2], cfg, causal, q.device)
    parts = [_local_part(q, k, v, spans)]
    if cfg.sinks > 0:
        parts.append(_sinks_part(q, k, v, spans, cfg.sinks))
    selected_blocks = _select_blocks(q, k, spans, cfg)
    parts.append(_selected_part(q, k, v, spans, cfg, selected_blocks))
    if cfg.sample_size > 0:
        parts.append(_sampled_part(q, k, v, spans, cfg, selected_blocks))
    return merge(parts)


class _LocalSpans:
    """Per query: the local key span [lo, hi) and the query block; by position arithmetic."""

    def __init__(self, nq: int, nk: int, cfg: HyperConfig, causal: bool, device):
        self.nq, self.nk, self.causal = nq, nk, causal
        self.qb, self.kb = cfg.query_block, cfg.select_block
        self.n_qblocks = math.ceil(nq / self.qb)
        self.n_kblocks = math.ceil(nk / self.kb)
        starts = torch.arange(self.n_qblocks, device=device) * self.qb
        self.block_lo = ((starts + self.qb - cfg.window).clamp(min=0) // self.kb) * self.kb
        block_hi = torch.div(starts + cfg.window + self.kb - 1, self.kb, rounding_mode="floor")
        self.block_hi = (block_hi * self.kb).clamp(max=nk)  # non-causal end of the span
        pos = torch.arange(nq, device=device)
        self.lo = self.block_lo[pos // self.qb]  # [nq]
        self.hi = (pos + 1).clamp(max=nk) if causal else self.block_hi[pos // self.qb]

    def is_local(self, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        """q_idx [..., M, 1], k_idx [..., S] (broadcastable) -> [..., M, S]."""
        return (k_idx >= self.lo[q_idx]) & (k_idx < self.hi[q_idx])


def _local_part(q, k, v, spans: _LocalSpans):
    """Exact attention over each query's local span, by chunks of queries."""
    outs, lses = [], []
    for start in range(0, spans.nq, _QUERY_CHUNK):
        q_idx = torch.arange(start, min(start + _QUERY_CHUNK, spans.nq), device=q.device)
        k_start = int(spans.lo[q_idx].min())
        k_end = int(spans.hi[q_idx].max())
        k_idx = torch.arange(k_start, max(k_end, k_start + 1), device=q.device).clamp(
            max=spans.nk - 1
        )  # never empty: an all-masked key gives the rows lse -inf, not an error
        keep = spans.is_local(q_idx.unsqueeze(-1), k_idx)
        out, lse = attend(
            q[..., q_idx, :], k[..., k_idx, :].unsqueeze(2), v[..., k_idx, :].unsqueeze(2), keep
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, -2), torch.cat(lses, -1)


def _sinks_part(q, k, v, spans: _LocalSpans, sinks: int):
    k_idx = torch.arange(min(sinks, spans.nk), device=q.device)
    q_idx = torch.arange(spans.nq, device=q.device).unsqueeze(-1)
    keep = ~spans.is_local(q_idx, k_idx)
    if spans.causal:
        keep &= k_idx <= q_idx
    return attend(q, k[..., k_idx, :].unsqueeze(2), v[..., k_idx, :].unsqueeze(2), keep)


def _select_blocks(q: Tensor, k: Tensor, spans: _LocalSpans, cfg: HyperConfig):
    """Indices [B, Hkv, G, n_qblocks, topk] of the selected key blocks (-1: none)."""
    block_bound = _block_bounds(q, k, spans, cfg)
    top = block_bound.topk(min(cfg.select_topk, spans.n_kblocks), dim=-1)
    return torch.where(torch.isfinite(top.values), top.indices, -1)


def _block_bounds(q: Tensor, k: Tensor, spans: _LocalSpans, cfg: HyperConfig):
    """[B, Hkv, G, n_qblocks, n_kblocks]: each query block's bound on each key block, -inf
    where the key block is not a candidate."""
    kb, n_kb = spans.kb, spans.n_kblocks
    keys = pad_rows(k, n_kb * kb).unflatten(-2, (n_kb, kb))  # [B,Hkv,nkb,kb,D]
    valid = (torch.arange(n_kb * kb, device=k.device) < spans.nk).view(n_kb, kb, 1)
    kmax = keys.masked_fill(~valid, float("-inf")).amax(-2)  # [B,Hkv,nkb,D]
    kmin = keys.masked_fill(~valid, float("inf")).amin(-2)
    bound = q.clamp(min=0) @ kmax.unsqueeze(2).mT + q.clamp(max=0) @ kmin.unsqueeze(2).mT
    bound = pad_rows(bound, spans.n_qblocks * spans.qb)  # padded queries: bound 0, below
    q_ok = torch.arange(spans.n_qblocks * spans.qb, device=q.device) < spans.nq
    bound = bound.masked_fill(~q_ok.unsqueeze(-1), float("-inf"))
    block_bound = bound.unflatten(-2, (spans.n_qblocks, spans.qb)).amax(-2)  # [..,nqb,nkb]

    block_start = torch.arange(n_kb, device=k.device) * kb
    block_end = (block_start + kb).clamp(max=spans.nk)
    before = block_end <= spans.block_lo.unsqueeze(-1)  # wholly before the local span
    after = block_start >= spans.block_hi.unsqueeze(-1)
    candidate = (before | (after & (not spans.causal))) & (block_end > cfg.sinks)
    return block_bound.masked_fill(~candidate, float("-inf"))


def _selected_part(q, k, v, spans: _LocalSpans, cfg: HyperConfig, blocks: Tensor):
    """Exact attention of each query block over the keys of its selected blocks, minus sinks."""
    q_blocks = pad_rows(q, spans.n_qblocks * spans.qb).unflatten(-2, (spans.n_qblocks, spans.qb))
    step = max(1, _QUERY_CHUNK // spans.qb)  # query blocks per step: bounds the gathered K/V
    outs, lses = [], []
    for start in range(0, spans.n_qblocks, step):
        chunk = blocks[..., start : start + step, :]  # [B,Hkv,G,c,topk]
        key_idx = chunk.unsqueeze(-1) * spans.kb + torch.arange(spans.kb, device=q.device)
        key_idx = key_idx.flatten(-2)  # [B,Hkv,G,c,topk*kb]
        keep = (chunk.unsqueeze(-1) >= 0).expand(*chunk.shape, spans.kb).flatten(-2)
        keep = keep & (key_idx < spans.nk) & (key_idx >= cfg.sinks)
        key_idx = key_idx.clamp(0, spans.nk - 1)
        flat_idx = key_idx.flatten(2)  # one gather per KV head for all its query heads
        k_sel = gather_rows(k, flat_idx).view(*key_idx.shape, k.shape[-1])
        v_sel = gather_rows(v, flat_idx).view(*key_idx.shape, v.shape[-1])
        out, lse = attend(
            q_blocks[..., start : start + step, :, :], k_sel, v_sel, keep.unsqueeze(-2)
        )
        outs.append(out.flatten(-3, -2))
        lses.append(lse.flatten(-2))
    return torch.cat(outs, -2)[..., : spans.nq, :], torch.cat(lses, -1)[..., : spans.nq]


def _sampled_part(q, k, v, spans: _LocalSpans, cfg: HyperConfig, blocks: Tensor):
    """Uniform samples weighted nk/m, minus local, sink, selected and (causal) future keys."""
    batch, kv_heads = k.shape[:2]
    m = cfg.sample_size
    idx = lsh.sample_indices(cfg.seed, lsh.subproblem_tag(0, 0), (batch, 1, m), spans.nk, q.device)
    idx = idx.expand(batch, kv_heads, m)
    k_s, v_s = gather_rows(k, idx).unsqueeze(2), gather_rows(v, idx).unsqueeze(2)
    q_idx = torch.arange(spans.nq, device=q.device).unsqueeze(-1)
    s_idx = idx.unsqueeze(2).unsqueeze(-2)  # [B,Hkv,1,1,m]
    drop = spans.is_local(q_idx, s_idx) | (s_idx < cfg.sinks)
    if spans.causal:
        drop |= s_idx > q_idx
    sample_block = (idx // spans.kb).unsqueeze(2).unsqueeze(-2).unsqueeze(-1)  # [B,Hkv,1,1,m,1]
    in_selected = (blocks.unsqueeze(-2) == sample_block).any(-1)  # [B,Hkv,G,nqb,m]
    drop = drop | in_selected[..., q_idx.squeeze(-1) // spans.qb, :]
    return attend(q, k_s, v_s, ~drop, log_weight=math.log(spans.nk / m))
