"""Speed of hyper_attention's methods vs exact SDPA and FlexAttention, side by side (needs CUDA).

Settings: ``paper`` (B=1, H=12, D=64) and ``llama`` (B=1, 32 query / 8 KV heads, D=128); bf16;
causal (``--noncausal`` adds the other); n = 1024 ... 131072. Each row: one implementation at
one length, forward and forward+backward, medians of ``triton.testing.do_bench`` (calls queued
back to back, as in a model's stream), in ms, and the speedup over SDPA (its default backend:
cuDNN on H100/H200) measured in the same process.

Implementations (``IMPLS``): ``sdpa``; ``default`` (the package default, method="select",
timed with ``min_len=1`` so the method itself runs at every length; ``shipped`` gives what the
default does at that length: SDPA below the break-even of ``hyperpass.op.cost_model``);
``default_recompute``: the default with its backward recomputing the forward, as calls traced
by ``torch.compile`` do (eager calls keep the forward's graph, ``registration.KEEP_FORWARD_GRAPH``);
``default_compiled``: the default through ``torch.compile(..., backend=hyperpass.backend())``
(Inductor; its training graph keeps the block lists for the backward, ``compiler/training.py``);
``select_*`` variants (``select_c*``: coarse tiles); ``longformer`` (window 2048 + 16
sinks) through hyperpass and ``flex_longformer``: FlexAttention on the same mask written as a
user would (``create_block_mask`` + ``torch.compile(flex_attention)``); ``selection`` (or
``selection_<impl>``): the block selection alone; ``paper``: ``config.PAPER``. FLOPs of exact
attention: 4 * B * Hq * N^2 * D (halved when causal), forward.

    python benchmarks/bench_attention.py --out $OUT/bench.json [--lengths 8192 32768]
    python benchmarks/bench_attention.py --table bench.json   # print the tables again
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

SETTINGS = {
    "paper": {"q_heads": 12, "kv_heads": 12, "dim": 64},
    "llama": {"q_heads": 32, "kv_heads": 8, "dim": 128},
}
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
LONGFORMER = {"method": "longformer", "window": 2048, "sinks": 16}
IMPLS = {
    "default": {},
    "select_k4": {"select_topk": 4},
    "select_k16": {"select_topk": 16},
    "select_kb64": {"select_block": 64, "select_topk": 16},
    "select_m90": {"select_mass": 0.9, "select_topk": 16, "select_min": 2},
    "select_m95_k40": {"select_mass": 0.95, "select_topk": 40, "select_min": 4},
    "select_bound": {"select_score": "bound"},
    "select_last0": {"select_last": 0},
    "select_rows4": {"select_rows": 4},
    "select_rows16": {"select_rows": 16},
    "select_c1": {"select_coarse": 1},
    "select_c4": {"select_coarse": 4},
    "select_c8": {"select_coarse": 8},
    "select_c16": {"select_coarse": 16},
    "select_c32": {"select_coarse": 32},
    "select_c8_r2": {"select_coarse": 8, "select_candidates": 2},
    "select_c16_r2": {"select_coarse": 16, "select_candidates": 2},
    "select_c16_r8": {"select_coarse": 16, "select_candidates": 8},
    "longformer": LONGFORMER,
    "paper": "PAPER",
}
FWD_BWD = ("sdpa", "shipped", "default", "default_recompute", "default_compiled", "longformer",
           "flex_longformer", "select_m90", "select_m95_k40", "select_bound", "select_c1",
           "select_c8", "select_c16")  # fmt: skip


def _params(spec):
    from hyperpass.config import PAPER

    return PAPER.as_dict() if spec == "PAPER" else spec


def implementations(setting: dict, causal: bool, names):
    """name -> forward fn over (q, k, v)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import hyperpass
    from hyperpass.config import DEFAULT
    from hyperpass.kernels.select_blocks import select_block_lists

    gqa = setting["q_heads"] != setting["kv_heads"]
    fns = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                   enable_gqa=gqa)}  # fmt: skip
    for name in names:
        if name in IMPLS:
            cfg = DEFAULT.replace(**{**_params(IMPLS[name]), "min_len": 1})
            fns[name] = lambda q, k, v, cfg=cfg: hyperpass.hyper_attention(
                q, k, v, is_causal=causal, enable_gqa=gqa, config=cfg
            )
    if "shipped" in names:
        fns["shipped"] = lambda q, k, v: hyperpass.hyper_attention(
            q, k, v, is_causal=causal, enable_gqa=gqa
        )
    if "default_recompute" in names:  # its backward recomputes the forward (the compiled path)
        cfg = DEFAULT.replace(min_len=1)

        def recompute(q, k, v):
            from hyperpass.op import registration

            registration.KEEP_FORWARD_GRAPH = False
            try:
                return hyperpass.hyper_attention(q, k, v, is_causal=causal, enable_gqa=gqa,
                                                 config=cfg)  # fmt: skip
            finally:
                registration.KEEP_FORWARD_GRAPH = True

        fns["default_recompute"] = recompute
    if "default_compiled" in names:  # what a torch.compile user gets: one graph per length

        def attention(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        fns["default_compiled"] = torch.compile(
            attention, backend=hyperpass.backend(min_len=1), dynamic=False
        )
    for name in names:  # the block selection alone: ``selection`` or ``selection_<impl>``
        if name == "selection" or name.startswith("selection_"):
            spec = IMPLS.get(name.removeprefix("selection_"), {})
            cfg = DEFAULT.replace(**_params(spec))
            fns[name] = lambda q, k, v, cfg=cfg: select_block_lists(
                q, k, q.shape[-1] ** -0.5, cfg, causal
            )
    if "flex_longformer" in names:
        flex = torch.compile(flex_attention, dynamic=True)
        window, sinks = LONGFORMER["window"], LONGFORMER["sinks"]

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx - kv_idx
            near = (d >= 0) & (d < window) if causal else (d < window) & (d > -window)
            sink = (kv_idx < sinks) & (d >= 0) if causal else kv_idx < sinks
            return near | sink

        masks = {}

        def flex_fn(q, k, v):
            n = q.shape[-2]
            if n not in masks:  # built once per length, as a user caches it
                masks[n] = create_block_mask(mask_mod, None, None, n, n, device="cuda",
                                             _compile=True)  # fmt: skip
            return flex(q, k, v, block_mask=masks[n], enable_gqa=gqa)

        fns["flex_longformer"] = flex_fn
    return fns


def bench(fn, q, k, v, grad, backward: bool) -> float:
    import torch
    import triton

    if not backward:
        return triton.testing.do_bench(lambda: fn(q, k, v), warmup=25, rep=100,
                                       return_mode="median")  # fmt: skip
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def step():
        out = fn(*inputs)
        torch.autograd.backward(out, grad)

    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median",
                                   grad_to_none=inputs)  # fmt: skip


