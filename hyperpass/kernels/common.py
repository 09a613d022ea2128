"""Small Triton helpers shared by every kernel: row loads, one online-softmax step, the pattern.

The pattern predicate is the reference's ``_in_pattern`` in position arithmetic: a key at distance
``d = q_pos - k_pos`` is a pattern key when ``|d| < window`` (``0 <= d < window`` when the op is
causal) and ``d % dilation == 0``; ``window == 0`` selects nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperpass.kernels.host import LN2, LOG2E, cdiv, next_pow2

LOG2E_C = tl.constexpr(LOG2E)  # the kernels' copies of the host constants
LN2_C = tl.constexpr(LN2)
# finite running max of empty rows: exp2(FLOOR - FLOOR) stays 1, never NaN
FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _load_rows(PTR, rows, stride_n, cols, n_cols, row_ok, EVEN: tl.constexpr = False):
    """Rows ``rows`` (int, [R]) of a [N, C] matrix at PTR: [R, BLOCK_C]. ``EVEN``: every row is
    valid and BLOCK_C == C, so the load needs no mask."""
    offs = rows[:, None].to(tl.int64) * stride_n + cols[None, :]
    if EVEN:
        return tl.load(PTR + offs)
    return tl.load(PTR + offs, mask=row_ok[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _load_vec(PTRS, ok, EVEN: tl.constexpr = False):
    """A 1-D load (index rows, block ids): zeros where not ``ok``; ``EVEN``: every element is
    valid, so the load needs no mask (as ``_load_rows``)."""
    if EVEN:
        return tl.load(PTRS)
    return tl.load(PTRS, mask=ok, other=0)


@triton.jit
def in_window(qpos, kpos, window, dilation, CAUSAL: tl.constexpr):
    """[M, N] bool: is key ``kpos[n]`` in the (dilated) window of query ``qpos[m]``?"""
    d = qpos[:, None] - kpos[None, :]
    if CAUSAL:
        near = (d >= 0) & (d < window)
    else:
        near = (d < window) & (d > -window)
    return near & (d % dilation == 0)


@triton.jit
def _exact_elsewhere(qpos, kpos, window, dilation, sinks, CAUSAL: tl.constexpr):
    """[M, N] bool: keys the pattern or the sinks part counts (the LSH/sampled parts skip them)."""
    return in_window(qpos, kpos, window, dilation, CAUSAL) | (kpos < sinks)[None, :]


@triton.jit
def _softmax_step(acc, l_i, m_i, scores, v, PRECISION: tl.constexpr):
    """One online-softmax step over a tile of base-2 ``scores`` [M, N] (-inf = masked)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _store_out_lse(
    o_base, lse_base, rows, row_ok, stride_on, dv, DV, acc, l_i, m_i,
    EVEN: tl.constexpr = False, STORE_LSE: tl.constexpr = True,
):  # fmt: skip
    """Final rows of a forward: out = acc / l in O's dtype at ``rows`` of ``o_base`` and the
    natural-log lse at ``lse_base + rows`` (-inf for a row that saw no key, with out = 0;
    not written without ``STORE_LSE``). ``EVEN`` as in ``_load_rows``."""
    nonempty = l_i > 0
    safe_l = tl.where(nonempty, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(safe_l)) * LN2_C, float("-inf"))
    o_offs = rows[:, None].to(tl.int64) * stride_on + dv[None, :]
    if EVEN:
        tl.store(o_base + o_offs, out.to(o_base.dtype.element_ty))
        if STORE_LSE:
            tl.store(lse_base + rows, lse)
    else:
        mask = row_ok[:, None] & (dv < DV)[None, :]
        tl.store(o_base + o_offs, out.to(o_base.dtype.element_ty), mask=mask)
        if STORE_LSE:
            tl.store(lse_base + rows, lse, mask=row_ok)


@triton.jit
def _delta_kernel(OUT, DO, DELTA, stride_ob, stride_oh, stride_on, stride_db, stride_dh,
                  stride_dn, heads, n, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    """DELTA[b, h, i] = sum_d OUT[b, h, i, d] * DO[b, h, i, d] in fp32."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows < n)[:, None] & (cols < DV)[None, :]
    o_offs = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    d_offs = b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    o = tl.load(OUT + o_offs + rows[:, None].to(tl.int64) * stride_on + cols[None, :], mask=mask)
    do = tl.load(DO + d_offs + rows[:, None].to(tl.int64) * stride_dn + cols[None, :], mask=mask)
    total = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * n + rows, total, mask=rows < n)


def row_delta(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``rowsum(out * grad_out)`` [B, H, N] fp32, the softmax backward's delta (rows of
    [B, H, N, Dv], last dim contiguous)."""
    batch, heads, n, dim_v = out.shape
    delta = torch.empty(batch, heads, n, dtype=torch.float32, device=out.device)
    _delta_kernel[(cdiv(n, 64), batch * heads)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], heads, n,
        DV=dim_v, BLOCK_DV=next_pow2(dim_v), BLOCK=64,
    )  # fmt: skip
    return delta
