"""Hand-written attention in a Dynamo FX graph: ``softmax(q @ k^T * scale + mask) @ v``.

Matching starts at the second matmul and walks up, so one matcher covers the shapes models write
(and those PyTorch Inductor's ``fuse_attention`` recognizes), in any combination:

- scores: ``matmul`` / ``@`` / ``bmm`` / ``einsum("...qd,...kd->...qk")``, with ``k`` given
  transposed (``transpose(-2, -1)``, ``permute(0, 1, 3, 2)``, ``.mT``) or already ``[.., D, Nk]``;
- scale: ``mul`` / ``div`` by a Python number, a symbolic float, or ``torch.full([], c)`` /
  ``torch.tensor(c)``; on the scores, on ``q`` (pre-scaled query, DistilBERT) or on ``k``; none
  at all (T5: scale 1);
- masks: ``scores + mask`` (Llama eager, BERT), ``masked_fill(cond, -inf)`` (nanoGPT,
  DistilBERT), ``where(cond, scores, min)`` (GPT-2), several of them;
- softmax over the last dim, with casts to fp32 and back (``.float()``, ``.to(...)``,
  ``type_as``), ``softmax(dtype=torch.float32)``;
- dropout (``F.dropout`` / ``torch.dropout``): a no-op when ``p == 0`` or not training;
- ``@ v`` (``v`` possibly cast to the weights' dtype).

The intermediates (scores, weights) must have no other user: a model that returns its attention
weights keeps its attention. A ``weights @ v`` whose weights come from a softmax but that does
not match gives a :class:`FailedMatch` saying why (as Inductor's pattern matcher does), so the
report can show it. Must not import the kernels.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from hyperpass.compiler.fx_utils import call_in, concrete_scalar, meta_of, same_size
from hyperpass.compiler.masks import AppliedMask, MaskInfo, classify_applied
from hyperpass.compiler.sites import Site

_MATMUL_FNS = {torch.matmul, operator.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_SOFTMAX_FNS = {torch.softmax, F.softmax, torch.Tensor.softmax}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type_as", "type", "contiguous"}
_MUL = ({operator.mul, torch.mul}, {"mul", "__mul__"})
_DIV = ({operator.truediv, torch.div}, {"div", "__truediv__"})
_ADD = ({operator.add, torch.add}, {"add", "__add__"})
_DROPOUT_FNS = {F.dropout, torch.dropout, torch.nn.functional.dropout}


def _tensor(x) -> bool:
    return meta_of(x) is not None


# ----------------------------------------------------------------------------- scalars
def scalar_value(x):
    """A scale factor: a Python number, a node of a symbolic float/int, or the constant of
    ``torch.full([], c)`` / ``torch.tensor(c)``; None for anything else."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int | float):
        return x
    if not isinstance(x, fx.Node):
        return None
    ev = x.meta.get("example_value")
    if isinstance(ev, torch.SymFloat | torch.SymInt):
        return concrete_scalar(x)
    if x.op == "call_function" and x.target is torch.full and len(x.args) >= 2:
        shape, value = x.args[0], x.args[1]
        if tuple(shape) == () and isinstance(value, int | float) and not isinstance(value, bool):
            return value
    if x.op == "call_function" and x.target is torch.tensor and x.args:
        value = x.args[0]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    if x.op == "call_method" and x.target in _CAST_METHODS and x.args:
        return scalar_value(x.args[0])
    return None


def _scale_op(node):
    """``(tensor, factor, power)`` for ``tensor * factor`` (+1) or ``tensor / factor`` (-1)."""
    if call_in(node, *_MUL) and len(node.args) == 2:
        a, b = node.args
        for t, s in ((a, b), (b, a)):
            f = scalar_value(s)
            if f is not None and _tensor(t):
                return t, f, 1
    if call_in(node, *_DIV) and len(node.args) == 2 and not node.kwargs.get("rounding_mode"):
        a, b = node.args
        f = scalar_value(b)
        if _tensor(a) and f is not None:
            return a, f, -1
    return None


def _known_product(factors) -> float | None:
    value = 1.0
    for f, p in factors:
        if isinstance(f, fx.Node):
            return None
        value = value * f if p > 0 else value / f
    return value


