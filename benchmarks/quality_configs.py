"""Named configurations of the quality benchmark.

A name is a base configuration, optionally followed by ``@lastN`` (only the last N layers
rewritten; the others exact). ``params`` overrides fields of :class:`hyperpass.config.HyperConfig`
(``None``: exact attention).
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
# the rows above are HyperAttention's (the package default method is "select")
BASE.update({name: {"method": "hyper", **p} for name, p in BASE.items() if p and "method" not in p})

# the block-sparse select (query tiles of 128, key blocks of 128, FlexAttention on GPUs)
_BLOCKS = {"method": "select", "window": 512, "sinks": 16, "select_block": 128,
           "query_block": 128, "query_groups": 8, "select_topk": 8}  # fmt: skip
BASE["select_w512_k8"] = _BLOCKS
BASE["select_w1024_k8"] = {**_BLOCKS, "window": 1024}
BASE["select_w512_k12"] = {**_BLOCKS, "select_topk": 12}
BASE["select_w512_k16_g16"] = {**_BLOCKS, "select_topk": 16, "query_groups": 16}
BASE["select_w512_m90"] = {**_BLOCKS, "select_topk": 16, "select_mass": 0.9, "select_min": 2}
BASE["select_w512_m95"] = {**_BLOCKS, "select_topk": 24, "select_mass": 0.95, "select_min": 4}
# larger budgets, for 16k-32k contexts (Gemma 3): fixed, and adaptive up to a cap
BASE["select_w512_k16"] = {**_BLOCKS, "select_topk": 16}
BASE["select_w512_k32"] = {**_BLOCKS, "select_topk": 32}
BASE["select_w1024_k24"] = {**_BLOCKS, "window": 1024, "select_topk": 24}
BASE["select_w512_k16_g32"] = {**_BLOCKS, "select_topk": 16, "query_groups": 32}
BASE["select_w512_k32_g32"] = {**_BLOCKS, "select_topk": 32, "query_groups": 32}
_ADAPTIVE = {**_BLOCKS, "select_mass": 0.98, "select_min": 4, "select_topk": 40}
BASE["select_w512_m95_k40"] = {**_ADAPTIVE, "select_mass": 0.95}
BASE["select_w512_m98_k40"] = _ADAPTIVE
BASE["select_w512_m99_k48"] = {**_ADAPTIVE, "select_mass": 0.99, "select_min": 8, "select_topk": 48}
BASE["select_w1024_m98_k40"] = {**_ADAPTIVE, "window": 1024}
BASE["select_w512_m98_k40_g32"] = {**_ADAPTIVE, "query_groups": 32}

# the same blocks ranked by the score bound (select_score="bound", the default before "rows")
BASE.update(
    {
        name.replace("select_", "select_bound_", 1): {**params, "select_score": "bound"}
        for name, params in list(BASE.items())
        if name.startswith("select_")
    }
)

# fewer sampled rows per tile (select_rows, 8 by default): each halving halves the scoring work
for _name in ("select_w512_k8", "select_w512_k12", "select_w512_k16", "select_w512_m90",
              "select_w512_m95_k40"):  # fmt: skip
    for _rows in (4, 2):
        BASE[f"{_name}_r{_rows}"] = {**BASE[_name], "select_rows": _rows}

# the last tile's floor (select_last, 32 by default; 0: the last tile ranked as every other)
for _last in (0, 16):
    BASE[f"select_w512_k8_l{_last}"] = {**BASE["select_w512_k8"], "select_last": _last}

# coarse tiles (select_coarse): every block ranked by select_rows rows per select_coarse tiles,
# select_candidates x select_topk candidates kept for the tiles' own rows; c1: every tile
# ranks every block
for _name in ("select_w512_k8", "select_w512_k12", "select_w512_k16", "select_w512_m95_k40"):
    BASE[f"{_name}_c1"] = {**BASE[_name], "select_coarse": 1}
    for _coarse in (4, 8, 16):
        for _keep in (2, 4, 8):
            BASE[f"{_name}_c{_coarse}_r{_keep}"] = {
                **BASE[_name], "select_coarse": _coarse, "select_candidates": _keep
            }  # fmt: skip


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
