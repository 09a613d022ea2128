"""The abstract values of mask classification and their algebra (see ``hyperpass.compiler.masks``).

A tensor that builds a mask is tracked as one of:

- :class:`Lin`: an integer tensor whose element at position ``p`` is an affine function of ``p``
  (``arange`` and what is computed from it);
- :class:`Pred`: a boolean tensor, a conjunction of linear inequalities over positions;
- :class:`Sel`: a numeric tensor, ``a`` where a :class:`Pred` holds, else ``b``;
- :class:`Opaque`: anything else (and whether it reads input data).

Axes are counted from the right (-1, -2, ...), so broadcasting needs no remapping. Imports torch
only.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

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
    module_state: bool = False  # the tensor read is a module's buffer or parameter
    axes: frozenset | None = None  # the axes its elements depend on, when known (else: all)


def as_allowed(value, boolean: bool):
    """The set of allowed (query, key) positions a mask value stands for, or an Opaque."""
    if isinstance(value, Opaque):
        return value
    if boolean:
        return to_pred(value)
    sel = to_sel(value)
    if isinstance(sel, Opaque):
        return sel
    if sel.a == 0 and (sel.b <= MASKED_AT_OR_BELOW or sel.pred == TRUE):
        return sel.pred
    if sel.b == 0 and sel.a <= MASKED_AT_OR_BELOW:
        return negate(sel.pred)
    if sel.a == sel.b == 0:
        return TRUE
    return Opaque(f"additive mask with values {sel.a} / {sel.b}", data=False)


# ----------------------------------------------------------------------------- value algebra
def lin_add(x: Lin, y: Lin, sign: int = 1) -> Lin:
    d = x.dict()
    for k, c in y.terms:
        d[k] = d.get(k, 0) + sign * c
    return Lin.of(d)


def lin_scale(x: Lin, s: int) -> Lin:
    return Lin.of({k: c * s for k, c in x.terms})


def scalar_lin(s) -> Lin | None:
    if isinstance(s, bool):
        return None
    if isinstance(s, int):
        return Lin.of({ONE: s})
    if isinstance(s, fx.Node) and isinstance(s.meta.get("example_value"), torch.SymInt):
        return Lin.of({("sym", s): 1})
    return None


def to_pred(v):
    if isinstance(v, Pred | Opaque):
        return v
    if isinstance(v, Sel):
        if v.a and not v.b:
            return v.pred
        if v.b and not v.a:
            return negate(v.pred)
        return TRUE if v.a and v.b else Pred(frozenset(), false=True)
    if isinstance(v, Lin):
        return Opaque("integer tensor used as a boolean", data=False)
    return Opaque(f"{type(v).__name__} used as a boolean", data=False)


def to_sel(v):
    if isinstance(v, Sel | Opaque):
        return v
    if isinstance(v, Pred):
        return Sel(v, 1, 0)
    return Opaque("index tensor used as a mask value", data=False)


def negate(p):
    if isinstance(p, Opaque):
        return p
    if p.false:
        return TRUE
    if not p.atoms:
        return Pred(frozenset(), false=True)
    if len(p.atoms) == 1:
        (atom,) = p.atoms
        if isinstance(atom, Lin):  # not(f <= 0)  <=>  -f + 1 <= 0 over integers
            return Pred(frozenset({lin_add(lin_scale(atom, -1), Lin.of({ONE: 1}))}))
        # not(an input-read boolean): another one, over the same axes
        return Pred(frozenset({("opaque", f"not ({atom[1]})", atom[2])}))
    return Opaque("negation of a compound mask", data=has_data(p))


def has_data(p) -> bool:
    return isinstance(p, Pred) and any(isinstance(a, tuple) for a in p.atoms)


def and_(x, y):
    x, y = to_pred(x), to_pred(y)
    if isinstance(x, Opaque) or isinstance(y, Opaque):
        # keep the known part so that "causal & padding" is reported as such
        known = y if isinstance(x, Opaque) else x
        opaque = x if isinstance(x, Opaque) else y
        if isinstance(known, Opaque) or not opaque.data:
            return Opaque(opaque.why, opaque.data or getattr(known, "data", False))
        return Pred(known.atoms | {("opaque", opaque.why, opaque.axes)}, known.false)
    return Pred(x.atoms | y.atoms, x.false or y.false)


def or_(x, y):
    x, y = to_pred(x), to_pred(y)
    for a, b in ((x, y), (y, x)):
        if isinstance(a, Pred) and a.false:
            return b
        if isinstance(a, Pred) and not a.atoms and not a.false:
            return TRUE
    return Opaque("union of masks", data=has_data(x) or has_data(y))


def axes_of(v) -> frozenset | None:
    """The axes an abstract value's elements depend on (None: unknown)."""
    if isinstance(v, Lin):
        return frozenset(v.axes())
    if isinstance(v, Opaque):
        return v.axes
    if isinstance(v, Sel):
        return axes_of(v.pred)
    if isinstance(v, Pred):
        axes = set()
        for a in v.atoms:
            part = a[2] if isinstance(a, tuple) else frozenset(a.axes())
            if part is None:
                return None
            axes |= part
        return frozenset(axes)
    return None


