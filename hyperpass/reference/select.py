"""``method="select"``: exact attention over key blocks chosen per query tile by a score bound.

HyperAttention's exact part is "the large entries" of the attention matrix; the paper finds them
with sortLSH. Here they are whole key blocks, which a block-sparse kernel runs at dense speed.
Queries are cut into tiles of ``query_block`` rows, keys into blocks of ``select_block``; each
tile attends exactly (softmax over the union, causal mask on top when causal) to:

1. *local* blocks: every block that meets ``[lo, hi)``, with
   ``lo = floor(max(s + query_block - window, 0) / select_block) * select_block`` for the tile
   starting at ``s`` and ``hi`` the tile's last row + 1 (causal) or
   ``ceil((s + window) / select_block) * select_block`` (non-causal): at least ``window`` keys;
2. *sink* blocks: every block that meets ``[0, sinks)``;
3. *selected* blocks among the other blocks (causal: only those wholly before ``lo``), ranked by
   a score per block (``select_score``):

   * ``"rows"`` (the default): the exact scores of ``select_rows`` rows of the tile, evenly
     spaced and ending at its last row (``r_i = s + m - 1 - i * max(m // select_rows, 1)``,
     clipped to ``s``, for the tile's ``m`` queries: ``query_block`` but in a partial last
     tile). For row ``i`` and block ``b``, ``lse_ib`` is the
     log-sum-exp of the row's scores over the block's keys (causal: those at or before the
     row) and ``L_i`` over the tile's local and sink keys; the score is
     ``max_i (lse_ib - L_i) - log(len(block))``: the log of the block's mass per key relative
     to the local mass, for the row that needs it most (each key's ratio to the local mass
     clipped to ``exp(+-ROW_SHARE_CAP)``). One block holding a passkey is found this way; a
     bound on whole blocks misses it among blocks of varied text;
   * ``"bound"``: the bound Quest (Tang et al. 2024) uses: for a block with per-channel key
     maxima ``kmax`` and minima ``kmin`` and a query ``q`` (scaled),

         q . k  <=  relu(q) . kmax + min(q, 0) . kmin     for every key k of the block;

     the max of that bound over ``query_groups`` representatives, each the mean of a group of
     consecutive rows of the tile.

How many blocks are selected: ``select_topk`` (``select_mass == 0``), or (``select_mass = t``)
the fewest whose estimated softmax mass, with the local and sink blocks', reaches ``t`` of the
row's total, between ``select_min`` and ``select_topk``; a causal call's last tile keeps at least
``select_last`` (the prompt's end, whose rows predict what generation writes first: ranked by
its few sampled rows, it would miss a far key that those rows need less than the answer's
would). The mass of a block is estimated as
``len(block) * exp(score)``. Ranking is by score quantized to buckets of ``1/8`` below the tile's
best candidate (ties inside a bucket: the block nearer the tile's local span first, the earlier
of two at the same distance), which a GPU kernel computes exactly the same way without a sort
(``hyperpass.kernels.select_blocks``). Nearer first is a locality prior, and it spreads the
chosen blocks over the past instead of piling every tile's ties onto the first blocks, which
FlexAttention's backward would read from hundreds of tiles in one program.

Coarse tiles (``select_coarse`` = c > 1, ``"rows"`` only): each group of c tiles first ranks
its candidates (outside its tiles' joint local span) by ``select_rows`` rows spread over it and
keeps ``select_candidates * select_topk``; its tiles rank only those and the blocks between
(``coarse_candidates``); a causal call's last coarse tile ranks every block.

Layout as in ``hyperpass.reference.hyper``: q [B, Hkv, G, Nq, D] (pre-scaled), k [B, Hkv, Nk, D],
v [B, Hkv, Nk, Dv]. Must not import the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hyperpass.config import HyperConfig
from hyperpass.reference.softmax import attend, pad_rows

BUCKET_WIDTH = 0.125  # score units (natural-log logits) per ranking bucket
N_BUCKETS = 128  # buckets below the best candidate; lower scores share the last
# select_score="rows": a key's mass counts as exp(-ROW_SHARE_CAP) .. exp(ROW_SHARE_CAP) times
# the tile's local mass (so the GPU sums each block relative to it in fp32, without a running max)
ROW_SHARE_CAP = 64.0
_SCORE_BUDGET = 2**26  # scores per step of the attention (256 MB of fp32): bounds its memory


@dataclass
class TileGeometry:
    """Query tiles, key blocks and each tile's local span, by position arithmetic."""

    nq: int
    nk: int
    qb: int
    kb: int
    causal: bool
    lo: Tensor  # [n_tiles] first local key
    hi: Tensor  # [n_tiles] end of the local span (causal: the tile's last row + 1)

    @property
    def n_tiles(self) -> int:
        return math.ceil(self.nq / self.qb)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.nk / self.kb)


