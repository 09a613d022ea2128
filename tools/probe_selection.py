"""Which block estimator should ``method="select"`` rank key blocks with? A probe on a real model.

Runs a model of ``benchmarks/quality_models`` (Gemma 3 270M at 32k tokens by default) with its
causal layers computed by the reference's block-sparse attention over blocks that each estimator
chooses (window and sink blocks fixed, then the ``k`` best-ranked candidates per query tile,
ranked as ``hyperpass.reference.select.choose_blocks`` ranks), and reports per estimator and
budget: perplexity on the two texts, passkey retrieval in real prose, and on Q/K/V captured
from the code text the output error and the share of each row's exact attention mass the chosen
blocks hold (``recall``). Estimators:

* ``bound_gN``: the package's score bound (per-channel key max/min) over N row-group means;
* ``mean_gN``: the row-group means' dot with each block's mean key (plus log block size);
* ``sampledS``: exact scores of S evenly spaced rows of the tile (the last included): per block,
  the largest share of a sampled row's softmax mass (a row-normalized estimate);
* ``oracle``: the same from every row, the mean share (the best a tile-level choice can do).

Not the product's path: it compares estimators before one is built into the kernels.

    PYTHONPATH=.:benchmarks python tools/probe_selection.py --model-path /tmp/gemma \
        --inputs .quality/gemma3_32k.pt --device cuda --out $OUT/probe_selection.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import quality  # benchmarks/quality.py: run with benchmarks/ on PYTHONPATH (see above)
import quality_models
import torch

from hyperpass.config import DEFAULT
from hyperpass.reference.select import (
    block_kinds,
    block_scores,
    block_sparse_attention,
    choose_blocks,
    representatives,
    tile_geometry,
)
from hyperpass.reference.softmax import pad_rows

_TILE_STEP = 16  # tiles per step of the exact estimators (bounds their score matrix)


def _row_mass(q, k, geo, rows_per_tile: int | None, reduce: str):
    """[B, Hkv, G, n_t, n_b]: log of per-block softmax mass of chosen rows of each tile
    (``None``: every row), reduced over the rows by max or mean."""
    batch, kv_heads, groups, nq, dim = q.shape
    qb, kb, n_t, n_b = geo.qb, geo.kb, geo.n_tiles, geo.n_blocks
    q_rows = pad_rows(q.float(), n_t * qb).unflatten(-2, (n_t, qb))
    if rows_per_tile is None:
        picks = torch.arange(qb, device=q.device)
    else:  # evenly spaced, ending at the tile's last row
        picks = torch.linspace(qb - 1, 0, rows_per_tile, device=q.device).round().long().flip(0)
    keys = pad_rows(k.float(), n_b * kb)
    k_pos = torch.arange(n_b * kb, device=q.device)
    out = torch.empty(batch, kv_heads, groups, n_t, n_b, device=q.device)
    for first in range(0, n_t, _TILE_STEP):
        tiles = torch.arange(first, min(first + _TILE_STEP, n_t), device=q.device)
        rows = tiles[:, None] * qb + picks[None, :]  # [t, r]
        rows = rows.clamp(max=nq - 1)
        s = q_rows[..., tiles, :, :][..., picks, :] @ keys[:, :, None, None].mT  # [.., t, r, nk]
        keep = (k_pos[None, None, :] <= rows[..., None]) & (k_pos < geo.nk)
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, -1).unflatten(-1, (n_b, kb)).sum(-1)  # [.., t, r, n_b]
        p = p.amax(-2) if reduce == "max" else p.mean(-2)
        out[..., first : first + len(tiles), :] = torch.log(p.clamp(min=1e-30))
    return out


def _mean_scores(q, k, geo, groups: int):
    n_b, kb = geo.n_blocks, geo.kb
    keys = pad_rows(k.float(), n_b * kb).unflatten(-2, (n_b, kb))
    size = (torch.arange(n_b * kb, device=k.device) < geo.nk).view(n_b, kb).sum(-1)
    mean_k = keys.sum(-2) / size.clamp(min=1)[..., None]  # [B, Hkv, n_b, D]
    reps, present = representatives(q, geo, groups)
    s = reps @ mean_k[:, :, None, None].mT + size.float().clamp(min=1).log()
    return s.masked_fill(~present[..., None], float("-inf")).amax(-2)


def estimator_scores(name: str, q, k, geo):
    if name.startswith("bound_g"):
        return block_scores(q, k, geo, int(name[7:]), q.dtype)
    if name.startswith("mean_g"):
        return _mean_scores(q, k, geo, int(name[6:]))
    if name.startswith("sampled"):
        return _row_mass(q, k, geo, int(name[7:]), "max")
    if name == "oracle":
        return _row_mass(q, k, geo, None, "mean")
    raise ValueError(f"unknown estimator {name!r}")


def choose(name: str, topk: int, q, k):
    """q [B, Hkv, G, N, D] pre-scaled: the blocks each tile attends to."""
    cfg = DEFAULT.replace(min_len=1, select_topk=topk)
    geo = tile_geometry(q.shape[-2], k.shape[-2], cfg, True, q.device)
    fixed, candidate = block_kinds(geo, cfg.sinks)
    return choose_blocks(estimator_scores(name, q, k, geo), fixed, candidate, geo, cfg), cfg


def attend(name: str, topk: int, q, k, v, scale):
    """(out [B, Hq, N, D], lse) of the estimator's blocks; q [B, Hq, N, D]."""
    grouped = (q * scale).unflatten(1, (k.shape[1], q.shape[1] // k.shape[1]))
    blocks, cfg = choose(name, topk, grouped, k)
    out, lse = block_sparse_attention(
        grouped, k, v, blocks, cfg.query_block, cfg.select_block, True
    )
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2), blocks


@torch.inference_mode()
def recall_and_error(name, topk, captured):
    recalls, errors = [], []
    for _, q, k, v, scale, ref_out, ref_lse in captured:
        out, lse, blocks = attend(name, topk, q, k, v, scale)
        errors.append(((out.double() - ref_out).norm() / ref_out.norm()).item())
        recalls.append(torch.exp(lse.double() - ref_lse).mean().item())  # kept mass share
    return sum(recalls) / len(recalls), sum(errors) / len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--estimators", default="bound_g8,bound_g32,mean_g8,sampled8,oracle")
    parser.add_argument("--budgets", default="8,16,32")
    parser.add_argument("--out", default=None)
    parser.add_argument("--limit-s", type=float, default=400)
    args = parser.parse_args()
    t0 = time.time()
    inputs = torch.load(args.inputs)
    path = quality_models.gguf_path(args.model, args.model_path)
    model = quality_models.load_model(path, args.model, args.device)
    router = quality.Router(model, impl="op")
    texts = {name: ids.to(args.device) for name, ids in inputs["texts"].items()}
    prose_keys = [p for p in inputs["passkeys"] if p.get("haystack") == "prose"]
    with router.active():
        captured = quality.capture_qkv(model, router, texts["code"])
    exact = {f"ppl_{text}": quality.perplexity(model, ids) for text, ids in texts.items()}
    print("exact", exact, flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    meta = {"model": args.model, "n_tokens": inputs["n_tokens"], "device": device,
            "torch": torch.__version__}  # fmt: skip
    results = {"meta": meta, "exact": exact, "rows": {}}
    current = {}

    def routed(q, k, v, scale, params, impl):
        return attend(current["name"], current["topk"], q, k, v, scale)[0]

    quality.approximate = routed  # the router's approximated calls go to the estimator
    router.layers = set(range(len(model.model.layers)))  # masked (sliding) calls stay exact
    for topk in [int(b) for b in args.budgets.split(",")]:
        for name in args.estimators.split(","):
            if time.time() - t0 > args.limit_s:
                print("time limit: stopping", flush=True)
                break
            current.update(name=name, topk=topk)
            row = {"estimator": name, "topk": topk}
            row["recall"], row["out_rel_err"] = recall_and_error(name, topk, captured)
            with router.active():
                for text, ids in texts.items():
                    row[f"ppl_{text}"] = quality.perplexity(model, ids)
                row["passkey_prose"] = {
                    str(p["depth"]): quality.passkey_score(
                        model, p["ids"].to(args.device), p["answer_len"]
                    )
                    for p in prose_keys
                }
            results["rows"][f"{name}_k{topk}"] = row
            print(
                f"{name:12s} k={topk:3d} recall={row['recall']:.3f} err={row['out_rel_err']:.3f} "
                f"ppl code={row['ppl_code']:.3f} prose={row['ppl_prose']:.3f} passkey prose="
                + " ".join(f"{v:.0%}" for v in row["passkey_prose"].values())
                + f" ({time.time() - t0:.0f} s)",
                flush=True,
            )
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
