"""``torch.ops.hyperpass.hyper_attention_with_plan``: the op of compiled training graphs, which
keeps ``method="select"``'s block lists for its backward.

A compiled graph's backward is a graph of its own, so the public op's backward reruns the
selection (at 131072 tokens half of the forward's time). In training graphs the backend
(:mod:`hyperpass.compiler.training`) swaps select's calls for this op: the same arguments and
the same value, plus the block lists (the *plan*: counts and ids, shapes from the input shapes
alone, :func:`hyperpass.kernels.plan_shapes`). AOTAutograd saves the plan as an activation and
hands it to ``hyper_attention_backward_with_plan``, which runs FlexAttention's forward and
backward over it and skips the selection. A call the kernels do not serve (exact at its length,
on the reference) computes what the public op computes and leaves its plan unset; its backward
recomputes, as the public op's does. Must not import the compiler pass.
"""

from __future__ import annotations

import torch

from hyperpass.config import HyperConfig
from hyperpass.op import signature
from hyperpass.op.registration import (
    autograd_inside_op,
    hyper_attention_backward,
    kernel_module,
    op_forward,
    serving_kernels,
)

_NO_PLAN = ((0,),) * 4


def keeps_plan(q, k, cfg: HyperConfig) -> bool:
    """Whether calls of ``cfg`` on tensors like ``q``/``k`` (real or fake) keep a plan: select
    on CUDA with the kernels importable, not DTensors (whose sharding rules cover the public
    op only)."""
    if cfg.method != "select" or q.device.type != "cuda":
        return False
    if hasattr(q, "placements") or hasattr(k, "placements"):
        return False
    return kernel_module() is not None


def _plan_shapes(q, k, cfg: HyperConfig):
    if not keeps_plan(q, k, cfg):
        return _NO_PLAN
    return kernel_module().plan_shapes(*q.shape[:2], k.shape[1], q.shape[2], k.shape[2], cfg)


@torch.library.custom_op(
    "hyperpass::hyper_attention_with_plan", mutates_args=(),
    schema=signature.PLANNED_FORWARD_SCHEMA,
)  # fmt: skip
@signature.positional("q", "k", "v")
def _with_plan(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params):
    cfg = signature.config_of(params)
    plan = tuple(
        torch.empty(shape, dtype=torch.int32, device=q.device) for shape in _plan_shapes(q, k, cfg)
    )
    out = None
    kernels = serving_kernels(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg)
    if kernels is not None and plan[0].numel():
        out = kernels.select_forward_with_plan(
            q, k, v, plan, is_causal=is_causal, scale=scale, config=cfg, key_mask=attn_mask
        )
    if out is None:  # exact, the reference, or FlexAttention past its recompile limit
        out = op_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, params)
    return (out.contiguous(), *plan)


@_with_plan.register_fake
@signature.positional("q", "k", "v")
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params):
    cfg = signature.config_of(params)
    plan = tuple(q.new_empty(shape, dtype=torch.int32) for shape in _plan_shapes(q, k, cfg))
    return (q.new_empty((*q.shape[:-1], v.shape[-1])), *plan)


@torch.library.custom_op(
    "hyperpass::hyper_attention_backward_with_plan", mutates_args=(),
    schema=signature.PLANNED_BACKWARD_SCHEMA,
)  # fmt: skip
@signature.positional(*signature.PLANNED_BACKWARD_TENSORS)
def _backward_with_plan(grad_out, q, k, v, part_num, part_idx, full_num, full_idx, attn_mask,
                        dropout_p, is_causal, scale, enable_gqa, *params):  # fmt: skip
    cfg = signature.config_of(params)
    kernels = serving_kernels(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg)
    if kernels is not None and part_num.numel():  # the forward wrote the plan
        plan = (part_num, part_idx, full_num, full_idx)
        with autograd_inside_op(), torch.enable_grad():
            grads = kernels.select_backward_over_plan(
                grad_out, q, k, v, plan, is_causal=is_causal, scale=scale, config=cfg,
                key_mask=attn_mask,
            )  # fmt: skip
        if grads is not None:
            return grads
    return hyper_attention_backward(
        grad_out, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params
    )


@_backward_with_plan.register_fake
@signature.positional(*signature.PLANNED_BACKWARD_TENSORS)
def _(grad_out, q, k, v, part_num, part_idx, full_num, full_idx, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask = inputs[:4]
    plan = output[1:]
    ctx.save_for_backward(q, k, v, attn_mask, *plan)
    ctx.mark_non_differentiable(*plan)
    ctx.scalars = inputs[4:]


def _backward(ctx, grad_out, *plan_grads):
    del plan_grads  # integer lists: no gradient
    q, k, v, attn_mask, *plan = ctx.saved_tensors
    dq, dk, dv = hyper_attention_backward_with_plan(
        grad_out, q, k, v, *plan, attn_mask, *ctx.scalars
    )
    return (dq, dk, dv) + (None,) * len(signature.PARAMETERS)


_with_plan.register_autograd(_backward, setup_context=_setup_context)

hyper_attention_with_plan_op = torch.ops.hyperpass.hyper_attention_with_plan.default
hyper_attention_backward_with_plan = torch.ops.hyperpass.hyper_attention_backward_with_plan.default
