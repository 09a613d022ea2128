"""The exact pattern parts: a (dilated) sliding window and the sink keys, forward and backward.

No mask tensor: every predicate is position arithmetic (``common.in_window``).

*Residue classes.* A query at position ``i`` only has window keys ``k`` with ``k = i (mod
dilation)``, so one program takes queries of one residue class ``rho``: ``i = rho + dilation * ii``
for consecutive ``ii``. Their window keys ``k = rho + dilation * kk`` satisfy ``|ii - kk| < reach``
with ``reach = (window - 1) // dilation + 1``: in these compressed coordinates the pattern is a
plain contiguous window, processed as tiles of consecutive keys (dilation 1 is the ordinary case).

*Limits.* Which keys this part may count at all (the others belong to other parts):
``LIMIT_ALL`` (non-causal) every key; ``LIMIT_PAST`` (flat causal) ``k <= i``; ``LIMIT_LEAF``
(causal recursion) ``k < leaf_start[i]``: the keys of the query's own leaf are the exact diagonal
part's. The recursion's off-diagonal sub-problems tile ``[0, leaf_start[i])`` for every query, so
their pattern and sink parts, merged by log-sum-exp, are this one part over that range.

*Sinks.* Keys ``k < sinks`` that are not window keys of the query. The forward and dQ take them in
the same program as the window; their dK/dV come from every query, so ``_sinks_dkdv_kernel`` splits
the queries and adds atomically into fp32 dK/dV.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hyperpass.kernels.common import (
    FLOOR,
    LOG2E_C,
    _load_rows,
    _softmax_step,
    _store_out_lse,
    in_window,
)

LIMIT_ALL, LIMIT_PAST, LIMIT_LEAF = 0, 1, 2


@triton.jit
def _allowed(rows, cols, start, LIMIT: tl.constexpr):
    """[M, N] bool: may this part count key ``cols[n]`` for query ``rows[m]``?"""
    if LIMIT == 1:
        return cols[None, :] <= rows[:, None]
    elif LIMIT == 2:
        return cols[None, :] < start[:, None]
    else:
        return cols[None, :] >= 0


@triton.jit
def _class_rows(pid, tiles_per_class, dilation, n, BLOCK: tl.constexpr):
    """Positions of the program's rows: tile ``t`` of residue class ``rho``."""
    rho = pid // tiles_per_class
    first = (pid % tiles_per_class) * BLOCK
    rows = rho + dilation * (first + tl.arange(0, BLOCK))
    n_class = tl.maximum(n - rho + dilation - 1, 0) // dilation  # positions of the class in [0, n)
    return rho, first, rows, rows < n, n_class


