"""``method="select"`` on a GPU: the kernels vs the reference, then speed vs SDPA (cuDNN).

Correctness (not a test: needs CUDA): out/lse (and dq/dk/dv at one size) of the kernels on
bf16/fp16 inputs vs the reference run in fp32 on the same (upcast) inputs, next to the
low-precision reference's own error; the fp32 run selects the same blocks as both (the
selection is computed in fp32 from the same values). Relative error = max |x - oracle| /
max |oracle|. Speed: B=1, H=12, D=64 (the paper's setting), bf16, causal, window 512, sinks 16,
select_topk 16, select_block 64, query_block 16, no samples; forward and forward+backward, each
median of CUDA-event timings. Writes JSON after every row (a time limit keeps what ran).

    python benchmarks/gpu_check_select.py --out $OUT/select.json [--limit-s 300]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from hyperpass.kernels.block_bound import select_blocks  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from hyperpass import block_select, kernels  # noqa: E402
from hyperpass.config import HyperConfig  # noqa: E402
from hyperpass.reference import hyper_attention_reference  # noqa: E402

CFG = HyperConfig(method="select", window=512, sinks=16, select_topk=16, select_block=64,
                  query_block=16, sample_size=0)  # fmt: skip
CHECKS = [  # (n, heads, kv_heads, dtype, causal, params, backward)
    (4096, 8, 2, torch.bfloat16, True, dict(), True),
    (4096, 6, 2, torch.float16, False, dict(sample_size=256), True),
    (16384, 8, 8, torch.bfloat16, True, dict(sample_size=256), False),
    (32768, 4, 4, torch.bfloat16, False, dict(), False),
]
LENGTHS = [8192, 16384, 32768, 65536, 131072]


def rel(x, oracle) -> float:
    x, oracle = x.float(), oracle.float()
    fin = torch.isfinite(oracle)
    if not torch.equal(fin, torch.isfinite(x)):
        return float("inf")
    scale = oracle[fin].abs().max().clamp(min=1e-6)
    return ((x[fin] - oracle[fin]).abs().max() / scale).item()


def check(n, heads, kv_heads, dtype, causal, params, backward) -> dict:
    cfg = CFG.replace(**params)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, g = (
        torch.randn(1, h, n, 64, device="cuda", generator=gen).to(dtype)
        for h in (heads, kv_heads, kv_heads, heads)
    )
    kw = dict(is_causal=causal, scale=None, config=cfg)
    names = ["out", "lse"]
    ours = list(kernels.hyper_attention_forward(q, k, v, **kw))
    blocks = select_blocks(q, k, 0.125, cfg, causal)
    row = dict(n=n, heads=heads, kv_heads=kv_heads, dtype=str(dtype), causal=causal, **params)
    row["selection"] = selection_check(q, k, blocks, cfg, causal)
    low_in = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    high_in = [t.detach().float().requires_grad_(backward) for t in (q, k, v)]
    # the attention given the kernels' selection (checked above up to rounding ties)
    given = blocks.long().view(1, kv_heads, heads // kv_heads, *blocks.shape[2:])
    with torch.enable_grad(), mock.patch.object(block_select, "_select_blocks", lambda *a: given):
        low = list(hyper_attention_reference(*low_in, **kw))
        high = list(hyper_attention_reference(*high_in, **kw))
    if backward:
        names += ["dq", "dk", "dv"]
        ours += list(kernels.hyper_attention_backward(g, q, k, v, **kw))
        low_g = torch.autograd.grad(low[0], low_in, g)
        high_g = torch.autograd.grad(high[0], high_in, g.float())
        low, high = low + list(low_g), high + list(high_g)
    ok = row["selection"]["ok"]
    for name, a, lo, hi in zip(names, ours, low, high, strict=True):
        err, ref_err = rel(a, hi), rel(lo.to(a.dtype) if name == "lse" else lo, hi)
        row[name] = dict(kernel=err, reference=ref_err)
        ok &= err <= 2 * ref_err + 2e-3
    row["ok"] = bool(ok)
    return row


def selection_check(q, k, blocks, cfg, causal) -> dict:
    """The kernels' blocks vs an fp64 top-k of the reference's bounds. Tensor-core sums round
    differently from the oracle's, so a block whose bound ties the k-th largest within rounding
    (1e-5 of the largest bound) may stand in for it; anything else is an error."""
    heads, kv_heads = q.shape[1], k.shape[1]
    spans = block_select._LocalSpans(q.shape[2], k.shape[2], cfg, causal, q.device)
    scaled = (q.double() * 0.125).view(1, kv_heads, heads // kv_heads, *q.shape[2:])
    bound = block_select._block_bounds(scaled, k.double(), spans, cfg)
    bound = bound.view(*blocks.shape[:3], -1)
    topk = blocks.shape[-1]
    expected = bound.topk(topk, dim=-1)
    chosen = blocks.long()
    picked = torch.where(chosen >= 0, bound.gather(-1, chosen.clamp(min=0)), float("-inf"))
    finite = torch.isfinite(expected.values)
    tol = 1e-5 * bound[torch.isfinite(bound)].abs().max()
    kth = expected.values.masked_fill(~finite, float("inf")).amin(-1, keepdim=True)
    same_count = ((chosen >= 0).sum(-1) == finite.sum(-1)).all().item()
    valid = torch.where(chosen >= 0, picked >= kth - tol, True).all().item()
    differ = chosen.sort(-1).values != torch.where(finite, expected.indices, -1).sort(-1).values
    return dict(
        ok=bool(same_count and valid),
        query_blocks=chosen.shape[:3].numel(),
        differing_query_blocks=int(differ.any(-1).sum().item()),
    )


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def speed(n: int) -> dict:
    q, k, v, g = (torch.randn(1, 12, n, 64, device="cuda", dtype=torch.bfloat16) for _ in "qkvg")
    kw = dict(is_causal=True, scale=None, config=CFG)
    reps = 10 if n <= 32768 else 4

    def sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_bwd():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
        out.backward(g)

    def sel_fwd_bwd():
        kernels.hyper_attention_forward(q, k, v, **kw)
        kernels.hyper_attention_backward(g, q, k, v, **kw)

    row = dict(n=n)
    row["sdpa_fwd_ms"] = timed(sdpa, reps)
    row["select_fwd_ms"] = timed(lambda: kernels.hyper_attention_forward(q, k, v, **kw), reps)
    row["select_blocks_ms"] = timed(lambda: select_blocks(q, k, 0.125, CFG, True), reps)
    row["sdpa_fwd_bwd_ms"] = timed(sdpa_bwd, reps)
    row["select_fwd_bwd_ms"] = timed(sel_fwd_bwd, reps)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="select.json")
    parser.add_argument("--limit-s", type=float, default=300.0)
    args = parser.parse_args()
    t0 = time.time()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, checks=[], speed=[])

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for case in CHECKS:
        try:
            row = check(*case)
        except Exception:  # noqa: BLE001 - report and go on
            row = dict(case=str(case[:5]), error=traceback.format_exc(limit=3))
        result["checks"].append(row)
        print(json.dumps(row), flush=True)
        save()
        torch.cuda.empty_cache()
    for n in LENGTHS:
        if time.time() - t0 > args.limit_s:
            print(f"time limit: stopped before n={n}", flush=True)
            break
        try:
            row = speed(n)
        except Exception:  # noqa: BLE001
            row = dict(n=n, error=traceback.format_exc(limit=3))
        result["speed"].append(row)
        print(json.dumps(row), flush=True)
        save()
        torch.cuda.empty_cache()
    print(
        "| n | SDPA fwd ms | select fwd ms | (selection ms) | SDPA fwd+bwd ms | select fwd+bwd ms |"
    )
    for r in result["speed"]:
        if "error" not in r:
            print(f"| {r['n']} | {r['sdpa_fwd_ms']:.2f} | {r['select_fwd_ms']:.2f} | "
                  f"{r['select_blocks_ms']:.2f} | {r['sdpa_fwd_bwd_ms']:.2f} | "
                  f"{r['select_fwd_bwd_ms']:.2f} |")  # fmt: skip
    return 0 if all(r.get("ok") for r in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
