"""The interpreter of mask-building nodes: an FX node -> its abstract value (``values``).

Follows ``arange`` comparisons broadcast by indexing or ``unsqueeze`` (Hugging Face
``masking_utils``), gathers of positions by positions, ``diff``/``cumsum`` of positions (HF's
packed-sequence check), ``tril``/``triu`` of ``ones``/``full``, ``masked_fill``/``where`` into
additive masks, ``~``, ``&``, casts, ``expand``, ``transpose``, size-1 reshapes and slices. Any
other node is :class:`~hyperpass.compiler.masks.values.Opaque`. Never raises on a graph.
Imports torch only.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re

import torch
from torch import fx

from hyperpass.compiler.fx_utils import meta_of, same_size
from hyperpass.compiler.masks.values import (
    MASKED_AT_OR_BELOW,
    ONE,
    TRUE,
    Lin,
    Opaque,
    Pred,
    Sel,
    and_,
    arith,
    as_allowed,
    as_atom,
    compare,
    depends_on_axes,
    insert_axes,
    lin_add,
    lin_scale,
    map_axes,
    negate,
    or_,
    scalar_lin,
    scalar_of,
    shift_axis,
    to_pred,
)

# ----------------------------------------------------------------------------- the interpreter
_CMP = {
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt",
    operator.eq: "eq", operator.ne: "ne", torch.le: "le", torch.lt: "lt", torch.ge: "ge",
    torch.gt: "gt", torch.eq: "eq", torch.ne: "ne",
}  # fmt: skip
_CMP_METHODS = {"le", "lt", "ge", "gt", "eq", "ne"}
_CMP_METHODS |= {f"__{name}__" for name in _CMP_METHODS}  # HF 5.17 writes ``a.__eq__(b)``
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
_MODULE_STATE = re.compile(r"_(buffers|parameters)_")  # Dynamo's names of lifted module state


class Interpreter:
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
            value = self.memo[node]
            if isinstance(value, Opaque) and value.axes is not None and not _keeps_axes(node):
                value = dataclasses.replace(value, axes=None)  # combined with others: unknown
            self.memo[node] = self._drop_unit_axes(node, value)
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
        meta = meta_of(node)
        if meta is None:
            return v
        unit = {a - meta.dim() for a in range(meta.dim()) if _is_one(meta.shape[a])}
        if not unit:
            return v
        return map_axes(v, lambda a: None if a in unit else a)

    def _eval(self, node: fx.Node):
        t, args, kwargs = node.target, node.args, node.kwargs
        if node.op == "placeholder" or node.op == "get_attr":
            if isinstance(node.meta.get("example_value"), torch.SymInt):
                return Lin.of({("sym", node): 1})
            state = _MODULE_STATE.search(node.name) is not None or node.op == "get_attr"
            meta = meta_of(node)
            axes = None if meta is None else frozenset(range(-meta.dim(), 0))
            return Opaque(f"graph input {node.name}", data=True, module_state=state, axes=axes)
        if node.op == "call_method":
            return self._method(node, t, args, kwargs)
        if node.op != "call_function":
            return self._opaque(node, f"{node.op} {t}")
        if t is torch.arange:
            return self._arange(node, args, kwargs)
        if t in _CMP:
            return compare(_CMP[t], self.eval(args[0]), self.eval(args[1]))
        if t in _ARITH:
            return arith(_ARITH[t], self.eval(args[0]), self.eval(args[1]))
        if t is operator.neg:
            return arith("mul", self.eval(args[0]), Lin.of({ONE: -1}))
        if t in _AND:
            return and_(self.eval(args[0]), self.eval(args[1]))
        if t in _OR:
            return or_(self.eval(args[0]), self.eval(args[1]))
        if t in _NOT:
            return negate(to_pred(self.eval(args[0])))
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
            return compare(name.strip("_"), self.eval(self_), self.eval(args[1]))
        if name in ("add", "sub", "mul", "div", "__add__", "__sub__", "__mul__", "__truediv__"):
            op = {"truediv": "div"}.get(name.strip("_"), name.strip("_"))
            return arith(op, self.eval(self_), self.eval(args[1]))
        if name in ("__rsub__",):
            return arith("sub", self.eval(args[1]), self.eval(self_))
        if name in ("__and__", "logical_and", "bitwise_and", "__rand__"):
            return and_(self.eval(self_), self.eval(args[1]))
        if name in ("__or__", "logical_or", "bitwise_or", "__ror__"):
            return or_(self.eval(self_), self.eval(args[1]))
        if name in ("__invert__", "logical_not", "bitwise_not"):
            return negate(to_pred(self.eval(self_)))
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
        lin = scalar_lin(start)
        if lin is None or not isinstance(step, int) or isinstance(step, bool):
            return self._opaque(node, "arange with a non-integer start or step")
        return lin_add(Lin.of({("ax", -1): step}), lin)

    def _const(self, node, value, dtype):
        meta = meta_of(node)
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
            return and_(v, keep)
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
        c = to_pred(self.eval(cond))
        va, vb = self.eval(a), self.eval(b)
        if isinstance(c, Opaque) and c.data:
            c = as_atom(c)  # a padding condition: where(keep, 0, min) stays an allowed set
        if isinstance(c, Opaque):
            return c
        sa, sb = scalar_of(va), scalar_of(vb)
        if isinstance(va, Pred) and isinstance(vb, Pred):
            if vb.false:
                return and_(c, va)
        if sa is not None and sb is not None:
            return Sel(c, sa, sb)
        if isinstance(va, Opaque) or isinstance(vb, Opaque):
            return va if isinstance(va, Opaque) else vb
        return Opaque("where over non-constant values", data=False)

    def _masked_fill(self, x, cond, value):
        vx = self.eval(x)
        c = to_pred(self.eval(cond))
        if isinstance(c, Opaque) and c.data:
            c = as_atom(c)
        if isinstance(c, Opaque):
            return c
        fill = scalar_of(self.eval(value)) if isinstance(value, fx.Node) else value
        if isinstance(fill, bool) or fill is None:
            return Opaque("masked_fill with a non-scalar value", data=False)
        if isinstance(vx, Opaque):
            return vx
        sx = scalar_of(vx)
        if sx is not None:
            return Sel(c, float(fill), float(sx))
        # x already a 0 / masked additive mask: masking more keeps it additive
        if isinstance(vx, Sel) and fill <= MASKED_AT_OR_BELOW:
            allowed = as_allowed(vx, False)
            if isinstance(allowed, Pred):
                return Sel(and_(allowed, negate(c)), 0.0, -math.inf)
        return Opaque("masked_fill of a non-constant tensor", data=False)

    def _unsqueeze(self, node, x, dim):
        meta_in = meta_of(x)
        if meta_in is None or not isinstance(dim, int):
            return self._opaque(node, "unsqueeze without shape metadata")
        n = meta_in.dim()
        d = dim if dim >= 0 else dim + n + 1
        return map_axes(self.eval(x), lambda a: insert_axes(a, n, [d]))

    def _transpose(self, node, x, d0, d1):
        meta_in = meta_of(x)
        if meta_in is None or not isinstance(d0, int) or not isinstance(d1, int):
            return self._opaque(node, "transpose without shape metadata")
        n = meta_in.dim()
        a0, a1 = (d0 if d0 < 0 else d0 - n), (d1 if d1 < 0 else d1 - n)
        return map_axes(self.eval(x), lambda a: a1 if a == a0 else a0 if a == a1 else a)

    def _reshape(self, node, x):
        meta_in, meta_out = meta_of(x), meta_of(node)
        if meta_in is None or meta_out is None:
            return self._opaque(node, "reshape without shape metadata")
        keep_in = [i for i, s in enumerate(meta_in.shape) if not _is_one(s)]
        keep_out = [i for i, s in enumerate(meta_out.shape) if not _is_one(s)]
        same = len(keep_in) == len(keep_out) and all(
            same_size(meta_in.shape[i], meta_out.shape[o])
            for i, o in zip(keep_in, keep_out, strict=False)
        )
        if not same:
            return self._opaque(node, "reshape that merges or splits axes")
        remap = {
            i - meta_in.dim(): o - meta_out.dim() for i, o in zip(keep_in, keep_out, strict=False)
        }
        return map_axes(self.eval(x), lambda a: remap.get(a))

    def _getitem(self, node, x, index):
        meta_in = meta_of(x)
        if meta_in is None:
            return self._opaque(node, "indexing a non-tensor")
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) and isinstance(meta_of(i), torch.Tensor) for i in index):
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
                start_lin = scalar_lin(start)
                if start_lin is None or (isinstance(start, int) and start < 0):
                    return self._opaque(node, "index or slice with a negative or computed start")
                # element t of the result is element t + start of the input along this axis
                v = shift_axis(v, pos_in - n, start_lin)
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

        return map_axes(v, rename)

    def _gather(self, node, x, index):
        """``x[i0, i1, ...]`` with one index tensor per axis of ``x``: an affine ``x`` read at
        affine indices is affine in the result's positions (HF gathers positions this way)."""
        meta_in = meta_of(x)
        v = self.eval(x)
        if len(index) != meta_in.dim() or not all(isinstance(i, fx.Node) for i in index):
            return v if isinstance(v, Opaque) else self._opaque(node, "advanced indexing")
        values = [self.eval(i) for i in index]
        if isinstance(v, Opaque):
            # an input read at affine positions depends on the axes of those positions only
            # (HF's padding: ``attention_mask[batch_idx, kv_idx]`` varies with batch and key)
            if v.data and all(isinstance(i, Lin) for i in values):
                axes = {a for i in values for a in i.axes()}
                return Opaque(v.why, True, v.module_state, frozenset(axes))
            return v
        if isinstance(v, Pred | Sel) and not depends_on_axes(v):
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
                out = lin_add(out, lin_scale(idx, coef))
        return out

    def _diff(self, node, args, kwargs):
        """``torch.diff(x, dim=-1, prepend=p)`` of an affine x whose prepend continues it: the
        constant step (HF's packed-sequence check on ``arange`` positions)."""
        x = args[0]
        n_ = _arg(args, kwargs, 1, "n", 1)
        dim = _arg(args, kwargs, 2, "dim", -1)
        prepend = kwargs.get("prepend", args[3] if len(args) > 3 else None)
        meta = meta_of(x)
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
        expected = lin_add(Lin.of(d), Lin.of({ONE: -step}))
        if self.eval(prepend) != expected:
            return self._opaque(node, "diff with a prepend that does not continue x")
        return Lin.of({ONE: step})

    def _cumsum(self, node, x, dim):
        v = self.eval(x)
        meta = meta_of(x)
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


