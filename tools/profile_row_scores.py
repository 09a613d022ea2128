"""The row-scoring kernel of ``select_score="rows"`` on a GPU: its launch options, its rows
per tile, and (``--baseline``) another build's kernel in the same process.

For each setting and length (bf16, causal, B=1): SDPA forward; ``_row_scores`` under the
default launch and a sweep of (rows per program, warps, stages) at 32k and up; 4 and 2 rows per
tile; the whole selection; FlexAttention alone on the selection's lists; the op forward (8, 4, 2
rows) and forward+backward. ``--baseline FILE``: a copy of an earlier
``hyperpass/kernels/select_blocks.py`` (``git show REV:hyperpass/kernels/select_blocks.py``)
whose scores and lists are compared with this build's (largest score difference, share of
tiles with the same blocks) and timed beside them. A lab tool: its output chose the launch
defaults in ``select_blocks._row_scores``.

    python tools/profile_row_scores.py --out $OUT/rows.json [--lengths 8192 32768 131072] \
        [--baseline /tmp/old_select_blocks.py] [--no-sweep]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json

SETTINGS = {"paper": (12, 12, 64), "llama": (32, 8, 128)}
LAUNCHES = list(itertools.product((64, 128, 256), (4, 8), (2, 3, 4)))  # rows/program, warps, stages


def _bench(fn, rep=60):
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def _load(path):
    spec = importlib.util.spec_from_file_location("baseline_select_blocks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block_sets(lists, n_kb):
    import torch

    _part_num, _part_idx, full_num, full_idx = lists
    listed = torch.arange(full_idx.shape[-1], device=full_idx.device) < full_num[..., None]
    dense = torch.zeros(*full_idx.shape[:-1], n_kb + 1, dtype=torch.bool, device=full_idx.device)
    dense.scatter_(-1, torch.where(listed, full_idx.long(), n_kb), True)
    return dense[..., :n_kb]


def profile(name, n, baseline, log, sweep=True):
    import torch
    import torch.nn.functional as F
    import triton

    from hyperpass.config import DEFAULT
    from hyperpass.kernels import flex
    from hyperpass.kernels import select_blocks as build
    from hyperpass.op import hyper_attention

    hq, hkv, d = SETTINGS[name]
    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v, grad = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for h in (hq, hkv, hkv, hq))  # fmt: skip
    gqa, scale, cfg = hq != hkv, d**-0.5, DEFAULT.replace(min_len=1)
    n_tiles, n_kb = triton.cdiv(n, cfg.query_block), triton.cdiv(n, cfg.select_block)
    scores = torch.full((1, hq, n_tiles, n_kb), float("nan"), device="cuda")
    base = {"setting": name, "n": n}
    base["sdpa"] = _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                 enable_gqa=gqa))  # fmt: skip

    def rows(module, c=cfg, *launch):
        return lambda: module._row_scores(q, k, scores, scale, c, True, c.window, "tf32", *launch)

    lists = build.select_block_lists(q, k, scale, cfg, True)
    if baseline is not None:
        theirs = torch.full_like(scores, float("nan"))
        baseline._row_scores(q, k, theirs, scale, cfg, True, cfg.window, "tf32")
        rows(build)()
        both = torch.isfinite(theirs) & torch.isfinite(scores)
        theirs_lists = baseline.select_block_lists(q, k, scale, cfg, True)
        same = _block_sets(theirs_lists, n_kb) == _block_sets(lists, n_kb)
        diff = (theirs - scores)[both].abs().max().item()
        log(**base, kind="baseline_check", max_score_diff=diff,
            tiles_same_blocks=same.all(-1).float().mean().item())  # fmt: skip
        log(**base, kind="rows_baseline", ms=_bench(rows(baseline)))
        log(**base, kind="selection_baseline",
            ms=_bench(lambda: baseline.select_block_lists(q, k, scale, cfg, True)))  # fmt: skip
    log(**base, kind="rows", ms=_bench(rows(build)))
    for s in (4, 2):
        log(**base, kind=f"rows_S{s}", ms=_bench(rows(build, cfg.replace(select_rows=s))))
    if sweep and n >= 32768:
        for launch in LAUNCHES:
            if d > 128 and launch[0] > 128:
                continue
            log(**base, kind="rows_launch", launch=launch, ms=_bench(rows(build, cfg, *launch)))
    selection = _bench(lambda: build.select_block_lists(q, k, scale, cfg, True))
    log(**base, kind="selection", ms=selection)
    mask = flex.block_mask_from_lists(*lists, n, n, cfg.query_block, cfg.select_block,
                                      flex.causal_mod(), False)  # fmt: skip
    options = flex._kernel_options(cfg, d)
    log(**base, kind="flex_on_lists",
        ms=_bench(lambda: flex._flex(q, k, v, mask, scale, gqa, options, True)))  # fmt: skip
    for s in (8, 4, 2):
        c = cfg.replace(select_rows=s)
        op = lambda c=c: hyper_attention(q, k, v, is_causal=True, enable_gqa=gqa, config=c)  # noqa: E731
        log(**base, kind=f"op_fwd_S{s}", ms=_bench(op))
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def step():
        out = hyper_attention(*inputs, is_causal=True, enable_gqa=gqa, config=cfg)
        torch.autograd.backward(out, grad)

    log(**base, kind="op_fwd_bwd",
        ms=triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median",
                                   grad_to_none=inputs))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--no-sweep", action="store_true", help="the default launch only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    baseline = _load(args.baseline) if args.baseline else None
    rows = []

    def log(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "rows": rows}, f, indent=1)  # fmt: skip

    for name, n in itertools.product(args.settings, args.lengths):
        profile(name, n, baseline, log, sweep=not args.no_sweep)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