# ----------------------------------------------------------------------------- the walk
class FailedMatch:
    """A ``weights @ v`` whose weights come from a softmax, which is not recognized: why."""

    def __init__(self, node: fx.Node, reason: str):
        self.node = node
        self.reason = reason

    def __repr__(self) -> str:
        return f"FailedMatch({self.node}, {self.reason!r})"


class _Match:
    def __init__(self):
        self.softmax = False  # the weights come from a softmax: a candidate attention
        self.failure = ""  # why it is not recognized
        self.features: list[str] = []
        self.factors: list = []  # (factor, power)
        self.masks: list[AppliedMask] = []
        self.internal: list[fx.Node] = []  # must have exactly one user
        self.dropout_p = 0.0
        self.q = self.k = self.v = None
        self.k_transposed = False
        self.qk = ""


def _unary_input(node):
    """The input of a value-preserving cast / contiguous, else None."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CAST_METHODS:
        return node.args[0]
    return None


def _dropout(node):
    """``(input, p)`` of a dropout call; p is 0.0 when it is inactive."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    if node.target not in _DROPOUT_FNS:
        return None
    args = list(node.args) + [None] * 4
    p = node.kwargs.get("p", args[1] if args[1] is not None else 0.5)
    training = node.kwargs.get("training", node.kwargs.get("train", args[2]))
    if training is None:
        training = node.target is not torch.dropout  # F.dropout defaults to training=True
    return node.args[0], (p if training else 0.0)


def _softmax_dim(node):
    """The ``dim`` of a softmax call, or None when ``node`` is no softmax."""
    if not call_in(node, _SOFTMAX_FNS, {"softmax"}):
        return None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def _weights_side(m: _Match, p):
    """Walk up from the second matmul's left input to the softmax."""
    while True:
        m.internal.append(p)
        dim = _softmax_dim(p)
        if dim is not None:
            meta = meta_of(p)
            m.softmax = True
            if meta is None or dim not in (-1, meta.dim() - 1):
                m.failure = f"softmax over dim {dim}, not the last (key) dim"
                return None
            if p.kwargs.get("dtype") is not None:
                m.features.append("fp32-softmax")
            return p.args[0]
        up = _unary_input(p)
        if up is not None:
            if "cast" not in m.features:
                m.features.append("cast")
            p = up
            continue
        drop = _dropout(p)
        if drop is not None:
            p, rate = drop
            if not (isinstance(rate, int | float) and rate == 0):
                m.dropout_p = rate
            m.features.append("dropout")
            continue
        return None


def _scores_side(m: _Match, s, post_scale) -> bool:
    """Walk up from the softmax input through casts, scales and masks to ``q @ k^T``."""
    while True:
        m.internal.append(s)
        up = _unary_input(s)
        if up is not None:
            s = up
            continue
        sc = _scale_op(s)
        if sc is not None:
            s, factor, power = sc
            m.factors.append((factor, power))
            if post_scale is not None:
                post_scale = (
                    None
                    if isinstance(factor, fx.Node)
                    else (post_scale * factor if power > 0 else post_scale / factor)
                )
            continue
        if call_in(s, *_ADD) and len(s.args) == 2 and all(_tensor(a) for a in s.args):
            a, b = s.args
            for chain, mask in ((a, b), (b, a)):
                trial = _copy(m)
                trial.masks.append(AppliedMask("add", mask, post_scale=post_scale))
                if _scores_side(trial, chain, post_scale):
                    _adopt(m, trial)
                    return True
            m.failure = "scores + tensor, but neither side leads to q @ k^T"
            return False
        if call_in(s, {torch.masked_fill}, {"masked_fill"}):
            fill = s.args[2] if len(s.args) > 2 else s.kwargs.get("value")
            m.masks.append(AppliedMask("fill", s.args[1], _fill(fill), post_scale))
            s = s.args[0]
            continue
        if call_in(s, {torch.where}, {"where"}) and len(s.args) == 3:
            cond, a, b = s.args
            if s.op == "call_method":
                cond, a = a, cond  # x.where(cond, other)
            if _tensor(a) and _fill(b) is not None:
                m.masks.append(AppliedMask("keep", cond, _fill(b), post_scale))
                s = a
            elif _tensor(b) and _fill(a) is not None:
                m.masks.append(AppliedMask("fill", cond, _fill(a), post_scale))
                s = b
            else:
                m.failure = "where() whose fill value is not a constant"
                return False
            continue
        if _qk(m, s):
            return True
        m.failure = m.failure or f"softmax input not recognized as scaled q @ k^T (reached {s})"
        return False


