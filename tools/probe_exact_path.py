"""Does a call that hyperpass keeps exact cost what SDPA costs? (needs CUDA)

``hyperpass.hyper_attention`` with the defaults below the break-even (``min_len=0``) calls the
same SDPA; the benchmark once measured it 12% slower on an H100 (llama 8k). This probe times
the two alternately, several rounds each (a drifting clock shows as spread, not as a
difference), forward and forward+backward, and the host's time to issue one call.

    python tools/probe_exact_path.py --out $OUT/exact_path.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import triton

import hyperpass

SETTINGS = {"paper": (12, 12, 64), "llama": (32, 8, 128)}


def _time(fn, backward: bool, inputs, grad) -> float:
    if not backward:
        return triton.testing.do_bench(lambda: fn(*inputs), warmup=25, rep=100,
                                       return_mode="median")  # fmt: skip

    def step():
        torch.autograd.backward(fn(*inputs), grad)

    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median",
                                   grad_to_none=inputs)  # fmt: skip


def _host_us(fn, inputs, calls: int = 200) -> float:
    """Host microseconds to issue one call (the GPU queue kept ahead by a large first call)."""
    with torch.no_grad():
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn(*inputs)
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for setting, (hq, hkv, dim) in SETTINGS.items():
        for n in args.lengths:
            gen = torch.Generator(device="cuda").manual_seed(n)
            q, k, v, g = (torch.randn(1, h, n, dim, device="cuda", dtype=torch.bfloat16,
                                      generator=gen) for h in (hq, hkv, hkv, hq))  # fmt: skip
            gqa = hq != hkv
            fns = {
                "sdpa": lambda q, k, v, gqa=gqa: F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=gqa),
                "shipped": lambda q, k, v, gqa=gqa: hyperpass.hyper_attention(
                    q, k, v, is_causal=True, enable_gqa=gqa),
            }  # fmt: skip
            for backward in (False, True):
                inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
                times = {name: [] for name in fns}
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        times[name].append(_time(fn, backward, inputs, g))
                row = {"setting": setting, "n": n, "backward": backward,
                       "ms": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
                       "ratio": round(statistics.median(times["sdpa"])
                                      / statistics.median(times["shipped"]), 3)}  # fmt: skip
                if not backward:
                    row["host_us"] = {name: round(_host_us(fn, inputs), 1)
                                      for name, fn in fns.items()}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
