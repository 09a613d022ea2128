"""Where the 131072 non-causal forward spends its time, and which kernel shapes would cut it.

Not a test, not the product: an A/B harness for the fused approximated forward
(``kernels/approx.py``) and the counting sort's launches (``kernels/hashing.py``) at one shape.
Each variant of the simplified forward below (non-causal, one sub-problem, no pattern) is checked
against the production kernel's output before it is timed.

    python benchmarks/explore_forward.py --out $OUT/explore.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import triton
import triton.language as tl

from kernels.common import FLOOR, _softmax_step, _store_out_lse


@triton.jit
def _rows(base, pos, d):
    return tl.load(base + pos[:, None].to(tl.int64) * 64 + d[None, :])


@triton.jit
def _xfwd_kernel(
    Q, K, V, OUT, LSE, QORD, KORD, KINV, SAMPLES, KS, VS, SBLK,
    qk_scale, log2_weight, n, n_samples, bsize,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DO_BLOCK: tl.constexpr, DO_SAMPLES: tl.constexpr, CONTIG: tl.constexpr, FLAT: tl.constexpr,
):  # fmt: skip
    """D = 64, B = 1, Hq = Hkv, contiguous [H, n, 64]; n a multiple of bsize and BLOCK_M."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = (pid_t * BLOCK_M) // bsize
    qpos = tl.load(QORD + h * n + rows)
    d = tl.arange(0, 64)
    q = _rows(Q + h * n * 64, qpos, d)
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
                kpos = tl.load(kord + n0 + tl.arange(0, BLOCK_N))
                k = _rows(k_base, kpos, d)
                v = _rows(v_base, kpos, d)
                scores = tl.dot(q, tl.trans(k)) * qk_scale
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, "tf32")
        if DO_SAMPLES:
            for s0 in range(0, n_samples, BLOCK_N):
                sc = s0 + tl.arange(0, BLOCK_N)
                if CONTIG:  # samples' rows copied contiguous, their block ids precomputed
                    k = _rows(KS + h * n_samples * 64, sc, d)
                    v = _rows(VS + h * n_samples * 64, sc, d)
                    blk = tl.load(SBLK + h * n_samples + sc)
                else:
                    kpos = tl.load(SAMPLES + sc)
                    k = _rows(k_base, kpos, d)
                    v = _rows(v_base, kpos, d)
                    blk = tl.load(KINV + h * n + kpos) // bsize
                scores = tl.dot(q, tl.trans(k)) * qk_scale + log2_weight
                scores = tl.where((blk != kb)[None, :], scores, float("-inf"))
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, scores, v, "tf32")
    _store_out_lse(OUT + h * n * 64, LSE + h * n, qpos, qpos >= 0, 64, d, 64, acc, l_i, m_i)


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
    args = parser.parse_args()

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
            return A.hyper_attention_forward(q, k, v, is_causal=causal, scale=None, config=cfg)

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
    level = call.plan.levels[0]
    _, _, k_inverse = call.orders(0)
    res["gather_samples_ms"] = _bench(lambda: A._sample_rows(call, level, k_inverse))
    return res


def variants(q, k, v, cfg) -> dict:
    """The simplified kernel's shapes (its outputs checked against the production kernel)."""
    from kernels import attention as A

    heads, n = q.shape[1], q.shape[2]
    call = A._setup(q, k, v, False, None, cfg, backward=False)
    level = call.plan.levels[0]
    q_order, k_order, k_inverse = call.orders(0)
    out_ref = torch.empty_like(q)
    lse_ref = torch.empty(1, heads, n, device="cuda", dtype=torch.float32)
    A._approx_forward(call, 0, out_ref, lse_ref, merge=False)

    bsize, m = cfg.block_size, level.samples.shape[-1]
    samples = level.samples[0, 0, 0].contiguous()  # shared by every head
    ks = k[0][:, samples.long()].contiguous()
    vs = v[0][:, samples.long()].contiguous()
    sblk = (k_inverse[0][:, samples.long()] // bsize).to(torch.int32).contiguous()
    log2_weight = float(torch.log2(torch.tensor(n / m)))
    scale = call.scale * A.LOG2E
    shapes = [(128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 4, 4)]
    rows = []
    for bm, bn, warps, stages in shapes:
        for contig in (False, True):
            var = dict(bm=bm, bn=bn, warps=warps, stages=stages, contig=contig, flat=False)
            out = torch.full_like(q, float("nan"))
            lse = torch.full_like(lse_ref, float("nan"))

            def launch(var=var, out=out, lse=lse):
                _xfwd_kernel[(n // var["bm"], heads)](
                    q, k, v, out, lse, q_order, k_order, k_inverse, samples, ks, vs, sblk,
                    scale, log2_weight, n, m, bsize,
                    BLOCK_M=var["bm"], BLOCK_N=var["bn"], DO_BLOCK=True, DO_SAMPLES=True,
                    CONTIG=var["contig"], FLAT=var["flat"],
                    num_warps=var["warps"], num_stages=var["stages"],
                )  # fmt: skip

            try:
                launch()
                torch.cuda.synchronize()
                var["max_diff_vs_prod"] = (out.float() - out_ref.float()).abs().max().item()
                var["ms"] = _bench(launch)
            except Exception as err:  # a variant that does not compile is a result too
                var["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(var)
    return {
        "prod_fused_fwd_ms": _bench(lambda: A._approx_forward(call, 0, out_ref, lse_ref, False)),
        "rows": rows,
    }


def hashing(q, k, v, cfg) -> dict:
    """The counting sort's launches; the rank kernel's warps at D=64 and D=128."""
    from kernels import attention as A
    from kernels import hashing as HS

    call = A._setup(q, k, v, False, None, cfg, backward=False)
    res = {
        "kernels": _kernel_times(
            lambda: (
                HS.CountingSort(q, _planes(cfg, 64), call.scale, call.plan.edges).level(0),
                HS.CountingSort(k, _planes(cfg, 64), 1.0, call.plan.edges, inverse=True).level(0),
            )
        )
    }
    ksrt = HS.CountingSort(k, _planes(cfg, 64), 1.0, call.plan.edges, inverse=True)
    chosen = HS.scatter_warps
    for warps in (8, 16, 32):
        HS.scatter_warps = lambda chunk, w=warps: w
        res[f"k_scatter_w{warps}_ms"] = _bench(lambda: ksrt._scatter(0, 1))
    HS.scatter_warps = chosen
    for dim, kv_heads in ((64, q.shape[1]), (128, 8)):
        x = torch.randn(1, kv_heads, q.shape[2], dim, device="cuda", dtype=torch.bfloat16)
        res[f"count_scan_d{dim}_ms"] = _bench(
            lambda x=x, dim=dim: HS.CountingSort(x, _planes(cfg, dim), 1.0, None)
        )
    return res


def host(q, k, v, cfg) -> dict:
    """Where the host's time to issue one forward goes (cProfile over 40 calls)."""
    import cProfile
    import io
    import pstats

    from kernels import attention as A

    def fwd():
        return A.hyper_attention_forward(q, k, v, is_causal=False, scale=None, config=cfg)

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


SECTIONS = {
    "host": host,
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
