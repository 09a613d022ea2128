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

Imports torch only; must not import the op or the pass.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import reduce

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

# A float mask value at or below this counts as "masked out": exp(score + it) underflows to zero
# next to any unmasked score of sane size. -inf and finfo(dtype).min (what HF uses) qualify;
# BERT's old -10000.0 does not, so such masks stay exact.
MASKED_AT_OR_BELOW = torch.finfo(torch.float16).min

ONE = "1"  # the constant term's key in a linear form


# ----------------------------------------------------------------------------- abstract values
@dataclass(frozen=True)
class Lin:
    """An integer tensor whose element at position ``p`` is ``sum(coef * term)``.

    Terms: ``("ax", a)`` is the element's index along axis ``a`` (negative, counted from the
    right, so broadcasting needs no remapping), ``("sym", node)`` a symbolic int computed by a graph
    node, ``ONE`` the constant.
    """

    terms: frozenset  # of (key, coef), coef != 0

    @staticmethod
    def of(mapping: dict) -> Lin:
        return Lin(frozenset((k, c) for k, c in mapping.items() if c != 0))

    def dict(self) -> dict:
        return dict(self.terms)

    def axes(self) -> set:
        return {k[1] for k, _ in self.terms if isinstance(k, tuple) and k[0] == "ax"}


@dataclass(frozen=True)
class Pred:
    """A boolean tensor: the conjunction of ``atoms``. An atom is a :class:`Lin` meaning
    ``form <= 0``, or ``("opaque", node)`` for a boolean the classifier could not follow."""

    atoms: frozenset
    false: bool = False  # the empty set (some atom can never hold)


TRUE = Pred(frozenset())


@dataclass(frozen=True)
class Sel:
    """A numeric tensor: ``a`` where ``pred`` holds, else ``b`` (``a``, ``b`` Python scalars)."""

    pred: Pred
    a: float
    b: float


@dataclass(frozen=True)
class Opaque:
    """A value the classifier cannot follow. ``data`` says whether it reads a tensor input
    (a padding mask, say) rather than only sizes and constants."""

    why: str
    data: bool


# ----------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class MaskInfo:
    """What a mask is. ``kind``: ``none`` (all allowed), ``causal`` (provably lower-triangular),
    ``causal+padding``, ``padding`` (depends on input data), ``sliding-window``, ``arbitrary``."""

    kind: str
    reason: str


def classify_mask(mask: fx.Node | None, n_q, n_k, *, boolean: bool | None = None) -> MaskInfo:
    """Classify an SDPA-style mask (boolean: True = attend; float: added to the scores).

    Args:
        mask: the node producing the mask, or None.
        n_q, n_k: the query and key lengths (ints or SymInts) of the attention it applies to.
        boolean: whether the mask is boolean; read from the node's metadata when None.
    """
    if mask is None:
        return MaskInfo("none", "no mask")
    value = _Interpreter().eval(mask)
    if boolean is None:
        meta = _meta(mask)
        boolean = meta is not None and meta.dtype == torch.bool
    allowed = as_allowed(value, boolean)
    return judge_allowed(allowed, value, _meta(mask), n_q, n_k)


def as_allowed(value, boolean: bool):
    """The set of allowed (query, key) positions a mask value stands for, or an Opaque."""
    if isinstance(value, Opaque):
        return value
    if boolean:
        return _to_pred(value)
    sel = _to_sel(value)
    if isinstance(sel, Opaque):
        return sel
    if sel.a == 0 and (sel.b <= MASKED_AT_OR_BELOW or sel.pred == TRUE):
        return sel.pred
    if sel.b == 0 and sel.a <= MASKED_AT_OR_BELOW:
        return _negate(sel.pred)
    if sel.a == sel.b == 0:
        return TRUE
    return Opaque(f"additive mask with values {sel.a} / {sel.b}", data=False)