def as_atom(c: Opaque) -> Pred:
    """An opaque boolean read from input data as a one-atom conjunction (it then keeps its
    place, and its axes, in the allowed set of the mask built from it)."""
    return Pred(frozenset({("opaque", c.why, c.axes)}))


def _elementwise(x, y) -> Opaque:
    """The Opaque result of an elementwise op on ``x``, ``y`` (one of them Opaque): it depends
    on the axes of both (``arange(n) < lengths[:, None]``: batch and key)."""
    o = x if isinstance(x, Opaque) else y
    ax, ay = axes_of(x), axes_of(y)
    axes = None if ax is None or ay is None else ax | ay
    data = any(isinstance(t, Opaque) and t.data for t in (x, y))
    state = any(isinstance(t, Opaque) and t.module_state for t in (x, y))
    return Opaque(o.why, data, state, axes)


def compare(op: str, x, y):
    if isinstance(x, Opaque) or isinstance(y, Opaque):
        return _elementwise(x, y)
    if isinstance(x, Lin) and isinstance(y, Lin):
        diff = lin_add(x, y, -1)  # x - y
        d = diff.dict()
        if set(d) <= {ONE} and not isinstance(d.get(ONE, 0), fx.Node):  # a constant comparison
            hit = cmp_scalar(op, d.get(ONE, 0), 0)
            return TRUE if hit else Pred(frozenset(), false=True)
        one = Lin.of({ONE: 1})
        forms = {
            "le": [diff],
            "lt": [lin_add(diff, one)],
            "ge": [lin_scale(diff, -1)],
            "gt": [lin_add(lin_scale(diff, -1), one)],
            "eq": [diff, lin_scale(diff, -1)],
        }.get(op)
        if forms is None:
            return Opaque(f"index comparison {op}", data=False)
        return Pred(frozenset(forms))
    # mask == 0 / mask != 0 / mask == 1 on 0/1 masks
    if isinstance(x, Pred | Sel) and isinstance(y, Lin) and y.terms <= {(ONE, y.dict().get(ONE))}:
        c = y.dict().get(ONE, 0)
        sel = to_sel(x)
        hit_a, hit_b = cmp_scalar(op, sel.a, c), cmp_scalar(op, sel.b, c)
        if hit_a is None:
            return Opaque(f"mask comparison {op}", data=has_data(sel.pred))
        if hit_a and not hit_b:
            return sel.pred
        if hit_b and not hit_a:
            return negate(sel.pred)
        return TRUE if hit_a else Pred(frozenset(), false=True)
    return Opaque(f"comparison {op} of mask values", data=False)


def cmp_scalar(op, a, c):
    fn = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt}
    fn.update({"eq": operator.eq, "ne": operator.ne})
    return fn[op](a, c) if op in fn else None


