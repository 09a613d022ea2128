"""The rewritten op under ``torch.compile`` modes on a GPU (not a test: needs CUDA).

One attention call, compiled with ``backend=hyperpass.backend(...)`` (paper setting) and with
``backend="inductor"`` (exact SDPA), by default and with ``mode="reduce-overhead"`` (Inductor's
CUDA graphs). For each: does it run, does its output equal the eager op's, and its median time
one call at a time (the host's launches count) and back to back. q, k and v are marked static
addresses, as a model's activations are produced inside its graph: the CUDA graphs copy no input.

    python benchmarks/compile_modes.py --out $OUT/compile_modes.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import hyperpass
from benchmarks.bench_attention import back_to_back, timed
from hyperpass.config import PAPER

PAPER_PARAMS = {"method": PAPER.method, "sample_size": PAPER.sample_size, "window": 0, "sinks": 0}


def run_case(n: int, causal: bool, mode: str | None, hyper: bool) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for t in (q, k, v):
        torch._dynamo.mark_static_address(t)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    backend = hyperpass.backend(min_len=4096, **PAPER_PARAMS) if hyper else "inductor"
    fn = torch.compile(attention, backend=backend, mode=mode, fullgraph=True)
    impl = "hyper" if hyper else "sdpa"
    row = {"n": n, "causal": causal, "mode": mode or "default", "impl": impl}
    try:
        with torch.no_grad():
            for _ in range(3):  # Inductor's CUDA graphs: warm-up runs, then the recording
                out = fn(q, k, v).clone()
            torch.cuda.synchronize()
            if hyper:
                expected = torch.ops.hyperpass.hyper_attention(
                    q, k, v, is_causal=causal, min_len=4096, **PAPER_PARAMS
                )
                row["equals_eager_op"] = bool(torch.equal(out, expected))
                row["rewritten"] = [r.code for r in backend.reports]
            row["one_call_ms"] = timed(lambda: fn(q, k, v))
            row["back_to_back_ms"] = back_to_back(lambda: fn(q, k, v))
    except Exception as err:  # a mode that fails is a result too
        row["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", nargs="+", type=int, default=[32768, 131072])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for n in args.lengths:
        for causal in (False, True):
            for mode in (None, "reduce-overhead"):
                for hyper in (True, False):
                    rows.append(run_case(n, causal, mode, hyper))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