def judge_allowed(allowed, value, meta, n_q, n_k) -> MaskInfo:
    """Turn an allowed-set into a :class:`MaskInfo` for an ``[..., Nq, Nk]`` attention."""
    if isinstance(allowed, Opaque):
        if allowed.data:
            return MaskInfo("padding", f"mask depends on input data ({allowed.why})")
        return MaskInfo("arbitrary", f"mask the classifier cannot follow ({allowed.why})")
    if allowed.false:
        return MaskInfo("arbitrary", "mask that masks everything")
    opaque = [a for a in allowed.atoms if isinstance(a, tuple)]
    forms = {_canonical(a) for a in allowed.atoms if isinstance(a, Lin)}
    forms.discard(None)  # always true
    if any(f == "false" for f in forms):
        return MaskInfo("arbitrary", "mask that masks everything")
    shape_ok = meta is not None and meta.dim() >= 2 and _same(meta.shape[-2], n_q)
    shape_ok = shape_ok and _same(meta.shape[-1], n_k)
    causal = Lin.of({("ax", -1): 1, ("ax", -2): -1})
    has_causal = causal in forms and shape_ok
    rest = forms - {causal} if has_causal else forms
    if opaque:
        kind = "causal+padding" if has_causal and not rest else "padding"
        return MaskInfo(kind, f"{kind} mask: part of it depends on input data")
    if not rest:
        if has_causal:
            return MaskInfo("causal", "lower-triangular mask (j <= i)")
        if not forms:
            return MaskInfo("none", "mask allows everything")
    if has_causal and len(rest) == 1 and _is_window(next(iter(rest))):
        return MaskInfo("sliding-window", "causal sliding-window mask")
    return MaskInfo("arbitrary", "mask is not the plain lower-triangular pattern")


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
    g = reduce(math.gcd, [abs(c) for c in d.values()])
    if g > 1 and isinstance(const, int):
        # integer positions: sum(c*x) <= -const  <=>  sum(c/g*x) <= floor(-const/g)
        new = {k: c // g for k, c in d.items()}
        new[ONE] = -((-const) // g)
        return Lin.of(new)
    return Lin.of({**d, ONE: const})


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - an undecidable comparison is "not known equal"
        return False


def _meta(node):
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


# ----------------------------------------------------------------------------- value algebra
def _lin_add(x: Lin, y: Lin, sign: int = 1) -> Lin:
    d = x.dict()
    for k, c in y.terms:
        d[k] = d.get(k, 0) + sign * c
    return Lin.of(d)


def _lin_scale(x: Lin, s: int) -> Lin:
    return Lin.of({k: c * s for k, c in x.terms})


def _scalar_lin(s) -> Lin | None:
    if isinstance(s, bool):
        return None
    if isinstance(s, int):
        return Lin.of({ONE: s})
    if isinstance(s, fx.Node) and isinstance(s.meta.get("example_value"), torch.SymInt):
        return Lin.of({("sym", s): 1})
    return None


def _to_pred(v):
    if isinstance(v, Pred | Opaque):
        return v
    if isinstance(v, Sel):
        if v.a and not v.b:
            return v.pred
        if v.b and not v.a:
            return _negate(v.pred)
        return TRUE if v.a and v.b else Pred(frozenset(), false=True)
    if isinstance(v, Lin):
        return Opaque("integer tensor used as a boolean", data=False)
    return Opaque(f"{type(v).__name__} used as a boolean", data=False)


def _to_sel(v):
    if isinstance(v, Sel | Opaque):
        return v
    if isinstance(v, Pred):
        return Sel(v, 1, 0)
    return Opaque("index tensor used as a mask value", data=False)


def _negate(p):
    if isinstance(p, Opaque):
        return p
    if p.false:
        return TRUE
    if not p.atoms:
        return Pred(frozenset(), false=True)
    if len(p.atoms) == 1:
        (atom,) = p.atoms
        if isinstance(atom, Lin):  # not(f <= 0)  <=>  -f + 1 <= 0 over integers
            return Pred(frozenset({_lin_add(_lin_scale(atom, -1), Lin.of({ONE: 1}))}))
    return Opaque("negation of a compound mask", data=_has_data(p))


def _has_data(p) -> bool:
    return isinstance(p, Pred) and any(isinstance(a, tuple) for a in p.atoms)


def _and(x, y):
    x, y = _to_pred(x), _to_pred(y)
    if isinstance(x, Opaque) or isinstance(y, Opaque):
        # keep the known part so that "causal & padding" is reported as such
        known = y if isinstance(x, Opaque) else x
        opaque = x if isinstance(x, Opaque) else y
        if isinstance(known, Opaque) or not opaque.data:
            return Opaque(opaque.why, opaque.data or getattr(known, "data", False))
        return Pred(known.atoms | {("opaque", opaque.why)}, known.false)
    return Pred(x.atoms | y.atoms, x.false or y.false)


def _or(x, y):
    x, y = _to_pred(x), _to_pred(y)
    for a, b in ((x, y), (y, x)):
        if isinstance(a, Pred) and a.false:
            return b
        if isinstance(a, Pred) and not a.atoms and not a.false:
            return TRUE
    return Opaque("union of masks", data=_has_data(x) or _has_data(y))


def _compare(op: str, x, y):
    if isinstance(x, Opaque) or isinstance(y, Opaque):
        o = x if isinstance(x, Opaque) else y
        return o
    if isinstance(x, Lin) and isinstance(y, Lin):
        diff = _lin_add(x, y, -1)  # x - y
        d = diff.dict()
        if set(d) <= {ONE} and not isinstance(d.get(ONE, 0), fx.Node):  # a constant comparison
            hit = _cmp_scalar(op, d.get(ONE, 0), 0)
            return TRUE if hit else Pred(frozenset(), false=True)
        one = Lin.of({ONE: 1})
        forms = {
            "le": [diff],
            "lt": [_lin_add(diff, one)],
            "ge": [_lin_scale(diff, -1)],
            "gt": [_lin_add(_lin_scale(diff, -1), one)],
            "eq": [diff, _lin_scale(diff, -1)],
        }.get(op)
        if forms is None:
            return Opaque(f"index comparison {op}", data=False)
        return Pred(frozenset(forms))
    # mask == 0 / mask != 0 / mask == 1 on 0/1 masks
    if isinstance(x, Pred | Sel) and isinstance(y, Lin) and y.terms <= {(ONE, y.dict().get(ONE))}:
        c = y.dict().get(ONE, 0)
        sel = _to_sel(x)
        hit_a, hit_b = _cmp_scalar(op, sel.a, c), _cmp_scalar(op, sel.b, c)
        if hit_a is None:
            return Opaque(f"mask comparison {op}", data=_has_data(sel.pred))
        if hit_a and not hit_b:
            return sel.pred
        if hit_b and not hit_a:
            return _negate(sel.pred)
        return TRUE if hit_a else Pred(frozenset(), false=True)
    return Opaque(f"comparison {op} of mask values", data=False)


def _cmp_scalar(op, a, c):
    fn = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt}
    fn.update({"eq": operator.eq, "ne": operator.ne})
    return fn[op](a, c) if op in fn else None


def _arith(op: str, x, y):
    """x op y where one side may be a Python scalar (as a constant Lin)."""
    if isinstance(x, Opaque) or isinstance(y, Opaque):
        return x if isinstance(x, Opaque) else y
    if isinstance(x, Lin) and isinstance(y, Lin):
        if op == "add":
            return _lin_add(x, y)
        if op == "sub":
            return _lin_add(x, y, -1)
        if op == "mul":
            for a, b in ((x, y), (y, x)):
                const = b.dict()
                if set(const) <= {ONE} and isinstance(const.get(ONE, 0), int):
                    return _lin_scale(a, const.get(ONE, 0))
        return Opaque(f"index arithmetic {op}", data=False)
    # numeric masks: apply the scalar op to both branches
    sx = _scalar_of(x)
    sy = _scalar_of(y)
    fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}
    if op not in fn:
        return Opaque(f"mask arithmetic {op}", data=False)
    if sx is not None and not isinstance(y, Lin):
        s = _to_sel(y)
        if isinstance(s, Opaque):
            return s
        return Sel(s.pred, _safe(fn[op], sx, s.a), _safe(fn[op], sx, s.b))
    if sy is not None and not isinstance(x, Lin):
        s = _to_sel(x)
        if isinstance(s, Opaque):
            return s
        return Sel(s.pred, _safe(fn[op], s.a, sy), _safe(fn[op], s.b, sy))
    if op == "add" and not isinstance(x, Lin) and not isinstance(y, Lin):
        sx_, sy_ = _to_sel(x), _to_sel(y)
        if isinstance(sx_, Opaque) or isinstance(sy_, Opaque):
            return sx_ if isinstance(sx_, Opaque) else sy_
        # sum of two additive masks (0 / masked each): masked where either masks
        ax, ay = as_allowed(sx_, False), as_allowed(sy_, False)
        if isinstance(ax, Pred) and isinstance(ay, Pred):
            return Sel(_and(ax, ay), 0.0, -math.inf)
    return Opaque(f"mask arithmetic {op}", data=False)