@triton.jit
def _window_keys(rho, first, n_class_rows, n_keys, dilation, reach, LEAF_START,
                 CAUSAL: tl.constexpr, LIMIT: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """Compressed key range [lo, hi) the window of rows ``first .. first + BLOCK_M`` reaches."""
    lo = tl.maximum(first - reach + 1, 0)
    if CAUSAL:
        hi = first + BLOCK_M
    else:
        hi = first + BLOCK_M + reach - 1
    hi = tl.minimum(hi, tl.maximum(n_keys - rho + dilation - 1, 0) // dilation)
    if LIMIT == 2:  # leaf starts grow with the row: the last row's bounds them all
        last = rho + dilation * tl.maximum(tl.minimum(first + BLOCK_M, n_class_rows) - 1, 0)
        start = tl.load(LEAF_START + last)
        hi = tl.minimum(hi, tl.maximum(start - rho + dilation - 1, 0) // dilation)
    return lo, hi


@triton.jit
def _pattern_fwd_kernel(
    Q, K, V, ACC, OUT, LSE, LEAF_START,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_heads, n_queries, n_keys, window, dilation, reach, n_sinks, tiles_per_class,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, LIMIT: tl.constexpr, MERGE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Window + sinks of a tile of queries. With MERGE, starts from the parts in ACC (contiguous
    [B, Hq, Nq, DV], may be OUT itself) and LSE; writes the merged output to OUT (strided)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // GROUP
    rho, first, rows, row_ok, n_class = _class_rows(
        tl.program_id(0), tiles_per_class, dilation, n_queries, BLOCK_M
    )
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh, rows,
                   stride_qn, d, D, row_ok)  # fmt: skip
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    lse_base = LSE + pid_bh.to(tl.int64) * n_queries
    start = rows
    if LIMIT == 2:
        start = tl.load(LEAF_START + rows, mask=row_ok, other=0)

    if MERGE:
        prev = tl.load(lse_base + rows, mask=row_ok, other=float("-inf"))
        has = prev > float("-inf")
        m_i = tl.where(has, prev * LOG2E_C, FLOOR)
        l_i = tl.where(has, 1.0, 0.0)
        acc = _load_rows(ACC + pid_bh.to(tl.int64) * n_queries * DV, rows, DV, dv, DV,
                         row_ok & has).to(tl.float32)  # fmt: skip
    else:
        m_i = tl.full([BLOCK_M], FLOOR, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    for c0 in range(0, n_sinks, BLOCK_N):  # sinks that are not window keys
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_sinks
        k = _load_rows(k_base, cols, stride_kn, d, D, col_ok)
        v = _load_rows(v_base, cols, stride_vn, dv, DV, col_ok)
        keep = col_ok[None, :] & _allowed(rows, cols, start, LIMIT)
        keep = keep & ~in_window(rows, cols, window, dilation, CAUSAL)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(keep, scores, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, PRECISION)

    lo, hi = _window_keys(rho, first, n_class, n_keys, dilation, reach, LEAF_START,
                          CAUSAL, LIMIT, BLOCK_M)  # fmt: skip
    for c0 in range(lo, hi, BLOCK_N):  # the window, as tiles of consecutive (compressed) keys
        cols = rho + dilation * (c0 + tl.arange(0, BLOCK_N))
        col_ok = cols < n_keys
        k = _load_rows(k_base, cols, stride_kn, d, D, col_ok)
        v = _load_rows(v_base, cols, stride_vn, dv, DV, col_ok)
        keep = col_ok[None, :] & _allowed(rows, cols, start, LIMIT)
        keep = keep & in_window(rows, cols, window, dilation, CAUSAL)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(keep, scores, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, PRECISION)

    o_base = OUT + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
    _store_out_lse(o_base, lse_base, rows, row_ok, stride_on, dv, DV, acc, l_i, m_i)


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, k_base, v_base, rows, row_ok, start, cols, col_ok, window,
    dilation, stride_kn, stride_vn, qk_scale, d, dv, D: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, LIMIT: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ += the share of keys ``cols``: window keys (WINDOW) or sinks outside the window."""
    k = _load_rows(k_base, cols, stride_kn, d, D, col_ok)
    v = _load_rows(v_base, cols, stride_vn, dv, DV, col_ok)
    keep = row_ok[:, None] & col_ok[None, :] & _allowed(rows, cols, start, LIMIT)
    if WINDOW:
        keep = keep & in_window(rows, cols, window, dilation, CAUSAL)
    else:
        keep = keep & ~in_window(rows, cols, window, dilation, CAUSAL)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.where(keep, tl.exp2(scores - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _pattern_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, LEAF_START,
    sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_heads, n_queries, n_keys, window, dilation, reach, n_sinks, tiles_per_class,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, LIMIT: tl.constexpr, ACCUMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ of window + sinks for a tile of queries, into contiguous DQ [B, Hq, Nq, D] (added to
    what is there when ACCUMULATE, which then must be fp32)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // GROUP
    rho, first, rows, row_ok, n_class = _class_rows(
        tl.program_id(0), tiles_per_class, dilation, n_queries, BLOCK_M
    )
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row_base = pid_bh.to(tl.int64) * n_queries
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh, rows,
                   stride_qn, d, D, row_ok)  # fmt: skip
    do = _load_rows(DO + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh, rows,
                    stride_on, dv, DV, row_ok)  # fmt: skip
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    lse2 = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0) * LOG2E_C
    lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    start = rows
    if LIMIT == 2:
        start = tl.load(LEAF_START + rows, mask=row_ok, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _window_keys(rho, first, n_class, n_keys, dilation, reach, LEAF_START,
                          CAUSAL, LIMIT, BLOCK_M)  # fmt: skip
    for c0 in range(0, n_sinks, BLOCK_N):  # sinks that are not window keys
        cols = c0 + tl.arange(0, BLOCK_N)
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, rows, row_ok, start, cols,
                      cols < n_sinks, window, dilation, stride_kn, stride_vn, qk_scale, d, dv,
                      D, DV, CAUSAL, LIMIT, False, PRECISION)  # fmt: skip
    for c0 in range(lo, hi, BLOCK_N):  # the window
        cols = rho + dilation * (c0 + tl.arange(0, BLOCK_N))
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, rows, row_ok, start, cols,
                      cols < n_keys, window, dilation, stride_kn, stride_vn, qk_scale, d, dv,
                      D, DV, CAUSAL, LIMIT, True, PRECISION)  # fmt: skip

    dq_ptrs = DQ + row_base * D + rows[:, None].to(tl.int64) * D + d[None, :]
    mask = row_ok[:, None] & (d < D)[None, :]
    dq = dq * sm_scale
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=mask, other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _pattern_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT, LEAF_START,
    sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_heads, kv_heads, n_queries, n_keys, window, dilation, reach, tiles_per_class,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, LIMIT: tl.constexpr, ACCUMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """dK/dV of the window for a tile of keys of one residue class: the queries whose window
    reaches them, all heads of the GQA group. DK/DV_OUT are contiguous [B, Hkv, Nk, D]: fp32
    when ACCUMULATE (added to), else any dtype (written)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    hkv = pid_bh % kv_heads
    rho, first, cols, col_ok, _ = _class_rows(
        tl.program_id(0), tiles_per_class, dilation, n_keys, BLOCK_N
    )
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh, cols,
                   stride_kn, d, D, col_ok)  # fmt: skip
    v = _load_rows(V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh, cols,
                   stride_vn, dv, DV, col_ok)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # compressed query range the tile's keys are window keys of
    if CAUSAL:
        lo = first
    else:
        lo = tl.maximum(first - reach + 1, 0)
    n_class_q = tl.maximum(n_queries - rho + dilation - 1, 0) // dilation
    hi = tl.minimum(first + BLOCK_N + reach - 1, n_class_q)
    for g in range(GROUP):
        hq = hkv * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
        row_base = (b * q_heads + hq).to(tl.int64) * n_queries
        for r0 in range(lo, hi, BLOCK_M):
            rows = rho + dilation * (r0 + tl.arange(0, BLOCK_M))
            row_ok = rows < n_queries
            q = _load_rows(q_base, rows, stride_qn, d, D, row_ok)
            do = _load_rows(do_base, rows, stride_on, dv, DV, row_ok)
            lse2 = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0) * LOG2E_C
            lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            start = rows
            if LIMIT == 2:
                start = tl.load(LEAF_START + rows, mask=row_ok, other=0)
            keep = row_ok[:, None] & col_ok[None, :] & _allowed(rows, cols, start, LIMIT)
            keep = keep & in_window(rows, cols, window, dilation, CAUSAL)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(keep, tl.exp2(scores - lse2[:, None]), 0.0)
            dvacc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    kv_row = pid_bh.to(tl.int64) * n_keys
    dk_ptrs = DK + kv_row * D + cols[:, None].to(tl.int64) * D + d[None, :]
    dv_ptrs = DV_OUT + kv_row * DV + cols[:, None].to(tl.int64) * DV + dv[None, :]
    dk_mask = col_ok[:, None] & (d < D)[None, :]
    dv_mask = col_ok[:, None] & (dv < DV)[None, :]
    dk = dk * sm_scale
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=dk_mask, other=0.0)
        dvacc += tl.load(dv_ptrs, mask=dv_mask, other=0.0)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptrs, dvacc.to(DV_OUT.dtype.element_ty), mask=dv_mask)


