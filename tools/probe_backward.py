"""The default's backward on the GPU: copies of the sink blocks, against FlexAttention's floor.

For each setting and length (bf16, causal, B=1): SDPA forward+backward; the op's forward and its
forward+backward with each value of ``flex._PAIRS_PER_SINK_COPY`` (``none``: no copies); the op's
lists' popularity (query tiles, over the query heads of one KV head, that read each key block);
and FlexAttention forward+backward on the op's lists with the sink blocks dropped (a floor: the
same work without the blocks every tile reads; selection and recomputation not timed). A lab
tool; its findings are in docs/performance.md.

    python tools/probe_backward.py --out $OUT/probe.json
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
PAIRS = (None, 1024, 512, 256, 128, 64, 32)


def _bench(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")


def _fwd_bwd(fn, q, k, v, grad):
    import torch
    import triton

    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def step():
        torch.autograd.backward(fn(*inputs), grad)

    return triton.testing.do_bench(step, warmup=10, rep=200, return_mode="median",
                                   grad_to_none=inputs)  # fmt: skip


def _dense(num, idx, n_blocks):
    """[..., tiles, n_blocks] bool of key-major lists (ids past a count ignored)."""
    import torch

    ok = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    ids = torch.where(ok, idx, n_blocks).long()
    out = torch.zeros(*idx.shape[:-1], n_blocks + 1, dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, ids, True)[..., :n_blocks]


def _popularity(dense, group):
    import torch

    per_kv = dense.sum(-2).view(dense.shape[0], -1, group, dense.shape[-1]).sum(2).float()
    flat = per_kv.flatten()
    return {"max": flat.max().item(), "p99": torch.quantile(flat, 0.99).item(),
            "mean": flat.mean().item(), "block0": per_kv[..., 0].mean().item()}  # fmt: skip


def probe_one(setting: str, n: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hyperpass.config import DEFAULT
    from hyperpass.kernels import flex
    from hyperpass.kernels.select_blocks import select_block_lists
    from hyperpass.op import hyper_attention

    s = SETTINGS[setting]
    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v, grad = (
        torch.randn(1, h, n, s["dim"], device="cuda", dtype=torch.bfloat16, generator=gen)
        for h in (s["q_heads"], s["kv_heads"], s["kv_heads"], s["q_heads"])
    )
    group = s["q_heads"] // s["kv_heads"]
    gqa = group > 1
    scale = s["dim"] ** -0.5
    cfg = DEFAULT.replace(min_len=1)
    kb = cfg.select_block
    row = {"setting": setting, "n": n}

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def op(q, k, v):
        return hyper_attention(q, k, v, is_causal=True, enable_gqa=gqa, config=cfg)

    row["sdpa_fwd"] = _bench(lambda: sdpa(q, k, v))
    row["sdpa_fwd_bwd"] = _fwd_bwd(sdpa, q, k, v, grad)
    row["op_fwd"] = _bench(lambda: op(q, k, v))
    default_pairs = flex._PAIRS_PER_SINK_COPY
    try:
        for pairs in PAIRS:
            flex._PAIRS_PER_SINK_COPY = pairs or 2**62
            copies = flex.sink_copies(cfg, n, n, group, True, False)
            row[f"op_fwd_bwd[pairs={pairs}]"] = _fwd_bwd(op, q, k, v, grad)
            row[f"copies[pairs={pairs}]"] = copies
    finally:
        flex._PAIRS_PER_SINK_COPY = default_pairs

    part_num, part_idx, full_num, full_idx = select_block_lists(q, k, scale, cfg, True)
    n_kb = n // kb
    full, part = _dense(full_num, full_idx, n_kb), _dense(part_num, part_idx, n_kb)
    row["pop"] = _popularity(full | part, group)
    row["keys_per_query"] = (full | part).sum(-1).float().mean().item() * kb
    full[..., 0] = False
    counts_f, ids_f = flex._ordered(full)
    counts_p, ids_p = flex._ordered(part)
    mask = flex.block_mask_from_lists(counts_p, ids_p, counts_f, ids_f, n, n, kb, kb,
                                      flex.causal_mod(), True)  # fmt: skip
    options = flex._kernel_options(cfg, s["dim"])

    def floor(q, k, v):
        return flex._flex(q, k, v, mask, scale, gqa, options, True)

    row["flex_fwd_bwd[lists,no_sinks]"] = _fwd_bwd(floor, q, k, v, grad)
    return {key: (round(x, 4) if isinstance(x, float) else x) for key, x in row.items()}


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--limit-s", type=float, default=520)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    deadline = time.time() + args.limit_s
    for setting in args.settings:
        for n in args.lengths:
            if time.time() > deadline:
                result["truncated"] = True
                break
            try:
                row = probe_one(setting, n)
            except Exception as err:  # noqa: BLE001 - record and go on
                row = {"setting": setting, "n": n, "error": f"{type(err).__name__}: {err}"[:800]}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
