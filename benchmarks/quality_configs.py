"""Named configurations of the quality benchmark.

A name is a base configuration, optionally followed by ``@lastN`` (only the last N layers
rewritten; the others exact). ``params`` overrides fields of :class:`hyperpass.config.HyperConfig`
(``None``: exact attention), or names a prototype of ``quality_proto`` (key ``"proto"``).
"""

from __future__ import annotations

BASE: dict[str, dict | None] = {
    "exact": None,
    # the published algorithm: recursive causal, sortLSH blocks + samples
    "hyper_rec4096": {"min_seq_len": 4096},
    "hyper_rec2048": {"min_seq_len": 2048},
    "hyper_rec4096_s0": {"min_seq_len": 4096, "sample_size": 0},
    # fixed patterns
    "local512_s16": {"method": "longformer", "window": 512, "sinks": 16},
    "local1024_s16": {"method": "longformer", "window": 1024, "sinks": 16},
    "local1536_s16": {"method": "longformer", "window": 1536, "sinks": 16},
    "local2048_s16": {"method": "longformer", "window": 2048, "sinks": 16},
    "local1024": {"method": "local", "window": 1024},
    "dilated2048x2_s16": {"method": "dilated", "window": 2048, "dilation": 2, "sinks": 16},
    # flat causal HyperAttention with a window and sinks
    "flat_w1024_s16_b256": {
        "causal_algo": "flat", "window": 1024, "sinks": 16, "block_size": 256, "sample_size": 0,
    },
    "flat_w1024_s16_b256_m256": {
        "causal_algo": "flat", "window": 1024, "sinks": 16, "block_size": 256, "sample_size": 256,
    },
    "flat_w1024_s16_b512": {
        "causal_algo": "flat", "window": 1024, "sinks": 16, "block_size": 512, "sample_size": 0,
    },
    "flat_w512_s16_b1024": {
        "causal_algo": "flat", "window": 512, "sinks": 16, "block_size": 1024, "sample_size": 0,
    },
    # recursive HyperAttention with a window and sinks in the approximated blocks
    "rec2048_w1024_s16": {"min_seq_len": 2048, "window": 1024, "sinks": 16, "sample_size": 0},
    "rec2048_w1024_s16_m256": {"min_seq_len": 2048, "window": 1024, "sinks": 16},
    "rec1024_w1024_s16": {"min_seq_len": 1024, "window": 1024, "sinks": 16, "sample_size": 0},
}  # fmt: skip

# the op's method="select" (hyperpass/block_select.py), folded in from the prototype below
_SELECT = {
    "method": "select",
    "window": 512,
    "sinks": 16,
    "select_topk": 16,
    "select_block": 64,
    "query_block": 16,
    "sample_size": 0,
}
BASE["select_w512_k16_q16"] = _SELECT
BASE["select_w1024_k8_q16"] = {**_SELECT, "window": 1024, "select_topk": 8}

# prototype (benchmarks/quality_proto.py): exact blocks picked by a score bound
_SEL = {"proto": "blocksel", "window": 1024, "sinks": 16, "block": 64, "qblock": 64, "topk": 8}
BASE.update(
    {
        "sel_w1024_k8": _SEL,
        "sel_w1024_k4": {**_SEL, "topk": 4},
        "sel_w1024_k16": {**_SEL, "topk": 16},
        "sel_w1024_k8_mean": {**_SEL, "agg": "mean"},
        "sel_w1024_k8_gqa": {**_SEL, "share_gqa": True},
        "sel_w1024_k8_m256": {**_SEL, "samples": 256},
        "sel_w512_k16": {**_SEL, "window": 512, "topk": 16},
        "sel_w512_k8": {**_SEL, "window": 512},
        "sel_w2048_k8": {**_SEL, "window": 2048},
        "sel_w1024_k4_b128": {**_SEL, "topk": 4, "block": 128},
        "sel_w1024_k16_b32": {**_SEL, "topk": 16, "block": 32},
        "sel_w1024_k8_q128_gqa_mean": {**_SEL, "qblock": 128, "share_gqa": True, "agg": "mean"},
        "sel_w512_k16_mean": {**_SEL, "window": 512, "topk": 16, "agg": "mean"},
        "sel_w512_k8_mean": {**_SEL, "window": 512, "agg": "mean"},
        "sel_w256_k16_mean": {**_SEL, "window": 256, "topk": 16, "agg": "mean"},
        "sel_w1024_k8_mean_gqa": {**_SEL, "agg": "mean", "share_gqa": True},
        "sel_w1024_k4_b128_mean_gqa": {
            **_SEL,
            "topk": 4,
            "block": 128,
            "agg": "mean",
            "share_gqa": True,
        },
        "sel_w1024_s0_k8_mean": {**_SEL, "sinks": 0, "agg": "mean"},
        "sel_w1024_k16_mean_gqa": {**_SEL, "topk": 16, "agg": "mean", "share_gqa": True},
        "sel_w512_k16_q16": {**_SEL, "window": 512, "topk": 16, "qblock": 16},
        "sel_w512_k16_q1": {**_SEL, "window": 512, "topk": 16, "qblock": 1},
        "sel_w1024_k8_q1": {**_SEL, "qblock": 1},
    }
)


def names() -> list[str]:
    return list(BASE)


def get(name: str) -> dict:
    """{"params": dict | None, "last": int | None} for ``base`` or ``base@lastN``."""
    base, _, suffix = name.partition("@")
    if base not in BASE:
        raise ValueError(f"unknown configuration {base!r}; known: {names()}")
    last = None
    if suffix:
        if not suffix.startswith("last") or not suffix[4:].isdigit():
            raise ValueError(f"configuration suffix must be @lastN, got {name!r}")
        last = int(suffix[4:])
    return {"params": BASE[base], "last": last}
