"""The reference of ``method="hyper"`` and the pattern methods (``local``, ``dilated``,
``longformer``): HyperAttention (Han et al., arXiv 2310.05869) with optional exact window/sinks.

Read it beside the paper:

* sortLSH (Algorithm 1) lives in :mod:`hyperpass.reference.lsh`.
* ``_approximate`` is Algorithms 2-3: each query's attention row is split into disjoint parts,
  computed separately and merged by log-sum-exp in fp32:

    1. the *pattern* part: keys at distance ``d`` with ``|d| < window`` (``0 <= d`` when causal)
       and ``d % dilation == 0`` (:func:`~hyperpass.reference.positions.in_window`), exact;
    2. the *sinks* part: the first ``sinks`` keys, exact;
    3. the *LSH* part: the keys of the query's sortLSH block, exact;
    4. the *sampled* part: ``sample_size`` keys drawn uniformly, weighted ``n / m``.

  Each part skips the keys an earlier part already counted, decided from positions and block ids,
  so no entry counts twice and the sampled part stays an unbiased estimate of what is left.
* ``_causal_recursive`` is Algorithm 4: halve, recurse on the two diagonal halves (exact below
  ``min_seq_len``), approximate the lower-left quarter non-causally, merge.
  ``causal_algo="flat"`` instead takes one pass in which every part only looks into the past.

Layout: q [B, Hkv, G, Nq, D] (pre-scaled), k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv].
Must not import the kernels or Triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hyperpass.config import HyperConfig
from hyperpass.reference import lsh
from hyperpass.reference.exact import exact_attention
from hyperpass.reference.lsh import lsh_block_shape
from hyperpass.reference.positions import in_window
from hyperpass.reference.softmax import attend, gather_rows, merge, pad_index, pad_rows

_PATTERN_CHUNK = 128  # queries per step of the windowed pattern part


@dataclass
class _Call:
    """What every part of one (sub-)problem needs: inputs, global offsets, hashing."""

    q: Tensor  # [B, Hkv, G, nq, D], already multiplied by the softmax scale
    k: Tensor  # [B, Hkv, nk, D]
    v: Tensor  # [B, Hkv, nk, Dv]
    q_offset: int  # global position of q[..., 0, :]
    k_offset: int
    op_causal: bool  # the whole op is causal: the window looks only back
    only_past: bool  # this call must mask keys after the query (flat causal)
    q_ranks: Tensor | None  # [B, Hkv, G, nq] sortLSH ranks
    k_ranks: Tensor | None  # [B, Hkv, nk]
    cfg: HyperConfig

    @property
    def nq(self) -> int:
        return self.q.shape[-2]

    @property
    def nk(self) -> int:
        return self.k.shape[-2]


# ----------------------------------------------------------------------------- small pieces
def _effective_window(call: _Call) -> int:
    # a flat causal pass must let every query see itself, or early rows could be empty
    return max(call.cfg.window, 1) if call.only_past else call.cfg.window


def _excluded_by_pattern_and_sinks(call: _Call, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    d = q_pos - k_pos
    drop = in_window(d, _effective_window(call), call.cfg.dilation, call.op_causal)
    drop |= k_pos < call.cfg.sinks
    if call.only_past:
        drop |= d < 0
    return drop


# ----------------------------------------------------------------------------- the four parts
def _pattern_part(call: _Call):
    """Window/dilated pattern, exact: query chunks against the contiguous key span they reach."""
    # keys farther than any query-key distance of this call change nothing: bound the span
    window = min(_effective_window(call), call.nq + call.nk + abs(call.q_offset - call.k_offset))
    dev = call.q.device
    nq, nk, c = call.nq, call.nk, _PATTERN_CHUNK
    n_chunks = math.ceil(nq / c)
    delta = call.q_offset - call.k_offset  # local key j sits at distance i + delta - j
    back = window - 1
    ahead = 0 if call.op_causal else window - 1
    span = c + back + ahead
    starts = torch.arange(n_chunks, device=dev) * c
    key_idx = (starts + delta - back).unsqueeze(-1) + torch.arange(span, device=dev)  # [nc, span]
    key_ok = (key_idx >= 0) & (key_idx < nk)
    key_idx = key_idx.clamp(0, nk - 1)
    q_idx = starts.unsqueeze(-1) + torch.arange(c, device=dev)  # [nc, c]
    q_ok = q_idx < nq
    q = pad_rows(call.q, n_chunks * c).unflatten(-2, (n_chunks, c))  # [B,Hkv,G,nc,c,D]
    k = call.k[:, :, key_idx.flatten()].unflatten(2, (n_chunks, span)).unsqueeze(2)
    v = call.v[:, :, key_idx.flatten()].unflatten(2, (n_chunks, span)).unsqueeze(2)
    d = (q_idx + delta).unsqueeze(-1) - key_idx.unsqueeze(-2)  # [nc, c, span]
    keep = (
        key_ok.unsqueeze(-2)
        & q_ok.unsqueeze(-1)
        & in_window(d, window, call.cfg.dilation, call.op_causal)
    )
    if call.only_past:
        keep &= d >= 0
    out, lse = attend(q, k, v, keep)
    return out.flatten(-3, -2)[..., :nq, :], lse.flatten(-2)[..., :nq]


def _sinks_part(call: _Call):
    """The first ``sinks`` keys (global positions), exact, minus those in the pattern."""
    n_sinks = min(call.nk, call.cfg.sinks - call.k_offset)
    dev = call.q.device
    q_pos = call.q_offset + torch.arange(call.nq, device=dev).unsqueeze(-1)
    k_pos = call.k_offset + torch.arange(n_sinks, device=dev)
    d = q_pos - k_pos
    keep = ~in_window(d, _effective_window(call), call.cfg.dilation, call.op_causal)
    if call.only_past:
        keep &= d >= 0
    k = call.k[:, :, :n_sinks].unsqueeze(2)
    v = call.v[:, :, :n_sinks].unsqueeze(2)
    return attend(call.q, k, v, keep)


@dataclass
class _Blocks:
    """sortLSH blocking of one call: who is in which block (original order)."""

    q_block: Tensor  # [B, Hkv, G, nq] key block each query attends to exactly
    k_block: Tensor  # [B, Hkv, nk] block of each key


def _lsh_part(call: _Call):
    """Exact attention between each block of sorted queries and its block of sorted keys."""
    bs = call.cfg.block_size
    qpb, n_qblocks, n_kblocks = lsh_block_shape(call.nq, call.nk, bs)
    dev = call.q.device
    q_order = lsh.sort_by_rank(call.q_ranks)  # [B,Hkv,G,nq]
    k_order = lsh.sort_by_rank(call.k_ranks)  # [B,Hkv,nk]

    q_slots = pad_index(q_order, n_qblocks * qpb)  # [B,Hkv,G,nqb*qpb]
    k_slots = pad_index(k_order, n_kblocks * bs).unflatten(-1, (n_kblocks, bs))
    k_valid = (torch.arange(n_kblocks * bs, device=dev) < call.nk).view(n_kblocks, bs)
    paired = torch.arange(n_qblocks, device=dev).clamp(max=n_kblocks - 1)
    k_slots, k_valid = k_slots[:, :, paired], k_valid[paired]  # [B,Hkv,nqb,bs], [nqb,bs]

    q = gather_rows(call.q, q_slots).unflatten(-2, (n_qblocks, qpb))  # [B,Hkv,G,nqb,qpb,D]
    k = gather_rows(call.k, k_slots.flatten(-2)).unflatten(-2, (n_qblocks, bs)).unsqueeze(2)
    v = gather_rows(call.v, k_slots.flatten(-2)).unflatten(-2, (n_qblocks, bs)).unsqueeze(2)

    q_pos = (call.q_offset + q_slots).unflatten(-1, (n_qblocks, qpb)).unsqueeze(-1)
    k_pos = (call.k_offset + k_slots).unsqueeze(2).unsqueeze(-2)
    keep = k_valid.unsqueeze(-2) & ~_excluded_by_pattern_and_sinks(call, q_pos, k_pos)
    out, lse = attend(q, k, v, keep)

    # back to original query order (padding rows dropped first)
    out = out.flatten(-3, -2)[..., : call.nq, :]
    lse = lse.flatten(-2)[..., : call.nq]
    out = torch.zeros_like(out).scatter(-2, q_order.unsqueeze(-1).expand_as(out), out)
    lse = torch.zeros_like(lse).scatter(-1, q_order, lse)

    sorted_pos = torch.arange(call.nq, device=dev).expand_as(q_order)
    q_block = torch.empty_like(q_order).scatter(-1, q_order, sorted_pos // qpb)
    k_sorted_pos = torch.arange(call.nk, device=dev).expand_as(k_order)
    k_block = torch.empty_like(k_order).scatter(-1, k_order, k_sorted_pos // bs)
    blocks = _Blocks(q_block=q_block.clamp(max=n_kblocks - 1), k_block=k_block)
    return (out, lse), blocks


def _sampled_part(call: _Call, blocks: _Blocks | None):
    """Uniform samples with replacement, weight nk/m, minus every key an exact part counted."""
    cfg = call.cfg
    batch, kv_heads = call.k.shape[:2]
    tag = lsh.subproblem_tag(call.q_offset, call.k_offset)
    # one sample set per batch row, shared by all heads: GQA then equals repeated KV heads
    idx = lsh.sample_indices(cfg.seed, tag, (batch, 1, cfg.sample_size), call.nk, call.q.device)
    idx = idx.expand(batch, kv_heads, cfg.sample_size)
    k = gather_rows(call.k, idx).unsqueeze(2)
    v = gather_rows(call.v, idx).unsqueeze(2)
    q_pos = call.q_offset + torch.arange(call.nq, device=call.q.device).unsqueeze(-1)
    k_pos = (call.k_offset + idx).unsqueeze(2).unsqueeze(-2)  # [B,Hkv,1,1,m]
    drop = _excluded_by_pattern_and_sinks(call, q_pos, k_pos)
    if blocks is not None:
        sample_block = blocks.k_block.gather(-1, idx).unsqueeze(2).unsqueeze(-2)
        drop = drop | (blocks.q_block.unsqueeze(-1) == sample_block)
    return attend(call.q, k, v, ~drop, log_weight=math.log(call.nk / cfg.sample_size))


def _approximate(call: _Call):
    """Algorithms 2-3 with the extra exact sets: merge of the disjoint parts."""
    cfg = call.cfg
    parts = []
    if _effective_window(call) > 0:
        parts.append(_pattern_part(call))
    if cfg.sinks > call.k_offset:
        parts.append(_sinks_part(call))
    blocks = None
    if cfg.uses_lsh:
        lsh_out, blocks = _lsh_part(call)
        parts.append(lsh_out)
    if cfg.uses_samples:
        parts.append(_sampled_part(call, blocks))
    return merge(parts)


def _causal_recursive(call: _Call):
    """Algorithm 4: exact diagonal blocks, approximated off-diagonal blocks, recursively."""
    n = call.nq
    if n <= call.cfg.min_seq_len:
        return exact_attention(call.q, call.k.unsqueeze(2), call.v.unsqueeze(2), causal=True)
    half = n // 2

    def sub(q_rows: slice, k_rows: slice, only_past: bool) -> _Call:
        return _Call(
            q=call.q[..., q_rows, :],
            k=call.k[..., k_rows, :],
            v=call.v[..., k_rows, :],
            q_offset=call.q_offset + (q_rows.start or 0),
            k_offset=call.k_offset + (k_rows.start or 0),
            op_causal=True,
            only_past=only_past,
            q_ranks=call.q_ranks[..., q_rows],
            k_ranks=call.k_ranks[..., k_rows],
            cfg=call.cfg,
        )

    first, second = slice(0, half), slice(half, n)
    top = _causal_recursive(sub(first, first, True))
    bottom_diagonal = _causal_recursive(sub(second, second, True))
    bottom_left = _approximate(sub(second, first, False))
    bottom = merge([bottom_diagonal, bottom_left])
    return torch.cat([top[0], bottom[0]], -2), torch.cat([top[1], bottom[1]], -1)


def hyper_attention(q: Tensor, k: Tensor, v: Tensor, cfg: HyperConfig, is_causal: bool):
    """(out [B, Hkv, G, Nq, Dv], lse [B, Hkv, G, Nq]) of the hyper and pattern methods."""
    q_ranks = k_ranks = None
    if cfg.uses_lsh:
        planes = lsh.hyperplanes(q.shape[-1], cfg.lsh_num_projs, cfg.seed, q.device)
        q_ranks, k_ranks = lsh.lsh_ranks(q, planes), lsh.lsh_ranks(k, planes)
    call = _Call(q, k, v, 0, 0, is_causal, False, q_ranks, k_ranks, cfg)
    if cfg.causal_recursion(is_causal):
        return _causal_recursive(call)
    call.only_past = is_causal
    return _approximate(call)
