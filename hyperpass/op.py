"""``torch.ops.hyperpass.hyper_attention``: the op the compiler pass rewrites attention into.

SDPA-shaped (``q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa``) plus the fields of
:class:`~hyperpass.config.HyperConfig`, whose defaults it takes. Registered once, when this module
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

import torch
import torch.nn.functional as F
from torch import Tensor

from hyperpass import config as _config
from hyperpass.config import HyperConfig
from hyperpass.reference import hyper_attention_reference

log = logging.getLogger("hyperpass")

_SDPA_ARGS = (
    "Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, float? scale=None, bool enable_gqa=False"
)
_SCHEMA_TYPES = {int: "int", str: "str"}
APPROX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _param_schema() -> str:
    parts = []
    for name, default in _config.DEFAULT.as_dict().items():
        literal = f'"{default}"' if isinstance(default, str) else str(default)
        parts.append(f"{_SCHEMA_TYPES[type(default)]} {name}={literal}")
    return ", ".join(parts)


FORWARD_SCHEMA = f"({_SDPA_ARGS}, {_param_schema()}) -> Tensor"
BACKWARD_SCHEMA = f"(Tensor grad_out, {_SDPA_ARGS}, {_param_schema()}) -> (Tensor, Tensor, Tensor)"


# ----------------------------------------------------------------------------- dispatch
def skip_reason(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    enable_gqa: bool,
    cfg: HyperConfig,
) -> str | None:
    """Why this call must be exact (a short reason), or None when it is approximated.

    Shared by the op's run-time dispatch and by the compiler pass's report.
    """
    if attn_mask is not None:
        return "attention mask the approximation cannot serve"
    if dropout_p > 0.0:
        return "dropout"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return "not 4-D [B, H, N, D]"
    if q.dtype not in APPROX_DTYPES:
        return f"dtype {q.dtype}"
    nq, nk = q.shape[-2], k.shape[-2]
    if q.shape[1] != k.shape[1] and (not enable_gqa or q.shape[1] % k.shape[1]):
        return "query heads do not match KV heads (and enable_gqa is off)"
    if is_causal and nq != nk:
        return f"causal with Nq={nq} != Nk={nk} (decode or chunked prefill)"
    if min(nq, nk) < cfg.min_len:
        return f"sequence {min(nq, nk)} shorter than min_len={cfg.min_len}"
    return None


def _exact(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        **kwargs,
    )


def _kernel_module():
    """The Triton kernels for CUDA tensors, or None where they cannot be imported."""
    try:
        from hyperpass import kernels
    except ImportError as err:  # no Triton, or no kernels in this build
        log.debug("hyperpass.kernels unavailable (%s); CUDA inputs use the reference", err)
        return None
    return kernels if hasattr(kernels, "hyper_attention_forward") else None


def _approximate(q, k, v, is_causal, scale, cfg):
    kernels = _kernel_module() if q.is_cuda else None
    if kernels is not None and kernels.unsupported_reason(q, k, v, is_causal, cfg) is None:
        return kernels.hyper_attention_forward(
            q, k, v, is_causal=is_causal, scale=scale, config=cfg, with_lse=False
        )[0]
    return hyper_attention_reference(q, k, v, is_causal=is_causal, scale=scale, config=cfg)[0]


def one_exact_leaf(nq: int, is_causal: bool, cfg: HyperConfig) -> bool:
    """The causal recursion on ``nq <= min_seq_len`` rows is one exact leaf: exact attention,
    which SDPA computes faster and in less memory than any approximation kernel."""
    return cfg.causal_recursion(is_causal) and nq <= cfg.min_seq_len


@functools.lru_cache(maxsize=256)
def _config_of(params: tuple) -> HyperConfig:
    """The config of an op call's parameter values (validated once per distinct values)."""
    return HyperConfig(*params)


def _forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, params) -> Tensor:
    cfg = _config_of(params)
    reason = skip_reason(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg)
    if reason is not None or one_exact_leaf(q.shape[-2], is_causal, cfg):
        return _exact(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _approximate(q, k, v, is_causal, scale, cfg)


# ----------------------------------------------------------------------------- the ops
_SDPA_DEFAULTS = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}


