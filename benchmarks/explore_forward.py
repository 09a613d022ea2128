"""Where the 131072 non-causal forward spends its time, and which kernel shapes would cut it.

Not a test, not the product: an A/B harness for the fused approximated forward
(``kernels/approx.py``) and the counting sort's launches (``kernels/hashing.py``) at one shape.
Each variant of the simplified forward below (non-causal, one sub-problem, no pattern) is checked
against the production kernel's output before it is timed.

    python benchmarks/explore_forward.py --out $OUT/explore.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import triton
import triton.language as tl

from kernels.common import FLOOR, _softmax_step, _store_out_lse
from kernels.hashing import _gray_rank, _gray_rank_dot, _inverse_gray


@triton.jit
def _rows(base, pos, d, stride=64):
    return tl.load(base + pos[:, None].to(tl.int64) * stride + d[None, :])


@triton.jit
def _xfwd_kernel(
    Q, K, V, OUT, LSE, QORD, KORD, KINV, SAMPLES, KS, VS, SBLK,
    qk_scale, log2_weight, n, n_samples, bsize,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DO_BLOCK: tl.constexpr, DO_SAMPLES: tl.constexpr, CONTIG: tl.constexpr, FLAT: tl.constexpr,
    SOFTMAX: tl.constexpr = 0, TILES=None, SUBS=None, stride_n=64, PROD: tl.constexpr = 0,
):  # fmt: skip
    """D = 64, B = 1, Hq = Hkv, contiguous [H, n, 64]; n a multiple of bsize and BLOCK_M.
    PROD adds the production kernel's generality, bit by bit (block loop and contiguous
    samples only): 1 masked index loads, 2 the tile table and sub-problem parameters read from
    memory, 4 a runtime row stride."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    nk = n
    if PROD & 2:
        s = tl.load(TILES + pid_t * 3)
        j = tl.load(TILES + pid_t * 3 + 1)
        t = tl.load(TILES + pid_t * 3 + 2)
        nq = tl.load(SUBS + s * 8 + 1)
        nk = tl.load(SUBS + s * 8 + 3)
        qpb = tl.load(SUBS + s * 8 + 4)
        kb = tl.minimum(j, tl.load(SUBS + s * 8 + 6) - 1)
        rows = j * qpb + t * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = (rows < (j + 1) * qpb) & (rows < nq)
    else:
        rows = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
        kb = (pid_t * BLOCK_M) // bsize
        row_ok = rows < n
    if PROD & 1:
        qpos = tl.load(QORD + h * n + rows, mask=row_ok, other=0)
    else:
        qpos = tl.load(QORD + h * n + rows)
    if PROD & 4:
        stride = stride_n
    else:
        stride = 64
    d = tl.arange(0, 64)
    q = _rows(Q + h * n * 64, qpos, d, stride)
    k_base = K + h * n * 64
    v_base = V + h * n * 64
    m_i = tl.full([BLOCK_M], FLOOR, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, 64], dtype=tl.float32)
    kord = KORD + h * n + kb * bsize
    n_block_steps = bsize // BLOCK_N
    if FLAT:  # one loop over block keys then samples: one software pipeline
        for it in range(0, (bsize + n_samples) // BLOCK_N):
            is_s = it >= n_block_steps
            offs = tl.arange(0, BLOCK_N)
            idx_ptr = tl.where(is_s, SAMPLES + (it - n_block_steps) * BLOCK_N, kord + it * BLOCK_N)
            kpos = tl.load(idx_ptr + offs)
            k = _rows(k_base, kpos, d)
            v = _rows(v_base, kpos, d)
            s_mask = offs < BLOCK_N * is_s.to(tl.int32)
            blk = tl.load(KINV + h * n + kpos, mask=s_mask, other=0) // bsize
            scores = tl.dot(q, tl.trans(k)) * qk_scale + tl.where(is_s, log2_weight, 0.0)
            keep = (blk != kb) | (it < n_block_steps)
            scores = tl.where(keep[None, :], scores, float("-inf"))
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, "tf32")
    else:
        if DO_BLOCK:
            for n0 in range(0, bsize, BLOCK_N):
                if PROD & 1:
                    offs = n0 + tl.arange(0, BLOCK_N)
                    col_ok = (offs < bsize) & (kb * bsize + offs < nk)
                    kpos = tl.load(kord + offs, mask=col_ok, other=0)
                else:
                    kpos = tl.load(kord + n0 + tl.arange(0, BLOCK_N))
                k = _rows(k_base, kpos, d, stride)
                v = _rows(v_base, kpos, d, stride)
                if SOFTMAX == 0:
                    scores = tl.dot(q, tl.trans(k)) * qk_scale
                    acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, "tf32")
                else:
                    raw = tl.dot(q, tl.trans(k))
                    acc, l_i, m_i = _xstep(acc, l_i, m_i, raw, qk_scale, 0.0, v, SOFTMAX == 2)
        if DO_SAMPLES:
            for s0 in range(0, n_samples, BLOCK_N):
                sc = s0 + tl.arange(0, BLOCK_N)
                if CONTIG:  # samples' rows copied contiguous, their block ids precomputed
                    k = _rows(KS + h * n_samples * 64, sc, d)
                    v = _rows(VS + h * n_samples * 64, sc, d)
                    if PROD & 1:
                        s_ok = sc < n_samples
                        blk = tl.load(SBLK + h * n_samples + sc, mask=s_ok, other=0)
                        blk = tl.where(s_ok, blk, kb)  # (a sample past the end is skipped)
                    else:
                        blk = tl.load(SBLK + h * n_samples + sc)
                else:
                    kpos = tl.load(SAMPLES + sc)
                    k = _rows(k_base, kpos, d)
                    v = _rows(v_base, kpos, d)
                    blk = tl.load(KINV + h * n + kpos) // bsize
                if SOFTMAX == 0:
                    scores = tl.dot(q, tl.trans(k)) * qk_scale + log2_weight
                    scores = tl.where((blk != kb)[None, :], scores, float("-inf"))
                    acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, "tf32")
                else:
                    raw = tl.where((blk != kb)[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
                    acc, l_i, m_i = _xstep(
                        acc, l_i, m_i, raw, qk_scale, log2_weight, v, SOFTMAX == 2
                    )
    _store_out_lse(OUT + h * n * 64, LSE + h * n, qpos, qpos >= 0, 64, d, 64, acc, l_i, m_i)


@triton.jit
def _xstep(acc, l_i, m_i, raw, scale, offset, v, LAZY: tl.constexpr):
    """``_softmax_step`` on unscaled scores (base-2 scores = raw * scale + offset): one FMA per
    score. LAZY: the rows' reference maxima move only when a tile's max exceeds them by more
    than 8 (p <= 2^8 meanwhile), so most steps skip rescaling acc and l."""
    m_tile = tl.max(raw, axis=1) * scale + offset
    m_new = tl.maximum(m_i, m_tile)
    if LAZY:
        if tl.max(m_new - m_i, axis=0) > 8.0:
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
    else:
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.exp2(tl.fma(raw, scale, (offset - m_i)[:, None]))
    l_i += tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


def _bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def _host_ms(fn, iters: int = 20) -> float:
    """Median host time to issue ``fn``'s launches (the GPU idle before each call)."""
    import statistics
    import time

    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def _kernel_times(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        out[evt.key[:60]] = round(evt.device_time_total / 1000.0 / 5, 4)
    return dict(sorted(out.items(), key=lambda x: -x[1])[:14])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument(
        "--sections", nargs="+", default=["whole", "prod_ab", "variants", "hashing"]
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", nargs="+", help="variants: rows,keys,warps,stages each")
    parser.add_argument("--contig-only", action="store_true", help="variants: production layout")
    parser.add_argument("--softmax", nargs="+", type=int, default=[0], help="variants: 0, 1, 2")
    args = parser.parse_args()
    global VARIANT_SHAPES, VARIANT_CONTIG_ONLY, VARIANT_SOFTMAX
    VARIANT_SOFTMAX = tuple(args.softmax)
    if args.shapes:
        VARIANT_SHAPES = [tuple(int(x) for x in shape.split(",")) for shape in args.shapes]
    VARIANT_CONTIG_ONLY = args.contig_only

    from hyperpass.config import PAPER

    n, heads = args.n, args.heads
    torch.manual_seed(0)
    q = torch.randn(1, heads, n, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    res: dict = {"device": torch.cuda.get_device_name(), "n": n, "heads": heads}
    for name in args.sections:
        try:
            res[name] = SECTIONS[name](q, k, v, PAPER)
        except Exception as err:  # keep the other sections' numbers
            res[name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        print(json.dumps({name: res[name]}, indent=1), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    return 0


def whole(q, k, v, cfg) -> dict:
    """The whole call (do_bench: back to back; synced: as bench_attention), and per kernel."""
    import torch.nn.functional as F

    from benchmarks.bench_attention import timed
    from kernels import attention as A

    res = {}
    for causal in (False, True):

        def fwd(causal=causal):
            return A.hyper_attention_forward(
                q, k, v, is_causal=causal, scale=None, config=cfg, with_lse=False
            )

        def sdpa(causal=causal):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        tag = "causal" if causal else "noncausal"
        res[tag] = {
            "fwd_ms": _bench(fwd),
            "fwd_synced_ms": timed(fwd),
            "sdpa_synced_ms": timed(sdpa),
            "host_issue_ms": _host_ms(fwd),
            "kernels": _kernel_times(fwd),
        }
    return res


def prod_ab(q, k, v, cfg) -> dict:
    """The production kernels with and without the unmasked (EVEN) path."""
    from kernels import attention as A

    heads, n = q.shape[1], q.shape[2]
    res = {}
    even = A._Call.even
    out = torch.empty_like(q)
    lse = torch.empty(1, heads, n, device="cuda", dtype=torch.float32)
    g = torch.randn_like(q)

    def bwd():
        return A.hyper_attention_backward(g, q, k, v, is_causal=False, scale=None, config=cfg)

    for flag in (True, False):
        A._Call.even = (lambda self, level: False) if not flag else even
        call = A._setup(q, k, v, False, None, cfg, backward=False)
        res[f"fused_fwd_even_{flag}_ms"] = _bench(
            lambda c=call: A._approx_forward(c, 0, out, lse, False)
        )
        res[f"bwd_even_{flag}_ms"] = _bench(bwd)
        res[f"bwd_even_{flag}_kernels"] = _kernel_times(bwd)
    A._Call.even = even
    call = A._setup(q, k, v, False, None, cfg, backward=False)
    _, _, k_inverse = call.orders(0)
    res["gather_samples_ms"] = _bench(lambda: A._sample_rows(call, 0, k_inverse))
    return res


def _simplified_inputs(q, k, v, cfg):
    """The production call's level 0, its fused forward's output (the reference of every
    variant) and the compact samples in the simplified kernel's layout (shared by all heads)."""
    from types import SimpleNamespace

    from kernels import attention as A

    heads, n = q.shape[1], q.shape[2]
    call = A._setup(q, k, v, False, None, cfg, backward=False)
    level = call.plan.levels[0]
    q_order, k_order, k_inverse = call.orders(0)
    out_ref = torch.empty_like(q)
    lse_ref = torch.empty(1, heads, n, device="cuda", dtype=torch.float32)
    A._approx_forward(call, 0, out_ref, lse_ref, merge=False)
    bsize, m = cfg.block_size, level.samples.shape[-1]
    samples = level.samples[0, 0, 0].contiguous()
    return SimpleNamespace(
        call=call, level=level, heads=heads, n=n, bsize=bsize, m=m, out_ref=out_ref,
        indices=(q_order, k_order, k_inverse, samples, k[0][:, samples.long()].contiguous(),
                 v[0][:, samples.long()].contiguous(),
                 (k_inverse[0][:, samples.long()] // bsize).to(torch.int32).contiguous()),
        scalars=(call.scale * A.LOG2E, float(torch.log2(torch.tensor(n / m))), n, m, bsize),
        prod_ms=lambda: _bench(lambda: A._approx_forward(call, 0, out_ref, lse_ref, False)),
    )  # fmt: skip


def _checked_ms(launch, out, out_ref, row: dict) -> dict:
    """``row`` with the variant's largest difference from the production output and its ms
    (or the error: a variant that does not compile is a result too)."""
    try:
        launch()
        torch.cuda.synchronize()
        row["max_diff_vs_prod"] = (out.float() - out_ref.float()).abs().max().item()
        row["ms"] = _bench(launch)
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return row


def variants(q, k, v, cfg) -> dict:
    """The simplified kernel's shapes (its outputs checked against the production kernel)."""
    x = _simplified_inputs(q, k, v, cfg)
    rows = []
    for bm, bn, warps, stages in VARIANT_SHAPES:
        for contig, softmax in itertools.product(
            (True,) if VARIANT_CONTIG_ONLY else (False, True), VARIANT_SOFTMAX
        ):
            var = dict(bm=bm, bn=bn, warps=warps, stages=stages, contig=contig, flat=False,
                       softmax=softmax)  # fmt: skip
            out = torch.full_like(q, float("nan"))
            lse = torch.full((1, x.heads, x.n), float("nan"), device="cuda")

            def launch(var=var, out=out, lse=lse):
                _xfwd_kernel[(x.n // var["bm"], x.heads)](
                    q, k, v, out, lse, *x.indices, *x.scalars,
                    BLOCK_M=var["bm"], BLOCK_N=var["bn"], DO_BLOCK=True, DO_SAMPLES=True,
                    CONTIG=var["contig"], FLAT=var["flat"], SOFTMAX=var["softmax"],
                    num_warps=var["warps"], num_stages=var["stages"],
                )  # fmt: skip

            rows.append(_checked_ms(launch, out, x.out_ref, var))
    return {"prod_fused_fwd_ms": x.prod_ms(), "rows": rows}


def prod_features(q, k, v, cfg) -> dict:
    """What the production kernel's generality costs: the simplified forward (64 x 64 tiles,
    4 warps, 2 stages, contiguous samples) with each of its features added (``PROD`` bits)."""
    x = _simplified_inputs(q, k, v, cfg)
    rows_per = 64
    starts = torch.arange(0, x.n, rows_per, dtype=torch.int32)
    tiles = torch.stack([starts * 0, starts // x.bsize, (starts % x.bsize) // rows_per], 1)
    tiles = tiles.contiguous().cuda()
    res = {"prod_fused_fwd_ms": x.prod_ms(), "rows": []}
    for prod in PROD_FEATURES:
        out = torch.full_like(q, float("nan"))
        lse = torch.full((1, x.heads, x.n), float("nan"), device="cuda")

        def launch(prod=prod, out=out, lse=lse):
            _xfwd_kernel[(x.n // rows_per, x.heads)](
                q, k, v, out, lse, *x.indices, *x.scalars,
                BLOCK_M=rows_per, BLOCK_N=64, DO_BLOCK=True, DO_SAMPLES=True, CONTIG=True,
                FLAT=False, TILES=tiles, SUBS=x.level.subs, stride_n=k.stride(2), PROD=prod,
                num_warps=4, num_stages=2,
            )  # fmt: skip

        res["rows"].append(_checked_ms(launch, out, x.out_ref, {"prod_bits": prod}))
        print(res["rows"][-1], flush=True)
    res["prod_fused_fwd_ms_again"] = x.prod_ms()
    return res


PROD_FEATURES = (0, 1, 2, 4, 7, 0, 7)  # ``_xfwd_kernel``'s PROD bits, alternating the ends


# (rows, keys per step, warps, stages) of the simplified forward; --shapes replaces them
VARIANT_SHAPES = [(128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 4, 4)]
VARIANT_CONTIG_ONLY = False  # --contig-only: the production layout (compact sample rows) only
# online-softmax forms (``--softmax``): 0 production, 1 one FMA per score, 2 that + lazy rescale
VARIANT_SOFTMAX = (0,)


def chunks(q, k, v, cfg) -> dict:
    """The joint counting sort with 256-, 512- and 1024-position chunks (the scatter sorts a
    chunk in registers: a bitonic sort's work per element grows as log^2 of the chunk)."""
    from kernels import attention as A
    from kernels import hashing as HS

    call = A._setup(q, k, v, False, None, cfg, backward=False)
    planes, edges = _planes(cfg, 64), call.plan.edges
    res = {}
    expected = None
    for chunk in (1024, 512, 256):

        def joint(chunk=chunk):
            parts = ((q, call.scale), (k, 1.0))
            return HS.CountingSort(parts, planes, edges, True, chunk=chunk).level(0)

        got = [t for part in joint() for t in part if t is not None]
        expected = expected or got
        same = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        res[f"chunk{chunk}"] = {
            "equal_to_1024": same,
            "ms": _bench(joint),
            "kernels": _kernel_times(joint),
        }
    return res


def hashing(q, k, v, cfg) -> dict:
    """The counting sort: Q and K in the same launches vs one sort each (GPU and host time)."""
    from kernels import attention as A
    from kernels import hashing as HS

    call = A._setup(q, k, v, False, None, cfg, backward=False)
    planes, edges = _planes(cfg, 64), call.plan.edges

    def joint():
        return HS.CountingSort(((q, call.scale), (k, 1.0)), planes, edges, True).level(0)

    def separate():
        return (
            HS.CountingSort(((q, call.scale),), planes, edges).level(0),
            HS.CountingSort(((k, 1.0),), planes, edges, True).level(0),
        )

    (q_joint, _), (k_joint, inv_joint) = joint()
    (q_alone, _), (k_alone, inv_alone) = (part for sort in separate() for part in sort)
    res = {
        "joint_equals_separate": bool(
            torch.equal(q_joint, q_alone)
            and torch.equal(k_joint, k_alone)
            and torch.equal(inv_joint, inv_alone)
        )
    }
    for name, fn in (("joint", joint), ("separate", separate)):
        res[f"{name}_ms"] = _bench(fn)
        res[f"{name}_host_ms"] = _host_ms(fn)
        res[f"{name}_kernels"] = _kernel_times(fn)
    return res


@triton.jit
def _xrank_kernel(
    X, PLANES, PLANES_LO, RANK, n, D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
    SUB: tl.constexpr, DOT: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Gray-code ranks of ITERS x SUB rows of a contiguous [H, n, D] tensor. DOT 0: R row
    reductions in fp32 and 3: three-part planes by tensor-core dots (both the production
    kernel's own functions); 1: one tl.dot (3xTF32); 2: two tensor-core dots of the 16-bit rows
    with the planes split into a 16-bit high and low part (fp32 accumulation)."""
    h = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, D)
    r = tl.arange(0, RP)
    for it in tl.range(ITERS, num_stages=STAGES):
        rows = (tl.program_id(0) * ITERS + it) * SUB + tl.arange(0, SUB)
        x = tl.load(X + h * n * D + rows[:, None].to(tl.int64) * D + cols[None, :])
        if DOT == 3:  # the production kernel's projections (three-part planes)
            rank = _gray_rank_dot(x, PLANES, cols, 1.0, D, R, 3)
        elif DOT == 0:  # the production kernel's fp32 row sums
            rank = _gray_rank(x.to(tl.float32), PLANES, cols, D, R, 3)
        else:
            if DOT == 2:
                offs = cols[:, None] * RP + r[None, :]
                proj = tl.dot(x, tl.load(PLANES + offs))
                proj = tl.dot(x, tl.load(PLANES_LO + offs), acc=proj)
            else:
                planes = tl.load(PLANES + cols[:, None] * R + r[None, :], mask=r[None, :] < R,
                                 other=0.0)  # fmt: skip
                proj = tl.dot(x.to(tl.float32), planes, input_precision="tf32x3")
            code = tl.sum(((proj > 0) & (r < R)[None, :]).to(tl.int32) << r[None, :], axis=1)
            rank = _inverse_gray(code, 3)  # R <= 8
        tl.store(RANK + h * n + rows, rank.to(tl.int16))


# (dot, rows per step, steps per program, pipeline stages, warps); the first is the row sums
# that the others' ranks are compared with. Session 8's first sweep (results/session8_ab_h200.json)
# also had 128/256-row tiles and 8/16-step pipelined loops: none beat the 64-row programs.
RANK_VARIANTS = [
    (0, 64, 1, 1, 2), (3, 64, 1, 1, 2), (3, 64, 1, 1, 4), (2, 64, 1, 1, 2), (1, 64, 1, 1, 2),
    (0, 128, 1, 1, 4), (2, 128, 4, 3, 4), (3, 128, 4, 3, 4),
]  # fmt: skip


def rank_variants(q, k, v, cfg) -> dict:
    """The rank kernel's share of the forward (~0.2 ms for Q and K at 131072, H100 and H200
    alike: not bound by memory bandwidth): row tiles, warps, pipelined loops over several
    tiles, and projections by tensor-core dots; ranks compared with the fp32 row sums' (the
    first variant), as are the production kernel's."""
    from kernels import attention as A
    from kernels import hashing as HS

    heads, n, dim = k.shape[1], k.shape[2], k.shape[3]
    call = A._setup(q, k, v, False, None, cfg, backward=False)
    planes = _planes(cfg, dim)
    prod = HS.CountingSort(((k, 1.0),), planes, call.plan.edges)
    prod_ranks = prod.ranks.view(heads, n)
    expected = None  # the fp32 row sums' ranks (the first DOT == 0 variant)
    padded = torch.zeros(dim, 16, device="cuda")
    padded[:, : planes.shape[1]] = planes
    hi = padded.to(k.dtype)
    lo = (padded - hi.float()).to(k.dtype)
    res = {"prod_rank_ms": _bench(lambda: HS.CountingSort(((k, 1.0),), planes, None))}
    rows = []
    for dot, sub, iters, stages, warps in RANK_VARIANTS:
        var = dict(dot=dot, sub=sub, iters=iters, stages=stages, warps=warps)
        out = torch.full((heads, n), -1, dtype=torch.int16, device="cuda")

        def launch(out=out, var=var):
            first, second = (hi, lo) if var["dot"] == 2 else (planes, planes)
            _xrank_kernel[(n // (var["sub"] * var["iters"]), heads)](
                k, first, second, out, n, D=dim, R=planes.shape[1], RP=16, SUB=var["sub"],
                DOT=var["dot"], ITERS=var["iters"], STAGES=var["stages"], num_warps=var["warps"],
            )  # fmt: skip

        try:
            launch()
            torch.cuda.synchronize()
            if expected is None and dot == 0:
                expected = out.clone()
                var["production_vs_row_sums"] = int((prod_ranks != expected).sum().item())
            if expected is not None:
                var["mismatches_vs_row_sums"] = int((out != expected).sum().item())
            var["ms"] = _bench(launch)
        except Exception as err:
            var["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows.append(var)
        print(var, flush=True)
    res["rows"] = rows
    return res


def graphed(q, k, v, cfg) -> dict:
    """One forward at a time when a CUDA graph replays it (as under torch.compile's
    mode="reduce-overhead"): the GPU's own time, no host launches in between."""
    from benchmarks.bench_attention import timed
    from kernels import attention as A

    res = {}
    for causal in (False, True):

        def fwd(causal=causal):
            return A.hyper_attention_forward(
                q, k, v, is_causal=causal, scale=None, config=cfg, with_lse=False
            )

        fwd()  # plans and kernels ready before the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fwd()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = fwd()
        graph.replay()
        torch.cuda.synchronize()
        expected, _ = fwd()
        tag = "causal" if causal else "noncausal"
        res[tag] = {
            "replay_equals_eager": bool(torch.equal(out, expected)),
            "replay_one_call_ms": timed(graph.replay),
            "eager_one_call_ms": timed(fwd),
        }
        del graph
    return res


def host(q, k, v, cfg) -> dict:
    """Where the host's time to issue one forward goes (cProfile over 40 calls)."""
    import cProfile
    import io
    import pstats

    from kernels import attention as A

    def fwd():
        return A.hyper_attention_forward(
            q, k, v, is_causal=False, scale=None, config=cfg, with_lse=False
        )

    fwd()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(40):
        fwd()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue(), flush=True)
    return {"top_by_tottime": text.getvalue()[-6000:]}


def once(q, k, v, cfg) -> dict:
    """One non-causal forward (for a profiler such as ncu to attach to its kernels)."""
    from kernels import attention as A

    A.hyper_attention_forward(q, k, v, is_causal=False, scale=None, config=cfg, with_lse=False)
    torch.cuda.synchronize()
    return {}


def launch_options(q, k, v, cfg) -> dict:
    """The production fused forward under other launch options (rows, warps, stages, ptxas
    register limit): registers, spills, ms, and its output against the default's."""
    import dataclasses

    from kernels import attention as A

    heads, n = q.shape[1], q.shape[2]
    base = A.tuning_for(64, q.dtype)
    rows = []
    ref = None
    for fwd_rows, warps, stages, maxnreg in LAUNCH_OPTIONS:
        tune = dataclasses.replace(
            base, one_level_fwd_rows=fwd_rows, fwd_warps=warps, one_level_fwd_stages=stages,
            one_level_fwd_maxnreg=maxnreg,
        )  # fmt: skip
        A.set_tuning(tune)
        row = dict(rows=fwd_rows, warps=warps, stages=stages, maxnreg=maxnreg)
        try:
            call = A._setup(q, k, v, False, None, cfg, backward=False)
            call.orders(0)
            out = torch.full_like(q, float("nan"))
            lse = torch.empty(1, heads, n, device="cuda", dtype=torch.float32)
            kernel = A._approx_forward(call, 0, out, lse, False)
            torch.cuda.synchronize()
            ref = out if ref is None else ref
            row["regs"], row["spills"] = kernel.n_regs, kernel.n_spills
            row["max_diff_vs_first"] = (out.float() - ref.float()).abs().max().item()
            row["ms"] = _bench(lambda c=call, o=out, s=lse: A._approx_forward(c, 0, o, s, False))
        except Exception as err:  # a variant that does not compile is a result too
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        finally:
            A.set_tuning(None)
        rows.append(row)
        print(row, flush=True)
    return {"rows": rows}


# (rows, warps, stages, maxnreg) of the production one-level forward; the first is the default.
# Session 7's first sweep (results/explore_forward_s7_h100.json) also had 128/112/88/80
# registers (88 and below spill heavily: 4-5 ms), 1 and 3 stages and 128-row programs: all slower
# than 96 or the default; these alternate the two candidates left.
LAUNCH_OPTIONS = [
    (64, 4, 2, None), (64, 4, 2, 96), (64, 4, 2, 104), (64, 4, 2, None), (64, 4, 2, 96),
    (64, 4, 2, 104),
]  # fmt: skip


@triton.jit
def _marker_kernel(X):
    tl.store(X, tl.load(X) + 1)


def timeline(q, k, v, cfg) -> dict:
    """One forward at a time as the GPU saw it (CUPTI): each kernel's start and end after a
    marker kernel issued just before the call, so the gaps are the GPU waiting for the host."""
    from torch.profiler import ProfilerActivity, profile

    from kernels import attention as A

    marker = torch.zeros(1, device="cuda")
    res = {}
    for causal in (False, True):

        def fwd(causal=causal):
            return A.hyper_attention_forward(
                q, k, v, is_causal=causal, scale=None, config=cfg, with_lse=False
            )

        fwd()
        runs = []
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.cuda.synchronize()
                _marker_kernel[(1,)](marker)
                fwd()
                torch.cuda.synchronize()
        events = sorted(
            (e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time > 0),
            key=lambda e: e.time_range.start,
        )
        for e in events:
            if "_marker_kernel" in e.name:
                runs.append([])
                t0 = e.time_range.end
                continue
            if not runs:
                continue
            runs[-1].append(
                (e.name[:40], round((e.time_range.start - t0) / 1e3, 4),
                 round((e.time_range.end - t0) / 1e3, 4))
            )  # fmt: skip
        res["causal" if causal else "noncausal"] = {
            "kernels_start_end_ms_after_marker": runs[-1] if runs else [],
            "end_ms_per_run": [r[-1][2] for r in runs if r],
        }
    return res


SECTIONS = {
    "launch_options": launch_options,
    "prod_features": prod_features,
    "timeline": timeline,
    "once": once,
    "host": host,
    "rank_variants": rank_variants,
    "chunks": chunks,
    "graphed": graphed,
    "whole": whole,
    "prod_ab": prod_ab,
    "variants": variants,
    "hashing": hashing,
}


def _planes(cfg, dim: int):
    from kernels.hashing import planes_for

    return planes_for(dim, cfg.lsh_num_projs, cfg.seed, "cuda")


if __name__ == "__main__":
    raise SystemExit(main())