def _fill(x) -> float | None:
    f = scalar_value(x)
    return float(f) if isinstance(f, int | float) else None


def _copy(m: _Match) -> _Match:
    c = _Match()
    c.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in m.__dict__.items()})
    return c


def _adopt(m: _Match, other: _Match) -> None:
    m.__dict__.update(other.__dict__)


def _strip_scale(m: _Match, x, role: str):
    while True:
        sc = _scale_op(x)
        if sc is None:
            return x
        x, factor, power = sc
        m.factors.append((factor, power))
        if f"pre-scaled-{role}" not in m.features:
            m.features.append(f"pre-scaled-{role}")


def _untranspose(kt):
    """``k`` when ``kt`` is ``k`` with its last two dims swapped, else None."""
    meta = meta_of(kt)
    if meta is None:
        return None
    n = meta.dim()
    if call_in(kt, {torch.transpose}, {"transpose"}) and len(kt.args) == 3:
        dims = {d % n for d in kt.args[1:] if isinstance(d, int)}
        return kt.args[0] if dims == {n - 2, n - 1} else None
    if call_in(kt, {torch.permute}, {"permute"}):
        perm = (
            kt.args[1]
            if len(kt.args) == 2 and isinstance(kt.args[1], list | tuple)
            else kt.args[1:]
        )
        expect = [*range(n - 2), n - 1, n - 2]
        return kt.args[0] if [d % n for d in perm] == expect else None
    if kt.op == "call_function" and kt.target is getattr and kt.args[1] == "mT":
        return kt.args[0]
    return None


def _qk(m: _Match, s) -> bool:
    if call_in(s, _MATMUL_FNS, _MATMUL_METHODS) and len(s.args) == 2:
        q, kt = s.args
        m.qk = "bmm" if s.target in (torch.bmm, "bmm") else "matmul"
        q = _strip_scale(m, q, "q")
        kt = _strip_scale(m, kt, "k")
        k = _untranspose(kt)
        if k is None:
            m.k, m.k_transposed = kt, True
        else:
            m.k = _strip_scale(m, k, "k")
        m.q = q
        return _tensor(m.q) and _tensor(m.k)
    if call_in(s, {torch.einsum}, set()):
        eq, ops = _einsum_args(s)
        m.failure = f"einsum {eq!r} is not q @ k^T"
        if eq is None or len(ops) != 2:
            return False
        lhs, out = eq.split("->")
        a, b = lhs.split(",")
        # "...qd,...kd->...qk": same batch letters, contract the last letter
        if not (len(a) == len(b) == len(out) and a[:-2] == b[:-2] == out[:-2]):
            return False
        if not (a[-1] == b[-1] and out[-2:] == a[-2] + b[-2] and a[-2] != b[-2]):
            return False
        m.qk, m.failure = "einsum", ""
        m.q = _strip_scale(m, ops[0], "q")
        m.k = _strip_scale(m, ops[1], "k")
        return _tensor(m.q) and _tensor(m.k)
    return False


def _einsum_args(node):
    if not node.args or not isinstance(node.args[0], str):
        return None, []
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], list | tuple):
        ops = list(ops[0])
    return node.args[0].replace(" ", ""), list(ops)


def _pv(node):
    """``(weights, v, how)`` when ``node`` is ``weights @ v``."""
    if call_in(node, _MATMUL_FNS, _MATMUL_METHODS) and len(node.args) == 2:
        return node.args[0], node.args[1], "bmm" if node.target in (torch.bmm, "bmm") else "matmul"
    if call_in(node, {torch.einsum}, set()):
        eq, ops = _einsum_args(node)
        if eq is None or len(ops) != 2 or "->" not in eq:
            return None
        lhs, out = eq.split("->")
        a, b = lhs.split(",")
        # "...qk,...kd->...qd"
        if len(a) == len(b) == len(out) and a[:-2] == b[:-2] == out[:-2]:
            if a[-1] == b[-2] and out[-2:] == a[-2] + b[-1]:
                return ops[0], ops[1], "einsum"
    return None


