"""Whether a mask (or anything it was computed from) is changed in place in the graph.

The mask interpreter reads how a tensor was *built*; an in-place edit afterwards (``m[:, 0] =
False``, ``m.masked_fill_(...)``, ``m.tril_()``, ``copy_``, an edit through a view) changes the
value without changing that recipe. Dynamo graphs keep such edits as nodes: any of them on a
tensor the mask depends on, or on a view of one, makes the mask unprovable (the site stays
exact). Conservative: an edit anywhere in the graph counts, before or after the attention.
Imports torch only.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

# ops that return a view of their first argument: an edit of the view edits the base
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "transpose", "permute",
    "t", "T", "mT", "unsqueeze", "squeeze", "flatten", "unflatten", "narrow", "select",
    "diagonal", "as_strided", "unfold", "split", "chunk", "unbind", "movedim", "swapaxes",
    "__getitem__", "detach", "contiguous", "type_as", "to", "bool", "float", "int", "long",
}  # fmt: skip
_VIEW_FUNCTIONS = {
    operator.getitem, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
    torch.reshape, torch.flatten, torch.narrow, torch.select, torch.diagonal, torch.split,
    torch.chunk, torch.unbind, torch.movedim, torch.swapaxes, torch.t, torch.detach,
}  # fmt: skip
_MUTATING_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, torch.Tensor.copy_, torch.Tensor.__setitem__,
}  # fmt: skip


def _is_mutation(user: fx.Node, of: fx.Node) -> bool:
    """``user`` changes ``of`` in place (it is the first argument of an in-place op)."""
    if not user.args or user.args[0] is not of:
        return "out" in user.kwargs and user.kwargs["out"] is of
    if user.op == "call_method":
        name = user.target
        in_place_dunder = name.startswith("__i") and name.endswith("__")  # __iand__, __iadd__
        return (
            name == "__setitem__"
            or in_place_dunder
            or (name.endswith("_") and not name.endswith("__"))
        )
    if user.op == "call_function":
        if user.target in _MUTATING_FUNCTIONS:
            return True
        if getattr(user.target, "__module__", "") in ("_operator", "operator"):
            return False  # operator.and_ / or_ / not_: the underscore avoids a keyword
        name = getattr(user.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


def _is_view(user: fx.Node, of: fx.Node) -> bool:
    if not user.args or user.args[0] is not of:
        return False
    if user.op == "call_method":
        return user.target in _VIEW_METHODS
    return user.op == "call_function" and user.target in _VIEW_FUNCTIONS


def edited_in_place(mask: fx.Node) -> fx.Node | None:
    """The first node that edits ``mask`` or a tensor it depends on (directly or through a
    view) in place, or None."""
    cone, stack = set(), [mask]
    while stack:  # every node the mask is computed from
        n = stack.pop()
        if isinstance(n, fx.Node) and n not in cone:
            cone.add(n)
            stack.extend(n.all_input_nodes)
    seen = set()
    stack = list(cone)
    while stack:  # those nodes and every view of them
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if _is_mutation(user, n):
                return user
            if _is_view(user, n):
                stack.append(user)
    return None