def _all_arguments(*tensor_names: str):
    """Bind a kernel's arguments to its full schema order, filling defaults.

    The dispatcher omits trailing arguments equal to their schema defaults when it calls a
    Python kernel, so kernels take ``*args, **kwargs`` and receive everything positionally here.
    (By hand, not ``inspect.Signature.bind``: that took half of the op's host time per call.)
    """
    defaults = {**_SDPA_DEFAULTS, **_config.DEFAULT.as_dict()}
    names = (*tensor_names, *defaults)
    position = {name: i for i, name in enumerate(names)}
    required = len(tensor_names)
    fill = tuple(defaults.values())

    def decorate(kernel):
        @functools.wraps(kernel)
        def with_defaults(*args, **kwargs):
            if len(args) > len(names):
                raise TypeError(f"{kernel.__name__}: {len(args)} arguments, at most {len(names)}")
            given = [*args, *[_MISSING] * (required - len(args))]
            values = [*given, *fill[len(given) - required :]]
            for name, value in kwargs.items():
                if name not in position or position[name] < len(args):
                    raise TypeError(f"{kernel.__name__}: unexpected or repeated argument {name!r}")
                values[position[name]] = value
            missing = [n for n, value in zip(names, values, strict=True) if value is _MISSING]
            if missing:
                raise TypeError(f"{kernel.__name__}: missing argument(s) {missing}")
            return kernel(*values)

        return with_defaults

    return decorate


_MISSING = object()


@torch.library.custom_op("hyperpass::hyper_attention", mutates_args=(), schema=FORWARD_SCHEMA)
@_all_arguments("q", "k", "v")
def _hyper_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params):
    out = _forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, params)
    return out.contiguous()


@_hyper_attention.register_fake
@_all_arguments("q", "k", "v")
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _autograd_inside_op():
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
    "hyperpass::hyper_attention_backward", mutates_args=(), schema=BACKWARD_SCHEMA
)
@_all_arguments("grad_out", "q", "k", "v")
def _hyper_attention_backward(
    grad_out, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params
):
    cfg = _config_of(params)
    reason = skip_reason(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg)
    if q.is_cuda and reason is None and not one_exact_leaf(q.shape[-2], is_causal, cfg):
        kernels = _kernel_module()
        if kernels is not None and kernels.unsupported_reason(q, k, v, is_causal, cfg) is None:
            return kernels.hyper_attention_backward(
                grad_out, q, k, v, is_causal=is_causal, scale=scale, config=cfg
            )
    # Recompute the forward under autograd: the gradients of exactly what the forward computed.
    # Dropout would draw a new mask here, so training with dropout is not supported exactly.
    with _autograd_inside_op(), torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = _forward(*inputs, attn_mask, dropout_p, is_causal, scale, enable_gqa, params)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return tuple(
        torch.zeros_like(t) if g is None else g.contiguous()
        for g, t in zip(grads, inputs, strict=True)
    )


@_hyper_attention_backward.register_fake
@_all_arguments("grad_out", "q", "k", "v")
def _(grad_out, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params):
    # contiguous, like the real gradients (``g.contiguous()``): empty_like would keep a
    # transposed input's strides and AOTAutograd would plan views the real tensors do not allow
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_N_SDPA_ARGS = 8


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask = inputs[:4]  # the autograd layer passes every argument, defaults filled
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.scalars = inputs[4:]


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    dq, dk, dv = hyper_attention_backward(grad_out, q, k, v, attn_mask, *ctx.scalars)
    return (dq, dk, dv) + (None,) * (_N_SDPA_ARGS - 3 + len(_config.field_names()))


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
        attn_mask, dropout_p, is_causal, scale, enable_gqa: as in SDPA. A mask or dropout makes
            the call exact; ``is_causal`` with Nq == Nk is approximated.
        config: a :class:`HyperConfig`; ``**params`` override its fields (``block_size=512``).

    Returns:
        [B, Hq, Nq, Dv]: exact SDPA when ``skip_reason`` names a reason (shorter than
        ``min_len``, a mask, dropout, decode-shaped...) or the causal recursion is one exact
        leaf (``method="hyper"``, Nq <= ``min_seq_len``), else the approximation.

    Raises:
        ValueError: a parameter out of range (the message names it).
        TypeError: an unknown parameter name.
    """
    values = _param_values(config or _config.DEFAULT, tuple(sorted(params.items())))
    return hyper_attention_op(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *values)


@torch.compiler.assume_constant_result
def _param_values(config: HyperConfig, overrides: tuple) -> tuple:
    """The op's parameter arguments, validated; a compile-time constant under Dynamo."""
    return tuple(config.replace(**dict(overrides)).as_dict().values())
