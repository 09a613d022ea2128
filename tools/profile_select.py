"""Where the default's time goes on a GPU, and FlexAttention kernel options for its lists.

For each setting and length (bf16, causal, B=1): SDPA forward and forward+backward; the op
(``method="select"``, forced to approximate); and its parts timed alone: the selection kernels,
the BlockMask without and with the query-major lists the backward reads, FlexAttention's forward
and forward+backward on the prebuilt mask under several ``kernel_options`` (gradients compared
with the default options'). A lab tool: its output feeds choices in ``hyperpass/kernels/flex.py``.

    python tools/profile_select.py --out $OUT/profile.json [--lengths 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

SETTINGS = {
    "paper": {"q_heads": 12, "kv_heads": 12, "dim": 64},
    "llama": {"q_heads": 32, "kv_heads": 8, "dim": 128},
}
_BWD = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "num_stages", "num_warps")
BWD_OPTIONS = {  # FlexAttention's sm90 default for head dims 64-128 is (64, 128, 128, 64, 3, 8)
    "default": None,
    "m64n64_s3w4": (64, 64, 64, 64, 3, 4),
    "m32n128_s3w4": (32, 128, 128, 32, 3, 4),
    "m64n128_s2w8": (64, 128, 128, 64, 2, 8),
    "m64n128_s3w4": (64, 128, 128, 64, 3, 4),
    "m64n128_s4w8": (64, 128, 128, 64, 4, 8),
}
FWD_OPTIONS = {
    "default": None,
    "m128n64_s3w4": (128, 64, 3, 4),
    "m128n128_s2w8": (128, 128, 2, 8),
    "m64n128_s3w4": (64, 128, 3, 4),
    "m128n64_s3w8": (128, 64, 3, 8),
}


def _bwd_options(spec):
    return None if spec is None else {f"bwd_{k}": v for k, v in zip(_BWD, spec, strict=True)}


def _fwd_options(spec):
    if spec is None:
        return None
    keys = ("BLOCK_M", "BLOCK_N", "num_stages", "num_warps")
    return {f"fwd_{k}": v for k, v in zip(keys, spec, strict=True)}


CANDIDATES = {
    "bwd_m64n64": _bwd_options(BWD_OPTIONS["m64n64_s3w4"]),
    "fwd_m128n64+bwd_m64n64": {
        **_fwd_options(FWD_OPTIONS["m128n64_s3w4"]),
        **_bwd_options(BWD_OPTIONS["m64n64_s3w4"]),
    },
}


def _bench(fn, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def _fwd_bwd(fn, q, k, v, grad):
    import torch

    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def step():
        torch.autograd.backward(fn(*inputs), grad)

    import triton

    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median",
                                   grad_to_none=inputs)  # fmt: skip


def _grads(fn, q, k, v, grad):
    import torch

    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    torch.autograd.backward(fn(*inputs), grad)
    return [t.grad.float() for t in inputs]


def profile_one(setting: str, n: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import BlockMask

    from hyperpass.config import DEFAULT
    from hyperpass.kernels import flex
    from hyperpass.kernels.select_blocks import select_block_lists
    from hyperpass.op import hyper_attention

    cfg = DEFAULT.replace(min_len=1)
    s = SETTINGS[setting]
    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v, grad = (
        torch.randn(1, h, n, s["dim"], device="cuda", dtype=torch.bfloat16, generator=gen)
        for h in (s["q_heads"], s["kv_heads"], s["kv_heads"], s["q_heads"])
    )
    gqa = s["q_heads"] != s["kv_heads"]
    scale = s["dim"] ** -0.5
    row = {"setting": setting, "n": n}

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def op(q, k, v):
        return hyper_attention(q, k, v, is_causal=True, enable_gqa=gqa, config=cfg)

    row["sdpa_fwd"] = _bench(lambda: sdpa(q, k, v))
    row["sdpa_fwd_bwd"] = _fwd_bwd(sdpa, q, k, v, grad)
    row["op_fwd"] = _bench(lambda: op(q, k, v))
    row["op_fwd_bwd"] = _fwd_bwd(op, q, k, v, grad)
    for name, options in CANDIDATES.items():  # the op with other kernel options
        real = flex._kernel_options
        flex._kernel_options = lambda config, dim, options=options: options
        try:
            row[f"op_fwd[{name}]"] = _bench(lambda: op(q, k, v))
            row[f"op_fwd_bwd[{name}]"] = _fwd_bwd(op, q, k, v, grad)
        finally:
            flex._kernel_options = real
    lists = select_block_lists(q, k, scale, cfg, True)
    row["selection"] = _bench(lambda: select_block_lists(q, k, scale, cfg, True))
    mask_args = (*lists, n, n, cfg.query_block, cfg.select_block, flex.causal_mod())
    row["mask_fwd"] = _bench(lambda: flex.block_mask_from_lists(*mask_args, False))
    row["mask_bwd"] = _bench(lambda: flex.block_mask_from_lists(*mask_args, True))
    row["mask_bwd_by_sort"] = _bench(  # FlexAttention's own transpose, for comparison
        lambda: BlockMask.from_kv_blocks(
            *lists,
            BLOCK_SIZE=(cfg.query_block, cfg.select_block),
            mask_mod=flex.causal_mod(),
            seq_lengths=(n, n),
            compute_q_blocks=True,
        )
    )
    mask = flex.block_mask_from_lists(*mask_args, True)

    def flex_with(options):
        return lambda q, k, v: flex._flex(q, k, v, mask, scale, gqa, options, True)

    for name, spec in FWD_OPTIONS.items():
        fn = flex_with(_fwd_options(spec))
        try:
            with torch.no_grad():
                row[f"flex_fwd[{name}]"] = _bench(lambda fn=fn: fn(q, k, v))
        except Exception as err:  # noqa: BLE001 - record and go on
            row[f"flex_fwd[{name}]_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    ref = None
    for name, spec in BWD_OPTIONS.items():
        fn = flex_with(_bwd_options(spec))
        try:
            row[f"flex_fwd_bwd[{name}]"] = _fwd_bwd(fn, q, k, v, grad)
            got = _grads(fn, q, k, v, grad)
            if ref is None:
                ref = got
            else:
                row[f"grad_diff[{name}]"] = max(
                    (a - b).abs().max().item() for a, b in zip(got, ref, strict=True)
                )
        except Exception as err:  # noqa: BLE001 - record and go on
            row[f"flex_fwd_bwd[{name}]_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return {key: (round(x, 4) if isinstance(x, float) else x) for key, x in row.items()}


def run(args) -> dict:
    import torch
    import triton

    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 1024
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "rows": []}  # fmt: skip
    deadline = time.time() + args.limit_s
    for setting in args.settings:
        for n in args.lengths:
            if time.time() > deadline:
                result["truncated"] = True
                return result
            row = profile_one(setting, n)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
            torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--limit-s", type=float, default=480)
    run(parser.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