def _safe(fn, a, b):
    try:
        return fn(a, b)
    except (ZeroDivisionError, OverflowError):
        return math.nan


def _scalar_of(v):
    if isinstance(v, Lin):
        d = v.dict()
        if set(d) <= {ONE} and not isinstance(d.get(ONE, 0), fx.Node):
            return d.get(ONE, 0)
    if isinstance(v, Sel) and v.a == v.b:
        return v.a
    return None


# ----------------------------------------------------------------------------- the interpreter
_CMP = {
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt",
    operator.eq: "eq", operator.ne: "ne", torch.le: "le", torch.lt: "lt", torch.ge: "ge",
    torch.gt: "gt", torch.eq: "eq", torch.ne: "ne",
}  # fmt: skip
_CMP_METHODS = {"le", "lt", "ge", "gt", "eq", "ne", "__le__", "__lt__", "__ge__", "__gt__"}
_ARITH = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
}  # fmt: skip
_AND = {operator.and_, torch.logical_and, torch.bitwise_and}
_OR = {operator.or_, torch.logical_or, torch.bitwise_or}
_NOT = {operator.invert, torch.logical_not, torch.bitwise_not}
_IDENTITY_METHODS = {"to", "float", "half", "bfloat16", "double", "bool", "long", "int", "type_as"}
_IDENTITY_METHODS |= {"contiguous", "clone", "detach", "requires_grad_"}
_CONST_FACTORIES = {torch.ones: 1, torch.zeros: 0, torch.ones_like: 1, torch.zeros_like: 0}
_CONST_METHODS = {"new_ones": 1, "new_zeros": 0}


