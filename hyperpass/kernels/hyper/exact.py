"""Exact causal attention inside the diagonal leaves of the causal recursion (block-diagonal).

Row ``i`` sees keys ``[leaf_start[i], i]``. The forward can start from the parts the
approximated levels already merged (fp32 OUT accumulator + LSE), so the final output is written
once, in the input dtype, with the final log-sum-exp. The backward kernels use that final lse,
which makes their dQ/dK/dV the diagonal share of the true gradient.
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
)


@triton.jit
def _diag_fwd_range(
    acc, l_i, m_i, q, k_base, v_base, rows, start, lo, hi, stride_kn, stride_vn,
    d, dv, qk_scale, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over keys [lo, hi); MASKED applies the causal and leaf-start mask,
    otherwise every key of the (whole) tiles counts."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = _load_rows(k_base, cols, stride_kn, d, D, col_ok)
        v = _load_rows(v_base, cols, stride_vn, dv, DV, col_ok)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = (cols[None, :] <= rows[:, None]) & (cols[None, :] >= start[:, None])
            scores = tl.where(keep & col_ok[None, :], scores, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _diag_fwd_kernel(
    Q, K, V, ACC, OUT, LSE, LEAF_START,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_heads, n,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MERGE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """ACC: contiguous [B, Hq, N, DV] of earlier parts (read if MERGE; may be OUT itself: a
    program reads its rows before it writes them); OUT: strided."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    lse_base = LSE + pid_bh.to(tl.int64) * n
    q = _load_rows(q_base, rows, stride_qn, d, D, row_ok)
    start = tl.load(LEAF_START + rows, mask=row_ok, other=0)

    if MERGE:
        prev = tl.load(lse_base + rows, mask=row_ok, other=float("-inf"))
        has = prev > float("-inf")
        m_i = tl.where(has, prev * LOG2E_C, FLOOR)
        l_i = tl.where(has, 1.0, 0.0)
        acc = _load_rows(ACC + pid_bh.to(tl.int64) * n * DV, rows, DV, dv, DV, row_ok & has)
        acc = acc.to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], FLOOR, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # keys [lo, full_lo) and [full_hi, hi) need the causal / leaf mask; between, every row of
    # the tile sees every key (its leaf started before, the keys end before the tile's rows)
    tile_lo = pid_m * BLOCK_M
    hi = tl.minimum(tile_lo + BLOCK_M, n)
    lo = tl.load(LEAF_START + tile_lo)
    full_lo = tl.load(LEAF_START + hi - 1)
    full_hi = full_lo + tl.maximum(tile_lo - full_lo, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _diag_fwd_range(
        acc, l_i, m_i, q, k_base, v_base, rows, start, lo, full_lo, stride_kn, stride_vn,
        d, dv, qk_scale, D, DV, BLOCK_N, True, PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _diag_fwd_range(
        acc, l_i, m_i, q, k_base, v_base, rows, start, full_lo, full_hi, stride_kn,
        stride_vn, d, dv, qk_scale, D, DV, BLOCK_N, False, PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _diag_fwd_range(
        acc, l_i, m_i, q, k_base, v_base, rows, start, full_hi, hi, stride_kn, stride_vn,
        d, dv, qk_scale, D, DV, BLOCK_N, True, PRECISION,
    )  # fmt: skip

    o_base = OUT + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
    _store_out_lse(o_base, lse_base, rows, row_ok, stride_on, dv, DV, acc, l_i, m_i)


@triton.jit
def _diag_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, LEAF_START,
    sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_heads, n,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Writes (not adds) the diagonal share of dQ into contiguous fp32 DQ [B, Hq, N, D]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row_base = pid_bh.to(tl.int64) * n
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh, rows,
                   stride_qn, d, D, row_ok)  # fmt: skip
    do = _load_rows(DO + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh, rows,
                    stride_on, dv, DV, row_ok)  # fmt: skip
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    lse2 = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0) * LOG2E_C
    lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    start = tl.load(LEAF_START + rows, mask=row_ok, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo = tl.load(LEAF_START + pid_m * BLOCK_M)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, n)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = _load_rows(k_base, cols, stride_kn, d, D, col_ok)
        v = _load_rows(v_base, cols, stride_vn, dv, DV, col_ok)
        keep = (cols[None, :] <= rows[:, None]) & (cols[None, :] >= start[:, None])
        keep = keep & row_ok[:, None] & col_ok[None, :]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(keep, tl.exp2(scores - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq_ptrs = DQ + row_base * D + rows[:, None].to(tl.int64) * D + d[None, :]
    tl.store(dq_ptrs, dq * sm_scale, mask=row_ok[:, None] & (d < D)[None, :])


@triton.jit
def _diag_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT, LEAF_START, LEAF_END,
    sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_heads, kv_heads, n,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Writes (not adds) the diagonal share of dK/dV into contiguous fp32 [B, Hkv, N, D]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    hkv = pid_bh % kv_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh, cols,
                   stride_kn, d, D, col_ok)  # fmt: skip
    v = _load_rows(V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh, cols,
                   stride_vn, dv, DV, col_ok)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = pid_n * BLOCK_N
    last = tl.minimum(lo + BLOCK_N, n) - 1
    hi = tl.load(LEAF_END + last)
    for g in range(GROUP):
        hq = hkv * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
        row_base = (b * q_heads + hq).to(tl.int64) * n
        for r0 in range(lo, hi, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < hi
            q = _load_rows(q_base, rows, stride_qn, d, D, row_ok)
            do = _load_rows(do_base, rows, stride_on, dv, DV, row_ok)
            lse2 = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0) * LOG2E_C
            lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            start = tl.load(LEAF_START + rows, mask=row_ok, other=0)
            keep = (cols[None, :] <= rows[:, None]) & (cols[None, :] >= start[:, None])
            keep = keep & row_ok[:, None] & col_ok[None, :]
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(keep, tl.exp2(scores - lse2[:, None]), 0.0)
            dvacc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    kv_row = pid_bh.to(tl.int64) * n
    dk_ptrs = DK + kv_row * D + cols[:, None].to(tl.int64) * D + d[None, :]
    dv_ptrs = DV_OUT + kv_row * DV + cols[:, None].to(tl.int64) * DV + dv[None, :]
    tl.store(dk_ptrs, dk * sm_scale, mask=col_ok[:, None] & (d < D)[None, :])
    tl.store(dv_ptrs, dvacc, mask=col_ok[:, None] & (dv < DV)[None, :])
