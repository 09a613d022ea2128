"""Head groups (``kernels.attention.GROUP_BUDGET``): time and peak memory vs the group budget.

Where backward launches add into one gradient row (the causal recursion; an approximation plus
a pattern), the kernels keep fp32 dQ/dK/dV, and the heads run in groups whose fp32 scratch stays
within ``GROUP_BUDGET`` x the bytes of q (the forward merges in its output: never grouped).
Fewer, larger groups launch less; smaller ones use less memory.
This sweeps the budget (``inf``: one group, as before head groups) on the paper and llama
settings, causal recursive, forward and forward+backward, next to SDPA (cuDNN). Not a test.

    python benchmarks/bench_head_groups.py --out $OUT/groups.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_attention import SETTINGS, implementations, peak_mb, timed  # noqa: E402

BUDGETS = [float("inf"), 4.0, 3.0, 2.0, 1.0]


def main() -> int:
    import torch
    from hyperpass.kernels import attention

    from hyperpass.config import PAPER

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[32768, 131072])
    parser.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows, default_budget = [], attention.GROUP_BUDGET
    for name in args.settings:
        s = SETTINGS[name]
        for n in args.lengths:
            gen = torch.Generator(device="cuda").manual_seed(n)
            q, k, v = (
                torch.randn(s["batch"], h, n, s["dim"], device="cuda", generator=gen,
                            dtype=torch.bfloat16).requires_grad_(True)
                for h in (s["q_heads"], s["kv_heads"], s["kv_heads"])
            )  # fmt: skip
            g = torch.randn_like(q)
            impls = implementations(s, True)
            sdpa, hyper = impls["sdpa"], impls["hyper"]
            base = {}
            for budget in [None, *args.budgets]:
                fwd, fwd_bwd = sdpa if budget is None else hyper
                if budget is not None:
                    attention.GROUP_BUDGET = budget
                for kind, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    call = lambda fn=fn, q=q, k=k, v=v, g=g: fn(q, k, v, g)  # noqa: E731
                    with torch.no_grad() if kind == "fwd" else torch.enable_grad():
                        ms = timed(call)
                        mem = peak_mb(call, (q, k, v) if kind == "fwd" else (q, k, v, g))
                    groups = None
                    if budget is not None:  # the forward is never grouped
                        grouped = len(attention.head_groups(q, k, v, True, PAPER))
                        groups = 1 if kind == "fwd" else grouped
                    row = dict(setting=name, n=n, pass_=kind, budget=budget, groups=groups,
                               ms=ms, peak_mb=mem)  # fmt: skip
                    if budget is None:
                        base[kind] = (ms, mem)
                    else:
                        row["speedup_vs_sdpa"] = base[kind][0] / ms
                        row["memory_vs_sdpa"] = mem / base[kind][1]
                    rows.append(row)
                    label = "sdpa" if budget is None else f"budget {budget} ({groups} groups)"
                    print(f"{name:6s} n={n:6d} {kind:8s} {label:26s} {ms:9.2f} ms "
                          f"{mem:8.0f} MB", flush=True)  # fmt: skip
                    torch.cuda.empty_cache()
            attention.GROUP_BUDGET = default_budget
            if args.out:
                meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
                with open(args.out, "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
