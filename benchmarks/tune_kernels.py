"""Tile-size sweep of the HyperAttention kernels: per-kernel CUDA time for each candidate.

Not a test. Prints one line per (setting, mask, candidate) with the time of each kernel (from
torch.profiler) and the wall time of forward and forward+backward, so the defaults in
``kernels/attention.py`` (``tuning_for``) can be chosen per kernel family.

    python benchmarks/tune_kernels.py --out $OUT/tune.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CANDIDATES = {
    64: [
        # session 5: with the samples' rows compact (approx.py), 64-row tiles ran the simplified
        # forward of benchmarks/explore_forward.py in 0.71 ms (2 stages) vs 0.77 (128 rows)
        dict(block_m=64, block_n=64, bwd_block_m=64, fwd_warps=4, bwd_warps=4, stages=3),
        dict(block_m=128, block_n=64, bwd_block_m=64, fwd_warps=4, bwd_warps=4, stages=2),
        dict(block_m=128, block_n=64, bwd_block_m=64, fwd_warps=8, bwd_warps=8, stages=2),
        dict(block_m=128, block_n=64, bwd_block_m=64, fwd_warps=4, bwd_warps=4, stages=3),
        dict(block_m=128, block_n=128, bwd_block_m=64, fwd_warps=8, bwd_warps=8, stages=2),
        dict(block_m=64, block_n=64, bwd_block_m=64, fwd_warps=4, bwd_warps=4, stages=2),
        dict(block_m=128, block_n=32, bwd_block_m=32, fwd_warps=4, bwd_warps=4, stages=3),
        dict(block_m=64, block_n=128, bwd_block_m=128, fwd_warps=4, bwd_warps=8, stages=2),
    ],
    128: [
        dict(block_m=128, block_n=64, bwd_block_m=64, fwd_warps=8, bwd_warps=8, stages=2),
        dict(block_m=64, block_n=64, bwd_block_m=64, fwd_warps=4, bwd_warps=4, stages=2),
        dict(block_m=128, block_n=32, bwd_block_m=32, fwd_warps=8, bwd_warps=8, stages=3),
        dict(block_m=64, block_n=32, bwd_block_m=64, fwd_warps=4, bwd_warps=4, stages=3),
        dict(block_m=128, block_n=64, bwd_block_m=32, fwd_warps=8, bwd_warps=4, stages=3),
    ],
}
CASES = [
    ("paper", 131072, False),
    ("paper", 131072, True),
    ("llama", 32768, True),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--cases", nargs="+", default=None, help="setting:n:causal, e.g. paper:131072:1"
    )
    parser.add_argument("--candidates", nargs="+", type=int, default=None, help="indices to run")
    args = parser.parse_args()
    cases = CASES
    if args.cases:
        cases = [
            (c.split(":")[0], int(c.split(":")[1]), c.split(":")[2] == "1") for c in args.cases
        ]
    import torch
    import triton
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_attention import SETTINGS, implementations, timed
    from hyperpass import kernels

    results = []
    for setting, n, causal in cases:
        s = SETTINGS[setting]
        q = torch.randn(1, s["q_heads"], n, s["dim"], device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, s["kv_heads"], n, s["dim"], device="cuda", dtype=torch.bfloat16)
        v, g = torch.randn_like(k), torch.randn_like(q)
        inputs = (q, k, v, g)
        fwd, fwd_bwd = implementations(s, causal)["hyper"]
        chosen = CANDIDATES[s["dim"]]
        if args.candidates:
            chosen = [chosen[i] for i in args.candidates if i < len(chosen)]
        for cand in chosen:
            kernels.set_tuning(kernels.Tuning(**cand))
            row = {"setting": setting, "n": n, "causal": causal, **cand}
            try:
                row["fwd_ms"] = timed(lambda f=fwd, x=inputs: f(*x), max_iters=20)
                row["fwd_bwd_ms"] = timed(lambda f=fwd_bwd, x=inputs: f(*x), max_iters=10)
                # back to back, the host ahead of the GPU: the kernels' own time
                row["fwd_b2b_ms"] = triton.testing.do_bench(
                    lambda f=fwd, x=inputs: f(*x), return_mode="median"
                )
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fwd_bwd(*inputs)
                    torch.cuda.synchronize()
                per_kernel = defaultdict(float)
                for evt in prof.key_averages():
                    name = evt.key if "_kernel" in evt.key else "torch:" + evt.key[:30]
                    per_kernel[name] += evt.device_time_total / 1000.0
                row["kernels_ms"] = {
                    k: round(t, 3) for k, t in sorted(per_kernel.items(), key=lambda x: -x[1])[:12]
                }
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            results.append(row)
            print(json.dumps(row), flush=True)
        kernels.set_tuning(None)
        del q, k, v, g, inputs
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
