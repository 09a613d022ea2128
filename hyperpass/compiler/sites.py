"""Attention sites of a Dynamo FX graph: what a rewrite needs to know about one attention.

A site is one ``torch._C._nn.scaled_dot_product_attention`` node (arguments by position or
keyword, :func:`sdpa_site`) or a hand-written matmul-softmax-matmul
(``hyperpass.compiler.handwritten`` builds those). Each carries its module path, as the model
spells it (``model.layers.3.self_attn``), for ``layers=`` patterns and the report.
Imports the mask classifier and FX helpers only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

from hyperpass.compiler.fx_utils import concrete_scalar, meta_of
from hyperpass.compiler.masks import MaskInfo, classify_mask

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention,)
_SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
_SDPA_DEFAULTS = {
    "attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False,
}  # fmt: skip


@dataclass
class Site:
    """An attention site: what the op call needs, and the node it replaces."""

    form: str
    out: fx.Node  # the node whose value the op call replaces
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: MaskInfo
    mask_node: object = None  # the SDPA attn_mask argument (kept when the site stays exact)
    dropout_p: object = 0.0
    is_causal: bool = False
    scale: object = None
    enable_gqa: bool = False
    module: str = ""
    unsqueeze_batch: bool = False  # 3-D [B*H, N, D] attention: lift to 4-D for the op
    exact_reason: tuple[str, str] | None = None  # (code, words): a form the op cannot take
    k_transposed: bool = False  # ``k`` holds k^T [.., D, Nk]: transpose it back
    scale_factors: tuple = ()  # hand-written: (scalar or SymFloat node, +1 multiply / -1 divide)


# A Dynamo source: the frame's local or global (``L['self']``, ``L['args'][0]``, ``G['model']``)
# and the tuple/dict items right after it; what follows is the path inside that module.
_SOURCE_ROOT = re.compile(r"^[LG]\['[^']*'\](?:\[\d+\]|\['[^']*'\])*")


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node, relative to the compiled module or function
    argument (``model.layers.0.self_attn``), or the node's name when the graph has none."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = str(list(stack.values())[-1][0])
    path = _SOURCE_ROOT.sub("", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".") or node.name


def _sdpa_args(node: fx.Node) -> dict:
    """SDPA's arguments by name, whether passed by position or keyword."""
    args = dict(_SDPA_DEFAULTS)
    for name, value in zip(_SDPA_ARG_NAMES, node.args, strict=False):
        args[name] = value
    for name, value in node.kwargs.items():
        args[{"q": "query", "k": "key", "v": "value"}.get(name, name)] = value
    return args


def sdpa_site(node: fx.Node) -> Site:
    a = _sdpa_args(node)
    q, k, v = a["query"], a["key"], a["value"]
    mq, mk = meta_of(q), meta_of(k)
    mask_node = a["attn_mask"]
    if mq is not None and mk is not None and mq.dim() >= 2:
        mask = classify_mask(mask_node, mq.shape[-2], mk.shape[-2])
    else:
        mask = MaskInfo("arbitrary", "no shape metadata") if mask_node is not None else None
        mask = mask or MaskInfo("none", "no mask")
    return Site(
        form="sdpa",
        out=node,
        q=q,
        k=k,
        v=v,
        mask=mask,
        mask_node=mask_node,
        dropout_p=concrete_scalar(a["dropout_p"]),
        is_causal=a["is_causal"],
        scale=concrete_scalar(a["scale"]),
        enable_gqa=a["enable_gqa"],
        module=module_path(node),
    )