# ----------------------------------------------------------------------------- entry point
def match_handwritten(node: fx.Node) -> Site | FailedMatch | None:
    """A :class:`~hyperpass.compiler.sites.Site` when ``node`` is the output of a hand-written
    attention; a :class:`FailedMatch` when it is ``softmax(...) @ v`` but not recognized; else
    None."""
    pv = _pv(node)
    if pv is None:
        return None
    weights, v, _ = pv
    m = _Match()
    scores = _weights_side(m, weights)
    if scores is None or not _scores_side(m, scores, 1.0):
        return FailedMatch(node, m.failure) if m.softmax else None
    m.v = v
    mq, mk, mv = meta_of(m.q), meta_of(m.k), meta_of(m.v)
    if mq is None or mk is None or mv is None:
        return FailedMatch(node, "no shape metadata on q/k/v")
    if not (mq.dim() == mk.dim() == mv.dim() >= 3):
        return None  # e.g. softmax(x @ W) @ V with a weight matrix: not attention
    return _site(node, m, mq, mk, mv)


def _site(node, m: _Match, mq, mk, mv):
    n_q = mq.shape[-2]
    n_k = mk.shape[-1] if m.k_transposed else mk.shape[-2]
    mask = classify_applied(m.masks, n_q, n_k) if m.masks else MaskInfo("none", "no mask")
    features = [m.qk]
    if not m.factors:
        features.append("unscaled")
    elif not any(f.startswith("pre-scaled") for f in m.features):
        features.append("scaled")
    features += [f for f in m.features if f != "cast"]
    features += sorted({f"mask:{a.how}" for a in m.masks})
    if "cast" in m.features:
        features.append("casts")
    site = Site(
        form="handwritten(" + ", ".join(features) + ")",
        out=node,
        q=m.q,
        k=m.k,
        v=m.v,
        mask=mask,
        dropout_p=m.dropout_p,
        scale=_known_product(m.factors),
        k_transposed=m.k_transposed,
        scale_factors=tuple(m.factors),
        unsqueeze_batch=mq.dim() == 3,
    )
    # uses inside the matched attention (``type_as(scores)``, ``expand_as(scores)``) are fine
    inside = set(m.internal) | {node}
    if any(not _only_inside_or_metadata(n, inside) for n in m.internal):
        site.exact_reason = ("weights_used", "attention scores or weights have other users")
    elif mq.dim() not in (3, 4):
        site.exact_reason = ("not_4d", f"{mq.dim()}-D attention")
    elif not (match := _batch_dims_match(mq, mk, mv, m.k_transposed)):
        site.exact_reason = ("broadcast", "q, k, v batch/head dims differ (broadcast matmul)")
    elif meta_of(node).dtype != mq.dtype:
        site.exact_reason = ("dtype", f"output dtype {meta_of(node).dtype} != q dtype {mq.dtype}")
    else:
        site.enable_gqa = match == "mqa"  # one KV head shared by all query heads: native GQA
    return site


_METADATA_METHODS = {"expand_as", "type_as", "view_as", "reshape_as"}


def _only_inside_or_metadata(n: fx.Node, inside: set) -> bool:
    """Every user of ``n`` is part of the match or reads only its shape / dtype."""
    for user in n.users:
        if user in inside:
            continue
        if user.op == "call_method" and user.target in _METADATA_METHODS and user.args[0] is not n:
            continue
        if user.op == "call_method" and user.target in ("size", "dim") and user.args[0] is n:
            continue
        return False
    return True


def _batch_dims_match(mq, mk, mv, k_transposed) -> bool | str:
    """True when q, k, v agree on their leading dims; ``"mqa"`` when they agree except for one
    shared KV head broadcast over the query heads (``k``/``v`` ``[B, 1, N, D]``); else False."""
    if not (mq.dim() == mk.dim() == mv.dim()):
        return False
    d_k = mk.shape[-2] if k_transposed else mk.shape[-1]
    n_k = mk.shape[-1] if k_transposed else mk.shape[-2]
    if not (same_size(mq.shape[-1], d_k) and same_size(n_k, mv.shape[-2])):
        return False
    lead = list(zip(mq.shape[:-2], mk.shape[:-2], mv.shape[:-2], strict=True))
    if all(same_size(a, b) and same_size(a, c) for a, b, c in lead):
        return True
    mqa = mq.dim() == 4 and mk.shape[1] == 1 and mv.shape[1] == 1
    mqa = mqa and isinstance(mq.shape[1], int) and mq.shape[1] > 1
    others = lead[:1]
    if mqa and all(same_size(a, b) and same_size(a, c) for a, b, c in others):
        return "mqa"
    return False
