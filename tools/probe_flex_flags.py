"""FlexAttention's kernel flags on the default's lists and the longformer pattern, on a GPU.

For each setting and length (bf16, causal, B=1): FlexAttention forward and forward+backward on
the default's select lists and on the longformer pattern (window 2048, 16 sinks) under the
options the op passes today, then with ``USE_TMA``, ``PRESCALE_QK``, ``ROWS_GUARANTEED_SAFE``
each and all together; every variant's output and gradients are compared with the first's
(largest absolute difference) and with an fp32 SDPA on the same mask where it fits. A lab tool:
its output decides the flags in ``hyperpass/kernels/flex.py``.

    python tools/probe_flex_flags.py --out $OUT/flags.json [--lengths 8192 32768 131072]
    python tools/probe_flex_flags.py --op ...  # the op: kept graph, recompute, USE_TMA; SDPA
"""

from __future__ import annotations

import argparse
import json
import time

SETTINGS = {"paper": (12, 12, 64), "llama": (32, 8, 128), "gemma": (4, 1, 256)}
FLAGS = {
    "base": {},
    "tma": {"USE_TMA": True},
    "prescale": {"PRESCALE_QK": True},
    "rows_safe": {"ROWS_GUARANTEED_SAFE": True},
    "all": {"USE_TMA": True, "PRESCALE_QK": True, "ROWS_GUARANTEED_SAFE": True},
    "tma_rows_safe": {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True},
}


def _bench(fn):
    import triton

    return round(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)


def _step(fn, q, k, v, grad):
    import torch

    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def step():
        torch.autograd.backward(fn(*inputs), grad)

    return step, inputs


def _masks(q, k, n, cfg, scale) -> dict:
    """{kind: (mask, the op's options, dynamic)}, as the op compiles each."""
    from hyperpass.kernels import flex
    from hyperpass.kernels.select_blocks import select_block_lists

    lists = select_block_lists(q, k, scale, cfg, True)
    select = flex.block_mask_from_lists(
        *lists, n, n, cfg.query_block, cfg.select_block, flex.causal_mod(), True
    )
    longformer = flex.pattern_block_mask(n, n, 2048, 1, 16, True, q.device)
    return {
        "select": (select, flex._kernel_options(cfg, q.shape[-1]) or {}, True),
        "longformer": (longformer, {}, False),
    }


def probe(setting: str, n: int) -> list[dict]:
    import torch

    from hyperpass.config import DEFAULT
    from hyperpass.kernels import flex

    hq, hkv, d = SETTINGS[setting]
    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v, grad = (
        torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        for h in (hq, hkv, hkv, hq)
    )
    gqa, scale, cfg = hq != hkv, d**-0.5, DEFAULT.replace(min_len=1)
    rows = []
    for kind, (mask, options, dynamic) in _masks(q, k, n, cfg, scale).items():
        ref = None
        for name, flags in FLAGS.items():
            opts = {**options, **flags}
            row = {"setting": setting, "n": n, "mask": kind, "flags": name}

            def fn(q, k, v, opts=opts, mask=mask, dynamic=dynamic):
                return flex._flex(q, k, v, mask, scale, gqa, opts, dynamic)

            try:
                with torch.no_grad():
                    row["fwd_ms"] = _bench(lambda fn=fn: fn(q, k, v))
                step, inputs = _step(fn, q, k, v, grad)
                row["fwd_bwd_ms"] = _bench(step)
                for t in inputs:
                    t.grad = None
                out = fn(*inputs)
                torch.autograd.backward(out, grad)
                got = [out.float(), *(t.grad.float() for t in inputs)]
                if ref is None:
                    ref = got
                else:
                    row["max_diff_vs_base"] = [
                        round((a - b).abs().max().item(), 5) for a, b in zip(got, ref, strict=True)
                    ]
            except Exception as err:  # noqa: BLE001 - record and go on
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def probe_op(setting: str, n: int) -> list[dict]:
    """The op (default config, forced to approximate) forward and forward+backward (time, and
    peak memory above the inputs') with the options it passes today, with its backward
    recomputing the forward, and with ``USE_TMA`` added, beside SDPA, in one process."""
    import torch
    import torch.nn.functional as F

    from hyperpass.config import DEFAULT
    from hyperpass.kernels import flex
    from hyperpass.op import hyper_attention, registration

    hq, hkv, d = SETTINGS[setting]
    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v, grad = (
        torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        for h in (hq, hkv, hkv, hq)
    )
    gqa, cfg = hq != hkv, DEFAULT.replace(min_len=1)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def op(q, k, v):
        return hyper_attention(q, k, v, is_causal=True, enable_gqa=gqa, config=cfg)

    def op_recompute(q, k, v):
        registration.KEEP_FORWARD_GRAPH = False
        try:
            return op(q, k, v)
        finally:
            registration.KEEP_FORWARD_GRAPH = True

    todays = flex._kernel_options
    variants = {
        "sdpa": (sdpa, todays),
        "op": (op, todays),
        "op_recompute": (op_recompute, todays),
        "op_tma": (op, lambda c, dim: {**(todays(c, dim) or {}), "USE_TMA": True}),
    }
    rows, ref = [], None
    for name, (fn, options) in variants.items():
        flex._kernel_options = options
        try:
            row = {"setting": setting, "n": n, "impl": name}
            with torch.no_grad():
                row["fwd_ms"] = _bench(lambda fn=fn: fn(q, k, v))
            step, inputs = _step(fn, q, k, v, grad)
            row["fwd_bwd_ms"] = _bench(step)
            for t in inputs:
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            row["fwd_bwd_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20)
            if name != "sdpa":
                for t in inputs:
                    t.grad = None
                out = fn(*inputs)
                torch.autograd.backward(out, grad)
                got = [out.float(), *(t.grad.float() for t in inputs)]
                if ref is None:
                    ref = got
                else:
                    row["max_diff_vs_op"] = [
                        round((a - b).abs().max().item(), 5) for a, b in zip(got, ref, strict=True)
                    ]
        except Exception as err:  # noqa: BLE001 - record and go on
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        finally:
            flex._kernel_options = todays
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--settings", nargs="+", default=["paper", "llama"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--limit-s", type=float, default=500)
    parser.add_argument("--op", action="store_true", help="time the op with and without TMA")
    args = parser.parse_args()
    import torch
    import triton

    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.accumulated_recompile_limit = 4096
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "rows": []}  # fmt: skip
    deadline = time.time() + args.limit_s
    for setting in args.settings:
        for n in args.lengths:
            if time.time() > deadline:
                result["truncated"] = True
                break
            result["rows"] += (probe_op if args.op else probe)(setting, n)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
