"""``method="select"``'s block selection on the GPU, written as FlexAttention block lists.

Same semantics as :mod:`hyperpass.reference.select` (the oracle): per query tile and query head

1. scores every key block the tile may read into a scratch row: with ``select_score="rows"``
   (``_row_scores_kernel``) the exact scores of the tile's sampled rows against every key,
   reduced to each block's log mass relative to the tile's local mass, one program per group
   of tiles and query heads (each key load serves all their rows); with ``"bound"`` the bounds
   from the per-block key maxima/minima and the tile's row-group means (``_reps_kernel``; two
   dots per step of key blocks, in the selection kernel). With coarse tiles
   (``select_coarse``, where they prune: ``coarse_prunes``) the same two kernels first rank
   each coarse tile's candidates (``_coarse_candidates``), and the tiles' rows score only
   those and the blocks near them;
2. finds how many blocks to keep (``select_topk``, or with ``select_mass`` the fewest buckets
   whose estimated mass reaches the target) and the bucket where the cut falls (buckets of
   ``BUCKET_WIDTH`` below the best candidate);
3. writes the tile's block lists in FlexAttention's layout (``BlockMask.from_kv_blocks``): the
   *full* blocks (sinks outside the window, the selected blocks, window blocks wholly in the
   past) and the *partial* ones (window blocks on the causal diagonal), each with its count.

So the selection is two launches (rows: the scores, then this kernel; with coarse tiles five:
their scores and candidates, a fill, the tiles' scores, this kernel) or three (bound:
key-block extremes, row-group means, this kernel), no sort and no top-k; the cut is found by
bisection over the buckets, one pass over the scratch row per step. The query heads of one KV
head are ranked in one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperpass.config import HyperConfig
from hyperpass.kernels.host import cdiv, last_dim_contiguous, next_pow2
from hyperpass.reference.select import BUCKET_WIDTH, N_BUCKETS, ROW_SHARE_CAP

_KEY_TILE = 64  # key blocks per step of the score loop
_GROUPS_PAD = 16  # a dot's smallest height: the row groups, padded
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_SHARE_CAP2 = tl.constexpr(ROW_SHARE_CAP * 1.4426950408889634)  # in log2 units


def key_block_extremes(k: torch.Tensor, kb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kmax, kmin) [B, Hkv, n_blocks, D] in k's dtype (exact: a max of its values)."""
    batch, kv_heads, nk, dim = k.shape
    n_kb = cdiv(nk, kb)
    kmax = k.new_empty(batch, kv_heads, n_kb, dim)
    kmin = k.new_empty(batch, kv_heads, n_kb, dim)
    rows = min(next_pow2(kb), 64)
    _extremes_kernel[(n_kb, batch * kv_heads)](
        k, kmax, kmin, *k.stride()[:3], kv_heads, nk, n_kb,
        D=dim, BLOCK_D=next_pow2(dim), KB=kb, ROWS=rows, num_warps=4,
    )  # fmt: skip
    return kmax, kmin


@triton.jit
def _extremes_kernel(K, KMAX, KMIN, stride_kb, stride_kh, stride_kn, kv_heads, n_keys, n_kb,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, KB: tl.constexpr,
                     ROWS: tl.constexpr):  # fmt: skip
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    d = tl.arange(0, BLOCK_D)
    base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_D], float("inf"), tl.float32)
    for r in range(0, KB, ROWS):
        rows = j * KB + r + tl.arange(0, ROWS)
        ok = (rows < n_keys) & (rows < (j + 1) * KB)
        mask = ok[:, None] & (d < D)[None, :]
        x = tl.load(
            base + rows[:, None].to(tl.int64) * stride_kn + d[None, :], mask=mask, other=0.0
        )
        x = x.to(tl.float32)
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=0))
    out = bh.to(tl.int64) * n_kb * D + j * D + d
    tl.store(KMAX + out, hi.to(KMAX.dtype.element_ty), mask=d < D)
    tl.store(KMIN + out, lo.to(KMIN.dtype.element_ty), mask=d < D)


@triton.jit
def _block_kinds(js, n_keys, lo, hi, first_row, n_sinks, KB: tl.constexpr,
                 CAUSAL: tl.constexpr):  # fmt: skip
    """Per block id: (local, sink, candidate, wholly in the past of the tile's first row)."""
    start = js * KB
    end = tl.minimum(start + KB, n_keys)
    local = (end > lo) & (start < hi)
    sink = start < n_sinks
    before = end <= lo
    if CAUSAL:
        cand = before & ~sink
        past = end - 1 <= first_row
    else:
        cand = (before | (start >= hi)) & ~sink
        past = start >= 0
    return local, sink, cand, past, end - start


@triton.jit
def _tie_order(js, lo, hi, KB: tl.constexpr):
    """``hyperpass.reference.select.tie_order``: nearer the local span [lo, hi) first."""
    lo_block = lo // KB
    hi_block = (hi + KB - 1) // KB
    return tl.where(js < lo_block, 2 * (lo_block - 1 - js), 2 * (js - hi_block) + 1)


