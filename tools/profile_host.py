"""Host time per call of the default's parts on a GPU: how long Python takes to issue each,
without waiting for the GPU (``time.perf_counter`` over back-to-back calls, then the same with
the final synchronization), in ms.

Parts: SDPA; the op (``hyper_attention``, ``min_len=1``); the op with its approximation
replaced by a preallocated output (the dispatch and checks alone); ``select_forward``; the
selection's launches (``select_block_lists``, and ``_row_scores`` alone); the compiled
FlexAttention call on a prebuilt mask (as the op makes it, inside Dynamo's config patch; the
same compiled function without the patch; the patch alone; a static-shape compile; a compile
that takes the four list tensors and builds the BlockMask inside); and, by ``do_bench``, the
op against ``select_forward`` replayed from a CUDA graph (its GPU time alone). Where the host
time is above the synchronized time's GPU share, the call is host-bound.

    python tools/profile_host.py --out $OUT/host.json [--lengths 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import time

SETTINGS = {"paper": (12, 12, 64), "llama": (32, 8, 128)}


def host_ms(fn, calls=200) -> tuple[float, float]:
    """(host ms per call, ms per call including the final synchronization)."""
    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    done = time.perf_counter() - start
    return round(issued / calls * 1e3, 4), round(done / calls * 1e3, 4)


def _flex_variants(q, k, v, lists, n, cfg, scale, gqa):
    """The compiled FlexAttention call, several ways (all on the same lists)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from hyperpass.kernels import flex

    qb, kb = cfg.query_block, cfg.select_block
    mask = flex.block_mask_from_lists(*lists, n, n, qb, kb, flex.causal_mod(), False)
    options = flex._kernel_options(cfg, q.shape[-1])
    kw = dict(block_mask=mask, scale=scale, enable_gqa=gqa, kernel_options=options)
    compiled = flex._compiled(True, False)
    static = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    causal = flex.causal_mod()

    def from_lists(q, k, v, part_num, part_idx, full_num, full_idx):
        m = BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=(qb, kb),
                                     mask_mod=causal, seq_lengths=(n, n))  # fmt: skip
        return flex_attention(q, k, v, block_mask=m, scale=scale, enable_gqa=gqa,
                              kernel_options=options)  # fmt: skip

    inside = torch.compile(from_lists, dynamic=True, fullgraph=True)

    def patch():
        with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
            pass

    return {
        "flex_call": lambda: flex._flex(q, k, v, mask, scale, gqa, options, True),
        "flex_no_patch": lambda: compiled(q, k, v, **kw),
        "dynamo_config_patch": patch,
        "flex_static": lambda: static(q, k, v, **kw),
        "flex_lists_inside": lambda: inside(q, k, v, *lists),
    }


def _gpu_floor(q, k, v, cfg, scale, gqa) -> dict:
    """do_bench medians (ms) of SDPA, the op, and ``select_forward`` replayed from a CUDA graph
    (no host time at all: what the GPU work alone takes)."""
    import torch
    import torch.nn.functional as F
    import triton

    from hyperpass.kernels import flex
    from hyperpass.op import hyper_attention

    def forward():
        return flex.select_forward(q, k, v, is_causal=True, scale=scale, config=cfg)[0]

    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()

    def bench(fn):
        return round(triton.testing.do_bench(fn, warmup=25, rep=100), 4)

    return {
        "gpu_sdpa_ms": bench(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        ),
        "gpu_op_ms": bench(
            lambda: hyper_attention(q, k, v, is_causal=True, enable_gqa=gqa, config=cfg)
        ),
        "gpu_graph_ms": bench(graph.replay),
    }


def profile(name: str, n: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hyperpass.config import DEFAULT
    from hyperpass.kernels import flex
    from hyperpass.kernels.select_blocks import _row_scores, select_block_lists
    from hyperpass.op import hyper_attention, registration

    hq, hkv, d = SETTINGS[name]
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    gqa, scale, cfg = hq != hkv, d**-0.5, DEFAULT.replace(min_len=1)
    lists = select_block_lists(q, k, scale, cfg, True)
    scores = torch.empty(1, hq, n // cfg.query_block, n // cfg.select_block, device="cuda")
    out = torch.empty_like(q)

    def op():
        return hyper_attention(q, k, v, is_causal=True, enable_gqa=gqa, config=cfg)

    row = {
        "setting": name,
        "n": n,
        "sdpa": host_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        ),  # fmt: skip
        "op": host_ms(op),
        "select_forward": host_ms(
            lambda: flex.select_forward(q, k, v, is_causal=True, scale=scale, config=cfg)
        ),
        "select_block_lists": host_ms(lambda: select_block_lists(q, k, scale, cfg, True)),
        "row_scores": host_ms(
            lambda: _row_scores(q, k, scores, scale, cfg, True, cfg.window, "tf32")
        ),
        "block_mask_from_lists": host_ms(
            lambda: flex.block_mask_from_lists(
                *lists, n, n, cfg.query_block, cfg.select_block, flex.causal_mod(), False
            )
        ),
    }
    for part, fn in _flex_variants(q, k, v, lists, n, cfg, scale, gqa).items():
        row[part] = host_ms(fn)
    row.update(_gpu_floor(q, k, v, cfg, scale, gqa))
    approximate = registration._approximate
    registration._approximate = lambda *args: out  # the op's dispatch and checks alone
    try:
        row["op_dispatch"] = host_ms(op)
    finally:
        registration._approximate = approximate
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    # the variants compile FlexAttention per setting and length, beyond Dynamo's default limit
    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.accumulated_recompile_limit = 4096
    rows = [profile(name, n) for name in SETTINGS for n in args.lengths]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
