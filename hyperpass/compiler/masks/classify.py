"""Classify an attention mask in a Dynamo FX graph by following how it was built.

A mask may become ``is_causal=True`` only when the graph proves it is the lower-triangular
pattern ``allowed[i, j] = j <= i`` over the full ``[Nq, Nk]`` score matrix (top-left aligned,
which is what SDPA's ``is_causal`` means). The proof is a small abstract interpretation of the
nodes that build the mask: every integer tensor is tracked as an affine function of its element's
position, every boolean tensor as a conjunction of linear inequalities over positions, every float
mask as ``a where pred else b``. Anything it cannot follow (a tensor input such as a padding mask,
advanced indexing, an unknown op) stays opaque, and an opaque mask is never called causal.

Covers the shapes models build masks with: ``arange`` comparisons broadcast by indexing or
``unsqueeze`` (Hugging Face ``masking_utils``), ``tril``/``triu`` of ``ones``/``full``,
``masked_fill``/``where`` into additive masks, ``~``, ``&``, ``.to(...)`` casts, ``expand``.

Three modules: ``values`` (the abstract values and their algebra), ``interpreter``
(node -> value), this one (value -> :class:`MaskInfo`, for SDPA masks and for masks a
hand-written attention applies). Imports torch only; must not import the op or the pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import torch
from torch import fx

from hyperpass.compiler.fx_utils import meta_of, same_size
from hyperpass.compiler.masks.interpreter import Interpreter
from hyperpass.compiler.masks.mutation import edited_in_place
from hyperpass.compiler.masks.values import (
    MASKED_AT_OR_BELOW,
    ONE,
    TRUE,
    Lin,
    Opaque,
    Sel,
    arith,
    as_allowed,
    negate,
    to_pred,
)


# ----------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class MaskInfo:
    """What a mask is. ``kind``: ``none`` (all allowed), ``causal`` (provably lower-triangular),
    ``causal+padding``, ``padding`` (depends on input data), ``sliding-window``, ``arbitrary``."""

    kind: str
    reason: str
    keys_only: bool = False  # padding: varies with the batch row and key only, never the query


def classify_mask(mask: fx.Node | None, n_q, n_k, *, boolean: bool | None = None) -> MaskInfo:
    """Classify an SDPA-style mask (boolean: True = attend; float: added to the scores).

    Args:
        mask: the node producing the mask, or None.
        n_q, n_k: the query and key lengths (ints or SymInts) of the attention it applies to.
        boolean: whether the mask is boolean; read from the node's metadata when None.
    """
    if mask is None:
        return MaskInfo("none", "no mask")
    if isinstance(mask, fx.Node) and (edit := edited_in_place(mask)) is not None:
        return MaskInfo("arbitrary", f"mask edited in place ({edit.name})")
    value = Interpreter().eval(mask)
    if boolean is None:
        meta = meta_of(mask)
        boolean = meta is not None and meta.dtype == torch.bool
    allowed = as_allowed(value, boolean)
    return judge_allowed(allowed, value, meta_of(mask), n_q, n_k)


def judge_allowed(allowed, value, meta, n_q, n_k) -> MaskInfo:
    """Turn an allowed-set into a :class:`MaskInfo` for an ``[..., Nq, Nk]`` attention."""
    if isinstance(allowed, Opaque):
        if allowed.module_state:  # nanoGPT's causal ``bias`` buffer, say
            return MaskInfo(
                "arbitrary",
                f"mask read from module state ({allowed.why}): its contents are not proven "
                "when compiled and may change without a recompile",
            )
        if allowed.data:
            # a boolean read from an input is an allowed set; a float one may be any bias
            keys = _keys_only(allowed.axes) and meta is not None and meta.dtype == torch.bool
            return MaskInfo("padding", f"mask depends on input data ({allowed.why})", keys)
        return MaskInfo("arbitrary", f"mask the classifier cannot follow ({allowed.why})")
    if allowed.false:
        return MaskInfo("arbitrary", "mask that masks everything")
    opaque = [a for a in allowed.atoms if isinstance(a, tuple)]
    forms = {_canonical(a) for a in allowed.atoms if isinstance(a, Lin)}
    forms.discard(None)  # always true
    if any(f == "false" for f in forms):
        return MaskInfo("arbitrary", "mask that masks everything")
    shape_ok = meta is not None and meta.dim() >= 2 and same_size(meta.shape[-2], n_q)
    shape_ok = shape_ok and same_size(meta.shape[-1], n_k)
    causal = Lin.of({("ax", -1): 1, ("ax", -2): -1})
    has_causal = causal in forms and shape_ok
    rest = forms - {causal} if has_causal else forms
    if opaque:
        kind = "causal+padding" if has_causal and not rest else "padding"
        keys = (has_causal or not forms) and not rest and all(_keys_only(a[2]) for a in opaque)
        return MaskInfo(kind, f"{kind} mask: part of it depends on input data", keys)
    if not rest:
        if has_causal:
            return MaskInfo("causal", "lower-triangular mask (j <= i)")
        if not forms:
            return MaskInfo("none", "mask allows everything")
    if has_causal and len(rest) == 1 and _is_window(next(iter(rest))):
        return MaskInfo("sliding-window", "causal sliding-window mask")
    return MaskInfo("arbitrary", "mask is not the plain lower-triangular pattern")


def _keys_only(axes) -> bool:
    """Axes of an SDPA mask ([B, H, Nq, Nk], right-aligned) that make it key padding per batch
    row: the key axis and the batch axis, no head or query axis."""
    return axes is not None and axes <= {-1, -4}


def _is_window(form: Lin) -> bool:
    d = form.dict()
    return (
        d.get(("ax", -2)) == 1
        and d.get(("ax", -1)) == -1
        and set(d) <= {("ax", -1), ("ax", -2), ONE}
    )


def _canonical(form: Lin):
    """Normalize ``form <= 0``: divide by the gcd; None if always true, "false" if never."""
    d = form.dict()
    const = d.pop(ONE, 0)
    if not d:
        if isinstance(const, int) and const <= 0:
            return None
        return "false" if isinstance(const, int) else form
    positions = all(isinstance(k, tuple) and k[0] == "ax" for k in d)
    if positions and isinstance(const, int) and const <= 0 and all(c <= 0 for c in d.values()):
        return None  # positions are >= 0: HF 5.17's bidirectional mask is ``q_idx >= 0``
    g = reduce(math.gcd, [abs(c) for c in d.values()])
    if g > 1 and isinstance(const, int):
        # integer positions: sum(c*x) <= -const  <=>  sum(c/g*x) <= floor(-const/g)
        new = {k: c // g for k, c in d.items()}
        new[ONE] = -((-const) // g)
        return Lin.of(new)
    return Lin.of({**d, ONE: const})


# ----------------------------------------------------------------------------- applied masks
@dataclass(frozen=True)
class AppliedMask:
    """How a hand-written attention applies a mask to its scores.

    ``how``: ``add`` (``scores + node``), ``fill`` (``masked_fill(node, value)``: masked where
    ``node`` holds), ``keep`` (``where(node, scores, value)``: kept where ``node`` holds).
    ``post_scale``: the product of the scalar factors applied to the scores after this mask
    (None when one is symbolic), which scales the masked value too.
    """

    how: str
    node: object
    value: float | None = None
    post_scale: float | None = 1.0


def classify_applied(masks: list[AppliedMask], n_q, n_k) -> MaskInfo:
    """Classify the conjunction of the masks a hand-written attention applies."""
    infos = [_classify_one(m, n_q, n_k) for m in masks]
    kinds = {i.kind for i in infos} - {"none"}
    if not kinds:
        return MaskInfo("none", "no mask")
    if kinds == {"causal"}:
        return next(i for i in infos if i.kind == "causal")
    if kinds <= {"causal", "padding", "causal+padding"} and kinds & {"causal", "causal+padding"}:
        return MaskInfo("causal+padding", "causal mask and a mask that depends on input data")
    for kind in ("padding", "sliding-window", "arbitrary"):
        for info in infos:
            if info.kind == kind:
                return info
    return infos[0]


def _classify_one(m: AppliedMask, n_q, n_k) -> MaskInfo:
    meta = meta_of(m.node)
    if not isinstance(m.node, fx.Node) or meta is None:
        return MaskInfo("arbitrary", "mask is not a tensor in the graph")
    if (edit := edited_in_place(m.node)) is not None:
        return MaskInfo("arbitrary", f"mask edited in place ({edit.name})")
    interp = Interpreter()
    if m.how == "add":
        if meta.dtype == torch.bool:
            return MaskInfo("arbitrary", "boolean tensor added to the scores")
        value = interp.eval(m.node)
        if m.post_scale is None:
            return MaskInfo("arbitrary", "additive mask scaled by a symbolic factor")
        if m.post_scale != 1:
            value = arith("mul", value, Sel(TRUE, m.post_scale, m.post_scale))
        allowed = as_allowed(value, boolean=False)
    else:
        fill = m.value
        if fill is None or m.post_scale is None or m.post_scale <= 0:
            return MaskInfo("arbitrary", "mask fill value not a known large negative constant")
        if fill * m.post_scale > MASKED_AT_OR_BELOW:
            return MaskInfo("arbitrary", f"mask fill value {fill} does not mask out")
        cond = to_pred(interp.eval(m.node))
        allowed = negate(cond) if m.how == "fill" else cond
    return judge_allowed(allowed, None, meta, n_q, n_k)