def arith(op: str, x, y):
    """x op y where one side may be a Python scalar (as a constant Lin)."""
    if isinstance(x, Opaque) or isinstance(y, Opaque):
        return _elementwise(x, y)
    if isinstance(x, Lin) and isinstance(y, Lin):
        if op == "add":
            return lin_add(x, y)
        if op == "sub":
            return lin_add(x, y, -1)
        if op == "mul":
            for a, b in ((x, y), (y, x)):
                const = b.dict()
                if set(const) <= {ONE} and isinstance(const.get(ONE, 0), int):
                    return lin_scale(a, const.get(ONE, 0))
        return Opaque(f"index arithmetic {op}", data=False)
    # numeric masks: apply the scalar op to both branches
    sx = scalar_of(x)
    sy = scalar_of(y)
    fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}
    if op not in fn:
        return Opaque(f"mask arithmetic {op}", data=False)
    if sx is not None and not isinstance(y, Lin):
        s = to_sel(y)
        if isinstance(s, Opaque):
            return s
        return Sel(s.pred, _safe(fn[op], sx, s.a), _safe(fn[op], sx, s.b))
    if sy is not None and not isinstance(x, Lin):
        s = to_sel(x)
        if isinstance(s, Opaque):
            return s
        return Sel(s.pred, _safe(fn[op], s.a, sy), _safe(fn[op], s.b, sy))
    if op == "add" and not isinstance(x, Lin) and not isinstance(y, Lin):
        sx_, sy_ = to_sel(x), to_sel(y)
        if isinstance(sx_, Opaque) or isinstance(sy_, Opaque):
            return sx_ if isinstance(sx_, Opaque) else sy_
        # sum of two additive masks (0 / masked each): masked where either masks
        ax, ay = as_allowed(sx_, False), as_allowed(sy_, False)
        if isinstance(ax, Pred) and isinstance(ay, Pred):
            return Sel(and_(ax, ay), 0.0, -math.inf)
    return Opaque(f"mask arithmetic {op}", data=False)


def _safe(fn, a, b):
    try:
        return fn(a, b)
    except (ZeroDivisionError, OverflowError):
        return math.nan


def scalar_of(v):
    if isinstance(v, Lin):
        d = v.dict()
        if set(d) <= {ONE} and not isinstance(d.get(ONE, 0), fx.Node):
            return d.get(ONE, 0)
    if isinstance(v, Sel) and v.a == v.b:
        return v.a
    return None


def depends_on_axes(v) -> bool:
    if isinstance(v, Lin):
        return bool(v.axes())
    if isinstance(v, Pred):
        return any(isinstance(a, Lin) and a.axes() for a in v.atoms)
    if isinstance(v, Sel):
        return depends_on_axes(v.pred)
    return True


def shift_axis(v, axis: int, start: Lin):
    """Forms with coefficient c on ``axis`` gain ``c * start`` (the axis now starts there)."""

    def fix(form: Lin) -> Lin:
        c = form.dict().get(("ax", axis), 0)
        return lin_add(form, lin_scale(start, c)) if c else form

    return map_forms(v, fix)


def map_forms(v, fn):
    if isinstance(v, Lin):
        return fn(v)
    if isinstance(v, Pred):
        return Pred(frozenset(fn(a) if isinstance(a, Lin) else a for a in v.atoms), v.false)
    if isinstance(v, Sel):
        return Sel(map_forms(v.pred, fn), v.a, v.b)
    return v


def map_axes(v, fn):
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

    def remap_axes(axes):  # an axis that disappears had size 1: nothing depended on it
        return None if axes is None else frozenset(a for a in map(fn, axes) if a is not None)

    if isinstance(v, Opaque):
        return dataclasses.replace(v, axes=remap_axes(v.axes))
    if isinstance(v, Pred):
        atoms = frozenset(
            (a[0], a[1], remap_axes(a[2])) if isinstance(a, tuple) else remap(a) for a in v.atoms
        )
        return Pred(atoms, v.false)
    if isinstance(v, Sel):
        return Sel(map_axes(v.pred, fn), v.a, v.b)
    return map_forms(v, remap)


def insert_axes(a: int, n: int, inserted: list[int]) -> int:
    p = a + n
    for d in sorted(inserted):
        if p >= d:
            p += 1
    return p - (n + len(inserted))