class _Interpreter:
    def __init__(self):
        self.memo: dict = {}

    def eval(self, node):
        if not isinstance(node, fx.Node):
            return self._literal(node)
        if node not in self.memo:
            try:
                self.memo[node] = self._eval(node)
            except Exception as err:  # noqa: BLE001 - never raise on a model: stay opaque
                self.memo[node] = Opaque(f"{type(err).__name__} while following {node}", False)
            self.memo[node] = self._drop_unit_axes(node, self.memo[node])
        return self.memo[node]

    def _literal(self, x):
        if isinstance(x, bool):
            return TRUE if x else Pred(frozenset(), false=True)
        if isinstance(x, int):
            return Lin.of({ONE: x})
        if isinstance(x, float):
            return Sel(TRUE, x, x)
        return Opaque(f"literal {type(x).__name__}", data=False)

    def _opaque(self, node, why):
        return Opaque(why, data=_reads_tensor_input(node))

    # the element value at a size-1 axis does not depend on its index: drop such terms
    def _drop_unit_axes(self, node, v):
        meta = _meta(node)
        if meta is None:
            return v
        unit = {a - meta.dim() for a in range(meta.dim()) if _is_one(meta.shape[a])}
        if not unit:
            return v
        return _map_axes(v, lambda a: None if a in unit else a)

    def _eval(self, node: fx.Node):
        t, args, kwargs = node.target, node.args, node.kwargs
        if node.op == "placeholder" or node.op == "get_attr":
            if isinstance(node.meta.get("example_value"), torch.SymInt):
                return Lin.of({("sym", node): 1})
            return Opaque(f"graph input {node.name}", data=True)
        if node.op == "call_method":
            return self._method(node, t, args, kwargs)
        if node.op != "call_function":
            return self._opaque(node, f"{node.op} {t}")
        if t is torch.arange:
            return self._arange(node, args, kwargs)
        if t in _CMP:
            return _compare(_CMP[t], self.eval(args[0]), self.eval(args[1]))
        if t in _ARITH:
            return _arith(_ARITH[t], self.eval(args[0]), self.eval(args[1]))
        if t is operator.neg:
            return _arith("mul", self.eval(args[0]), Lin.of({ONE: -1}))
        if t in _AND:
            return _and(self.eval(args[0]), self.eval(args[1]))
        if t in _OR:
            return _or(self.eval(args[0]), self.eval(args[1]))
        if t in _NOT:
            return _negate(_to_pred(self.eval(args[0])))
        if t is operator.getitem:
            return self._getitem(node, args[0], args[1])
        if t in _CONST_FACTORIES:
            return self._const(node, _CONST_FACTORIES[t], kwargs.get("dtype"))
        if t in (torch.full, torch.full_like):
            return self._const(node, args[1], kwargs.get("dtype"))
        if t is torch.tensor and isinstance(args[0], int | float | bool):
            return self._const(node, args[0], kwargs.get("dtype"))
        if t is torch.diff:
            return self._diff(node, args, kwargs)
        if t is torch.cumsum:
            return self._cumsum(node, args[0], _arg(args, kwargs, 1, "dim", None))
        if t in (torch.tril, torch.triu):
            return self._tri(node, t.__name__, args[0], _arg(args, kwargs, 1, "diagonal", 0))
        if t is torch.where and len(args) == 3:
            return self._where(args[0], args[1], args[2])
        if t is torch.masked_fill:
            return self._masked_fill(args[0], args[1], args[2])
        if t is torch.unsqueeze:
            return self._unsqueeze(node, args[0], args[1])
        if t in (torch.transpose, torch.swapaxes):
            return self._transpose(node, args[0], args[1], args[2])
        return self._opaque(node, f"op {getattr(t, '__name__', t)}")

    def _method(self, node, name, args, kwargs):
        self_ = args[0]
        if name in _IDENTITY_METHODS:
            if name == "to" and any(isinstance(a, torch.dtype) and a.is_complex for a in args):
                return self._opaque(node, "complex cast")
            return self.eval(self_)
        if name in _CMP_METHODS:
            return _compare(name.strip("_"), self.eval(self_), self.eval(args[1]))
        if name in ("add", "sub", "mul", "div", "__add__", "__sub__", "__mul__", "__truediv__"):
            op = {"truediv": "div"}.get(name.strip("_"), name.strip("_"))
            return _arith(op, self.eval(self_), self.eval(args[1]))
        if name in ("__rsub__",):
            return _arith("sub", self.eval(args[1]), self.eval(self_))
        if name in ("__and__", "logical_and", "bitwise_and", "__rand__"):
            return _and(self.eval(self_), self.eval(args[1]))
        if name in ("__or__", "logical_or", "bitwise_or", "__ror__"):
            return _or(self.eval(self_), self.eval(args[1]))
        if name in ("__invert__", "logical_not", "bitwise_not"):
            return _negate(_to_pred(self.eval(self_)))
        if name in _CONST_METHODS:
            return self._const(node, _CONST_METHODS[name], kwargs.get("dtype"))
        if name == "new_full":
            return self._const(node, args[2] if len(args) > 2 else kwargs["fill_value"], None)
        if name in ("fill_", "zero_"):
            return self._opaque(node, "in-place fill")
        if name == "cumsum":
            return self._cumsum(node, self_, _arg(args, kwargs, 1, "dim", None))
        if name in ("tril", "triu"):
            return self._tri(node, name, self_, _arg(args, kwargs, 1, "diagonal", 0))
        if name == "masked_fill":
            return self._masked_fill(self_, args[1], args[2] if len(args) > 2 else kwargs["value"])
        if name in ("expand", "expand_as", "broadcast_to"):
            return self.eval(self_)  # right-aligned axes: broadcasting keeps the forms
        if name == "unsqueeze":
            return self._unsqueeze(node, self_, _arg(args, kwargs, 1, "dim", None))
        if name in ("view", "reshape"):
            return self._reshape(node, self_)
        if name in ("transpose", "swapaxes"):
            return self._transpose(node, self_, args[1], args[2])
        if name == "__getitem__":
            return self._getitem(node, self_, args[1])
        if name == "where":
            return self._where(args[1], self_, args[2])
        return self._opaque(node, f"method {name}")

    def _arange(self, node, args, kwargs):
        start, _end, step = 0, None, 1
        if len(args) == 1:
            args[0]
        elif len(args) >= 2:
            start, _end = args[0], args[1]
            if len(args) > 2:
                step = args[2]
        start = kwargs.get("start", start)
        step = kwargs.get("step", step)
        lin = _scalar_lin(start)
        if lin is None or not isinstance(step, int) or isinstance(step, bool):
            return self._opaque(node, "arange with a non-integer start or step")
        return _lin_add(Lin.of({("ax", -1): step}), lin)

    def _const(self, node, value, dtype):
        meta = _meta(node)
        if isinstance(value, fx.Node) or not isinstance(value, int | float | bool):
            return self._opaque(node, "fill value computed in the graph")
        if meta is not None and meta.dtype == torch.bool or dtype == torch.bool:
            return TRUE if value else Pred(frozenset(), false=True)
        if meta is not None and not meta.dtype.is_floating_point and isinstance(value, int):
            return Lin.of({ONE: int(value)})
        return Sel(TRUE, float(value), float(value))

    def _tri(self, node, which, x, diagonal):
        v = self.eval(x)
        if not isinstance(diagonal, int):
            return self._opaque(node, f"{which} with a computed diagonal")
        # tril keeps j - i <= d; triu keeps j - i >= d  <=>  i - j + d <= 0
        if which == "tril":
            keep = Lin.of({("ax", -1): 1, ("ax", -2): -1, ONE: -diagonal})
        else:
            keep = Lin.of({("ax", -1): -1, ("ax", -2): 1, ONE: diagonal})
        keep = Pred(frozenset({keep}))
        if isinstance(v, Pred):
            return _and(v, keep)
        if isinstance(v, Sel) and v.a == v.b:
            return Sel(keep, v.a, 0.0)
        if isinstance(v, Lin) and set(v.dict()) <= {ONE}:
            return Sel(keep, v.dict().get(ONE, 0), 0.0)
        return (
            self._opaque(node, f"{which} of a non-constant tensor")
            if not isinstance(v, Opaque)
            else v
        )

    def _where(self, cond, a, b):
        c = _to_pred(self.eval(cond))
        va, vb = self.eval(a), self.eval(b)
        if isinstance(c, Opaque):
            return c
        sa, sb = _scalar_of(va), _scalar_of(vb)
        if isinstance(va, Pred) and isinstance(vb, Pred):
            if vb.false:
                return _and(c, va)
        if sa is not None and sb is not None:
            return Sel(c, sa, sb)
        if isinstance(va, Opaque) or isinstance(vb, Opaque):
            return va if isinstance(va, Opaque) else vb
        return Opaque("where over non-constant values", data=False)

    def _masked_fill(self, x, cond, value):
        vx = self.eval(x)
        c = _to_pred(self.eval(cond))
        if isinstance(c, Opaque):
            return c
        fill = _scalar_of(self.eval(value)) if isinstance(value, fx.Node) else value
        if isinstance(fill, bool) or fill is None:
            return Opaque("masked_fill with a non-scalar value", data=False)
        if isinstance(vx, Opaque):
            return vx
        sx = _scalar_of(vx)
        if sx is not None:
            return Sel(c, float(fill), float(sx))
        # x already a 0 / masked additive mask: masking more keeps it additive
        if isinstance(vx, Sel) and fill <= MASKED_AT_OR_BELOW:
            allowed = as_allowed(vx, False)
            if isinstance(allowed, Pred):
                return Sel(_and(allowed, _negate(c)), 0.0, -math.inf)
        return Opaque("masked_fill of a non-constant tensor", data=False)

    def _unsqueeze(self, node, x, dim):
        meta_in = _meta(x)
        if meta_in is None or not isinstance(dim, int):
            return self._opaque(node, "unsqueeze without shape metadata")
        n = meta_in.dim()
        d = dim if dim >= 0 else dim + n + 1
        return _map_axes(self.eval(x), lambda a: _insert_axes(a, n, [d]))

    def _transpose(self, node, x, d0, d1):
        meta_in = _meta(x)
        if meta_in is None or not isinstance(d0, int) or not isinstance(d1, int):
            return self._opaque(node, "transpose without shape metadata")
        n = meta_in.dim()
        a0, a1 = (d0 if d0 < 0 else d0 - n), (d1 if d1 < 0 else d1 - n)
        return _map_axes(self.eval(x), lambda a: a1 if a == a0 else a0 if a == a1 else a)

    def _reshape(self, node, x):
        meta_in, meta_out = _meta(x), _meta(node)
        if meta_in is None or meta_out is None:
            return self._opaque(node, "reshape without shape metadata")
        keep_in = [i for i, s in enumerate(meta_in.shape) if not _is_one(s)]
        keep_out = [i for i, s in enumerate(meta_out.shape) if not _is_one(s)]
        same = len(keep_in) == len(keep_out) and all(
            _same(meta_in.shape[i], meta_out.shape[o])
            for i, o in zip(keep_in, keep_out, strict=False)
        )
        if not same:
            return self._opaque(node, "reshape that merges or splits axes")
        remap = {
            i - meta_in.dim(): o - meta_out.dim() for i, o in zip(keep_in, keep_out, strict=False)
        }
        return _map_axes(self.eval(x), lambda a: remap.get(a))

    def _getitem(self, node, x, index):
        meta_in = _meta(x)
        if meta_in is None:
            return self._opaque(node, "indexing a non-tensor")
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) and isinstance(_meta(i), torch.Tensor) for i in index):
            return self._gather(node, x, index)
        n = meta_in.dim()
        n_used = sum(1 for i in index if i is not None and i is not Ellipsis)
        v = self.eval(x)
        pos_in, out, mapping = 0, 0, {}
        for i in index:
            if i is Ellipsis:
                for _ in range(n - n_used):
                    mapping[pos_in] = out
                    pos_in, out = pos_in + 1, out + 1
            elif i is None:
                out += 1
            elif isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool)):
                start = i if isinstance(i, int) else (0 if i.start is None else i.start)
                if isinstance(i, slice) and i.step not in (None, 1):
                    return self._opaque(node, "strided slice")
                start_lin = _scalar_lin(start)
                if start_lin is None or (isinstance(start, int) and start < 0):
                    return self._opaque(node, "index or slice with a negative or computed start")
                # element t of the result is element t + start of the input along this axis
                v = _shift_axis(v, pos_in - n, start_lin)
                if isinstance(i, slice):
                    mapping[pos_in] = out
                    out += 1
                pos_in += 1
            else:
                return self._opaque(node, f"index {i!r}")
        while pos_in < n:
            mapping[pos_in] = out
            pos_in, out = pos_in + 1, out + 1
        n_out = out

        def rename(a):
            new = mapping.get(a + n)
            return None if new is None else new - n_out

        return _map_axes(v, rename)

    def _gather(self, node, x, index):
        """``x[i0, i1, ...]`` with one index tensor per axis of ``x``: an affine ``x`` read at
        affine indices is affine in the result's positions (HF gathers positions this way)."""
        meta_in = _meta(x)
        v = self.eval(x)
        if isinstance(v, Opaque):
            return v
        if len(index) != meta_in.dim() or not all(isinstance(i, fx.Node) for i in index):
            return self._opaque(node, "advanced indexing with a tensor")
        values = [self.eval(i) for i in index]
        if isinstance(v, Pred | Sel) and not _depends_on_axes(v):
            return v
        if not isinstance(v, Lin) or not all(isinstance(i, Lin) for i in values):
            bad = next((i for i in values if isinstance(i, Opaque)), None)
            return bad or self._opaque(node, "advanced indexing with a tensor")
        d = v.dict()
        out = Lin.of({k: c for k, c in d.items() if not (isinstance(k, tuple) and k[0] == "ax")})
        n = meta_in.dim()
        for pos, idx in enumerate(values):
            coef = d.get(("ax", pos - n), 0)
            if coef:
                out = _lin_add(out, _lin_scale(idx, coef))
        return out

    def _diff(self, node, args, kwargs):
        """``torch.diff(x, dim=-1, prepend=p)`` of an affine x whose prepend continues it: the
        constant step (HF's packed-sequence check on ``arange`` positions)."""
        x = args[0]
        n_ = _arg(args, kwargs, 1, "n", 1)
        dim = _arg(args, kwargs, 2, "dim", -1)
        prepend = kwargs.get("prepend", args[3] if len(args) > 3 else None)
        meta = _meta(x)
        v = self.eval(x)
        if isinstance(v, Opaque):
            return v
        if n_ != 1 or not isinstance(dim, int) or meta is None or kwargs.get("append") is not None:
            return self._opaque(node, "diff")
        axis = dim if dim < 0 else dim - meta.dim()
        if not isinstance(v, Lin) or prepend is None:
            return self._opaque(node, "diff")
        d = v.dict()
        step = d.pop(("ax", axis), 0)
        # the prepended column must be x's value at position -1 along the axis
        expected = _lin_add(Lin.of(d), Lin.of({ONE: -step}))
        if self.eval(prepend) != expected:
            return self._opaque(node, "diff with a prepend that does not continue x")
        return Lin.of({ONE: step})

    def _cumsum(self, node, x, dim):
        v = self.eval(x)
        meta = _meta(x)
        if isinstance(v, Pred) and v.false:
            v = Lin.of({})
        if not isinstance(v, Lin) or not isinstance(dim, int) or meta is None:
            return v if isinstance(v, Opaque) else self._opaque(node, "cumsum")
        d = v.dict()
        if set(d) - {ONE}:
            return self._opaque(node, "cumsum of a non-constant tensor")
        c = d.get(ONE, 0)
        axis = dim if dim < 0 else dim - meta.dim()
        return Lin.of({("ax", axis): c, ONE: c})  # sum of c over positions 0..t


