"""The approximated parts (sortLSH block + weighted uniform samples) of one level, fused.

One program takes a tile of *sorted* queries of one sub-problem, gathers them and their key block
by index (no permuted copies of Q/K/V), reads the sub-problem's sampled keys from compact copies
(``_gather_samples_kernel``: m rows per sub-problem and KV head, gathered once per level since
every tile reads the same ones), and runs one online softmax over all of them: the sampled
scores carry ``+log(nk/m)``, which is exactly the reference's log-sum-exp merge of the two parts.
Samples whose key lies in the query's own block are skipped (the exclusion is a block-id
comparison, no bias tensor). With ``ONLY_PAST`` (flat causal) every key after the query is masked
and, without a pattern, the query's own key (the window of one that the reference adds) seeds
the softmax (``SEED_SELF``). With ``PATTERN`` the keys of the window and the sinks
(``kernels/pattern.py`` computes them) are skipped by position.

The backward is split by who owns the gradient, so nothing but the samples needs atomics:
``_approx_dq_kernel`` (one program per query tile), ``_approx_dkdv_block_kernel`` (one program per
key tile of a sortLSH block, looping over the query tiles of its block and the GQA group) and
``_approx_dkdv_sample_kernel`` (one program per chunk of samples and split of the queries,
adding into fp32 dK/dV). All use the final, merged log-sum-exp, so they give the true gradients of
the merged output.

Softmax runs in base 2 (``exp2`` with ``scale * log2(e)`` folded in); lse is stored in natural log.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hyperpass.kernels.common import (
    FLOOR,
    LOG2E_C,
    _exact_elsewhere,
    _load_rows,
    _load_vec,
    _softmax_step,
    _store_out_lse,
)


@triton.jit
def _sub_params(SUBS, s):
    q_off = tl.load(SUBS + s * 8 + 0)
    nq = tl.load(SUBS + s * 8 + 1)
    k_off = tl.load(SUBS + s * 8 + 2)
    nk = tl.load(SUBS + s * 8 + 3)
    qpb = tl.load(SUBS + s * 8 + 4)
    q_blocks = tl.load(SUBS + s * 8 + 5)
    k_blocks = tl.load(SUBS + s * 8 + 6)
    return q_off, nq, k_off, nk, qpb, q_blocks, k_blocks


@triton.jit
def _sample_keys(SAMPLES, KINV, s, b, hkv, batch, kv_heads, n_keys, n_samples, k_off, bsize, sc):
    """Global positions and sortLSH block ids of samples ``sc`` of sub-problem ``s``."""
    s_ok = sc < n_samples
    base = ((s * batch + b) * kv_heads + hkv).to(tl.int64) * n_samples
    idx = tl.load(SAMPLES + base + sc, mask=s_ok, other=0)
    kpos = k_off + idx
    inv = tl.load(KINV + (b * kv_heads + hkv).to(tl.int64) * n_keys + kpos, mask=s_ok, other=0)
    return kpos, (inv - k_off) // bsize, s_ok


@triton.jit
def _gather_samples_kernel(
    K, V, KINV, SAMPLES, SUBS, KS, VS, SBLK,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    batch, kv_heads, n_keys, n_samples, bsize,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Compact copies of one level's sampled keys. Row ``r = (s * B + b) * Hkv + hkv`` of
    KS/VS [r, m, D] holds the K/V rows of the samples of sub-problem ``s`` (as ``SAMPLES``), and
    SBLK [r, m] their sortLSH block ids. Every query tile of a head reads the same samples:
    gathered once here, the tiles' loads are contiguous and wait on no index load."""
    row = tl.program_id(1)
    hkv = row % kv_heads
    b = (row // kv_heads) % batch
    s = row // (kv_heads * batch)
    k_off = tl.load(SUBS + s * 8 + 2)
    sc = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kpos, blocks, ok = _sample_keys(
        SAMPLES, KINV, s, b, hkv, batch, kv_heads, n_keys, n_samples, k_off, bsize, sc
    )
    at = row.to(tl.int64) * n_samples + sc
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    k = _load_rows(k_base, kpos, stride_kn, d, D, ok)
    v = _load_rows(v_base, kpos, stride_vn, dv, DV, ok)
    tl.store(KS + at[:, None] * D + d[None, :], k, mask=ok[:, None] & (d < D)[None, :])
    tl.store(VS + at[:, None] * DV + dv[None, :], v, mask=ok[:, None] & (dv < DV)[None, :])
    tl.store(SBLK + at, blocks, mask=ok)


@triton.jit
def _sample_tile(
    KS, VS, SBLK, SAMPLES, row, n_samples, k_off, sc, d, dv,
    D: tl.constexpr, DV: tl.constexpr, ONLY_PAST: tl.constexpr, PATTERN: tl.constexpr,
    EVEN: tl.constexpr,
):  # fmt: skip
    """Samples ``sc`` of row ``row`` of the compact copies (``_gather_samples_kernel``):
    (K rows, V rows, block ids, key positions (only where a mask needs them), valid)."""
    s_ok = sc < n_samples
    at = row * n_samples + sc
    k = _load_rows(KS, at, D, d, D, s_ok, EVEN)
    v = _load_rows(VS, at, DV, dv, DV, s_ok, EVEN)
    sblk = _load_vec(SBLK + at, s_ok, EVEN)
    kpos = sc
    if ONLY_PAST or PATTERN:
        kpos = k_off + tl.load(SAMPLES + at, mask=s_ok, other=0)
    return k, v, sblk, kpos, s_ok


@triton.jit
def _past_and_not_exact(
    qpos, kpos, window, dilation, sinks,
    ONLY_PAST: tl.constexpr, PATTERN: tl.constexpr, CAUSAL_WINDOW: tl.constexpr,
):  # fmt: skip
    """[M, N] bool: the key may count here (flat causal: strictly past; not a pattern/sink key)."""
    keep = qpos[:, None] >= 0  # all true
    if ONLY_PAST:
        keep = keep & (kpos[None, :] < qpos[:, None])
    if PATTERN:
        keep = keep & ~_exact_elsewhere(qpos, kpos, window, dilation, sinks, CAUSAL_WINDOW)
    return keep


@triton.jit
def _approx_fwd_kernel(
    Q, K, V, OUT, LSE,
    QORD, KORD, SAMPLES, KS, VS, SBLK, SUBS, TILES,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    batch, q_heads, kv_heads, n_queries, n_keys, n_samples, bsize,
    window, dilation, sinks,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MERGE: tl.constexpr, ONLY_PAST: tl.constexpr, PRECISION: tl.constexpr,
    PATTERN: tl.constexpr, CAUSAL_WINDOW: tl.constexpr, SEED_SELF: tl.constexpr,
    EVEN: tl.constexpr, SPLIT: tl.constexpr, STORE_LSE: tl.constexpr,
):  # fmt: skip
    """``EVEN`` (``Level.even`` and head dims that are powers of two): no tile has a row, key
    or sample past its end, so the loads, the store and the scores need no masks. ``SPLIT``
    programs share one tile of ``TILES`` (its rows are SPLIT x BLOCK_M). Without
    ``STORE_LSE`` only the output is written."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // GROUP
    tile = pid_t // SPLIT
    s = tl.load(TILES + tile * 3)
    j = tl.load(TILES + tile * 3 + 1)
    t = tl.load(TILES + tile * 3 + 2) * SPLIT + pid_t % SPLIT
    q_off, nq, k_off, nk, qpb, q_blocks, k_blocks = _sub_params(SUBS, s)
    kb = tl.minimum(j, k_blocks - 1)

    rows = j * qpb + t * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows < (j + 1) * qpb) & (rows < nq)
    qpos = _load_vec(QORD + pid_bh.to(tl.int64) * n_queries + q_off + rows, row_ok, EVEN)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    o_base = OUT + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
    lse_base = LSE + pid_bh.to(tl.int64) * n_queries
    q = _load_rows(q_base, qpos, stride_qn, d, D, row_ok, EVEN)

    if MERGE:  # continue from the parts already merged into OUT / LSE
        prev = tl.load(lse_base + qpos, mask=row_ok, other=float("-inf"))
        has = prev > float("-inf")
        m_i = tl.where(has, prev * LOG2E_C, FLOOR)
        l_i = tl.where(has, 1.0, 0.0)
        acc = _load_rows(o_base, qpos, stride_on, dv, DV, row_ok & has).to(tl.float32)
    elif SEED_SELF:  # the query's own key: the reference's window of one
        k_self = _load_rows(k_base, qpos, stride_kn, d, D, row_ok, EVEN)
        m_i = tl.sum(q.to(tl.float32) * k_self.to(tl.float32), axis=1) * qk_scale
        l_i = tl.where(row_ok, 1.0, 0.0)
        acc = _load_rows(v_base, qpos, stride_vn, dv, DV, row_ok, EVEN).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], FLOOR, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # the sortLSH block: sorted keys [kb * bsize, (kb + 1) * bsize) of the sub-problem
    kord_base = KORD + (b * kv_heads + hkv).to(tl.int64) * n_keys + k_off
    for n0 in range(0, bsize, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        cols = kb * bsize + offs
        col_ok = (offs < bsize) & (cols < nk)
        kpos = _load_vec(kord_base + cols, col_ok, EVEN)
        k = _load_rows(k_base, kpos, stride_kn, d, D, col_ok, EVEN)
        v = _load_rows(v_base, kpos, stride_vn, dv, DV, col_ok, EVEN)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if ONLY_PAST or PATTERN:
            keep = col_ok[None, :] & _past_and_not_exact(
                qpos, kpos, window, dilation, sinks, ONLY_PAST, PATTERN, CAUSAL_WINDOW
            )
            scores = tl.where(keep, scores, float("-inf"))
        elif not EVEN:  # rows past the tile hold zeros: finite, and never stored
            scores = tl.where(col_ok[None, :], scores, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, PRECISION)

    # the uniform samples, weight nk/m, minus the keys of the query's own block
    log2_weight = tl.log2(nk.to(tl.float32) / tl.maximum(n_samples, 1))
    sample_row = ((s * batch + b) * kv_heads + hkv).to(tl.int64)
    for s0 in range(0, n_samples, BLOCK_N):
        sc = s0 + tl.arange(0, BLOCK_N)
        k, v, sblk, kpos, s_ok = _sample_tile(
            KS, VS, SBLK, SAMPLES, sample_row, n_samples, k_off, sc, d, dv,
            D, DV, ONLY_PAST, PATTERN, EVEN,
        )  # fmt: skip
        if EVEN:
            keep = (sblk != kb)[None, :]
        else:
            keep = (s_ok & (sblk != kb))[None, :]
        if ONLY_PAST or PATTERN:
            keep = keep & _past_and_not_exact(
                qpos, kpos, window, dilation, sinks, ONLY_PAST, PATTERN, CAUSAL_WINDOW
            )
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + log2_weight
        scores = tl.where(keep, scores, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, PRECISION)

    _store_out_lse(o_base, lse_base, qpos, row_ok, stride_on, dv, DV, acc, l_i, m_i, EVEN,
                   STORE_LSE)  # fmt: skip


@triton.jit
def _approx_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    QORD, KORD, SAMPLES, KS, VS, SBLK, SUBS, TILES,
    sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    batch, q_heads, kv_heads, n_queries, n_keys, n_samples, bsize,
    window, dilation, sinks,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACCUMULATE: tl.constexpr, ONLY_PAST: tl.constexpr, PRECISION: tl.constexpr,
    PATTERN: tl.constexpr, CAUSAL_WINDOW: tl.constexpr, SEED_SELF: tl.constexpr,
    EVEN: tl.constexpr,
):  # fmt: skip
    """dQ of one tile of sorted queries. DO is read with the ``stride_o*`` strides; DQ is
    contiguous [B, Hq, N, D], fp32 when ACCUMULATE (other launches add to it), else any dtype.
    ``EVEN`` as in the forward."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // GROUP
    s = tl.load(TILES + pid_t * 3)
    j = tl.load(TILES + pid_t * 3 + 1)
    t = tl.load(TILES + pid_t * 3 + 2)
    q_off, nq, k_off, nk, qpb, q_blocks, k_blocks = _sub_params(SUBS, s)
    kb = tl.minimum(j, k_blocks - 1)

    rows = j * qpb + t * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows < (j + 1) * qpb) & (rows < nq)
    qpos = tl.load(QORD + pid_bh.to(tl.int64) * n_queries + q_off + rows, mask=row_ok, other=0)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    do_base = DO + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
    row_base = pid_bh.to(tl.int64) * n_queries
    q = _load_rows(q_base, qpos, stride_qn, d, D, row_ok, EVEN)
    do = _load_rows(do_base, qpos, stride_on, dv, DV, row_ok, EVEN)
    lse2 = tl.load(LSE + row_base + qpos, mask=row_ok, other=0.0) * LOG2E_C
    lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
    delta = tl.load(DELTA + row_base + qpos, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if SEED_SELF:  # the query's own key
        k_self = _load_rows(k_base, qpos, stride_kn, d, D, row_ok).to(tl.float32)
        v_self = _load_rows(v_base, qpos, stride_vn, dv, DV, row_ok).to(tl.float32)
        p_self = tl.exp2(tl.sum(q.to(tl.float32) * k_self, axis=1) * qk_scale - lse2)
        p_self = tl.where(row_ok, p_self, 0.0)
        ds_self = p_self * (tl.sum(do.to(tl.float32) * v_self, axis=1) - delta)
        dq += ds_self[:, None] * k_self

    kord_base = KORD + (b * kv_heads + hkv).to(tl.int64) * n_keys + k_off
    for n0 in range(0, bsize, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        cols = kb * bsize + offs
        col_ok = (offs < bsize) & (cols < nk)
        kpos = tl.load(kord_base + cols, mask=col_ok, other=0)
        k = _load_rows(k_base, kpos, stride_kn, d, D, col_ok, EVEN)
        v = _load_rows(v_base, kpos, stride_vn, dv, DV, col_ok, EVEN)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(scores - lse2[:, None])
        if ONLY_PAST or PATTERN:
            keep = row_ok[:, None] & col_ok[None, :]
            keep = keep & _past_and_not_exact(
                qpos, kpos, window, dilation, sinks, ONLY_PAST, PATTERN, CAUSAL_WINDOW
            )
            p = tl.where(keep, p, 0.0)
        elif not EVEN:
            p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    log2_weight = tl.log2(nk.to(tl.float32) / tl.maximum(n_samples, 1))
    sample_row = ((s * batch + b) * kv_heads + hkv).to(tl.int64)
    for s0 in range(0, n_samples, BLOCK_N):
        sc = s0 + tl.arange(0, BLOCK_N)
        k, v, sblk, kpos, s_ok = _sample_tile(
            KS, VS, SBLK, SAMPLES, sample_row, n_samples, k_off, sc, d, dv,
            D, DV, ONLY_PAST, PATTERN, EVEN,
        )  # fmt: skip
        keep = row_ok[:, None] & (s_ok & (sblk != kb))[None, :]
        if ONLY_PAST or PATTERN:
            keep = keep & _past_and_not_exact(
                qpos, kpos, window, dilation, sinks, ONLY_PAST, PATTERN, CAUSAL_WINDOW
            )
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + log2_weight
        p = tl.where(keep, tl.exp2(scores - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq_ptrs = DQ + row_base * D + qpos[:, None].to(tl.int64) * D + d[None, :]
    mask = row_ok[:, None] & (d < D)[None, :]
    dq = dq * sm_scale
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=mask, other=0.0)
    if EVEN:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _approx_dkdv_block_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT,
    QORD, KORD, SUBS, TILES,
    sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_heads, kv_heads, n_queries, n_keys, bsize,
    window, dilation, sinks,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACCUMULATE: tl.constexpr, ONLY_PAST: tl.constexpr, PRECISION: tl.constexpr,
    PATTERN: tl.constexpr, CAUSAL_WINDOW: tl.constexpr, SEED_SELF: tl.constexpr,
):  # fmt: skip
    """dK/dV of one tile of a sortLSH key block: every query tile of its block(s), all heads of
    the GQA group. DK/DV_OUT are contiguous [B, Hkv, Nk, D], fp32 when ACCUMULATE (other
    launches add to them), else any dtype (each key row has this one writer)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    hkv = pid_bh % kv_heads
    s = tl.load(TILES + pid_t * 3)
    kb = tl.load(TILES + pid_t * 3 + 1)
    u = tl.load(TILES + pid_t * 3 + 2)
    q_off, nq, k_off, nk, qpb, q_blocks, k_blocks = _sub_params(SUBS, s)

    offs = u * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = kb * bsize + offs
    col_ok = (offs < bsize) & (cols < nk)
    kv_row = pid_bh.to(tl.int64) * n_keys
    kpos = tl.load(KORD + kv_row + k_off + cols, mask=col_ok, other=0)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    k = _load_rows(k_base, kpos, stride_kn, d, D, col_ok)
    v = _load_rows(v_base, kpos, stride_vn, dv, DV, col_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # query blocks paired with this key block: kb itself, and all the rest for the last one
    j_lo = kb
    j_hi = tl.where(kb == k_blocks - 1, q_blocks, kb + 1)
    j_hi = tl.minimum(j_hi, q_blocks)
    for g in range(GROUP):
        hq = hkv * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
        row_base = (b * q_heads + hq).to(tl.int64) * n_queries
        for j in range(j_lo, j_hi):
            row_end = tl.minimum((j + 1) * qpb, nq)
            for r0 in range(j * qpb, row_end, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < row_end
                qpos = tl.load(QORD + row_base + q_off + rows, mask=row_ok, other=0)
                q = _load_rows(q_base, qpos, stride_qn, d, D, row_ok)
                do = _load_rows(do_base, qpos, stride_on, dv, DV, row_ok)
                lse2 = tl.load(LSE + row_base + qpos, mask=row_ok, other=0.0) * LOG2E_C
                lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
                delta = tl.load(DELTA + row_base + qpos, mask=row_ok, other=0.0)
                keep = row_ok[:, None] & col_ok[None, :]
                if ONLY_PAST or PATTERN:
                    keep = keep & _past_and_not_exact(
                        qpos, kpos, window, dilation, sinks, ONLY_PAST, PATTERN, CAUSAL_WINDOW
                    )
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                p = tl.where(keep, tl.exp2(scores - lse2[:, None]), 0.0)
                dvacc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        if SEED_SELF:  # each key is also its own query's diagonal entry (the window of one)
            q_self = _load_rows(q_base, kpos, stride_qn, d, D, col_ok).to(tl.float32)
            do_self = _load_rows(do_base, kpos, stride_on, dv, DV, col_ok).to(tl.float32)
            lse2_self = tl.load(LSE + row_base + kpos, mask=col_ok, other=0.0) * LOG2E_C
            lse2_self = tl.where(lse2_self > float("-inf"), lse2_self, 0.0)
            delta_self = tl.load(DELTA + row_base + kpos, mask=col_ok, other=0.0)
            s_self = tl.sum(q_self * k.to(tl.float32), axis=1) * qk_scale
            p_self = tl.where(col_ok, tl.exp2(s_self - lse2_self), 0.0)
            dvacc += p_self[:, None] * do_self
            ds_self = p_self * (tl.sum(do_self * v.to(tl.float32), axis=1) - delta_self)
            dk += ds_self[:, None] * q_self

    dk = dk * sm_scale
    dk_ptrs = DK + kv_row * D + kpos[:, None].to(tl.int64) * D + d[None, :]
    dv_ptrs = DV_OUT + kv_row * DV + kpos[:, None].to(tl.int64) * DV + dv[None, :]
    dk_mask = col_ok[:, None] & (d < D)[None, :]
    dv_mask = col_ok[:, None] & (dv < DV)[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=dk_mask, other=0.0)
        dvacc += tl.load(dv_ptrs, mask=dv_mask, other=0.0)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptrs, dvacc.to(DV_OUT.dtype.element_ty), mask=dv_mask)


@triton.jit
def _approx_dkdv_sample_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT,
    QORD, SAMPLES, SBLK, SLOT, SUBS, TILES,
    sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    batch, q_heads, kv_heads, n_queries, n_keys, n_samples, q_split,
    window, dilation, sinks,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ONLY_PAST: tl.constexpr, PRECISION: tl.constexpr,
    PATTERN: tl.constexpr, CAUSAL_WINDOW: tl.constexpr, COMPACT: tl.constexpr,
):  # fmt: skip
    """dK/dV of a chunk of samples from one split of the sub-problem's sorted queries, added
    atomically into fp32 DK/DV_OUT (a key may be drawn several times and by several splits).
    SBLK: the samples' sortLSH block ids (``_gather_samples_kernel``).
    COMPACT: DK/DV_OUT are [S, B, Hkv, m, D] rows per distinct sampled key (``SLOT``), which
    ``_sample_merge_kernel`` adds into the real dK/dV once."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    hkv = pid_bh % kv_heads
    s = tl.load(TILES + pid_t * 3)
    c = tl.load(TILES + pid_t * 3 + 1)
    split = tl.load(TILES + pid_t * 3 + 2)
    q_off, nq, k_off, nk, qpb, q_blocks, k_blocks = _sub_params(SUBS, s)

    sc = c * BLOCK_N + tl.arange(0, BLOCK_N)
    s_ok = sc < n_samples
    at = ((s * batch + b) * kv_heads + hkv).to(tl.int64) * n_samples + sc
    kpos = k_off + tl.load(SAMPLES + at, mask=s_ok, other=0)
    sblk = tl.load(SBLK + at, mask=s_ok, other=0)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    k = _load_rows(k_base, kpos, stride_kn, d, D, s_ok)
    v = _load_rows(v_base, kpos, stride_vn, dv, DV, s_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    log2_weight = tl.log2(nk.to(tl.float32) / tl.maximum(n_samples, 1))

    r_start = split * q_split
    r_end = tl.minimum(r_start + q_split, nq)
    for g in range(GROUP):
        hq = hkv * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
        row_base = (b * q_heads + hq).to(tl.int64) * n_queries
        for r0 in range(r_start, r_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < r_end
            qblk = tl.minimum(rows // qpb, k_blocks - 1)
            qpos = tl.load(QORD + row_base + q_off + rows, mask=row_ok, other=0)
            q = _load_rows(q_base, qpos, stride_qn, d, D, row_ok)
            do = _load_rows(do_base, qpos, stride_on, dv, DV, row_ok)
            lse2 = tl.load(LSE + row_base + qpos, mask=row_ok, other=0.0) * LOG2E_C
            lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
            delta = tl.load(DELTA + row_base + qpos, mask=row_ok, other=0.0)
            keep = row_ok[:, None] & s_ok[None, :] & (qblk[:, None] != sblk[None, :])
            if ONLY_PAST or PATTERN:
                keep = keep & _past_and_not_exact(
                    qpos, kpos, window, dilation, sinks, ONLY_PAST, PATTERN, CAUSAL_WINDOW
                )
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + log2_weight
            p = tl.where(keep, tl.exp2(scores - lse2[:, None]), 0.0)
            dvacc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    if COMPACT:
        base = ((s * batch + b) * kv_heads + hkv).to(tl.int64) * n_samples
        dst = base + tl.load(SLOT + base + sc, mask=s_ok, other=0)
    else:
        dst = pid_bh.to(tl.int64) * n_keys + kpos
    dk_ptrs = DK + dst[:, None] * D + d[None, :]
    dv_ptrs = DV_OUT + dst[:, None] * DV + dv[None, :]
    tl.atomic_add(dk_ptrs, dk * sm_scale, mask=s_ok[:, None] & (d < D)[None, :])
    tl.atomic_add(dv_ptrs, dvacc, mask=s_ok[:, None] & (dv < DV)[None, :])


@triton.jit
def _sample_merge_kernel(
    DK, DV_OUT, SDK, SDV, KEYS, SUBS,
    batch, kv_heads, n_keys, n_samples,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK/dV[key] += the summed sample gradients of each distinct sampled key, in fp32, one
    rounding to DK's dtype (no two programs touch the same key: the keys are distinct)."""
    s = tl.program_id(0)
    u = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_bh = tl.program_id(2)
    b = pid_bh // kv_heads
    hkv = pid_bh % kv_heads
    k_off = tl.load(SUBS + s * 8 + 2)
    slots = ((s * batch + b) * kv_heads + hkv).to(tl.int64) * n_samples + u
    key = tl.load(KEYS + slots, mask=u < n_samples, other=-1)
    ok = key >= 0
    rows = pid_bh.to(tl.int64) * n_keys + k_off + key
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_mask = ok[:, None] & (d < D)[None, :]
    v_mask = ok[:, None] & (dv < DV)[None, :]
    k_ptrs = DK + rows[:, None] * D + d[None, :]
    v_ptrs = DV_OUT + rows[:, None] * DV + dv[None, :]
    dk = tl.load(k_ptrs, mask=k_mask, other=0.0).to(tl.float32)
    dk += tl.load(SDK + slots[:, None] * D + d[None, :], mask=k_mask, other=0.0)
    dvv = tl.load(v_ptrs, mask=v_mask, other=0.0).to(tl.float32)
    dvv += tl.load(SDV + slots[:, None] * DV + dv[None, :], mask=v_mask, other=0.0)
    tl.store(k_ptrs, dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(v_ptrs, dvv.to(DV_OUT.dtype.element_ty), mask=v_mask)