# ops whose Opaque result depends on the axes the interpreter tracks for it: an input read,
# indexed, gathered at affine positions, cast, broadcast or re-laid-out. Any other op that
# returns an Opaque stands for a value computed from more than it: its axes become unknown.
_AXIS_METHODS = _IDENTITY_METHODS | {
    "expand",
    "expand_as",
    "broadcast_to",
    "unsqueeze",
    "transpose",
    "swapaxes",
    "view",
    "reshape",
    "__getitem__",
}
_AXIS_METHODS |= _CMP_METHODS | {
    "add",
    "sub",
    "mul",
    "div",
    "__add__",
    "__sub__",
    "__mul__",
    "__truediv__",
    "__rsub__",
}  # elementwise: axes_of both sides
_AXIS_METHODS |= {"__invert__", "logical_not", "bitwise_not"}  # not(opaque): the same axes
_AXIS_FUNCTIONS = {operator.getitem, torch.unsqueeze, torch.transpose, torch.swapaxes,
                   operator.neg, *_CMP, *_ARITH, *_NOT}  # fmt: skip


def _keeps_axes(node: fx.Node) -> bool:
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.op == "call_method":
        return node.target in _AXIS_METHODS
    return node.op == "call_function" and node.target in _AXIS_FUNCTIONS


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
        if n.op in ("placeholder", "get_attr") and isinstance(meta_of(n), torch.Tensor):
            return True
        stack.extend(n.all_input_nodes)
    return False