def _depends_on_axes(v) -> bool:
    if isinstance(v, Lin):
        return bool(v.axes())
    if isinstance(v, Pred):
        return any(isinstance(a, Lin) and a.axes() for a in v.atoms)
    if isinstance(v, Sel):
        return _depends_on_axes(v.pred)
    return True


def _shift_axis(v, axis: int, start: Lin):
    """Forms with coefficient c on ``axis`` gain ``c * start`` (the axis now starts there)."""

    def fix(form: Lin) -> Lin:
        c = form.dict().get(("ax", axis), 0)
        return _lin_add(form, _lin_scale(start, c)) if c else form

    return _map_forms(v, fix)


def _map_forms(v, fn):
    if isinstance(v, Lin):
        return fn(v)
    if isinstance(v, Pred):
        return Pred(frozenset(fn(a) if isinstance(a, Lin) else a for a in v.atoms), v.false)
    if isinstance(v, Sel):
        return Sel(_map_forms(v.pred, fn), v.a, v.b)
    return v


def _map_axes(v, fn):
    """Rename axis terms with ``fn(axis) -> new axis or None`` (None: the term disappears)."""

    def remap(form: Lin) -> Lin:
        d = {}
        for k, c in form.terms:
            if isinstance(k, tuple) and k[0] == "ax":
                new = fn(k[1])
                if new is None:
                    continue
                k = ("ax", new)
            d[k] = d.get(k, 0) + c
        return Lin.of(d)

    return _map_forms(v, remap)