def run(args) -> dict:
    import torch
    import triton

    torch._dynamo.config.recompile_limit = 64
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "timing": "triton.testing.do_bench median, back to back (warmup 25 ms, rep 100 ms)",
        "rows": [],
    }
    names = args.impls.split(",")
    deadline = time.time() + args.limit_s
    for setting_name in args.settings:
        setting = SETTINGS[setting_name]
        for causal in [True] + ([False] if args.noncausal else []):
            fns = implementations(setting, causal, names)
            for n in args.lengths:
                gen = torch.Generator(device="cuda").manual_seed(n)
                h, hkv, d = setting["q_heads"], setting["kv_heads"], setting["dim"]

                q, k, v, grad = (
                    torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                    for heads in (h, hkv, hkv, h)
                )
                flops = 4 * h * n * n * d / (2 if causal else 1)
                base = {}
                for name, fn in fns.items():
                    if time.time() > deadline:
                        result["truncated"] = "time limit"
                        return result
                    row = {"setting": setting_name, "causal": causal, "n": n, "impl": name}
                    for backward in (False, True):
                        if backward and (name not in FWD_BWD or n > args.max_bwd_n):
                            continue
                        key = "fwd_bwd_ms" if backward else "fwd_ms"
                        try:
                            ms = bench(fn, q, k, v, grad, backward)
                        except Exception as err:  # noqa: BLE001 - record and go on
                            row[key + "_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                            continue
                        row[key] = round(ms, 4)
                        if name == "sdpa":
                            base[key] = ms
                        elif key in base:
                            row[key.replace("_ms", "_speedup")] = round(base[key] / ms, 3)
                        if name == "sdpa" and not backward:
                            row["sdpa_tflops"] = round(flops / ms / 1e9, 1)
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "w") as f:
                            json.dump(result, f, indent=1)
                del q, k, v, grad
                torch.cuda.empty_cache()
    return result


def tables(result: dict) -> str:
    """Markdown tables: forward and forward+backward speedup over SDPA per length."""
    lines = [f"{result['device']}, torch {result['torch']}, triton {result['triton']}, bf16"]
    rows = result["rows"]
    for key, title in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        for setting in SETTINGS:
            for causal in (True, False):
                sel = [r for r in rows if r["setting"] == setting and r["causal"] == causal]
                if not sel:
                    continue
                lengths = sorted({r["n"] for r in sel})
                impls = list(dict.fromkeys(r["impl"] for r in sel))
                head = f"\n{title}, {setting}, {'causal' if causal else 'non-causal'}: "
                lines.append(head + "speedup over SDPA (SDPA ms in the first row)")
                lines.append("| impl | " + " | ".join(f"{n // 1024}k" for n in lengths) + " |")
                lines.append("|---|" + "---|" * len(lengths))
                for impl in impls:
                    cells = []
                    for n in lengths:
                        r = next((x for x in sel if x["impl"] == impl and x["n"] == n), {})
                        v = r.get(f"{key}_ms") if impl == "sdpa" else r.get(f"{key}_speedup")
                        cells.append("-" if v is None else f"{v:.3g}" + ("" if impl == "sdpa"
                                                                          else "x"))  # fmt: skip
                    if any(c != "-" for c in cells):
                        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", default=None, help="print the tables of a JSON result")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    parser.add_argument("--noncausal", action="store_true")
    parser.add_argument("--max-bwd-n", type=int, default=131072)
    parser.add_argument("--limit-s", type=float, default=500.0, help="stop starting new rows")
    parser.add_argument(
        "--impls",
        default="shipped,default,select_k4,select_k16,select_kb64,select_m90,longformer,"
        "flex_longformer,selection,paper",
    )
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(tables(json.load(f)))
        return 0
    result = run(args)
    print(tables(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