@triton.jit
def _sinks_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT, LEAF_START,
    sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_heads, kv_heads, n_queries, n_keys, window, dilation, n_sinks, n_splits, q_split,
    dk_rows,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, LIMIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dK/dV of a tile of sink keys from one split of the queries (consecutive rows), added
    atomically into fp32 DK/DV_OUT [B, Hkv, dk_rows, D] (dk_rows: Nk, or the sinks alone)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    hkv = pid_bh % kv_heads
    cols = (tl.program_id(0) // n_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_sinks
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh, cols,
                   stride_kn, d, D, col_ok)  # fmt: skip
    v = _load_rows(V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh, cols,
                   stride_vn, dv, DV, col_ok)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    r_start = (tl.program_id(0) % n_splits) * q_split
    r_end = tl.minimum(r_start + q_split, n_queries)
    for g in range(GROUP):
        hq = hkv * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
        row_base = (b * q_heads + hq).to(tl.int64) * n_queries
        for r0 in range(r_start, r_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < r_end
            q = _load_rows(q_base, rows, stride_qn, d, D, row_ok)
            do = _load_rows(do_base, rows, stride_on, dv, DV, row_ok)
            lse2 = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0) * LOG2E_C
            lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            start = rows
            if LIMIT == 2:
                start = tl.load(LEAF_START + rows, mask=row_ok, other=0)
            keep = row_ok[:, None] & col_ok[None, :] & _allowed(rows, cols, start, LIMIT)
            keep = keep & ~in_window(rows, cols, window, dilation, CAUSAL)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(keep, tl.exp2(scores - lse2[:, None]), 0.0)
            dvacc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    kv_row = pid_bh.to(tl.int64) * dk_rows
    dk_ptrs = DK + kv_row * D + cols[:, None].to(tl.int64) * D + d[None, :]
    dv_ptrs = DV_OUT + kv_row * DV + cols[:, None].to(tl.int64) * DV + dv[None, :]
    tl.atomic_add(dk_ptrs, dk * sm_scale, mask=col_ok[:, None] & (d < D)[None, :])
    tl.atomic_add(dv_ptrs, dvacc, mask=col_ok[:, None] & (dv < DV)[None, :])
