"""Host time per call of the default's parts on a GPU: how long Python takes to issue each,
without waiting for the GPU (``time.perf_counter`` over back-to-back calls, then the same with
the final synchronization), in ms.

Parts: SDPA; the op (``hyper_attention``, ``min_len=1``); ``select_forward`` (the selection,
the BlockMask, FlexAttention); the selection's two launches (``select_block_lists``);
``block_mask_from_lists``; the compiled FlexAttention call on a prebuilt mask. Where the host
time is above the synchronized time's GPU share, the call is host-bound.

    python tools/profile_host.py --out $OUT/host.json [--lengths 4096 8192] \
        [--cprofile $OUT/host_cprofile.txt]   # also cProfile 200 op calls (paper, 8192)
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


def profile(name: str, n: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hyperpass.config import DEFAULT
    from hyperpass.kernels import flex
    from hyperpass.kernels.select_blocks import select_block_lists
    from hyperpass.op import hyper_attention

    hq, hkv, d = SETTINGS[name]
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    gqa, scale, cfg = hq != hkv, d**-0.5, DEFAULT.replace(min_len=1)
    qb, kb = cfg.query_block, cfg.select_block
    lists = select_block_lists(q, k, scale, cfg, True)
    mask = flex.block_mask_from_lists(*lists, n, n, qb, kb, flex.causal_mod(), False)
    options = flex._kernel_options(cfg, d)
    return {
        "setting": name,
        "n": n,
        "sdpa": host_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        ),  # fmt: skip
        "op": host_ms(lambda: hyper_attention(q, k, v, is_causal=True, enable_gqa=gqa, config=cfg)),
        "select_forward": host_ms(
            lambda: flex.select_forward(q, k, v, is_causal=True, scale=scale, config=cfg)
        ),
        "select_block_lists": host_ms(lambda: select_block_lists(q, k, scale, cfg, True)),
        "block_mask_from_lists": host_ms(
            lambda: flex.block_mask_from_lists(*lists, n, n, qb, kb, flex.causal_mod(), False)
        ),
        "flex_call": host_ms(lambda: flex._flex(q, k, v, mask, scale, gqa, options, True)),
    }


def cprofile_op(path: str, calls: int = 200) -> None:
    """cProfile's tables (own time, cumulative) of ``calls`` op calls, paper setting, 8192."""
    import cProfile
    import io
    import pstats

    import torch

    from hyperpass.config import DEFAULT
    from hyperpass.op import hyper_attention

    q, k, v = (torch.randn(1, 12, 8192, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = DEFAULT.replace(min_len=1)
    for _ in range(20):
        hyper_attention(q, k, v, is_causal=True, config=cfg)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        hyper_attention(q, k, v, is_causal=True, config=cfg)
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    with open(path, "w") as f:
        f.write(text.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cprofile", default=None, help="write cProfile's tables here")
    args = parser.parse_args()
    rows = [profile(name, n) for name in SETTINGS for n in args.lengths]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.cprofile:
        cprofile_op(args.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