@triton.jit
def _reps_kernel(Q, REPS, scale, stride_qb, stride_qh, stride_qn, q_heads, n_queries, n_tiles,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, QB: tl.constexpr, GROUPS: tl.constexpr,
                 GROUPS_PAD: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """REPS[b, h, t, g] = scale * the mean of the rows of group ``g`` of tile ``t`` (one dot
    with an averaging matrix), in Q's dtype, as the bound dots take it."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // q_heads
    h = bh % q_heads
    rows = t * QB + tl.arange(0, QB)
    row_ok = rows < n_queries
    d = tl.arange(0, BLOCK_D)
    base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    x = tl.load(base + rows[:, None].to(tl.int64) * stride_qn + d[None, :],
                mask=row_ok[:, None] & (d < D)[None, :], other=0.0)  # fmt: skip
    g = tl.arange(0, GROUPS_PAD)
    member = (tl.arange(0, QB)[None, :] // (QB // GROUPS) == g[:, None]) & (g < GROUPS)[:, None]
    member = member & row_ok[None, :]
    count = tl.sum(member.to(tl.int32), axis=1)
    average = tl.where(member, 1.0 / tl.maximum(count, 1).to(tl.float32)[:, None], 0.0)
    reps = tl.dot(average.to(x.dtype), x, input_precision=PRECISION) * scale
    out = REPS + ((bh.to(tl.int64) * n_tiles + t) * GROUPS + g[:, None]) * D + d[None, :]
    tl.store(out, reps.to(REPS.dtype.element_ty), mask=(g < GROUPS)[:, None] & (d < D)[None, :])


@triton.jit
def _block_lse(x, k_base, stride_kn, j, rows, n_keys, D: tl.constexpr, BLOCK_D: tl.constexpr,
               KB: tl.constexpr, KC: tl.constexpr, CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    """Per row of ``x`` (scaled queries at positions ``rows``): log-sum-exp of its scores over
    the keys of block ``j`` (causal: those at or before the row); -inf where none."""
    d = tl.arange(0, BLOCK_D)
    top = tl.full([x.shape[0]], float("-inf"), tl.float32)
    acc = tl.zeros([x.shape[0]], tl.float32)
    for c in tl.static_range(0, KB, KC):  # unrolled: the caller's loop over blocks pipelines
        cols = j * KB + c + tl.arange(0, KC)
        ok = cols < n_keys
        keys = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + d[None, :],
                       mask=ok[:, None] & (d < D)[None, :], other=0.0)  # fmt: skip
        s = tl.dot(x, tl.trans(keys), input_precision=PRECISION)
        keep = ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)
        acc = acc * tl.exp(top - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
        top = new_top
    return tl.where(acc > 0, top + tl.log(tl.maximum(acc, 1e-30)), float("-inf"))


@triton.jit
def _logaddexp(a, b):
    top = tl.maximum(a, b)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return tl.where(top == float("-inf"), top, safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)))


@triton.jit
def _tile_span(t, n_queries, n_keys, n_kb, window, QB: tl.constexpr, KB: tl.constexpr,
               CAUSAL: tl.constexpr):  # fmt: skip
    """Tile ``t``'s local span of keys [lo, hi) and the blocks it visits [0, n_visit)."""
    first_row = t * QB
    lo = (tl.maximum(first_row + QB - window, 0) // KB) * KB
    if CAUSAL:
        hi = tl.minimum(tl.minimum(first_row + QB, n_queries), n_keys)
        n_visit = tl.cdiv(hi, KB)
    else:
        hi = tl.minimum(((first_row + window + KB - 1) // KB) * KB, n_keys)
        n_visit = n_kb + t * 0
    return lo, hi, n_visit


@triton.jit
def _block_share(x, k_base, stride_kn, j, rows, norm2, n_keys, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, KB: tl.constexpr, KC: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """Per row of ``x``: the log of block ``j``'s mass relative to ``exp(norm)`` (``norm2`` is
    ``norm`` in log2 units), each key's ratio clipped to ``exp(+-ROW_SHARE_CAP)``. Relative to
    a known norm the sum needs no running max (FlashAttention's rescaling) and, clipped, cannot
    overflow or underflow fp32; ``MASKED``: the block may hold keys past ``n_keys`` or (causal)
    after a row."""
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([x.shape[0]], tl.float32)
    for c in tl.static_range(0, KB, KC):  # unrolled: the caller's loop over blocks pipelines
        cols = j * KB + c + tl.arange(0, KC)
        ptrs = k_base + cols[:, None].to(tl.int64) * stride_kn + d[None, :]
        if MASKED:
            keys = tl.load(ptrs, mask=(cols < n_keys)[:, None] & (d < D)[None, :], other=0.0)
        elif BLOCK_D == D:
            keys = tl.load(ptrs)
        else:
            keys = tl.load(ptrs, mask=(d < D)[None, :], other=0.0)
        s = tl.dot(x, tl.trans(keys), input_precision=PRECISION)
        s = tl.minimum(tl.maximum(s * _LOG2E - norm2[:, None], -_SHARE_CAP2), _SHARE_CAP2)
        if MASKED:
            keep = (cols < n_keys)[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
        acc += tl.sum(tl.exp2(s), axis=1)
    return tl.where(acc > 0, tl.log2(tl.maximum(acc, 1e-30)) * _LN2, float("-inf"))


@triton.jit
def _store_scores(SCORES, row_base, pair_ok, share, row_ok, j, n_keys, KB: tl.constexpr,
                  PAIRS: tl.constexpr, SP: tl.constexpr):  # fmt: skip
    """Block ``j``'s score of each (tile, head) pair: the max over its rows, per key."""
    share = tl.where(row_ok, share, float("-inf"))
    size = tl.minimum(n_keys - j * KB, KB).to(tl.float32)
    score = tl.max(tl.reshape(share, (PAIRS, SP)), axis=1) - tl.log(size)
    tl.store(SCORES + row_base + j, score, mask=pair_ok)


@triton.jit
def _row_scores_kernel(
    Q, K, SCORES, CAND_NUM, CAND_IDX, scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    q_heads, kv_heads, n_queries, n_keys, n_kb, n_tiles, window, n_sinks, cand_width,
    GROUP: tl.constexpr, HG: tl.constexpr, HGP: tl.constexpr, TG: tl.constexpr,
    S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    QB: tl.constexpr, KB: tl.constexpr, KC: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, COARSE: tl.constexpr,
):  # fmt: skip
    """``select_score="rows"`` (``hyperpass.reference.select.row_scores``) for ``TG`` tiles
    from ``t0`` and the ``HG`` query heads ``h0 ..``, ``S`` rows each: every block the tiles
    visit gets each (tile, head)'s score in the scratch rows the selection kernel ranks. The
    rows of several tiles share each load of a key block (one dot for all of them).

    ``COARSE`` = c > 1 (``select_coarse``; one head, the ``TG`` tiles inside one coarse tile):
    only the blocks the tiles may rank (``reference.select.coarse_candidates``): the sinks,
    the coarse tile's candidates (``CAND_IDX``: ``CAND_NUM`` ascending ids per head and coarse
    tile) and the blocks from the coarse tile's local span on; a causal call's last coarse
    tile, every block."""
    # the last tiles first: causal, they visit the most blocks (the longest programs start early)
    if COARSE > 1:  # heads fastest: a coarse tile's heads share its local span's keys in L2
        t0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * TG
        pid = tl.program_id(0)
    else:
        t0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * TG
        pid = tl.program_id(1)
    chunks = GROUP // HG
    b = pid // (kv_heads * chunks)
    hkv = (pid // chunks) % kv_heads
    h0 = hkv * GROUP + (pid % chunks) * HG
    m = tl.arange(0, TG * HGP * SP)  # row m: tile t0 + m // (HGP * SP), head, sample i
    t = t0 + m // (HGP * SP)
    head = (m // SP) % HGP
    i = m % SP
    row_ok = (t < n_tiles) & (head < HG) & (i < S)
    present = tl.maximum(tl.minimum(n_queries - t * QB, QB), 1)  # a partial last tile's rows
    rows = t * QB + tl.maximum(present - 1 - i * tl.maximum(present // S, 1), 0)
    rows = tl.minimum(rows, n_queries - 1)  # the programs' tiles past the last: not stored
    d = tl.arange(0, BLOCK_D)
    q_ptr = (Q + b.to(tl.int64) * stride_qb + (h0 + head).to(tl.int64)[:, None] * stride_qh
             + rows.to(tl.int64)[:, None] * stride_qn + d[None, :])  # fmt: skip
    x = tl.load(q_ptr, mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
    x = (x.to(tl.float32) * scale).to(Q.dtype.element_ty)  # as the reference rounds q * scale
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh

    lo, hi, _v = _tile_span(t, n_queries, n_keys, n_kb, window, QB, KB, CAUSAL)
    lo_blk, hi_blk = lo // KB, tl.cdiv(hi, KB)
    t_last = tl.minimum(t0 + TG - 1, n_tiles - 1)
    lo_first, _h, _v0 = _tile_span(t0, n_queries, n_keys, n_kb, window, QB, KB, CAUSAL)
    _l, hi_last, n_visit = _tile_span(t_last, n_queries, n_keys, n_kb, window, QB, KB, CAUSAL)
    lo_first, hi_last = lo_first // KB, tl.cdiv(hi_last, KB)
    sink_blk = tl.cdiv(tl.minimum(n_sinks, n_keys), KB)
    # 1. each row's log-sum-exp over its tile's local and sink keys
    norm = tl.full([TG * HGP * SP], float("-inf"), tl.float32)
    for j in range(0, tl.minimum(sink_blk, lo_first)):  # sinks before every local span
        lse = _block_lse(x, k_base, stride_kn, j, rows, n_keys, D, BLOCK_D, KB, KC, CAUSAL,
                         PRECISION)  # fmt: skip
        norm = _logaddexp(norm, lse)
    for j in range(lo_first, tl.maximum(hi_last, sink_blk)):
        lse = _block_lse(x, k_base, stride_kn, j, rows, n_keys, D, BLOCK_D, KB, KC, CAUSAL,
                         PRECISION)  # fmt: skip
        fixed = ((j >= lo_blk) & (j < hi_blk)) | (j < sink_blk)
        if CAUSAL:
            fixed = fixed & (j < hi_blk)
        norm = _logaddexp(norm, tl.where(fixed, lse, float("-inf")))
    # 2. every visited block: max over the rows of its mass relative to the local mass, per
    # key; the blocks no row of the program masks first, without the masks
    norm2 = norm * _LOG2E
    p = tl.arange(0, TG * HGP)  # (tile, head) pairs
    pair_ok = (t0 + p // HGP < n_tiles) & (p % HGP < HG)
    row_base = ((b * q_heads + h0 + p % HGP).to(tl.int64) * n_tiles + t0 + p // HGP) * n_kb
    unmasked = n_keys // KB
    if CAUSAL:
        unmasked = tl.minimum(unmasked, (tl.minimum(t0 * QB, n_queries - 1) + 1) // KB)
    unmasked = tl.minimum(unmasked, n_visit)
    near = 0  # the first block every tile scores (COARSE: the coarse tile's local span)
    if COARSE > 1:
        ct = t0 // COARSE
        n_coarse = tl.cdiv(n_tiles, COARSE)
        lo_c, _h, _v1 = _tile_span(ct * COARSE, n_queries, n_keys, n_kb, window, QB, KB, CAUSAL)
        _l, hi_c, _v2 = _tile_span(tl.minimum(ct * COARSE + COARSE - 1, n_tiles - 1), n_queries,
                                   n_keys, n_kb, window, QB, KB, CAUSAL)  # fmt: skip
        near = lo_c // KB
        if not CAUSAL:
            n_visit = tl.cdiv(hi_c, KB)
        if CAUSAL:  # the prompt's end ranks every block
            every = ct == n_coarse - 1
        else:
            every = ct < 0
        head_end = tl.where(every, near, tl.minimum(sink_blk, near))
        for j in range(0, head_end):  # the sinks (or every block before the local span)
            share = _block_share(x, k_base, stride_kn, j, rows, norm2, n_keys, D, BLOCK_D, KB,
                                 KC, not CAUSAL, CAUSAL, PRECISION)  # fmt: skip
            _store_scores(SCORES, row_base, pair_ok, share, row_ok, j, n_keys, KB, TG * HGP, SP)
        cand_row = (b * q_heads + h0).to(tl.int64) * n_coarse + ct
        n_cand = tl.load(CAND_NUM + cand_row, mask=~every, other=0)
        cand_ids = CAND_IDX + cand_row * cand_width
        j = tl.load(cand_ids, mask=n_cand > 0, other=0)
        for e in range(0, n_cand):  # the next id loads while this block is scored
            j_next = tl.load(cand_ids + e + 1, mask=e + 1 < n_cand, other=0)
            share = _block_share(x, k_base, stride_kn, j, rows, norm2, n_keys, D, BLOCK_D, KB,
                                 KC, not CAUSAL, CAUSAL, PRECISION)  # fmt: skip
            _store_scores(SCORES, row_base, pair_ok, share, row_ok, j, n_keys, KB, TG * HGP, SP)
            j = j_next
    mid = tl.minimum(tl.maximum(unmasked, near), n_visit)
    for j in range(near, mid):
        share = _block_share(x, k_base, stride_kn, j, rows, norm2, n_keys, D, BLOCK_D, KB, KC,
                             False, CAUSAL, PRECISION)  # fmt: skip
        _store_scores(SCORES, row_base, pair_ok, share, row_ok, j, n_keys, KB, TG * HGP, SP)
    for j in range(mid, n_visit):
        share = _block_share(x, k_base, stride_kn, j, rows, norm2, n_keys, D, BLOCK_D, KB, KC,
                             True, CAUSAL, PRECISION)  # fmt: skip
        _store_scores(SCORES, row_base, pair_ok, share, row_ok, j, n_keys, KB, TG * HGP, SP)


@triton.jit
def _buckets(scores, best, WIDTH: tl.constexpr, NB: tl.constexpr):
    """Ranking bucket of each score below its head's best candidate ``best`` [HG, 1]."""
    return tl.minimum(tl.maximum((best - scores) / WIDTH, 0.0), NB - 1).to(tl.int32)


@triton.jit
def _select_kernel(
    REPS, KMAX, KMIN, SCORES, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
    mass_share,
    q_heads, kv_heads, n_queries, n_keys, n_kb, n_tiles, window, n_sinks, topk, min_blocks,
    last_blocks, tie_steps, list_width, copy_base, copies, sink_blocks,
    GROUP: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    QB: tl.constexpr, KB: tl.constexpr, GROUPS: tl.constexpr, RP: tl.constexpr,
    KEY_TILE: tl.constexpr, NB: tl.constexpr, LOG_NB: tl.constexpr, WIDTH: tl.constexpr,
    CAUSAL: tl.constexpr, ADAPTIVE: tl.constexpr, PRECISION: tl.constexpr,
    PRECOMPUTED: tl.constexpr, LISTS: tl.constexpr,
):  # fmt: skip
    """Tile ``t`` of the ``HG`` query heads ``h0 ..`` (one KV head's): scores, budget, lists.
    ``PRECOMPUTED``: the scores are in ``SCORES`` already (``_row_scores_kernel``); else the
    bounds are computed here from ``REPS``, ``KMAX`` and ``KMIN``. ``LISTS``: FlexAttention's
    lists; else only the chosen candidates, ascending, into ``FULL_IDX`` / ``FULL_NUM`` (a
    coarse tile's candidates, ``select_coarse``).
    With ``copies`` > 0 a full sink block ``s`` is written as its copy ``copy_base + (t %
    copies) * sink_blocks + s`` (``select_block_lists``)."""
    t = tl.program_id(0)
    pid = tl.program_id(1)
    chunks = GROUP // HG
    b = pid // (kv_heads * chunks)
    hkv = (pid // chunks) % kv_heads
    h0 = hkv * GROUP + (pid % chunks) * HG
    first_row = t * QB
    d = tl.arange(0, BLOCK_D)

    # the HG heads' row-group representatives: row m = head m // RP, group m % RP
    m = tl.arange(0, HG * RP)
    head = m // RP
    grp = m % RP
    present = (grp < GROUPS) & (first_row + grp * (QB // GROUPS) < n_queries)
    rep_row = ((b * q_heads + h0 + head).to(tl.int64) * n_tiles + t) * GROUPS + grp
    if not PRECOMPUTED:
        reps = tl.load(REPS + rep_row[:, None] * D + d[None, :],
                       mask=present[:, None] & (d < D)[None, :], other=0.0)  # fmt: skip
        positive = tl.where(reps > 0, reps, 0.0).to(KMAX.dtype.element_ty)
        negative = tl.where(reps < 0, reps, 0.0).to(KMAX.dtype.element_ty)

    lo, hi, n_visit = _tile_span(t, n_queries, n_keys, n_kb, window, QB, KB, CAUSAL)
    k_base = (b * kv_heads + hkv).to(tl.int64) * n_kb * D
    hs = tl.arange(0, HG)
    row_base = ((b * q_heads + h0 + hs).to(tl.int64) * n_tiles + t) * n_kb  # [HG]
    n_steps = tl.cdiv(n_visit, KEY_TILE)

    # 1. scores (scratch rows), each head's best candidate, and (adaptive) the masses, online
    best = tl.full([HG], float("-inf"), tl.float32)
    top = tl.full([HG], float("-inf"), tl.float32)
    fixed_mass = tl.zeros([HG], tl.float32)
    total_mass = tl.zeros([HG], tl.float32)
    n_cand = 0
    for c in range(0, n_steps):
        js = c * KEY_TILE + tl.arange(0, KEY_TILE)
        ok = js < n_visit
        if PRECOMPUTED:
            score = tl.load(SCORES + row_base[:, None] + js[None, :], mask=ok[None, :],
                            other=float("-inf"))  # fmt: skip
        else:
            kmask = ok[:, None] & (d < D)[None, :]
            offs = k_base + js[:, None].to(tl.int64) * D + d[None, :]
            kmax = tl.load(KMAX + offs, mask=kmask, other=0.0)
            kmin = tl.load(KMIN + offs, mask=kmask, other=0.0)
            bound = tl.dot(positive, tl.trans(kmax), input_precision=PRECISION)
            bound = tl.dot(negative, tl.trans(kmin), bound, input_precision=PRECISION)
            bound = tl.where(present[:, None], bound, float("-inf"))
            score = tl.max(tl.reshape(bound, (HG, RP, KEY_TILE)), axis=1)  # [HG, KEY_TILE]
            tl.store(SCORES + row_base[:, None] + js[None, :], score, mask=ok[None, :])
        local, sink, cand, _p, size = _block_kinds(js, n_keys, lo, hi, first_row, n_sinks, KB,
                                                  CAUSAL)  # fmt: skip
        cand = cand & ok
        best = tl.maximum(best, tl.max(tl.where(cand[None, :], score, float("-inf")), axis=1))
        n_cand += tl.sum(cand.to(tl.int32), axis=0)
        if ADAPTIVE:
            allowed = ((local | sink | cand) & ok)[None, :]
            new_top = tl.maximum(top, tl.max(tl.where(allowed, score, float("-inf")), axis=1))
            rescale = tl.exp(top - new_top)
            mass = tl.where(allowed, size.to(tl.float32)[None, :] *
                            tl.exp(score - new_top[:, None]), 0.0)  # fmt: skip
            fixed = ((local | sink) & ok)[None, :]
            fixed_mass = fixed_mass * rescale + tl.sum(tl.where(fixed, mass, 0.0), axis=1)
            total_mass = total_mass * rescale + tl.sum(mass, axis=1)
            top = new_top
    best2 = tl.where(n_cand > 0, best, 0.0)[:, None]
    if CAUSAL:  # the prompt's end: generation reads its rows first
        is_last = t == n_tiles - 1
        topk = tl.where(is_last, tl.maximum(topk, last_blocks), topk)
        min_blocks = tl.where(is_last, tl.maximum(min_blocks, last_blocks), min_blocks)

    # 2. the budget per head, then by bisection the bucket where the cut falls
    budget = tl.full([HG], 0, tl.int32) + tl.minimum(topk, n_cand)
    if ADAPTIVE:
        target = mass_share * total_mass
        lo_b = tl.zeros([HG], tl.int32)
        hi_b = tl.full([HG], NB, tl.int32)  # NB: not reached within the buckets
        for _it in range(LOG_NB + 1):
            mid = (lo_b + hi_b) // 2
            got = fixed_mass
            for c in range(0, n_steps):
                js = c * KEY_TILE + tl.arange(0, KEY_TILE)
                ok = js < n_visit
                score = tl.load(SCORES + row_base[:, None] + js[None, :], mask=ok[None, :],
                                other=float("-inf"))  # fmt: skip
                _l, _s, cand, _p, size = _block_kinds(js, n_keys, lo, hi, first_row, n_sinks, KB,
                                                   CAUSAL)  # fmt: skip
                inside = (cand & ok)[None, :] & (_buckets(score, best2, WIDTH, NB) <= mid[:, None])
                mass = size.to(tl.float32)[None, :] * tl.exp(score - top[:, None])
                got += tl.sum(tl.where(inside, mass, 0.0), axis=1)
            reached = (got >= target) & (lo_b < hi_b)
            hi_b = tl.where(reached, mid, hi_b)
            lo_b = tl.where(reached | (lo_b >= hi_b), lo_b, mid + 1)
        need = tl.zeros([HG], tl.int32)
        for c in range(0, n_steps):
            js = c * KEY_TILE + tl.arange(0, KEY_TILE)
            ok = js < n_visit
            score = tl.load(SCORES + row_base[:, None] + js[None, :], mask=ok[None, :],
                            other=float("-inf"))  # fmt: skip
            _l, _s, cand, _p, _z = _block_kinds(js, n_keys, lo, hi, first_row, n_sinks, KB, CAUSAL)
            inside = (cand & ok)[None, :] & (_buckets(score, best2, WIDTH, NB) <= hi_b[:, None])
            need += tl.sum(inside.to(tl.int32), axis=1)
        need = tl.where(fixed_mass >= target, 0, need)
        budget = tl.minimum(tl.minimum(tl.maximum(need, min_blocks), topk), n_cand)
    # smallest bucket b with count(bucket <= b) >= budget
    lo_b = tl.zeros([HG], tl.int32)
    hi_b = tl.full([HG], NB - 1, tl.int32)
    for _it in range(LOG_NB):
        mid = (lo_b + hi_b) // 2
        count = tl.zeros([HG], tl.int32)
        for c in range(0, n_steps):
            js = c * KEY_TILE + tl.arange(0, KEY_TILE)
            ok = js < n_visit
            score = tl.load(SCORES + row_base[:, None] + js[None, :], mask=ok[None, :],
                            other=float("-inf"))  # fmt: skip
            _l, _s, cand, _p, _z = _block_kinds(js, n_keys, lo, hi, first_row, n_sinks, KB, CAUSAL)
            inside = (cand & ok)[None, :] & (_buckets(score, best2, WIDTH, NB) <= mid[:, None])
            count += tl.sum(inside.to(tl.int32), axis=1)
        enough = count >= budget
        hi_b = tl.where(enough, mid, hi_b)
        lo_b = tl.where(enough, lo_b, mid + 1)
    cut = lo_b
    above = tl.zeros([HG], tl.int32)
    in_cut_total = tl.zeros([HG], tl.int32)
    for c in range(0, n_steps):
        js = c * KEY_TILE + tl.arange(0, KEY_TILE)
        ok = js < n_visit
        score = tl.load(SCORES + row_base[:, None] + js[None, :], mask=ok[None, :],
                        other=float("-inf"))  # fmt: skip
        _l, _s, cand, _p, _z = _block_kinds(js, n_keys, lo, hi, first_row, n_sinks, KB, CAUSAL)
        bucket = _buckets(score, best2, WIDTH, NB)
        above += tl.sum(((cand & ok)[None, :] & (bucket < cut[:, None])).to(tl.int32), axis=1)
        in_cut_total += tl.sum(((cand & ok)[None, :] & (bucket == cut[:, None])).to(tl.int32),
                               axis=1)  # fmt: skip
    need_in_cut = budget - above
    # which blocks of the cut bucket: the need_in_cut nearest the local span (``tie_order``).
    # Causal: the latest ones, counted from the end; else by bisection on the tie order
    tie_cut = tl.full([HG], 0, tl.int32)
    if not CAUSAL:
        lo_t = tl.zeros([HG], tl.int32)
        hi_t = tl.full([HG], 2 * n_kb - 1, tl.int32)
        for _it in range(tie_steps):
            mid = (lo_t + hi_t) // 2
            count = tl.zeros([HG], tl.int32)
            for c in range(0, n_steps):
                js = c * KEY_TILE + tl.arange(0, KEY_TILE)
                ok = js < n_visit
                score = tl.load(SCORES + row_base[:, None] + js[None, :], mask=ok[None, :],
                                other=float("-inf"))  # fmt: skip
                _l, _s, cand, _p, _z = _block_kinds(js, n_keys, lo, hi, first_row, n_sinks, KB,
                                                   CAUSAL)  # fmt: skip
                in_cut = (cand & ok)[None, :] & (_buckets(score, best2, WIDTH, NB) == cut[:, None])
                near = _tie_order(js, lo, hi, KB)[None, :] <= mid[:, None]
                count += tl.sum((in_cut & near).to(tl.int32), axis=1)
            enough = count >= need_in_cut
            hi_t = tl.where(enough, mid, hi_t)
            lo_t = tl.where(enough, lo_t, mid + 1)
        tie_cut = lo_t

    # 3. the block lists, ascending: full (sinks, selected, past window) and partial (diagonal)
    list_row = (b * q_heads + h0 + hs).to(tl.int64) * n_tiles + t  # [HG]
    full_base = FULL_IDX + list_row * list_width
    part_base = PART_IDX + list_row * list_width
    copy_of = copy_base + (t % tl.maximum(copies, 1)) * sink_blocks
    n_full = tl.zeros([HG], tl.int32)
    n_part = 0
    seen_in_cut = tl.zeros([HG], tl.int32)
    for c in range(0, n_steps):
        js = c * KEY_TILE + tl.arange(0, KEY_TILE)
        ok = js < n_visit
        score = tl.load(SCORES + row_base[:, None] + js[None, :], mask=ok[None, :],
                        other=float("-inf"))  # fmt: skip
        local, sink, cand, past, _z = _block_kinds(js, n_keys, lo, hi, first_row, n_sinks, KB,
                                                  CAUSAL)  # fmt: skip
        bucket = _buckets(score, best2, WIDTH, NB)
        cand2 = (cand & ok)[None, :]
        in_cut = cand2 & (bucket == cut[:, None])
        rank_in_cut = seen_in_cut[:, None] + tl.cumsum(in_cut.to(tl.int32), axis=1)
        if CAUSAL:
            taken = in_cut_total[:, None] - rank_in_cut < need_in_cut[:, None]
        else:
            near = _tie_order(js, lo, hi, KB)[None, :] <= tie_cut[:, None]
            taken = near & (need_in_cut > 0)[:, None]
        chosen = cand2 & ((bucket < cut[:, None]) | (in_cut & taken))
        seen_in_cut += tl.sum(in_cut.to(tl.int32), axis=1)
        local = local & ok
        fixed_full = (((sink & ok) & ~local) | (local & past))[None, :]
        full = chosen
        if LISTS:
            full = full | fixed_full
        at = n_full[:, None] + tl.cumsum(full.to(tl.int32), axis=1) - 1
        ids = tl.where((copies > 0) & (js < sink_blocks), copy_of + js, js)
        tl.store(full_base[:, None] + at, ids[None, :] + tl.zeros([HG, KEY_TILE], tl.int32),
                 mask=full)  # fmt: skip
        n_full += tl.sum(full.to(tl.int32), axis=1)
        if LISTS:
            partial = local & ~past  # the same for every head
            at_p = n_part + tl.cumsum(partial.to(tl.int32), axis=0) - 1
            tl.store(part_base[:, None] + at_p[None, :], js[None, :] + tl.zeros([HG, KEY_TILE],
                     tl.int32), mask=partial[None, :] & (hs >= 0)[:, None])  # fmt: skip
            n_part += tl.sum(partial.to(tl.int32), axis=0)
    tl.store(FULL_NUM + list_row, n_full)
    if LISTS:
        tl.store(PART_NUM + list_row, tl.zeros([HG], tl.int32) + n_part)


def _program_rows(group: int, groups: int) -> tuple[int, int]:
    """(query heads of one KV head scored together, row slots per head): the heads a power of
    two dividing the group, their row groups filling 16-128 rows of one tensor-core dot."""
    slots = next_pow2(groups)
    heads = 1
    while group % (2 * heads) == 0 and 2 * heads * slots <= 128:
        heads *= 2
    return heads, max(slots, _GROUPS_PAD // heads)


def sink_blocks(cfg: HyperConfig, n_keys: int) -> int:
    """How many key blocks meet the sinks ``[0, sinks)``."""
    return cdiv(min(cfg.sinks, n_keys), cfg.select_block)


def select_block_lists(q: torch.Tensor, k: torch.Tensor, scale: float, cfg: HyperConfig,
                       causal: bool, sink_copies: int = 0,
                       out: tuple | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """FlexAttention block lists of ``method="select"`` for q [B, Hq, Nq, D], k [B, Hkv, Nk, D]:
    (partial count [B, Hq, n_tiles], partial ids [B, Hq, n_tiles, width], full count, full
    ids), int32, each list ascending; ids past a count are unset. ``sink_copies`` = R > 0: the
    keys are read as ``cdiv(Nk, select_block)`` blocks followed by R copies of the
    ``sink_blocks`` (which must be whole blocks); tile t reads copy ``t % R`` of each sink
    block it reads in full, listed first (``width`` = blocks + R * sink blocks). ``out``: four
    contiguous int32 tensors to write into (the counts' shapes, ids of at least ``width``
    entries per list, filled from their first entries: ``flex.plan_lists``)."""
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    batch, q_heads, nq, dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    qb, kb, groups = cfg.query_block, cfg.select_block, cfg.query_groups
    n_tiles, n_kb = cdiv(nq, qb), cdiv(nk, kb)
    group = q_heads // kv_heads
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    dev = q.device
    window = min(cfg.window, nq + nk + qb)  # covers everything already; keeps s + window in int32
    scores = torch.empty(batch, q_heads, n_tiles, n_kb, dtype=torch.float32, device=dev)
    precomputed = cfg.select_score == "rows"
    if precomputed:
        _rank_by_rows(q, k, scores, scale, cfg, causal, window, precision)
        reps = kmax = kmin = scores  # not read
    else:
        kmax, kmin = key_block_extremes(k, kb)
        reps = torch.empty(batch, q_heads, n_tiles, groups, dim, dtype=k.dtype, device=dev)
        groups_pad = max(_GROUPS_PAD, next_pow2(groups))
        _reps_kernel[(n_tiles, batch * q_heads)](
            q, reps, float(scale), *q.stride()[:3], q_heads, nq, n_tiles,
            D=dim, BLOCK_D=next_pow2(dim), QB=qb, GROUPS=groups, GROUPS_PAD=groups_pad,
            PRECISION=precision, num_warps=8 if qb * dim > 8192 else 4,
        )  # fmt: skip
    hg, rp = _program_rows(group, groups)
    # lists in the full block width, as FlexAttention's lowerings and its transposition (for
    # the backward) read them; only the counts' entries are written
    n_sink = sink_blocks(cfg, nk) if sink_copies > 0 else 0
    if n_sink * kb > nk:
        raise ValueError(f"sink copies need whole sink blocks: {cfg.sinks} sinks, {nk} keys")
    width = n_kb + sink_copies * n_sink
    counts, ids = (batch, q_heads, n_tiles), (batch, q_heads, n_tiles, width)
    if out is None:
        full_num = torch.empty(counts, dtype=torch.int32, device=dev)
        full_idx = torch.empty(ids, dtype=torch.int32, device=dev)
        part_num, part_idx = torch.empty_like(full_num), torch.empty_like(full_idx)
    else:
        part_num, part_idx, full_num, full_idx = out
        if tuple(part_num.shape) != counts or part_idx.numel() < part_num.numel() * width:
            raise ValueError(f"out: counts {counts} and ids of >= {width} per list expected")
        part_idx, full_idx = (t.view(-1)[: part_num.numel() * width].view(ids)
                              for t in (part_idx, full_idx))  # fmt: skip
    _select_kernel[(n_tiles, batch * kv_heads * (group // hg))](
        reps, kmax, kmin, scores, full_num, full_idx, part_num, part_idx,
        float(cfg.select_mass),
        q_heads, kv_heads, nq, nk, n_kb, n_tiles, window, cfg.sinks, cfg.select_topk,
        cfg.select_min, cfg.select_last, (2 * n_kb).bit_length(), width, n_kb, sink_copies, n_sink,
        GROUP=group, HG=hg, D=dim, BLOCK_D=next_pow2(dim), QB=qb, KB=kb, GROUPS=groups, RP=rp,
        KEY_TILE=_KEY_TILE, NB=N_BUCKETS, LOG_NB=N_BUCKETS.bit_length() - 1, WIDTH=BUCKET_WIDTH,
        CAUSAL=causal, ADAPTIVE=cfg.select_mass > 0, PRECISION=precision,
        PRECOMPUTED=precomputed, LISTS=True, num_warps=4,
    )  # fmt: skip
    return part_num, part_idx, full_num, full_idx


def _rank_by_rows(q, k, scores, scale, cfg: HyperConfig, causal: bool, window: int,
                  precision: str) -> None:  # fmt: skip
    """``select_score="rows"``: the scores the selection ranks, into ``scores`` (filled with
    -inf first where coarse tiles leave blocks unranked: ``select_coarse``)."""
    if not coarse_prunes(q.shape[-2], k.shape[-2], cfg, causal):
        _row_scores(q, k, scores, scale, cfg, causal, window, precision)
        return
    candidates = _coarse_candidates(q, k, scale, cfg, causal, precision)
    scores.fill_(float("-inf"))
    _row_scores(q, k, scores, scale, cfg, causal, window, precision, candidates=candidates)


def _coarse_geometry(cfg: HyperConfig, nq: int, nk: int) -> tuple[int, int]:
    """(query tile, window) of the coarse tiles: ``reference.select.tile_geometry``'s."""
    qb = cfg.select_coarse * cfg.query_block
    return qb, min(cfg.window + qb - cfg.query_block, nq + nk + qb)


def coarse_prunes(nq: int, nk: int, cfg: HyperConfig, causal: bool) -> bool:
    """Whether coarse tiles (``select_coarse``) can change what a tile ranks: a coarse tile
    that ranks by candidates has more candidate blocks than it keeps. Where none does, every
    tile ranking every block gives the same scores, at less cost."""
    if cfg.select_coarse == 1 or cfg.select_score != "rows":
        return False
    kb = cfg.select_block
    n_kb, keep = cdiv(nk, kb), cfg.select_candidates * cfg.select_topk
    sink_blk = cdiv(min(cfg.sinks, nk), kb)
    if not causal:  # at most every block but the sinks
        return n_kb - sink_blk > keep
    qb, window = _coarse_geometry(cfg, nq, nk)
    n_coarse = cdiv(nq, qb)
    if n_coarse < 2:  # the last coarse tile ranks every block
        return False
    lo_block = max((n_coarse - 2) * qb + qb - window, 0) // kb  # the latest with candidates
    return lo_block - min(sink_blk, lo_block) > keep


def _coarse_candidates(q, k, scale, cfg: HyperConfig, causal: bool, precision: str):
    """(counts [B, Hq, n_coarse] int32, ascending ids [B, Hq, n_coarse, width], width): the
    blocks each coarse tile keeps (``reference.select.coarse_candidates``): its row scores,
    then the selection kernel's ranking with ``select_candidates * select_topk`` blocks."""
    batch, q_heads, nq, dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    kb, group = cfg.select_block, q_heads // kv_heads
    qb, window = _coarse_geometry(cfg, nq, nk)
    n_coarse, n_kb = cdiv(nq, qb), cdiv(nk, kb)
    width = min(cfg.select_candidates * cfg.select_topk, n_kb)
    scores = torch.empty(batch, q_heads, n_coarse, n_kb, dtype=torch.float32, device=q.device)
    _row_scores(q, k, scores, scale, cfg, causal, window, precision, query_block=qb)
    counts = torch.empty(batch, q_heads, n_coarse, dtype=torch.int32, device=q.device)
    ids = torch.empty(batch, q_heads, n_coarse, width, dtype=torch.int32, device=q.device)
    hg, rp = _program_rows(group, cfg.query_groups)
    _select_kernel[(n_coarse, batch * kv_heads * (group // hg))](
        scores, scores, scores, scores, counts, ids, counts, ids, 0.0,
        q_heads, kv_heads, nq, nk, n_kb, n_coarse, window, cfg.sinks, width, 0, 0,
        (2 * n_kb).bit_length(), width, n_kb, 0, 0,
        GROUP=group, HG=hg, D=dim, BLOCK_D=next_pow2(dim), QB=qb, KB=kb,
        GROUPS=cfg.query_groups, RP=rp, KEY_TILE=_KEY_TILE, NB=N_BUCKETS,
        LOG_NB=N_BUCKETS.bit_length() - 1, WIDTH=BUCKET_WIDTH, CAUSAL=causal, ADAPTIVE=False,
        PRECISION=precision, PRECOMPUTED=True, LISTS=False, num_warps=4,
    )  # fmt: skip
    return counts, ids, width


def _row_scores(q, k, scores, scale, cfg: HyperConfig, causal: bool, window: int,
                precision: str, target: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, *, query_block: int | None = None,
                candidates: tuple | None = None) -> None:  # fmt: skip
    """``select_score="rows"``: each tile's block scores into ``scores`` [B, Hq, n_tiles,
    n_blocks] (the blocks a causal tile cannot see are left unset, as the bounds leave them).
    ``query_block``: tiles of another height (coarse tiles); ``candidates``: a coarse tile's
    (``_coarse_candidates``), the only far blocks its tiles score. ``target`` (rows per
    program), ``num_warps`` and ``num_stages``: launch overrides for
    ``tools/profile_row_scores.py``."""
    batch, q_heads, nq, dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    qb, kb, rows = query_block or cfg.query_block, cfg.select_block, cfg.select_rows
    group, n_tiles = q_heads // kv_heads, cdiv(nq, qb)
    rows_pad = next_pow2(rows)
    coarse = 1 if candidates is None else cfg.select_coarse
    heads = 1  # query heads of one KV head per program: a power of two, up to 64 rows
    while coarse == 1 and group % (2 * heads) == 0 and 2 * heads * rows_pad <= 64:
        heads *= 2  # (coarse tiles keep their candidates per head)
    # rows per program (each key load serves them all), warps and stages: the fastest of 3 x 2
    # x 3 on an H200 at 32k-128k (tools/profile_row_scores.py, docs/performance.md)
    if target is None:
        target = 128 if 64 < dim <= 128 else 64
    if num_stages is None:
        num_stages = 3 if dim <= 64 else 2
    tiles = 1  # a program's tiles lie in one coarse tile
    while (2 * tiles * heads * rows_pad <= target and tiles < next_pow2(n_tiles)
           and (coarse == 1 or coarse % (2 * tiles) == 0)):  # fmt: skip
        tiles *= 2
    heads_pad = max(heads, next_pow2(cdiv(16, tiles * rows_pad)))  # a dot's smallest height
    cand_num, cand_idx, width = (scores, scores, 0) if candidates is None else candidates
    grid = (cdiv(n_tiles, tiles), batch * kv_heads * (group // heads))
    _row_scores_kernel[grid if coarse == 1 else grid[::-1]](
        q, k, scores, cand_num, cand_idx, float(scale), *q.stride()[:3], *k.stride()[:3],
        q_heads, kv_heads, nq, nk, cdiv(nk, kb), n_tiles, window, cfg.sinks, width,
        GROUP=group, HG=heads, HGP=heads_pad, TG=tiles, S=rows, SP=rows_pad, D=dim,
        BLOCK_D=next_pow2(dim), QB=qb, KB=kb, KC=min(kb & -kb, 128), CAUSAL=causal,
        PRECISION=precision, COARSE=coarse,
        num_warps=num_warps or 4,
        num_stages=num_stages,
    )  # fmt: skip