def tile_geometry(nq: int, nk: int, cfg: HyperConfig, causal: bool, device,
                  coarse: int = 1) -> TileGeometry:  # fmt: skip
    """The query tiles of ``cfg``, or with ``coarse`` = c its coarse tiles: c tiles each, whose
    local span runs from the first tile's ``lo`` to the last tile's ``hi`` (the window grown
    by the c - 1 tiles between)."""
    qb, kb = coarse * cfg.query_block, cfg.select_block
    window = cfg.window + (coarse - 1) * cfg.query_block
    starts = torch.arange(math.ceil(nq / qb), device=device) * qb
    lo = ((starts + qb - window).clamp(min=0) // kb) * kb
    if causal:
        hi = (starts + qb).clamp(max=nq).clamp(max=nk)
    else:
        hi = (torch.div(starts + window + kb - 1, kb, rounding_mode="floor") * kb).clamp(max=nk)
    return TileGeometry(nq, nk, qb, kb, causal, lo, hi)


def block_kinds(geo: TileGeometry, sinks: int) -> tuple[Tensor, Tensor]:
    """(fixed [n_tiles, n_blocks] bool: local or sink blocks, candidate: may be selected).
    Causal: no block that starts at or after the end of the tile's span (wholly future)."""
    start = torch.arange(geo.n_blocks, device=geo.lo.device) * geo.kb
    end = (start + geo.kb).clamp(max=geo.nk)
    local = (end > geo.lo[:, None]) & (start < geo.hi[:, None])
    sink = (start < sinks).expand_as(local)
    if geo.causal:
        sink = sink & (start < geo.hi[:, None])
    fixed = local | sink
    before = end[None, :] <= geo.lo[:, None]
    outside = before if geo.causal else before | (start[None, :] >= geo.hi[:, None])
    return fixed, outside & ~sink


def block_scores(q: Tensor, k: Tensor, geo: TileGeometry, groups: int,
                 rep_dtype: torch.dtype | None = None) -> Tensor:  # fmt: skip
    """[B, Hkv, G, n_tiles, n_blocks] fp32: each tile's bound on each block's scores (the max
    over its representatives, the means of ``groups`` groups of consecutive rows, rounded to
    ``rep_dtype`` as the GPU's tensor-core dots take them)."""
    batch, kv_heads, nk, dim = k.shape
    n_b, kb = geo.n_blocks, geo.kb
    keys = pad_rows(k, n_b * kb).unflatten(-2, (n_b, kb))
    valid = (torch.arange(n_b * kb, device=k.device) < nk).view(n_b, kb, 1)
    kmax = keys.masked_fill(~valid, float("-inf")).amax(-2).float()  # [B, Hkv, n_b, D]
    kmin = keys.masked_fill(~valid, float("inf")).amin(-2).float()
    reps, present = representatives(q, geo, groups)  # [B, Hkv, G, n_t, R, D], [n_t, R]
    if rep_dtype is not None:
        reps = reps.to(rep_dtype).float()
    bound = (
        reps.clamp(min=0) @ kmax[:, :, None, None].mT
        + reps.clamp(max=0) @ kmin[:, :, None, None].mT
    )  # [B, Hkv, G, n_t, R, n_b]
    bound = bound.masked_fill(~present[..., None], float("-inf"))
    return bound.amax(-2)


def sampled_rows(geo: TileGeometry, rows: int) -> Tensor:
    """[n_tiles, rows] the rows of each tile whose exact scores rank its blocks: evenly spaced
    over the tile's queries, ending at its last one (a prompt's partial last tile, whose last
    row predicts the first generated token, is spread over the rows it has)."""
    dev = geo.lo.device
    starts = torch.arange(geo.n_tiles, device=dev)[:, None] * geo.qb
    present = (geo.nq - starts).clamp(max=geo.qb)  # [n_t, 1]
    stride = (present // rows).clamp(min=1)
    picks = (present - 1 - torch.arange(rows, device=dev)[None, :] * stride).clamp(min=0)
    return starts + picks


@torch.no_grad()  # in place below; a ranking is not differentiated
def row_scores(q: Tensor, k: Tensor, geo: TileGeometry, rows: int, fixed: Tensor,
               rep_dtype: torch.dtype | None = None) -> Tensor:  # fmt: skip
    """[B, Hkv, G, n_tiles, n_blocks] fp32: ``select_score="rows"``, each block's log mass per
    key relative to the tile's local and sink mass (``fixed``), the max over sampled rows."""
    batch, kv_heads, groups, nq, dim = q.shape
    n_t, n_b, kb, nk = geo.n_tiles, geo.n_blocks, geo.kb, geo.nk
    picked = sampled_rows(geo, rows)  # [n_t, S]
    keys = pad_rows(k.float(), n_b * kb)
    k_pos = torch.arange(n_b * kb, device=q.device)
    size = ((k_pos < nk).view(n_b, kb).sum(-1)).float()
    queries = (q if rep_dtype is None else q.to(rep_dtype)).float()  # the GPU's dot takes q's dtype
    out = torch.empty(batch, kv_heads, groups, n_t, n_b, device=q.device)
    step = max(1, _SCORE_BUDGET // (batch * kv_heads * groups * rows * n_b * kb))
    for first in range(0, n_t, step):
        tiles = slice(first, first + step)
        rows_pos = picked[tiles]  # [t, S]
        s = queries[..., rows_pos, :] @ keys[:, :, None, None].mT  # [B, Hkv, G, t, S, nk]
        keep = k_pos < nk
        if geo.causal:
            keep = keep & (k_pos <= rows_pos[..., None])
        s = s.masked_fill(~keep, float("-inf")).unflatten(-1, (n_b, kb))
        block_lse = torch.logsumexp(s, -1)  # [B, Hkv, G, t, S, n_b]
        local = block_lse.masked_fill(~fixed[tiles, None, :], float("-inf"))
        norm = torch.logsumexp(local, -1, keepdim=True)  # finite: a row's own key is local
        hidden = ~keep.unflatten(-1, (n_b, kb))
        ratio = s.sub_(norm[..., None]).clamp_(-ROW_SHARE_CAP, ROW_SHARE_CAP)  # in place: memory
        share = torch.logsumexp(ratio.masked_fill_(hidden, float("-inf")), -1)
        out[..., tiles, :] = share.amax(-2) - size.log()
    return out


def representatives(q: Tensor, geo: TileGeometry, groups: int) -> tuple[Tensor, Tensor]:
    """(the mean of each group of ``query_block / groups`` rows of each tile
    [B, Hkv, G, n_tiles, groups, D] fp32, whether the group has a row [n_tiles, groups])."""
    nq, n_t, qb = geo.nq, geo.n_tiles, geo.qb
    size = qb // groups
    rows = pad_rows(q.float(), n_t * qb)
    rows = rows.unflatten(-2, (n_t, groups, size))
    count = (torch.arange(n_t * qb, device=q.device) < nq).view(n_t, groups, size).sum(-1)
    reps = rows.sum(-2) / count.clamp(min=1)[..., None]
    return reps, count > 0


def choose_blocks(scores: Tensor, fixed: Tensor, candidate: Tensor, geo: TileGeometry,
                  cfg: HyperConfig) -> Tensor:  # fmt: skip
    """[B, Hkv, G, n_tiles, n_blocks] bool: the blocks each tile attends to (fixed + chosen)."""
    bucket = _buckets(scores, candidate)
    n_candidates = candidate.sum(-1)
    budget = torch.full_like(n_candidates, cfg.select_topk).expand(*scores.shape[:-1])
    if cfg.select_mass > 0:
        budget = _mass_budget(scores, fixed, candidate, bucket, geo, cfg)
    if geo.causal and cfg.select_last:  # the prompt's end: generation reads its rows first
        budget = budget.clone()
        budget[..., -1] = budget[..., -1].clamp(min=cfg.select_last)
    return _best_ranked(bucket, candidate, geo, torch.minimum(budget, n_candidates)) | fixed


def _buckets(scores: Tensor, candidate: Tensor) -> Tensor:
    """Each candidate's ranking bucket below its tile's best candidate (N_BUCKETS: not one)."""
    cand_scores = scores.masked_fill(~candidate, float("-inf"))
    best = cand_scores.amax(-1, keepdim=True)  # -inf: no candidate
    safe_best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    bucket = ((safe_best - cand_scores) / BUCKET_WIDTH).floor().clamp(0, N_BUCKETS - 1)
    return torch.where(candidate, bucket, torch.full_like(bucket, N_BUCKETS))


def _best_ranked(bucket: Tensor, candidate: Tensor, geo: TileGeometry, budget: Tensor) -> Tensor:
    """The first ``budget`` candidates of each tile, ranked by bucket, then by distance to the
    local span (``tie_order``)."""
    order_key = bucket * (2 * geo.n_blocks) + tie_order(geo)
    rank = order_key.argsort(-1).argsort(-1)
    return candidate & (rank < budget[..., None])


def tie_order(geo: TileGeometry) -> Tensor:
    """[n_tiles, n_blocks] int: the order of candidates within a bucket, nearer the tile's local
    span first: ``2 * distance`` in blocks for a block before it, ``2 * distance + 1`` after it
    (non-causal; the block before wins a tie of distance). Unique per candidate."""
    j = torch.arange(geo.n_blocks, device=geo.lo.device)[None, :]
    lo_block = (geo.lo // geo.kb)[:, None]
    hi_block = torch.div(geo.hi + geo.kb - 1, geo.kb, rounding_mode="floor")[:, None]
    return torch.where(j < lo_block, 2 * (lo_block - 1 - j), 2 * (j - hi_block) + 1)


def _mass_budget(scores, fixed, candidate, bucket, geo: TileGeometry, cfg: HyperConfig):
    """Per tile, the fewest candidate buckets (best first) whose estimated mass, with the
    fixed blocks', reaches ``select_mass`` of the total; as a block count in
    [select_min, select_topk]."""
    start = torch.arange(geo.n_blocks, device=scores.device) * geo.kb
    size = ((start + geo.kb).clamp(max=geo.nk) - start).float()
    allowed = fixed | candidate
    top = scores.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.where(allowed, size * torch.exp(scores - top), torch.zeros_like(scores))
    fixed_mass = (mass * fixed).sum(-1)
    total = mass.sum(-1)
    idx = bucket.long().clamp(max=N_BUCKETS - 1)
    cand = candidate.float().expand_as(scores)
    hist_mass = torch.zeros(*scores.shape[:-1], N_BUCKETS, device=scores.device)
    hist_count = torch.zeros_like(hist_mass)
    hist_mass.scatter_add_(-1, idx, mass * cand)
    hist_count.scatter_add_(-1, idx, cand)
    reached = fixed_mass[..., None] + hist_mass.cumsum(-1) >= cfg.select_mass * total[..., None]
    counts = hist_count.cumsum(-1)
    first = reached.float().argmax(-1, keepdim=True)  # first bucket that reaches the target
    need = torch.where(reached.any(-1), counts.gather(-1, first)[..., 0], counts[..., -1])
    need = torch.where(fixed_mass >= cfg.select_mass * total, torch.zeros_like(need), need)
    return need.long().clamp(min=cfg.select_min, max=cfg.select_topk)


def coarse_candidates(q: Tensor, k: Tensor, cfg: HyperConfig, causal: bool,
                      rep_dtype: torch.dtype | None = None) -> Tensor:  # fmt: skip
    """[B, Hkv, G, n_tiles, n_blocks] bool: the blocks each tile may rank with
    ``select_coarse`` = c > 1. Each coarse tile (``tile_geometry(..., coarse=c)``) scores its
    candidates (the blocks outside its local span and the sinks) by ``select_rows`` rows spread
    over it, as ``row_scores`` scores a tile's, and keeps the ``select_candidates *
    select_topk`` best, ranked as ``choose_blocks`` ranks. Its tiles may rank those and every
    block that is not its candidate (the blocks between the coarse and the tile's local span);
    a causal call's last coarse tile keeps every block."""
    coarse = tile_geometry(q.shape[-2], k.shape[-2], cfg, causal, q.device, cfg.select_coarse)
    fixed, far = block_kinds(coarse, cfg.sinks)
    scores = row_scores(q, k, coarse, cfg.select_rows, fixed, rep_dtype)
    keep = torch.clamp(far.sum(-1), max=cfg.select_candidates * cfg.select_topk)
    allowed = _best_ranked(_buckets(scores, far), far, coarse, keep.expand(scores.shape[:-1]))
    allowed = allowed | ~far
    if causal:
        allowed[..., -1, :] = True
    n_tiles = math.ceil(q.shape[-2] / cfg.query_block)
    return allowed.repeat_interleave(cfg.select_coarse, dim=-2)[..., :n_tiles, :]


def select_block_mask(q: Tensor, k: Tensor, cfg: HyperConfig, causal: bool,
                      rep_dtype: torch.dtype | None = None) -> Tensor:  # fmt: skip
    """[B, Hkv, G, n_tiles, n_blocks] bool: the key blocks each query tile attends to."""
    geo = tile_geometry(q.shape[-2], k.shape[-2], cfg, causal, q.device)
    fixed, candidate = block_kinds(geo, cfg.sinks)
    with torch.no_grad():  # a discrete choice: nothing to differentiate
        if cfg.select_score == "rows":
            scores = row_scores(q, k, geo, cfg.select_rows, fixed, rep_dtype)
            if cfg.select_coarse > 1:
                allowed = coarse_candidates(q, k, cfg, causal, rep_dtype)
                scores = scores.masked_fill(~allowed, float("-inf"))
        else:
            scores = block_scores(q, k, geo, cfg.query_groups, rep_dtype)
        return choose_blocks(scores, fixed, candidate, geo, cfg)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, blocks: Tensor, qb: int, kb: int,
                           causal: bool, key_valid: Tensor | None = None):  # fmt: skip
    """(out, lse) of exact attention of each query tile over its ``blocks`` [.., n_t, n_b]
    (and, when causal, only keys at or before the query; with ``key_valid`` [B, Nk], only
    valid keys). Each tile scores only the keys of its blocks, gathered (slots past a tile's
    block count are masked), by steps of tiles that bound the score matrix's memory."""
    batch, kv_heads, groups, nq, _ = q.shape
    nk, n_t, n_b = k.shape[-2], blocks.shape[-2], blocks.shape[-1]
    slots = max(int(blocks.sum(-1).amax()), 1)
    # the chosen blocks first (ascending), then unchosen ones as masked padding slots
    order = (~blocks).to(torch.int32).argsort(dim=-1, stable=True)[..., :slots]
    slot_used = blocks.gather(-1, order)  # [B, Hkv, G, n_t, slots]
    key_blocks = pad_rows(k, n_b * kb).unflatten(-2, (n_b, kb))
    value_blocks = pad_rows(v, n_b * kb).unflatten(-2, (n_b, kb))
    q_rows = pad_rows(q, n_t * qb).unflatten(-2, (n_t, qb))
    row_pos = torch.arange(n_t * qb, device=q.device).view(n_t, qb)
    b_idx = torch.arange(batch, device=q.device).view(batch, 1, 1, 1, 1)
    h_idx = torch.arange(kv_heads, device=q.device).view(1, kv_heads, 1, 1, 1)
    step = max(1, _SCORE_BUDGET // (batch * kv_heads * groups * qb * slots * kb))
    outs, lses = [], []
    for first in range(0, n_t, step):
        tiles = slice(first, first + step)
        idx = order[..., tiles, :]  # [B, Hkv, G, t, slots]
        keys = key_blocks[b_idx, h_idx, idx].flatten(-3, -2)  # [B, Hkv, G, t, slots*kb, D]
        values = value_blocks[b_idx, h_idx, idx].flatten(-3, -2)
        k_pos = (idx[..., None] * kb + torch.arange(kb, device=q.device)).flatten(-2)
        keep = slot_used[..., tiles, :].repeat_interleave(kb, -1) & (k_pos < nk)
        keep = keep[..., None, :]  # [B, Hkv, G, t, 1, slots*kb]
        if causal:
            keep = keep & (k_pos[..., None, :] <= row_pos[tiles, :, None])
        if key_valid is not None:
            keep = keep & key_valid[b_idx, k_pos.clamp(max=nk - 1)][..., None, :]
        out, lse = attend(q_rows[..., tiles, :, :], keys, values, keep)
        outs.append(out.flatten(-3, -2))
        lses.append(lse.flatten(-2))
    return torch.cat(outs, -2)[..., :nq, :], torch.cat(lses, -1)[..., :nq]


def select_attention(q: Tensor, k: Tensor, v: Tensor, cfg: HyperConfig, causal: bool,
                     rep_dtype: torch.dtype | None = None,
                     key_valid: Tensor | None = None):  # fmt: skip
    """(out [B, Hkv, G, Nq, Dv], lse [B, Hkv, G, Nq]) of ``method="select"``; ``rep_dtype``: the
    inputs' dtype, to which the GPU rounds the row-group means it ranks blocks with;
    ``key_valid`` [B, Nk]: the keys a padding mask leaves (the selection scores every block)."""
    blocks = select_block_mask(q, k, cfg, causal, rep_dtype)
    return block_sparse_attention(
        q, k, v, blocks, cfg.query_block, cfg.select_block, causal, key_valid
    )
