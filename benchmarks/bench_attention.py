"""Speed of the HyperAttention Triton kernels vs exact SDPA (cuDNN default, flash backend).

Settings (issue 4): B=1, H=12, D=64 (the paper's) and B=1, 32 query / 8 KV heads, D=128;
n = 4096 ... 131072; causal and non-causal; forward and forward+backward; bf16; config
block 256, 256 samples, exact below 4096 (hyperpass.config.PAPER). Times are medians of CUDA-event
timed runs after a warm-up; fwd+bwd of the kernels is their forward plus their backward (which
recomputes the forward, as the op does). Peak memory is what the call allocates at most
(``torch.cuda.max_memory_allocated`` above what was live before it) plus its inputs (q, k, v, and
the output gradient for fwd+bwd). "rel err" is ||out - exact|| / ||exact|| against SDPA's output
on the same inputs (Gaussian inputs: see docs/performance.md on what that error means).

FLOPs of exact attention: 4 * B * Hq * Nq * Nk * D (halved when causal), forward only.

    python benchmarks/bench_attention.py --out $OUT/bench.json --png $OUT/speedup.png
    python benchmarks/bench_attention.py --plot-only bench.json --png docs/speedup.png  # + tables
    python benchmarks/bench_attention.py --patterns --settings paper --out $OUT/patterns.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {
    "paper": dict(batch=1, q_heads=12, kv_heads=12, dim=64),
    "llama": dict(batch=1, q_heads=32, kv_heads=8, dim=128),
}
LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072]
REFERENCE_MAX_N = 8192
# --patterns: the exact window/sinks parts (issue 7), alone and with HyperAttention
PATTERN_IMPLS = {
    "longformer_w1024_s16": dict(method="longformer", window=1024, sinks=16),
    "hyper_w512_s16": dict(window=512, sinks=16),
    "hyper_w512_s16_flat": dict(window=512, sinks=16, causal_algo="flat"),
}


# Warm-up before a one-call-at-a-time timing, as ``triton.testing.do_bench`` does: calls until
# this much time has passed (the first call alone compiles). It does not remove the host's
# noise: on the eighth session's H200 machines the same 131072 forward timed 1.04-1.40 ms one
# call at a time in consecutive runs, 0.975-0.979 ms back to back (results/session8_ab_h200.json).
WARMUP_MS = 25.0


def timed(fn, budget_ms: float = 300.0, max_iters: int = 50) -> float:
    """Median milliseconds of ``fn()`` over enough runs to fill about ``budget_ms``, each
    synced (the host's launch time counts), after ``WARMUP_MS`` of warm-up calls."""
    import torch

    fn()  # compile
    torch.cuda.synchronize()
    warm_start = time.perf_counter()
    while (time.perf_counter() - warm_start) * 1e3 < WARMUP_MS:
        fn()
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    iters = int(max(3, min(max_iters, budget_ms / max(first, 1e-3))))
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# forward rows also timed back to back (``ms_b2b``): calls queued without a sync between them,
# so the host issues the next call's launches while the GPU runs this one, as in a model's
# stream. ``timed`` syncs after every call and so also counts the host's launch time.
BACK_TO_BACK = ("sdpa", "hyper", "hyper_flat")


def back_to_back(fn) -> float:
    """Median ms of ``fn()`` by ``triton.testing.do_bench`` (no sync between calls)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_mb(fn, inputs) -> float:
    """Peak memory of ``fn()``: its inputs plus the most it allocated on top of what was live."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    live = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - live
    return (extra + sum(t.numel() * t.element_size() for t in inputs)) / 2**20


def implementations(setting: dict, causal: bool, patterns: bool = False):
    """name -> (forward fn, forward+backward fn) over (q, k, v, grad).

    With ``patterns``: SDPA and the ``PATTERN_IMPLS`` configs only."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hyperpass import kernels
    from hyperpass.config import PAPER
    from hyperpass.op import one_exact_leaf
    from hyperpass.reference import hyper_attention_reference

    gqa = setting["q_heads"] != setting["kv_heads"]

    def sdpa(backend):
        def fwd(q, k, v, g):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        def fwd_bwd(q, k, v, g):
            out = fwd(q, k, v, g)
            return torch.autograd.grad(out, (q, k, v), g)

        return fwd, fwd_bwd

    def hyper(algo, **params):
        cfg = PAPER.replace(**{"causal_algo": algo, **params})
        exact_fwd, exact_fwd_bwd = sdpa(None)

        def fwd(q, k, v, g):
            if one_exact_leaf(q.shape[-2], causal, cfg):  # as the op: SDPA
                return exact_fwd(q, k, v, g)
            return kernels.hyper_attention_forward(  # as the op: no lse
                q, k, v, is_causal=causal, scale=None, config=cfg, with_lse=False
            )[0]

        def fwd_bwd(q, k, v, g):
            if one_exact_leaf(q.shape[-2], causal, cfg):
                return exact_fwd_bwd(q, k, v, g)
            fwd(q, k, v, g)
            return kernels.hyper_attention_backward(
                g, q, k, v, is_causal=causal, scale=None, config=cfg
            )

        return fwd, fwd_bwd

    def reference(q, k, v, g):
        return hyper_attention_reference(q, k, v, is_causal=causal, config=PAPER)[0]

    def reference_bwd(q, k, v, g):
        return torch.autograd.grad(reference(q, k, v, g), (q, k, v), g)

    if patterns:
        impls = {"sdpa": sdpa(None)}
        for name, params in PATTERN_IMPLS.items():
            if causal or params.get("causal_algo") != "flat":
                impls[name] = hyper(**{"algo": "recursive", **params})
        return impls
    impls = {
        "sdpa": sdpa(None),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "hyper": hyper("recursive"),
    }
    if causal:
        impls["hyper_flat"] = hyper("flat")
    impls["reference"] = (reference, reference_bwd)
    return impls


def run(settings, lengths, masks, with_backward: bool, patterns=False, save=None) -> list[dict]:
    """All rows; ``save(rows)`` after each length (a run cut short keeps what it measured)."""
    import torch

    rows: list[dict] = []
    for name in settings:
        for n in lengths:
            bench_length(name, n, masks, with_backward, rows, patterns)
            if save is not None:
                save(rows)
            torch.cuda.empty_cache()
    return rows


def bench_length(
    name: str, n: int, masks, with_backward: bool, rows: list[dict], patterns: bool = False
) -> None:
    import torch

    s = SETTINGS[name]
    gen = torch.Generator(device="cuda").manual_seed(n)

    def make(heads):
        shape = (s["batch"], heads, n, s["dim"])
        x = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
        return x.requires_grad_(True)

    q, k, v = make(s["q_heads"]), make(s["kv_heads"]), make(s["kv_heads"])
    g = torch.randn_like(q)
    for causal in masks:
        exact = None
        base = {}
        for impl, (fwd, fwd_bwd) in implementations(s, causal, patterns).items():
            if impl == "reference" and n > REFERENCE_MAX_N:
                continue
            passes = [("fwd", fwd)] + ([("fwd+bwd", fwd_bwd)] if with_backward else [])
            for kind, fn in passes:
                row = {
                    "setting": name, **s, "n": n, "causal": causal, "impl": impl,
                    "pass": kind, "dtype": "bfloat16",
                }  # fmt: skip
                call = lambda fn=fn: fn(q, k, v, g)  # noqa: E731
                try:
                    with torch.no_grad() if kind == "fwd" else torch.enable_grad():
                        ms = timed(call)
                        if kind == "fwd" and impl in BACK_TO_BACK:
                            row["ms_b2b"] = back_to_back(call)
                        mem = peak_mb(call, (q, k, v) if kind == "fwd" else (q, k, v, g))
                        if kind == "fwd":
                            out = call().detach()
                            if impl == "sdpa":
                                exact = out
                            if exact is not None:
                                err = (out.float() - exact.float()).norm()
                                row["rel_err"] = (err / exact.float().norm()).item()
                    row.update(ms=ms, peak_mb=mem)
                    if impl == "sdpa":
                        base[kind] = ms
                    if kind in base:
                        row["speedup_vs_sdpa"] = base[kind] / ms
                except Exception as err:  # out of memory, unsupported backend...
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                rows.append(row)
                print(format_row(row), flush=True)
                torch.cuda.empty_cache()


def format_row(r: dict) -> str:
    mask = "causal" if r["causal"] else "full"
    if "error" in r:
        return f"{r['setting']:6} {r['n']:7} {mask:6} {r['pass']:8} {r['impl']:20} {r['error']}"
    speed = f"{r['speedup_vs_sdpa']:8.2f}x" if "speedup_vs_sdpa" in r else " " * 9
    err = f"{r['rel_err']:.3f}" if "rel_err" in r else "-"
    return (
        f"{r['setting']:6} {r['n']:7} {mask:6} {r['pass']:8} {r['impl']:20} "
        f"{r['ms']:10.3f} ms {speed} {r['peak_mb']:9.0f} MB  rel_err {err}"
    )


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for impl in ("hyper", "hyper_flat", "sdpa_flash"):
            for causal in (False, True):
                for kind, style in (("fwd", "-"), ("fwd+bwd", "--")):
                    pts = [
                        (r["n"], r["speedup_vs_sdpa"])
                        for r in rows
                        if r["setting"] == setting and r["impl"] == impl
                        and r["causal"] == causal and r["pass"] == kind
                        and "speedup_vs_sdpa" in r
                    ]  # fmt: skip
                    if pts:
                        xs, ys = zip(*sorted(pts), strict=True)
                        label = f"{impl} {'causal' if causal else 'full'} {kind}"
                        ax.plot(xs, ys, style, marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel("speedup vs SDPA default (cuDNN)")
        ax.set_title(setting)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def profile(setting: str, n: int) -> None:
    """Per-kernel CUDA time of the hyper kernels at one length (guides optimization)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    s = SETTINGS[setting]
    q = torch.randn(s["batch"], s["q_heads"], n, s["dim"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn(s["batch"], s["kv_heads"], n, s["dim"], device="cuda", dtype=torch.bfloat16)
    v, g = torch.randn_like(k), torch.randn_like(q)
    for causal in (False, True):
        impls = implementations(s, causal)
        for impl in ("hyper", "hyper_flat"):
            if impl not in impls:
                continue
            for kind, fn in zip(("fwd", "fwd+bwd"), impls[impl], strict=True):
                fn(q, k, v, g)
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn(q, k, v, g)
                    torch.cuda.synchronize()
                print(f"== profile {setting} n={n} causal={causal} {impl} {kind}", flush=True)
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
                print(table, flush=True)


def markdown(rows: list[dict]) -> str:
    """The results as markdown tables, one per setting (ms, speedup vs SDPA, peak MB)."""
    impls = ("sdpa", "sdpa_flash", "hyper", "hyper_flat", "reference")
    if any(r["impl"] in PATTERN_IMPLS for r in rows):
        return markdown_patterns(rows)
    by_key: dict = {}
    for r in rows:
        key = (r["setting"], r["n"], r["causal"], r["pass"])
        by_key.setdefault(key, {})[r["impl"]] = r
    lines = []
    for setting in dict.fromkeys(k[0] for k in by_key):
        s = SETTINGS[setting]
        lines += [
            f"### {setting}: B={s['batch']}, Hq={s['q_heads']}, Hkv={s['kv_heads']}, D={s['dim']}",
            "",
            "| n | mask | pass | " + " | ".join(impls) + " | peak MB (sdpa / hyper / flat) "
            "| rel err hyper / flat |",
            "|---" * (len(impls) + 5) + "|",
        ]
        for key, cell in by_key.items():
            if key[0] != setting:
                continue

            def fmt(impl, cell=cell):
                r = cell.get(impl)
                if r is None or "ms" not in r:
                    return "-" if r is None else "error"
                speed = f" ({r['speedup_vs_sdpa']:.2f}x)" if impl != "sdpa" else ""
                return f"{r['ms']:.2f}{speed}"

            def mem(impl, cell=cell):
                r = cell.get(impl)
                return f"{r['peak_mb']:.0f}" if r and "peak_mb" in r else "-"

            def err(impl, cell=cell):
                r = cell.get(impl)
                return f"{r['rel_err']:.2f}" if r and "rel_err" in r else "-"

            mask = "causal" if key[2] else "none"
            stale = " †" if any(r.get("stale") for r in cell.values()) else ""
            lines.append(
                f"| {key[1]}{stale} | {mask} | {key[3]} | "
                + " | ".join(fmt(i) for i in impls)
                + f" | {mem('sdpa')} / {mem('hyper')} / {mem('hyper_flat')}"
                + f" | {err('hyper')} / {err('hyper_flat')} |"
            )
        if any(r.get("stale") for r in rows if r["setting"] == setting):
            lines += ["† from an earlier run (the JSON's meta.note says which).", ""]
        lines.append("")
        lines += markdown_back_to_back([r for r in rows if r["setting"] == setting])
    return "\n".join(lines)


def markdown_back_to_back(rows: list[dict]) -> list[str]:
    """Forward ms timed back to back; the speedup divides SDPA's lower time of the two
    timings (synced or back to back) by hyper's back-to-back time."""
    cells: dict = {}
    for r in rows:
        if r["pass"] == "fwd" and "ms_b2b" in r:
            cells.setdefault((r["n"], r["causal"]), {})[r["impl"]] = r
    if not cells:
        return []
    lines = [
        "Forward, back to back (ms; speedup vs SDPA's lower time of the two timings):",
        "",
        "| n | mask | sdpa synced / b2b | hyper b2b | hyper_flat b2b |",
        "|---|---|---|---|---|",
    ]
    for (n, causal), cell in cells.items():
        sdpa = cell.get("sdpa")
        best = min(sdpa["ms"], sdpa["ms_b2b"]) if sdpa else None

        def fmt(impl, cell=cell, best=best):
            r = cell.get(impl)
            if r is None:
                return "-"
            return f"{r['ms_b2b']:.2f}" + (f" ({best / r['ms_b2b']:.1f}x)" if best else "")

        sdpa_cell = f"{sdpa['ms']:.2f} / {sdpa['ms_b2b']:.2f}" if sdpa else "-"
        mask = "causal" if causal else "none"
        lines.append(f"| {n} | {mask} | {sdpa_cell} | {fmt('hyper')} | {fmt('hyper_flat')} |")
    return lines + [""]


def markdown_patterns(rows: list[dict]) -> str:
    """--patterns results: ms (speedup vs SDPA) per config, one row per (setting, n, mask, pass)."""
    impls = ["sdpa", *PATTERN_IMPLS]
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["setting"], r["n"], r["causal"], r["pass"]), {})[r["impl"]] = r
    lines = [
        "| setting | n | mask | pass | " + " | ".join(impls) + " |",
        "|---" * (len(impls) + 4) + "|",
    ]
    for (setting, n, causal, kind), cell in by_key.items():

        def fmt(impl, cell=cell):
            r = cell.get(impl)
            if r is None or "ms" not in r:
                return "-" if r is None else "error"
            speed = f" ({r['speedup_vs_sdpa']:.2f}x)" if impl != "sdpa" else ""
            return f"{r['ms']:.2f}{speed}"

        mask = "causal" if causal else "none"
        lines.append(
            f"| {setting} | {n} | {mask} | {kind} | " + " | ".join(fmt(i) for i in impls) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    parser.add_argument("--masks", nargs="+", default=["full", "causal"])
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--out", default=None, help="JSON output")
    parser.add_argument("--png", default=None, help="speedup plot")
    parser.add_argument(
        "--plot-only", default=None, help="from this JSON: draw --png, print markdown tables"
    )
    parser.add_argument("--profile", type=int, default=0, help="profile the kernels at this n")
    parser.add_argument(
        "--patterns", action="store_true", help="time the window/sinks configs (PATTERN_IMPLS)"
    )
    args = parser.parse_args()
    if args.profile:
        profile(args.settings[0], args.profile)
        return 0
    if args.plot_only:
        with open(args.plot_only) as f:
            rows = json.load(f)["rows"]
        if args.png:
            plot(rows, args.png)
        print(markdown(rows))
        return 0
    import torch
    import triton

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(meta), flush=True)
    masks = [m == "causal" for m in args.masks]

    def save(rows):
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)

    rows = run(args.settings, args.lengths, masks, not args.no_backward, args.patterns, save)
    save(rows)
    if args.patterns:
        print(markdown(rows), flush=True)
    if args.png:
        try:
            plot(rows, args.png)
        except ImportError:
            print("matplotlib missing: draw the PNG later with --plot-only", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