def _insert_axes(a: int, n: int, inserted: list[int]) -> int:
    p = a + n
    for d in sorted(inserted):
        if p >= d:
            p += 1
    return p - (n + len(inserted))


def _is_one(s) -> bool:
    return isinstance(s, int) and s == 1


def _arg(args, kwargs, i, name, default):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _reads_tensor_input(node: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr") and isinstance(_meta(n), torch.Tensor):
            return True
        stack.extend(n.all_input_nodes)
    return False


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
    meta = _meta(m.node)
    if not isinstance(m.node, fx.Node) or meta is None:
        return MaskInfo("arbitrary", "mask is not a tensor in the graph")
    interp = _Interpreter()
    if m.how == "add":
        if meta.dtype == torch.bool:
            return MaskInfo("arbitrary", "boolean tensor added to the scores")
        value = interp.eval(m.node)
        if m.post_scale is None:
            return MaskInfo("arbitrary", "additive mask scaled by a symbolic factor")
        if m.post_scale != 1:
            value = _arith("mul", value, Sel(TRUE, m.post_scale, m.post_scale))
        allowed = as_allowed(value, boolean=False)
    else:
        fill = m.value
        if fill is None or m.post_scale is None or m.post_scale <= 0:
            return MaskInfo("arbitrary", "mask fill value not a known large negative constant")
        if fill * m.post_scale > MASKED_AT_OR_BELOW:
            return MaskInfo("arbitrary", f"mask fill value {fill} does not mask out")
        cond = _to_pred(interp.eval(m.node))
        allowed = _negate(cond) if m.how == "fill" else cond
    return judge_allowed(allowed, None, meta, n_q, n_k)
