"""``torch.ops.hyperpass.hyper_attention``: the op the compiler pass rewrites attention into.

Its signature is :mod:`hyperpass.op.signature`'s (SDPA's arguments, then every
:class:`~hyperpass.config.HyperConfig` field); :mod:`hyperpass.op.eligibility` decides which calls
are exact. Registered once, when this module
is imported, with a fake implementation (symbolic shapes), autograd (through a second op that
computes the gradients), and a run-time dispatch: calls the approximation cannot serve go to exact
``F.scaled_dot_product_attention``, so they compute what the un-rewritten model computes.

The CPU implementation is the reference; CUDA tensors go to the Triton kernels when
``hyperpass.kernels`` can serve them (imported lazily, so importing this module never imports
Triton), else to the reference. Must not import the compiler pass.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from hyperpass import config as _config
from hyperpass.config import HyperConfig
from hyperpass.op import signature
from hyperpass.op.eligibility import one_exact_leaf, skip_reason
from hyperpass.reference import hyper_attention_reference

log = logging.getLogger("hyperpass")


def _exact(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    if attn_mask is not None and is_causal:  # causal AND a key-padding mask (SDPA takes one)
        attn_mask, is_causal = causal_and(attn_mask, q.shape[-2], k.shape[-2]), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        **kwargs,
    )  # fmt: skip


def causal_and(key_mask: Tensor, nq: int, nk: int) -> Tensor:
    """Causal AND a key-padding mask, as the one boolean mask SDPA takes."""
    return key_mask & torch.ones(nq, nk, dtype=torch.bool, device=key_mask.device).tril()


def kernel_module():
    """The Triton kernels for CUDA tensors, or None where they cannot be imported."""
    try:
        from hyperpass import kernels
    except ImportError as err:  # no Triton
        log.debug("hyperpass.kernels unavailable (%s); CUDA inputs use the reference", err)
        return None
    return kernels


def _approximate(q, k, v, key_mask, is_causal, scale, cfg):
    kernels = kernel_module() if q.is_cuda else None
    if kernels is not None and kernels.unsupported_reason(q, k, v, is_causal, cfg) is None:
        return kernels.hyper_attention_forward(
            q, k, v, is_causal=is_causal, scale=scale, config=cfg, with_lse=False,
            key_mask=key_mask,
        )[0]  # fmt: skip
    return hyper_attention_reference(
        q, k, v, is_causal=is_causal, scale=scale, config=cfg, key_mask=key_mask
    )[0]


def op_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, params) -> Tensor:
    cfg = signature.config_of(params)
    reason = skip_reason(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg)
    if reason is not None or one_exact_leaf(q.shape[-2], is_causal, cfg):
        return _exact(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _approximate(q, k, v, attn_mask, is_causal, scale, cfg)


# ----------------------------------------------------------------------------- the ops
@torch.library.custom_op(
    "hyperpass::hyper_attention", mutates_args=(), schema=signature.FORWARD_SCHEMA
)
@signature.positional("q", "k", "v")
def _hyper_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params):
    args = (attn_mask, dropout_p, is_causal, scale, enable_gqa, params)
    _KEPT.entry = None
    if KEEP_FORWARD_GRAPH and any(t.requires_grad for t in (q, k, v)):
        cfg = signature.config_of(params)
        kernels = serving_kernels(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg)
        if kernels is not None and kernels.backward_by_autograd(cfg):
            return _forward_keeping_graph(q, k, v, *args)
    return op_forward(q, k, v, *args).contiguous()


# Eager calls that autograd records run the block methods' forward under autograd and hand its
# graph to their backward (through ``_KEPT``, the op's impl to its setup_context within one
# autograd.Function.forward), which then skips recomputing the selection and FlexAttention's
# forward; the lists, lse and sink copies live until the backward. Calls traced by torch.compile
# recompute (their backward is a separate graph). False: always recompute (less memory). An
# entry no setup_context took (inputs requiring grad under no_grad) lives until the next call.
KEEP_FORWARD_GRAPH = True
_KEPT = threading.local()


def serving_kernels(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg):
    """``hyperpass.kernels`` when they compute this call's approximation, else None (exact,
    the reference, or no Triton)."""
    if not q.is_cuda or one_exact_leaf(q.shape[-2], is_causal, cfg):
        return None
    if skip_reason(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg) is not None:
        return None
    kernels = kernel_module()
    if kernels is None or kernels.unsupported_reason(q, k, v, is_causal, cfg) is not None:
        return None
    return kernels


def _forward_keeping_graph(q, k, v, *args) -> Tensor:
    with autograd_inside_op(), torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = op_forward(*inputs, *args)
    result = out.detach().contiguous()
    _KEPT.entry = (weakref.ref(result), out, inputs)  # a weak key: ids of dead tensors recur
    return result


@_hyper_attention.register_fake
@signature.positional("q", "k", "v")
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def autograd_inside_op():
    """Re-enable autograd dispatch inside an op's kernel.

    A custom op's kernel runs below the autograd dispatch keys, so ``torch.enable_grad()`` alone
    records nothing there. The backward op recomputes the forward under autograd to get the exact
    gradients of the approximation, so it lifts that exclusion for the recomputation only.
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (
        keys.AutogradFunctionality,
        keys.AutogradOther,
        keys.AutogradNestedTensor,
        keys.ADInplaceOrView,
    ):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op(
    "hyperpass::hyper_attention_backward", mutates_args=(), schema=signature.BACKWARD_SCHEMA
)
@signature.positional("grad_out", "q", "k", "v")
def _hyper_attention_backward(
    grad_out, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params
):
    cfg = signature.config_of(params)
    kernels = serving_kernels(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg)
    if kernels is not None and not kernels.backward_by_autograd(cfg):
        return kernels.hyper_attention_backward(
            grad_out, q, k, v, is_causal=is_causal, scale=scale, config=cfg
        )
    # Recompute the forward under autograd: the gradients of exactly what the forward computed.
    # Dropout would draw a new mask here, so training with dropout is not supported exactly.
    with autograd_inside_op(), torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = op_forward(*inputs, attn_mask, dropout_p, is_causal, scale, enable_gqa, params)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return tuple(
        torch.zeros_like(t) if g is None else g.contiguous()
        for g, t in zip(grads, inputs, strict=True)
    )


