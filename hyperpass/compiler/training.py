"""Training graphs: select's rewritten sites keep their block lists for the backward.

A compiled graph's backward is a graph of its own, so ``hyper_attention``'s backward would
rerun the selection. In a graph that autograd will differentiate, each rewritten call that
keeps a plan (``method="select"`` on CUDA, :func:`hyperpass.op.keeps_plan`) becomes one call of
``hyperpass::hyper_attention_with_plan`` (same arguments, same value) and a getitem of its
attention: AOTAutograd then saves the lists for the backward (``hyperpass.op.planned``). Runs
after the rewrite, on the same Dynamo graph. Must not import the kernels.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from hyperpass.compiler.fx_utils import emit, meta_of
from hyperpass.op import hyper_attention_op, hyper_attention_with_plan_op, keeps_plan
from hyperpass.op.signature import N_SDPA_ARGS, config_of

log = logging.getLogger("hyperpass")

# False: training graphs keep the public op, whose backward recomputes the selection (less
# memory between the forward and the backward: the lists, about 8 bytes per key block per tile)
KEEP_PLANS = True


def is_training_graph(gm: fx.GraphModule, example_inputs) -> bool:
    """Autograd will record the graph: gradients are on and an input or parameter needs them."""
    if not KEEP_PLANS or not torch.is_grad_enabled():
        return False
    tensors = [t for t in example_inputs or () if isinstance(t, torch.Tensor)]
    return any(t.requires_grad for t in (*tensors, *gm.parameters()))


def keep_plans(gm: fx.GraphModule) -> int:
    """Swap the graph's planned sites (see the module doc) in place; how many were swapped."""
    swapped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not hyper_attention_op:
            continue
        q, k = meta_of(node.args[0]), meta_of(node.args[1])
        cfg = config_of(node.args[N_SDPA_ARGS:])
        if q is None or k is None or not keeps_plan(q, k, cfg):
            continue
        with gm.graph.inserting_before(node):
            planned = emit(gm.graph, "call_function", hyper_attention_with_plan_op, node.args)
            out = emit(gm.graph, "call_function", operator.getitem, (planned, 0))
        out.meta.update({key: value for key, value in node.meta.items() if key not in out.meta})
        if "nn_module_stack" in node.meta:
            planned.meta.setdefault("nn_module_stack", node.meta["nn_module_stack"])
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        swapped += 1
    if swapped:
        gm.graph.lint()
        gm.recompile()
        log.info("hyperpass: %d select site(s) keep their block lists for the backward", swapped)
    return swapped
