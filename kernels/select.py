"""``method="select"`` on the GPU: block selection by a score bound, then one fused pass.

Same semantics as :mod:`hyperpass.block_select` (the oracle). One call:

1. ``select_blocks`` (``block_bound.py``): per key block of ``select_block`` keys the
   per-channel min/max of K; a Triton kernel bounds every query (pre-scaled) against every key
   block, keeps the max over each query block and masks the non-candidates; ``torch.topk``:
   block ids [B, Hq, n_qblocks, topk] (-1: none). ``Nq * Nk / select_block`` dot products per
   head on tensor cores; only the per-query-block bounds reach memory, in chunks.
2. ``_select_kernel`` (forward): one program per tile of rows of one query block and one query
   head; one online softmax over its local span (contiguous key tiles), the sinks outside it, its
   selected blocks (read by block id from K/V, no copies) and the samples (score + log2(n/m),
   minus the keys of the other parts); writes out and lse.
3. The same kernel with ``BACKWARD`` (after recomputing out/lse and delta = rowsum(dO * O)):
   the same keys, dQ per program (one writer), dK/dV added with fp32 atomics (the selection
   differs per query head, so a key has writers from many programs).

Every key set is position arithmetic on the program's query block ``s``: local keys
``[lo(s), hi)`` (causal: up to the query), sinks ``< sinks`` outside them, selected blocks wholly
outside the local span and not wholly sinks (their keys ``>= sinks``), samples outside all three.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hyperpass import lsh
from hyperpass.config import HyperConfig

from .block_bound import _local_span, clamped_window, select_blocks
from .common import FLOOR, _load_rows, _softmax_step, _store_out_lse
from .host import cdiv, last_dim_contiguous, next_pow2

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _visit(acc, l_i, m_i, dq, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, rows,
           row_ok, cols, col_ok, keep, log2w, stride_kn, stride_vn, sm_scale, qk_scale, d, dv,
           D: tl.constexpr, DV: tl.constexpr, BACKWARD: tl.constexpr,
           PRECISION: tl.constexpr):  # fmt: skip
    """One tile of keys ``cols`` ([N], rows of K/V; ``keep`` [M, N] the counted pairs).

    Forward: one online-softmax step (acc, l_i, m_i). Backward: dq += dS K; dK/dV of the tile
    added atomically into fp32 dk_base/dv_base (contiguous rows of D / DV)."""
    k = _load_rows(k_base, cols, stride_kn, d, D, col_ok)
    v = _load_rows(v_base, cols, stride_vn, dv, DV, col_ok)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + log2w
    if BACKWARD:
        keep = keep & row_ok[:, None]
        p = tl.where(keep, tl.exp2(scores - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * sm_scale
        dvt = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        k_ptrs = dk_base + cols[:, None].to(tl.int64) * D + d[None, :]
        v_ptrs = dv_base + cols[:, None].to(tl.int64) * DV + dv[None, :]
        tl.atomic_add(k_ptrs, dk, mask=col_ok[:, None] & (d < D)[None, :], sem="relaxed")
        tl.atomic_add(v_ptrs, dvt, mask=col_ok[:, None] & (dv < DV)[None, :], sem="relaxed")
    else:
        scores = tl.where(keep, scores, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, PRECISION)
    return acc, l_i, m_i, dq


@triton.jit
def _outside_span(cols, lo, hi, CAUSAL: tl.constexpr):
    """Keys outside the local span [lo, hi) (causal: only before it; later keys are future)."""
    outside = cols < lo
    if not CAUSAL:
        outside = outside | (cols >= hi)
    return outside


@triton.jit
def _select_kernel(
    Q, K, V, OUT, DO, LSE, DELTA, DQ, DK, DV_OUT, BLOCKS, SAMPLES,
    sm_scale, qk_scale, sample_log2w,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_heads, kv_heads, n_queries, n_keys, window, n_sinks, n_samples, topk, n_qblocks,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    QB: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, BACKWARD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Rows ``[pid * BLOCK_M, +BLOCK_M)`` (inside one query block) of one query head.

    Forward writes OUT (strided like Q's layout, DV wide) and LSE [B, Hq, Nq] fp32. Backward
    reads DO (OUT's strides), LSE, DELTA; writes DQ (contiguous [B, Hq, Nq, D]) and adds into
    DK/DV_OUT (contiguous fp32 [B, Hkv, Nk, D/DV])."""
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // GROUP
    first = tl.program_id(0) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries
    qblock = first // QB
    start = qblock * QB
    lo, hi = _local_span(start, window, n_keys, QB, KB)
    if CAUSAL:
        hi = tl.minimum(tl.minimum(first + BLOCK_M, n_queries), n_keys)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh, rows,
                   stride_qn, d, D, row_ok)  # fmt: skip
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    row_base = pid_bh.to(tl.int64) * n_queries
    kv_row = (b * kv_heads + hkv).to(tl.int64) * n_keys
    dk_base = DK + kv_row * D
    dv_base = DV_OUT + kv_row * DV
    blocks = BLOCKS + (pid_bh.to(tl.int64) * n_qblocks + qblock) * topk

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], FLOOR, dtype=tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BACKWARD:
        do = _load_rows(DO + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh, rows,
                        stride_on, dv, DV, row_ok)  # fmt: skip
        lse2 = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
        delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    else:
        do = tl.zeros([BLOCK_M, BLOCK_DV], dtype=Q.dtype.element_ty)
        lse2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)

    # 1. local: consecutive keys, causal mask near the diagonal
    for c0 in range(lo, hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        keep = col_ok[None, :] & (rows[:, None] >= 0)
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        acc, l_i, m_i, dq = _visit(acc, l_i, m_i, dq, q, do, lse2, delta, k_base, v_base,
                                   dk_base, dv_base, rows, row_ok, cols, col_ok, keep, 0.0,
                                   stride_kn, stride_vn, sm_scale, qk_scale, d, dv, D, DV,
                                   BACKWARD, PRECISION)  # fmt: skip

    # 2. sinks outside the local span (causal: before it, so never in the future)
    for c0 in range(0, n_sinks, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_sinks
        keep = (col_ok & _outside_span(cols, lo, hi, CAUSAL))[None, :] & (rows[:, None] >= 0)
        acc, l_i, m_i, dq = _visit(acc, l_i, m_i, dq, q, do, lse2, delta, k_base, v_base,
                                   dk_base, dv_base, rows, row_ok, cols, col_ok, keep, 0.0,
                                   stride_kn, stride_vn, sm_scale, qk_scale, d, dv, D, DV,
                                   BACKWARD, PRECISION)  # fmt: skip

    # 3. selected blocks (wholly outside the local span, so no causal mask), minus sinks
    for j in range(topk):
        block = tl.load(blocks + j)
        n_cols = tl.where(block >= 0, KB, 0)
        for c0 in range(0, n_cols, BLOCK_N):
            cols = block * KB + c0 + tl.arange(0, BLOCK_N)
            col_ok = (cols < n_keys) & (cols >= n_sinks)
            keep = col_ok[None, :] & (rows[:, None] >= 0)
            acc, l_i, m_i, dq = _visit(acc, l_i, m_i, dq, q, do, lse2, delta, k_base, v_base,
                                       dk_base, dv_base, rows, row_ok, cols, col_ok, keep, 0.0,
                                       stride_kn, stride_vn, sm_scale, qk_scale, d, dv, D, DV,
                                       BACKWARD, PRECISION)  # fmt: skip

    # 4. samples (weight n/m) outside the local span, the sinks and the selected blocks
    for s0 in range(0, n_samples, BLOCK_N):
        idx = s0 + tl.arange(0, BLOCK_N)
        in_range = idx < n_samples
        cols = tl.load(SAMPLES + b.to(tl.int64) * n_samples + idx, mask=in_range, other=0)
        use = in_range & _outside_span(cols, lo, hi, CAUSAL) & (cols >= n_sinks)
        sample_block = cols // KB
        for j in range(topk):
            use = use & (sample_block != tl.load(blocks + j))
        keep = use[None, :] & (rows[:, None] >= 0)
        acc, l_i, m_i, dq = _visit(acc, l_i, m_i, dq, q, do, lse2, delta, k_base, v_base,
                                   dk_base, dv_base, rows, row_ok, cols, in_range, keep,
                                   sample_log2w, stride_kn, stride_vn, sm_scale, qk_scale, d,
                                   dv, D, DV, BACKWARD, PRECISION)  # fmt: skip

    if BACKWARD:
        dq_ptrs = DQ + row_base * D + rows[:, None].to(tl.int64) * D + d[None, :]
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (d < D)[None, :])  # fmt: skip
    else:
        o_base = OUT + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh
        _store_out_lse(o_base, LSE + row_base, rows, row_ok, stride_on, dv, DV, acc, l_i, m_i)


# ----------------------------------------------------------------------------- launchers
def _divisor_tile(n: int) -> int:
    """The largest of 64, 32, 16 dividing ``n`` (config: multiples of 16)."""
    return next(t for t in (64, 32, 16) if n % t == 0)


class _SelectCall:
    """Everything the kernel launches share: contiguous inputs, selection, samples, sizes."""

    def __init__(self, q, k, v, is_causal: bool, scale: float | None, cfg: HyperConfig):
        self.q, self.k, self.v = (last_dim_contiguous(t) for t in (q, k, v))
        self.causal, self.cfg = is_causal, cfg
        batch, self.q_heads, self.nq, dim = q.shape
        self.kv_heads, self.nk = k.shape[1], k.shape[2]
        self.scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
        self.blocks = select_blocks(self.q, self.k, self.scale, cfg, is_causal).contiguous()
        m = cfg.sample_size
        if m > 0:
            tag = lsh.subproblem_tag(0, 0)
            idx = lsh.sample_indices(cfg.seed, tag, (batch, 1, m), self.nk, q.device)
            self.samples = idx.view(batch, m).to(torch.int32).contiguous()
            self.log2w = math.log2(self.nk / m)
        else:
            self.samples = torch.zeros(1, dtype=torch.int32, device=q.device)
            self.log2w = 0.0
        self.window = clamped_window(cfg, self.nq, self.nk)
        self.block_m = _divisor_tile(cfg.query_block)
        self.block_n = _divisor_tile(cfg.select_block)

    def launch(self, out, grad_out, lse, delta, dq, dk, dv, backward: bool) -> None:
        q, k, v, cfg = self.q, self.k, self.v, self.cfg
        dim, dim_v = q.shape[-1], v.shape[-1]
        strided_out = grad_out if backward else out
        small = max(dim, dim_v) <= 64 and q.dtype != torch.float32
        grid = (cdiv(self.nq, self.block_m), q.shape[0] * self.q_heads)
        _select_kernel[grid](
            q, k, v, out, grad_out, lse, delta, dq, dk, dv, self.blocks, self.samples,
            self.scale, self.scale * LOG2E, self.log2w,
            *[s for t in (q, k, v, strided_out) for s in t.stride()[:3]],
            self.q_heads, self.kv_heads, self.nq, self.nk, self.window, min(cfg.sinks, self.nk),
            cfg.sample_size, self.blocks.shape[-1], self.blocks.shape[-2],
            GROUP=self.q_heads // self.kv_heads, D=dim, DV=dim_v,
            BLOCK_D=next_pow2(dim), BLOCK_DV=next_pow2(dim_v),
            QB=cfg.query_block, KB=cfg.select_block, BLOCK_M=self.block_m,
            BLOCK_N=self.block_n, CAUSAL=self.causal, BACKWARD=backward,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=4 if small or not backward else 8,
        )  # fmt: skip

    def forward(self):
        q = self.q
        out = torch.empty(*q.shape[:3], self.v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        self.launch(out, out, lse, lse, q, self.k, self.v, backward=False)
        return out, lse


def select_forward(q, k, v, *, is_causal: bool, scale: float | None, config: HyperConfig):
    """``method="select"`` forward with the Triton kernel.

    Args:
        q: [B, Hq, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv].

    Returns:
        (out [B, Hq, Nq, Dv] in q's dtype, lse [B, Hq, Nq] fp32 natural log)
    """
    return _SelectCall(q, k, v, is_causal, scale, config).forward()


def select_backward(grad_out, q, k, v, *, is_causal: bool, scale: float | None, config):
    """Gradients of ``method="select"``: recompute out/lse, delta = rowsum(dO * O), one launch.

    Returns:
        (dq [B, Hq, Nq, D], dk [B, Hkv, Nk, D], dv [B, Hkv, Nk, Dv]) in the inputs' dtypes.
    """
    from .attention import _delta_kernel  # the shared delta; attention imports this module

    call = _SelectCall(q, k, v, is_causal, scale, config)
    out, lse = call.forward()
    grad_out = last_dim_contiguous(grad_out)
    q, k, v = call.q, call.k, call.v
    batch, q_heads, nq, dim = q.shape
    dim_v = v.shape[-1]
    delta = torch.empty_like(lse)
    _delta_kernel[(cdiv(nq, 64), batch * q_heads)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], q_heads, nq,
        DV=dim_v, BLOCK_DV=next_pow2(dim_v), BLOCK=64,
    )  # fmt: skip
    dq = torch.empty(batch, q_heads, nq, dim, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    call.launch(out, grad_out, lse, delta, dq, dk, dv, backward=True)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