@_hyper_attention_backward.register_fake
@signature.positional("grad_out", "q", "k", "v")
def _(grad_out, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params):
    # contiguous, like the real gradients (``g.contiguous()``): empty_like would keep a
    # transposed input's strides and AOTAutograd would plan views the real tensors do not allow
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask = inputs[:4]  # the autograd layer passes every argument, defaults filled
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.scalars = inputs[4:]
    entry, _KEPT.entry = getattr(_KEPT, "entry", None), None
    ctx.kept = entry[1:] if entry is not None and entry[0]() is output else None


def _backward(ctx, grad_out):
    kept, ctx.kept = ctx.kept, None  # once: a second backward (retain_graph) recomputes
    if kept is not None:
        out, inputs = kept
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        dq, dk, dv = (
            torch.zeros_like(t) if g is None else g.contiguous()
            for g, t in zip(grads, inputs, strict=True)
        )
    else:
        q, k, v, attn_mask = ctx.saved_tensors
        dq, dk, dv = hyper_attention_backward(grad_out, q, k, v, attn_mask, *ctx.scalars)
    return (dq, dk, dv) + (None,) * (len(signature.PARAMETERS))


_hyper_attention.register_autograd(_backward, setup_context=_setup_context)

hyper_attention_op = torch.ops.hyperpass.hyper_attention.default
hyper_attention_backward = torch.ops.hyperpass.hyper_attention_backward.default


def hyper_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    config: HyperConfig | None = None,
    **params,
) -> Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` that approximates long sequences.

    Args:
        q: [B, Hq, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]. With ``enable_gqa``, Hkv
            divides Hq and query head h reads KV head ``h // (Hq // Hkv)``.
        attn_mask, dropout_p, is_causal, scale, enable_gqa: as in SDPA, but for one extension:
            a boolean key-padding mask ``[B, 1, 1, Nk]`` may come with ``is_causal`` (causal AND
            the mask), and ``method="select"`` approximates it (padded keys never attended;
            a query with no key gets 0). Any other mask, or dropout, makes the call exact;
            ``is_causal`` with Nq == Nk is approximated.
        config: a :class:`HyperConfig`; ``**params`` override its fields (``block_size=512``).

    Returns:
        [B, Hq, Nq, Dv]: exact SDPA when ``skip_reason`` names a reason (shorter than
        ``min_len``, a mask, dropout, decode-shaped...) or the causal recursion is one exact
        leaf (``method="hyper"``, Nq <= ``min_seq_len``), else the approximation.

    Raises:
        ValueError: a parameter out of range (the message names it).
        TypeError: an unknown parameter name.
    """
    overrides = tuple(sorted(params.items()))
    # no config object crosses into Dynamo's constant function where none was given: torch 2.11
    # cannot reconstruct a frozen dataclass there
    values = _param_values(config, overrides) if config is not None else _default_values(overrides)
    if not torch.compiler.is_compiling():  # eager: an exact call skips the op's dispatch
        cfg = signature.config_of(values)
        reason = skip_reason(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg)
        if reason is not None or one_exact_leaf(q.shape[-2], is_causal, cfg):
            return _exact(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return hyper_attention_op(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *values)


@torch.compiler.assume_constant_result
def _param_values(config: HyperConfig, overrides: tuple) -> tuple:
    """The op's parameter arguments, validated; a compile-time constant under Dynamo."""
    return _validated_values(config, overrides)


@torch.compiler.assume_constant_result
def _default_values(overrides: tuple) -> tuple:
    return _validated_values(_config.DEFAULT, overrides)


@functools.lru_cache(maxsize=256)
def _validated_values(config: HyperConfig, overrides: tuple) -> tuple:
    return tuple(config.replace(**dict(overrides)).as_dict().values())
