"""``method="select"``'s block selection on the GPU: a Triton score-bound kernel, then top-k.

Same semantics as :func:`hyperpass.block_select._select_blocks` (the oracle). For each key block
of ``select_block`` keys, the per-channel ``kmin``/``kmax`` bound every score of the block:

    q . k  <=  relu(q) . kmax + min(q, 0) . kmin

``_bound_kernel`` computes that bound for a tile of query rows against a tile of key blocks with
two tensor-core dots and takes its max over each query block in registers (``-inf`` for blocks
that are not candidates: inside the local span, wholly sinks, or in the causal future). So the
N x N/select_block per-query bounds never reach memory (the torch version wrote and re-read them:
87% of the select call at 131072); the per-query-block bounds do, in chunks of query blocks, and
only up to the last key block a chunk can select (causal: its rows' past), for ``torch.topk``.
(Keeping the top-k in registers by sorting packed (bound, id) keys per tile was measured slower
from 65536 on: benchmarks/KERNEL_NOTES.md.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hyperpass.config import HyperConfig

from .host import cdiv, next_pow2

_BOUND_ELEMENTS = 1 << 24  # block bounds per chunk of query blocks (64 MiB in fp32)
_KEY_TILE = 64  # key blocks per inner step


def select_blocks(q, k, scale: float, cfg: HyperConfig, causal: bool) -> torch.Tensor:
    """Ids of the selected key blocks, as ``hyperpass.block_select._select_blocks``.

    Args:
        q: [B, Hq, Nq, D] (unscaled); k: [B, Hkv, Nk, D]; both last-dim contiguous.

    Returns:
        int32 [B, Hq, n_qblocks, topk], -1 where a query block has fewer candidates (the ids of
        a query block in no particular order).
    """
    batch, q_heads, nq, dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    qb, kb = cfg.query_block, cfg.select_block
    n_qb, n_kb = math.ceil(nq / qb), math.ceil(nk / kb)
    topk = min(cfg.select_topk, n_kb)
    kmax, kmin = _key_block_extremes(k, kb)
    if scale < 0:  # relu(s q) = s min(q, 0) and min(s q, 0) = s relu(q) when s < 0
        kmax, kmin = kmin, kmax
    rows, per_program, chunks = _row_tiling(qb)
    out = torch.empty(batch, q_heads, n_qb, topk, dtype=torch.int32, device=q.device)
    step = max(per_program, _BOUND_ELEMENTS // max(1, batch * q_heads * n_kb))
    step -= step % per_program  # whole programs per chunk
    window = clamped_window(cfg, nq, nk)
    for first in range(0, n_qb, step):
        count = min(step, n_qb - first)
        cols = n_kb
        if causal:  # candidates end before the span of the chunk's last query block
            last_start = (first + count - 1) * qb
            cols = min(n_kb, max(topk, max(last_start + qb - window, 0) // kb))
        bound = torch.empty(batch, q_heads, count, cols, dtype=torch.float32, device=q.device)
        grid = (cdiv(count, per_program), batch * q_heads)
        _bound_kernel[grid](
            q, kmax, kmin, bound, float(scale),
            *q.stride()[:3],
            q_heads, kv_heads, nq, nk, n_kb, cols, first, count, window, cfg.sinks,
            D=dim, BLOCK_D=next_pow2(dim), QB=qb, KB=kb, ROWS=rows,
            PER_PROGRAM=per_program, CHUNKS=chunks, KEY_TILE=_KEY_TILE, CAUSAL=causal,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=4,
        )  # fmt: skip
        top = bound.topk(topk, dim=-1)
        out[:, :, first : first + count] = torch.where(torch.isfinite(top.values), top.indices, -1)
    return out


def clamped_window(cfg: HyperConfig, nq: int, nk: int) -> int:
    """``cfg.window`` capped where it already covers every key, so ``s + window`` fits int32."""
    return min(cfg.window, nq + nk + cfg.query_block)


def _key_block_extremes(k: torch.Tensor, kb: int):
    """(kmax, kmin) [B, Hkv, n_kb, D] in k's dtype (exact), without copying K."""
    nk = k.shape[2]
    full = nk // kb
    shape = (*k.shape[:2], math.ceil(nk / kb), k.shape[-1])
    kmax, kmin = k.new_empty(shape), k.new_empty(shape)
    if full:
        blocks = k[:, :, : full * kb].unflatten(2, (full, kb))
        kmax[:, :, :full] = blocks.amax(3)
        kmin[:, :, :full] = blocks.amin(3)
    if nk % kb:
        kmax[:, :, full] = k[:, :, full * kb :].amax(2)
        kmin[:, :, full] = k[:, :, full * kb :].amin(2)
    return kmax, kmin


def _row_tiling(qb: int) -> tuple[int, int, int]:
    """(rows per dot, query blocks per program, dots per program) for query blocks of ``qb``.

    Query blocks that divide 64 share a program (64 rows, max over each block's rows by a
    reshape); larger or odd ones (multiples of 16) get one program, their rows in steps."""
    if 64 % qb == 0:
        return 64, 64 // qb, 1
    rows = next(r for r in (64, 32, 16) if qb % r == 0)
    return rows, 1, qb // rows


