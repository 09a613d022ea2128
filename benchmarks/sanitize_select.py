"""One small call of every ``method="select"`` kernel, for ``compute-sanitizer`` (needs CUDA).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_select.py

The block-bound kernel (one chunk and several, causal and not, odd lengths, GQA 3, head dims 64
and 128, query blocks of 16 and 48) and the fused select kernel forward and backward.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from hyperpass.kernels import block_bound  # noqa: E402

from hyperpass import kernels  # noqa: E402
from hyperpass.config import HyperConfig  # noqa: E402

CFG = HyperConfig(method="select", window=512, sinks=16, select_topk=16, select_block=64,
                  query_block=16, sample_size=0)  # fmt: skip
CASES = [  # (n, q heads, kv heads, dim, dtype, causal, config changes)
    (4099, 6, 2, 64, torch.bfloat16, True, dict()),
    (3001, 3, 1, 128, torch.float16, False, dict(sample_size=64)),
    (2053, 4, 4, 64, torch.bfloat16, True, dict(query_block=48, select_block=96, window=200)),
]


def main() -> int:
    for n, hq, hkv, dim, dtype, causal, change in CASES:
        cfg = CFG.replace(**change)
        q, g = (torch.randn(1, hq, n, dim, device="cuda", dtype=dtype) for _ in "qg")
        k, v = (torch.randn(1, hkv, n, dim, device="cuda", dtype=dtype) for _ in "kv")
        kw = dict(is_causal=causal, scale=None, config=cfg)
        for budget in (block_bound._BOUND_ELEMENTS, 1):  # one chunk, then one per program
            block_bound._BOUND_ELEMENTS = budget
            kernels.hyper_attention_forward(q, k, v, **kw)
            kernels.hyper_attention_backward(g, q, k, v, **kw)
        block_bound._BOUND_ELEMENTS = 1 << 24
        torch.cuda.synchronize()
        print("done", n, hq, hkv, dim, dtype, causal, change, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
