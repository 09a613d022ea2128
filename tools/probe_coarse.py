"""Coarse tiles (``select_coarse``): do the tiles still choose the blocks a full scan chooses?

On Q/K/V captured from a model's causal layers (``--capture``: a file of (layer, q, k, v, scale)
tuples, as ``benchmarks/quality.py``'s ``capture_qkv`` collects them; ``--save-capture`` makes
one from a model and text), for each configuration: the share of (head, tile) pairs whose
chosen blocks equal those of the same configuration with ``select_coarse=1`` (every tile ranks
every block), the share of those blocks kept, the output's relative error against exact
attention and the share of each row's exact softmax mass the chosen blocks hold. The reference
implementation computes everything (CPU or GPU).

    PYTHONPATH=.:benchmarks python tools/probe_coarse.py --save-capture .quality/qkv.pt \
        --model gemma3 --inputs .quality/gemma3_32k.pt --text code
    PYTHONPATH=. python tools/probe_coarse.py --capture .quality/qkv.pt \
        --configs c4_r4,c8_r4,c8_r8 --out probe_coarse.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hyperpass.config import DEFAULT
from hyperpass.reference.select import block_sparse_attention, select_block_mask

_ROWS_PER_STEP = 1024  # query rows per step of the exact attention (bounds its memory)


def parse_config(name: str) -> dict:
    """``c8_r4_k16`` -> select_coarse=8, select_candidates=4, select_topk=16 (each optional)."""
    keys = {"c": "select_coarse", "r": "select_candidates", "k": "select_topk",
            "s": "select_rows", "m": "select_mass"}  # fmt: skip
    params = {}
    for part in name.split("_"):
        if part == "full":
            continue
        value = part[1:]
        params[keys[part[0]]] = float(value) / 100 if part[0] == "m" else int(value)
    return params


@torch.inference_mode()
def exact_lse_out(q, k, v, scale):
    """Causal exact attention in fp32, by steps of rows: (out [B, Hq, N, D], lse [B, Hq, N])."""
    group = q.shape[1] // k.shape[1]
    keys = k.float().repeat_interleave(group, 1)
    values = v.float().repeat_interleave(group, 1)
    n = q.shape[-2]
    outs, lses = [], []
    for first in range(0, n, _ROWS_PER_STEP):
        rows = torch.arange(first, min(first + _ROWS_PER_STEP, n))
        s = (q[..., rows, :].float() * scale) @ keys[..., : rows[-1] + 1, :].mT
        s = s.masked_fill(torch.arange(rows[-1] + 1)[None, :] > rows[:, None], float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append(torch.exp(s - lse[..., None]) @ values[..., : rows[-1] + 1, :])
        lses.append(lse)
    return torch.cat(outs, -2), torch.cat(lses, -1)


@torch.inference_mode()
def probe(captured, params: dict, exact: list) -> dict:
    cfg = DEFAULT.replace(min_len=1, **params)
    full_cfg = cfg.replace(select_coarse=1)
    same, kept, errors, mass = [], [], [], []
    for (_, q, k, v, scale), (ref_out, ref_lse) in zip(captured, exact, strict=True):
        grouped = (q.float() * scale).unflatten(1, (k.shape[1], q.shape[1] // k.shape[1]))
        blocks = select_block_mask(grouped, k.float(), cfg, True, q.dtype)
        full = select_block_mask(grouped, k.float(), full_cfg, True, q.dtype)
        same.append((blocks == full).all(-1).float().mean().item())
        kept.append(((blocks & full).sum() / full.sum()).item())
        out, lse = block_sparse_attention(grouped, k.float(), v.float(), blocks,
                                          cfg.query_block, cfg.select_block, True)  # fmt: skip
        out, lse = out.flatten(1, 2), lse.flatten(1, 2)
        errors.append(((out - ref_out).norm() / ref_out.norm()).item())
        mass.append(torch.exp(lse - ref_lse).mean().item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"params": params, "tiles_same_as_full": mean(same), "blocks_kept": mean(kept),
            "out_rel_err": mean(errors), "mass_kept": mean(mass)}  # fmt: skip


def save_capture(args) -> None:
    import quality  # benchmarks/quality.py
    import quality_models

    inputs = torch.load(args.inputs)
    path = quality_models.gguf_path(args.model, args.model_path)
    model = quality_models.load_model(path, args.model, args.device)
    router = quality.Router(model, impl="op")
    ids = inputs["texts"][args.text].to(args.device)
    router.layers, router.capture = set(), []
    with router.active(), torch.inference_mode():
        model.model(input_ids=ids[None])
    captured = [(layer, q.cpu(), k.cpu(), v.cpu(), s) for layer, q, k, v, s in router.capture]
    torch.save(captured, args.save_capture)
    print(f"{len(captured)} layers captured to {args.save_capture}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capture", help="captured Q/K/V to probe")
    parser.add_argument("--save-capture", help="capture Q/K/V from a model into this file")
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--inputs", help="token ids from benchmarks/quality.py prepare")
    parser.add_argument("--text", default="code")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="full,c4_r4,c8_r4,c8_r8,c16_r4")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.save_capture:
        save_capture(args)
        return
    captured = [(layer, q.to(args.device), k.to(args.device), v.to(args.device), scale)
                for layer, q, k, v, scale in torch.load(args.capture)]  # fmt: skip
    t0 = time.time()
    exact = [exact_lse_out(q, k, v, scale) for _, q, k, v, scale in captured]
    print(f"exact attention of {len(captured)} layers: {time.time() - t0:.0f} s", flush=True)
    result = {"capture": args.capture, "shapes": [list(c[1].shape) for c in captured],
              "device": args.device, "torch": torch.__version__,
              "python": platform.python_version(), "rows": {}}  # fmt: skip
    for name in args.configs.split(","):
        row = probe(captured, parse_config(name), exact)
        result["rows"][name] = row
        print(f"{name:14s} same tiles {row['tiles_same_as_full']:.3f}  blocks kept "
              f"{row['blocks_kept']:.4f}  out err {row['out_rel_err']:.4f}  mass kept "
              f"{row['mass_kept']:.4f}  ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