@triton.jit
def _local_span(start, window, n_keys, QB: tl.constexpr, KB: tl.constexpr):
    """[lo, hi) of the query block starting at ``start``: at least ``window`` keys around it,
    aligned to key blocks (non-causal end; causal callers stop at the query)."""
    lo = (tl.maximum(start + QB - window, 0) // KB) * KB
    hi = tl.minimum(((start + window + KB - 1) // KB) * KB, n_keys)
    return lo, hi


@triton.jit
def _signed_rows(q_base, rows, row_ok, stride_qn, d, D: tl.constexpr, dtype: tl.constexpr):
    """(relu(q), min(q, 0)) of the given rows, in ``dtype`` (Triton computes a bf16 max in fp32,
    so the parts are cast back for the tensor-core dots)."""
    q = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qn + d[None, :],
                mask=row_ok[:, None] & (d < D)[None, :], other=0.0)  # fmt: skip
    return tl.where(q > 0, q, 0.0).to(dtype), tl.where(q < 0, q, 0.0).to(dtype)


@triton.jit
def _bound_kernel(
    Q, KMAX, KMIN, OUT, scale,
    stride_qb, stride_qh, stride_qn,
    q_heads, kv_heads, n_queries, n_keys, n_kblocks, n_cols, first_qblock, n_qblocks_chunk,
    window, n_sinks,
    D: tl.constexpr, BLOCK_D: tl.constexpr, QB: tl.constexpr, KB: tl.constexpr,
    ROWS: tl.constexpr, PER_PROGRAM: tl.constexpr, CHUNKS: tl.constexpr,
    KEY_TILE: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """OUT[b, hq, j, c] = max over the rows of query block ``first_qblock + j`` of the bound on
    key block ``c < n_cols``; -inf where ``c`` is not a candidate of that query block."""
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // (q_heads // kv_heads)
    local0 = tl.program_id(0) * PER_PROGRAM
    local = local0 + tl.arange(0, PER_PROGRAM)  # the program's query blocks in the chunk
    qblocks = first_qblock + local
    block_ok = local < n_qblocks_chunk
    starts = qblocks * QB
    span_lo, span_hi = _local_span(starts, window, n_keys, QB, KB)
    d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
    k_off = (b * kv_heads + hkv).to(tl.int64) * n_kblocks * D
    out_base = OUT + (pid_bh.to(tl.int64) * n_qblocks_chunk) * n_cols
    # causal candidates lie wholly before the span: no tile past the last block's span start
    if CAUSAL:
        last_lo = tl.max(tl.where(block_ok, span_lo, 0), axis=0)
        n_tiles = tl.cdiv(tl.cdiv(last_lo, KB), KEY_TILE)
    else:
        n_tiles = tl.cdiv(n_kblocks, KEY_TILE)
    first_row = (first_qblock + local0) * QB
    row_end = tl.minimum(n_queries, (first_qblock + n_qblocks_chunk) * QB)
    # one dot's rows are the same for every key tile: loaded once (several dots: per tile)
    rows0 = first_row + tl.arange(0, ROWS)
    positive0, negative0 = _signed_rows(q_base, rows0, rows0 < row_end, stride_qn, d, D,
                                        KMAX.dtype.element_ty)  # fmt: skip
    for t in range(0, tl.cdiv(n_cols, KEY_TILE)):  # every column is written, computed or -inf
        cols = t * KEY_TILE + tl.arange(0, KEY_TILE)  # key block ids
        col_ok = cols < n_cols
        best = tl.full([PER_PROGRAM, KEY_TILE], float("-inf"), dtype=tl.float32)
        if t < n_tiles:
            kmask = col_ok[:, None] & (d < D)[None, :]
            k_offs = k_off + cols[:, None].to(tl.int64) * D + d[None, :]
            kmax = tl.load(KMAX + k_offs, mask=kmask, other=0.0)
            kmin = tl.load(KMIN + k_offs, mask=kmask, other=0.0)
            for c in range(CHUNKS):
                rows = first_row + c * ROWS + tl.arange(0, ROWS)
                row_ok = rows < row_end
                if CHUNKS == 1:
                    positive, negative = positive0, negative0
                else:
                    positive, negative = _signed_rows(q_base, rows, row_ok, stride_qn, d, D,
                                                      KMAX.dtype.element_ty)  # fmt: skip
                upper = tl.dot(positive, tl.trans(kmax), input_precision=PRECISION)
                upper = tl.dot(negative, tl.trans(kmin), upper, input_precision=PRECISION)
                upper = tl.where(row_ok[:, None], upper * scale, float("-inf"))
                per_block = tl.max(tl.reshape(upper, (PER_PROGRAM, ROWS // PER_PROGRAM,
                                                      KEY_TILE)), axis=1)  # fmt: skip
                best = tl.maximum(best, per_block)
            key_start = cols * KB
            key_end = tl.minimum(key_start + KB, n_keys)
            candidate = key_end[None, :] <= span_lo[:, None]
            if not CAUSAL:
                candidate = candidate | (key_start[None, :] >= span_hi[:, None])
            candidate = candidate & (key_end > n_sinks)[None, :] & col_ok[None, :]
            best = tl.where(candidate, best, float("-inf"))
        ptrs = out_base + local[:, None].to(tl.int64) * n_cols + cols[None, :]
        tl.store(ptrs, best, mask=block_ok[:, None] & col_ok[None, :])
