"""GPU correctness of the block methods (``select``, the patterns): FlexAttention and the
selection kernel against the reference (not a test: needs a CUDA GPU).

select: (1) the kernel's block lists against the reference's selection (with the group means
rounded to the inputs' dtype, as the GPU ranks): share of tiles whose set differs; (2) the op's
output and gradients against the reference computed over the *kernel's* lists in fp64, next to
the bf16 reference's own error (``gpu_check.compare``). Patterns: the op against the reference.

    python tools/gpu_check_blocks.py --out $OUT/gpu_check_blocks.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

import hyperpass
from hyperpass.config import DEFAULT
from hyperpass.kernels import flex
from hyperpass.kernels.select_blocks import select_block_lists
from hyperpass.reference import hyper_attention_reference
from hyperpass.reference.select import block_sparse_attention, select_block_mask
from tools.gpu_check import compare


def _dense(part_num, part_idx, full_num, full_idx, n_blocks) -> torch.Tensor:
    cols = torch.arange(n_blocks, device=full_idx.device)
    dense = torch.zeros(*full_num.shape, n_blocks + 1, dtype=torch.bool, device=full_idx.device)
    for num, idx in ((full_num, full_idx), (part_num, part_idx)):
        ok = cols[: idx.shape[-1]] < num[..., None]
        ids = torch.where(ok, idx[..., :n_blocks].long(), n_blocks)
        dense.scatter_(-1, ids, True)
    return dense[..., :n_blocks]


PATHS = ("eager", "planned", "compiled")


def _select_call(path: str, inputs, key_mask, causal: bool, cfg, params: dict):
    """The op as one of ``PATHS`` calls it: eager (the forward's graph kept for the backward),
    the planned op of compiled training graphs called eagerly, or ``torch.compile`` with the
    backend (Inductor, dynamic shapes; no key mask: SDPA takes it without ``is_causal``)."""
    if path == "eager":
        return hyperpass.hyper_attention(*inputs, attn_mask=key_mask, is_causal=causal,
                                         enable_gqa=True, config=cfg)  # fmt: skip
    if path == "planned":
        from hyperpass.op import hyper_attention_with_plan_op, op_args

        args = op_args(*inputs, attn_mask=key_mask, is_causal=causal, enable_gqa=True,
                       config=cfg)  # fmt: skip
        return hyper_attention_with_plan_op(*args)[0]
    assert key_mask is None, "compiled: no key mask"

    def attention(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=True
        )

    torch._dynamo.reset()
    compiled = torch.compile(attention, backend=hyperpass.backend(min_len=1, **params),
                             dynamic=True)  # fmt: skip
    return compiled(*inputs)


def select_case(batch, q_heads, kv_heads, n, dim, causal, params, grads=True, padded=False,
                pairs_per_copy=None, path="eager") -> dict:  # fmt: skip
    """``padded``: a key-padding mask, left padding on row 0, right padding on the last row.
    ``pairs_per_copy``: the backward's copies of the sink blocks from that many pairs on.
    ``path``: how the op is called (:func:`_select_call`)."""
    if pairs_per_copy is not None:
        default, flex._PAIRS_PER_SINK_COPY = flex._PAIRS_PER_SINK_COPY, pairs_per_copy
        try:  # the copies counted under the same override the case ran with
            row = select_case(batch, q_heads, kv_heads, n, dim, causal, params, grads, padded,
                              path=path)  # fmt: skip
            group = q_heads // kv_heads
            copies = flex.sink_copies(DEFAULT.replace(**params), n, n, group, causal, padded)
        finally:
            flex._PAIRS_PER_SINK_COPY = default
        row["case"] += f" sink copies {copies}"
        row["ok"] = row["ok"] and copies > 1
        return row
    cfg = DEFAULT.replace(min_len=1, **params)
    gen = torch.Generator(device="cuda").manual_seed(n + dim)
    shape_q, shape_k = (batch, q_heads, n, dim), (batch, kv_heads, n, dim)
    q = torch.randn(shape_q, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(shape_k, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(shape_k, device="cuda", generator=gen, dtype=torch.bfloat16)
    g = torch.randn(shape_q, device="cuda", generator=gen, dtype=torch.bfloat16)
    scale = dim**-0.5
    group = q_heads // kv_heads
    lists = select_block_lists(q, k, scale, cfg, causal)
    n_kb = -(-n // cfg.select_block)
    mine = _dense(*lists, n_kb)  # [B, Hq, n_tiles, n_blocks]
    scaled = (q.float() * scale).view(batch, kv_heads, group, n, dim)
    ref_sel = select_block_mask(scaled, k.float(), cfg, causal, rep_dtype=q.dtype)
    ref_sel = ref_sel.reshape(mine.shape)
    row = {
        "case": f"select {params} B{batch} H{q_heads}/{kv_heads} n{n} d{dim} causal={causal}"
        + ("" if path == "eager" else f" {path}"),
        "tiles_differing": (mine != ref_sel).any(-1).float().mean().item(),
        "blocks_per_tile": mine.sum(-1).float().mean().item(),
    }
    blocks = mine.view(batch, kv_heads, group, *mine.shape[2:])
    valid = key_mask = None
    if padded:
        valid = torch.ones(batch, n, dtype=torch.bool, device="cuda")
        valid[0, : n // 5] = False
        valid[-1, n - n // 7 :] = False
        key_mask = valid[:, None, None, :]
        row["case"] += " padded"

    def reference(*tensors, dtype):
        qq, kk, vv = (t.to(dtype) for t in tensors)
        qs = (qq * scale).view(batch, kv_heads, group, n, dim)
        out, _ = block_sparse_attention(qs, kk, vv, blocks, cfg.query_block, cfg.select_block,
                                        causal, valid)  # fmt: skip
        return out.reshape(shape_q)

    inputs = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    out = _select_call(path, inputs, key_mask, causal, cfg, params)
    oracle_in = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    low_in = [t.detach().float().requires_grad_(grads) for t in (q, k, v)]
    oracle = reference(*oracle_in, dtype=torch.float64)
    low = reference(*low_in, dtype=torch.float32).to(q.dtype)
    checks = [compare("out", out, low, oracle)]
    if grads:
        got = torch.autograd.grad(out, inputs, g)
        want = torch.autograd.grad(oracle, oracle_in, g.double())
        ref_low = torch.autograd.grad(low.float(), low_in, g.float())
        for name, a, lo, hi in zip(("dq", "dk", "dv"), got, ref_low, want, strict=True):
            checks.append(compare(name, a, lo.to(a.dtype), hi))
    row["checks"] = checks
    row["ok"] = all(c["ok"] for c in checks) and row["tiles_differing"] < 0.02
    return row


def pattern_case(batch, q_heads, kv_heads, n, dim, causal, params, grads=True) -> dict:
    cfg = DEFAULT.replace(min_len=1, **params)
    gen = torch.Generator(device="cuda").manual_seed(n)
    shape_q, shape_k = (batch, q_heads, n, dim), (batch, kv_heads, n, dim)
    q, k, v = (torch.randn(s, device="cuda", generator=gen, dtype=torch.bfloat16)
               for s in (shape_q, shape_k, shape_k))  # fmt: skip
    g = torch.randn(shape_q, device="cuda", generator=gen, dtype=torch.bfloat16)
    inputs = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    out = hyperpass.hyper_attention(*inputs, is_causal=causal, enable_gqa=True, config=cfg)
    oracle_in = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    low_in = [t.detach().float().requires_grad_(grads) for t in (q, k, v)]
    oracle, _ = hyper_attention_reference(*oracle_in, is_causal=causal, config=cfg)
    low, _ = hyper_attention_reference(*low_in, is_causal=causal, config=cfg)
    checks = [compare("out", out, low.to(q.dtype), oracle)]
    if grads:
        got = torch.autograd.grad(out, inputs, g)
        want = torch.autograd.grad(oracle, oracle_in, g.double())
        ref_low = torch.autograd.grad(low, low_in, g.float())
        for name, a, lo, hi in zip(("dq", "dk", "dv"), got, ref_low, want, strict=True):
            checks.append(compare(name, a, lo.to(a.dtype), hi))
    return {"case": f"{params} B{batch} H{q_heads}/{kv_heads} n{n} d{dim} causal={causal}",
            "checks": checks, "ok": all(c["ok"] for c in checks)}  # fmt: skip


def cases(quick: bool):
    n_small, n_big = 4096 + 77, 16384
    yield select_case, (1, 4, 4, n_small, 64, True, {})
    yield select_case, (1, 8, 2, n_small, 128, False, {})
    yield select_case, (1, 4, 1, n_small, 64, True, {"select_mass": 0.9, "select_min": 2})
    yield select_case, (1, 4, 2, n_small, 128, True, {"select_score": "bound"})
    yield select_case, (2, 4, 2, n_small, 64, True, {}, True, True)
    yield select_case, (2, 4, 4, n_small, 128, False, {}, True, True)
    yield select_case, (1, 8, 2, n_small, 64, True, {}, True, False, 32)  # odd: padded keys
    yield select_case, (2, 4, 4, n_small, 128, False, {}, True, True, 32)
    yield select_case, (1, 4, 2, 4096, 128, False, {"sinks": 200}, True, False, 32)
    for path in PATHS[1:]:  # compiled training graphs: the lists kept for the backward
        yield select_case, (1, 8, 2, n_small, 128, True, {}, True, False, 32, path)
        yield select_case, (1, 12, 12, n_small, 64, False, {}, True, False, None, path)
    yield select_case, (2, 4, 2, n_small, 64, True, {}, True, True, 32, "planned")
    # coarse tiles that prune (one candidate per selected block at this length)
    coarse = {"select_coarse": 4, "select_candidates": 1}
    yield select_case, (1, 8, 2, n_small, 128, True, coarse)
    yield select_case, (1, 4, 4, n_small, 64, False, {**coarse, "select_coarse": 2})
    yield select_case, (1, 4, 1, n_small, 256, True, {**coarse, "select_coarse": 8})
    yield select_case, (2, 4, 2, n_small, 64, True, coarse, True, True, 32, "planned")
    yield pattern_case, (1, 4, 2, n_small, 64, True, {"method": "longformer", "window": 1024})
    yield pattern_case, (1, 2, 2, n_small, 128, False, {"method": "dilated", "window": 512,
                                                        "dilation": 2})  # fmt: skip
    if quick:
        return
    yield select_case, (1, 12, 12, n_big, 64, True, {})
    yield select_case, (2, 8, 2, n_big, 128, True, {"select_block": 128})
    yield select_case, (1, 4, 1, n_big, 256, True, {})  # Gemma 3's head dim
    yield select_case, (1, 8, 2, n_big, 128, True, {"select_coarse": 16, "select_candidates": 2})
    yield pattern_case, (1, 8, 2, n_big, 128, True, {"method": "longformer", "window": 2048})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=None, help="cases whose arguments contain this text")
    args = parser.parse_args()
    rows, failed = [], 0
    for fn, case in cases(args.quick):
        if args.only and args.only not in repr(case):
            continue
        start = time.time()
        try:
            row = fn(*case)
        except Exception as err:  # noqa: BLE001 - record and go on
            row = {"case": repr(case), "ok": False, "error": traceback.format_exc()[-2000:]}
            print(err, file=sys.stderr)
        row["seconds"] = round(time.time() - start, 1)
        failed += not row["ok"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "rows": rows}, f, indent=1)  # fmt: skip
        torch.cuda.empty_cache()
    print("ALL OK" if not failed else f"{failed} FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
