"""Small helpers over Dynamo FX graphs shared by the compiler's modules: a node's fake value,
size equality that never guards, fixed symbolic scalars, call matching, node emission.
Imports torch only."""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

log = logging.getLogger("hyperpass")


def meta_of(node):
    """The fake tensor a node produces (``example_value`` or ``val``), or None."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def same_size(a, b) -> bool:
    """Two sizes (ints or SymInts) known to be equal, without installing a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - an undecidable comparison is "not known equal"
        return False


def concrete_scalar(x):
    """A SymFloat/SymInt node whose value a guard already fixed (SDPA guards its ``scale``):
    its Python value, so that AOTAutograd need not specialize it and restart the trace."""
    if not isinstance(x, fx.Node):
        return x
    value = x.meta.get("example_value")
    if not isinstance(value, torch.SymFloat | torch.SymInt):
        return x
    try:
        fixed = value.node.shape_env.replace(value.node.expr)
    except Exception:  # noqa: BLE001 - not a plain symbol: keep the node
        return x
    if getattr(fixed, "is_number", False) and value.node.hint is not None:
        return type(value.node.hint)(value.node.hint)
    return x


def is_call(node, name: str) -> bool:
    """A call_method ``name`` or a call_function of ``torch.name`` / ``operator.name``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target == name
    if node.op == "call_function":
        return node.target in (getattr(torch, name, None), getattr(operator, name, None)) or (
            getattr(node.target, "__name__", None) == name
            and getattr(node.target, "__module__", "") in ("torch", "_operator", "operator")
        )
    return False


def call_in(node, fns, methods) -> bool:
    """A call_function of one of ``fns`` or a call_method named in ``methods``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in fns
    return node.op == "call_method" and node.target in methods


def emit(graph: fx.Graph, op: str, target, args) -> fx.Node:
    """Add a node and fill its ``example_value`` from the inputs' fake values."""
    node = graph.create_node(op, target, args)
    values = [a.meta.get("example_value") if isinstance(a, fx.Node) else a for a in args]
    mode = next((x.fake_mode for x in values if hasattr(x, "fake_mode")), None)
    if mode is None:
        return node
    try:
        with mode:
            if op == "call_method":
                node.meta["example_value"] = getattr(values[0], target)(*values[1:])
            else:
                node.meta["example_value"] = target(*values)
    except Exception as err:  # noqa: BLE001 - metadata only; AOTAutograd re-traces anyway
        log.debug("hyperpass: no example_value for %s (%s)", node, err)
    return node


def remove_orphans(graph: fx.Graph, roots) -> None:
    """Erase the nodes a rewrite left without users, from ``roots`` up through their inputs,
    where they are pure. Not a whole-graph dead-code pass: a user's graph may hold nodes whose
    value nobody reads but whose effect matters (in-place methods, distributed ops), which
    ``Graph.eliminate_dead_code`` drops (an in-place ``copy_`` of a tensor-parallel HF model:
    it then computed another answer)."""
    stack, erased = list(roots), set()
    while stack:
        node = stack.pop()
        if node in erased or node.users or not _pure(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)


_IN_PLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul,
    operator.ilshift, operator.irshift,
}  # fmt: skip


def _pure(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    if node.target in _IN_PLACE_OPERATORS:
        return False
    module = str(getattr(node.target, "__module__", ""))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    # in place: ``x.add_()``, ``torch.relu_`` (not ``operator.and_``, which is not)
    if module != "_operator" and name.endswith("_") and not name.endswith("__"):
        return False
    return "distributed" not in module
