"""The block methods' GPU work at one size, small enough for compute-sanitizer (needs CUDA).

Runs, forward and backward, the default (``method="select"``: row scoring, selection, the
query-major lists, FlexAttention) eagerly, through the planned op of compiled training graphs,
with a key-padding mask and sink copies, and ``method="longformer"``; checks only that the
outputs are finite (correctness against the reference is ``tools/gpu_check_blocks.py``).

    compute-sanitizer --tool memcheck --error-exitcode 3 python tools/memcheck_select.py
"""

from __future__ import annotations

import sys

import torch

import hyperpass
from hyperpass.config import DEFAULT
from hyperpass.kernels import flex
from hyperpass.op import hyper_attention_with_plan_op, op_args


def run(n: int = 4173) -> list[str]:
    flex._PAIRS_PER_SINK_COPY = 16  # sink copies at this size too
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, g = (torch.randn(2, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))  # fmt: skip
    k, v = (torch.randn(2, 2, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))  # fmt: skip
    key_mask = torch.ones(2, 1, 1, n, dtype=torch.bool, device="cuda")
    key_mask[0, ..., : n // 5] = False
    select, longformer = (
        DEFAULT.replace(min_len=1),
        DEFAULT.replace(min_len=1, method="longformer", window=1024),
    )
    calls = {
        "select eager": lambda *t: hyperpass.hyper_attention(
            *t, is_causal=True, enable_gqa=True, config=select),
        "select eager, key mask": lambda *t: hyperpass.hyper_attention(
            *t, attn_mask=key_mask, is_causal=True, enable_gqa=True, config=select),
        "select planned": lambda *t: hyper_attention_with_plan_op(
            *op_args(*t, is_causal=True, enable_gqa=True, config=select))[0],
        "select planned, key mask": lambda *t: hyper_attention_with_plan_op(
            *op_args(*t, attn_mask=key_mask, is_causal=True, enable_gqa=True,
                     config=select))[0],
        "longformer": lambda *t: hyperpass.hyper_attention(
            *t, is_causal=True, enable_gqa=True, config=longformer),
    }  # fmt: skip
    failures = []
    for name, call in calls.items():
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = call(*inputs)
        grads = torch.autograd.grad(out, inputs, g)
        torch.cuda.synchronize()
        finite = all(bool(torch.isfinite(t).all()) for t in (out, *grads))
        print(f"{name}: {'finite' if finite else 'NOT FINITE'}", flush=True)
        if not finite:
            failures.append(name)
    return failures


if __name__ == "__main__":
    sys.exit(1 if run() else 0)
