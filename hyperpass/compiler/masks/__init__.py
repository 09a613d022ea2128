"""Attention masks in a Dynamo FX graph, classified by following how the graph built them
(``values``: abstract values; ``interpreter``: node -> value; ``classify``: value -> kind)."""

from hyperpass.compiler.masks.classify import (
    AppliedMask,
    MaskInfo,
    classify_applied,
    classify_mask,
)

__all__ = ["AppliedMask", "MaskInfo", "classify_applied", "classify_mask"]
