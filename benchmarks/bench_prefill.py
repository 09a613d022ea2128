"""End to end: prefill of a Llama-3.1-8B-shaped model (random weights) through the backend,
against eager Hugging Face and plain ``torch.compile`` (needs CUDA and transformers).

The model: ``LlamaForCausalLM`` with Llama-3.1-8B's shapes (hidden 4096, 32 query / 8 KV heads,
head dim 128, MLP 14336, vocabulary 128256) and ``--layers`` decoder layers, bf16,
``attn_implementation="sdpa"``; one sequence of ``n`` random tokens (``--batch``, ``--left-pad``:
a padded batch of prompts), ``use_cache=False``, no gradients; ``--logits-to-keep 1`` computes
the last position's logits only, as ``generate()`` prefills (the LM head over every position is
a third of the model's time at 128k). Rows:
``eager`` (the model as is), ``compile`` (``torch.compile(model)``), ``hyperpass``
(``torch.compile(model, backend=hyperpass.backend())``: the defaults, the measured break-even
included), ``hyperpass_recompute`` (the same with ``training.KEEP_PLANS = False``: with
``--train``, the backward selects again). Each: median wall time of the forward over a few
calls after warm-up, peak memory, and the backend's rewritten-site count.

``--train``: a fine-tuning step instead: the decoder stack's forward and backward (the loss a
mean of the last hidden states' squares; the LM head and its n x vocabulary logits left out),
gradients for every weight, in train mode.

    python benchmarks/bench_prefill.py --out $OUT/prefill.json [--lengths 32768 131072]
    python benchmarks/bench_prefill.py --train --out $OUT/train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def build(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, num_hidden_layers=layers, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def timed(fn, calls: int) -> float:
    import torch

    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lengths", nargs="+", type=int, default=[32768, 131072])
    parser.add_argument("--rows", default="eager,compile,hyperpass")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--left-pad",
        type=float,
        default=0.0,
        help="left-pad the first row by this share of n (a padded batch)",
    )
    parser.add_argument("--train", action="store_true", help="a fine-tuning step (see above)")
    parser.add_argument("--logits-to-keep", type=int, default=0,
                        help="0: logits at every position; 1: the last one, as generate() "
                             "prefills")  # fmt: skip
    args = parser.parse_args()

    import torch

    import hyperpass
    from hyperpass.compiler import training

    model = build(args.layers)
    if args.train:
        model.train()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "layers": args.layers, "logits_to_keep": args.logits_to_keep,
              "batch": args.batch, "left_pad": args.left_pad, "train": args.train,
              "rows": []}  # fmt: skip
    for n in args.lengths:
        ids = torch.randint(0, 128256, (args.batch, n), device="cuda")
        call_kwargs = {"use_cache": False}
        if not args.train:
            call_kwargs["logits_to_keep"] = args.logits_to_keep
        if args.left_pad > 0:
            keep = torch.ones_like(ids)
            keep[0, : int(args.left_pad * n)] = 0
            call_kwargs["attention_mask"] = keep
        for name in args.rows.split(","):
            row = {"n": n, "impl": name}
            training.KEEP_PLANS = name != "hyperpass_recompute"
            try:
                backend = hyperpass.backend() if name.startswith("hyperpass") else None
                module = model.model if args.train else model
                if name == "eager":
                    fn = module
                elif name == "compile":
                    fn = torch.compile(module, dynamic=False)
                else:
                    fn = torch.compile(module, backend=backend, dynamic=False)
                call = _step(fn, ids, call_kwargs, args.train)
                with torch.set_grad_enabled(args.train):
                    start = time.perf_counter()
                    call()  # compile / warm up
                    torch.cuda.synchronize()
                    row["first_call_s"] = round(time.perf_counter() - start, 1)
                    torch.cuda.reset_peak_memory_stats()
                    row["ms"] = round(timed(call, args.calls), 1)
                    row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if backend is not None:
                    row["rewritten"] = sum(r.rewritten for r in backend.reports)
                    row["sites"] = len(backend.reports)
                    row["exact_reasons"] = sorted({r.reason for r in backend.reports
                                                   if not r.rewritten})  # fmt: skip
            except Exception as err:  # noqa: BLE001 - record and go on
                row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
            base = next((r for r in result["rows"] if r["n"] == n and r["impl"] == "eager"), None)
            if base and "ms" in row and "ms" in base:
                row["speedup_vs_eager"] = round(base["ms"] / row["ms"], 2)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
            training.KEEP_PLANS = True
            model.zero_grad(set_to_none=True)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    return 0


def _step(fn, ids, kwargs: dict, train: bool):
    """One timed call: the forward, or (``train``) the decoder's forward and backward."""
    if not train:
        return lambda: fn(ids, **kwargs)

    def step():
        hidden = fn(ids, **kwargs).last_hidden_state
        hidden.float().square().mean().backward()

    return step


if __name__ == "__main__":
    sys.exit(main())
