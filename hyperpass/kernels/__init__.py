"""Triton kernels of hyperpass, and the one place that dispatches a call to a method's launcher.

``hyperpass.op`` calls these three for CUDA tensors; the reference stays the oracle:

* :func:`unsupported_reason` - None when the kernels serve the inputs and config (their own
  limits only: device, dtype, head dim, int32 positions; the op's eligibility rule came first);
* :func:`hyper_attention_forward` - (out, lse);
* :func:`hyper_attention_backward` - the true (dq, dk, dv) of ``method="hyper"``; the block
  methods' backward is FlexAttention's autograd (:func:`backward_by_autograd`).

and, for the planned op of compiled training graphs (``hyperpass.op.planned``), select's
forward that keeps its block lists and the backward over them (:func:`plan_shapes`,
:func:`select_forward_with_plan`, :func:`select_backward_over_plan`).

Layout: ``hyper/`` (sortLSH, samples, the causal recursion; with ``pattern.py`` for its exact
window/sinks part), ``flex.py`` (the block methods, ``select`` and the patterns, through
PyTorch's FlexAttention) with ``select_blocks.py`` (``select``'s block selection),
``common.py`` / ``host.py`` (shared helpers), ``tuning.py`` (tile table). Importing needs
Triton but no GPU (the tests run the kernels with ``TRITON_INTERPRET=1``). Must not import the
op or the compiler.
"""

from __future__ import annotations

import os

import torch

from hyperpass.config import HyperConfig
from hyperpass.kernels import flex as _flex
from hyperpass.kernels.flex import plan_shapes, select_backward_over_plan, select_forward_with_plan
from hyperpass.kernels.hyper import launch as _hyper
from hyperpass.kernels.tuning import Tuning, tuning_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

__all__ = [
    "Tuning",
    "backward_by_autograd",
    "plan_shapes",
    "select_backward_over_plan",
    "select_forward_with_plan",
    "hyper_attention_backward",
    "hyper_attention_forward",
    "tuning_for",
    "unsupported_reason",
]


def unsupported_reason(q, k, v, is_causal: bool, cfg: HyperConfig) -> str | None:
    """None when the kernels compute exactly the reference's approximation for these inputs
    (q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], already eligible)."""
    del is_causal
    if cfg.block_sparse and not _flex.available():
        return "FlexAttention is not in this PyTorch"
    if not (q.is_cuda or _interpreting()) or q.device != k.device or q.device != v.device:
        return "kernels need CUDA tensors on one device"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (kernels take fp16, bf16, fp32)"
    if not (16 <= q.shape[-1] <= MAX_HEAD_DIM and 16 <= v.shape[-1] <= MAX_HEAD_DIM):
        return f"head dims {q.shape[-1]}/{v.shape[-1]} outside [16, {MAX_HEAD_DIM}]"
    if min(q.shape[2], k.shape[2]) == 0 or q.shape[0] == 0 or k.shape[1] == 0:
        return "empty sequence, batch or heads"
    if max(q.shape[2], k.shape[2]) >= 2**30:
        return "sequence too long for int32 positions"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def hyper_attention_forward(
    q, k, v, *, is_causal: bool, scale: float | None, config: HyperConfig, with_lse: bool = True,
    tuning: Tuning | None = None, key_mask=None,
):  # fmt: skip
    """The approximation's (out [B, Hq, Nq, Dv], lse [B, Hq, Nq] fp32 or None without
    ``with_lse``; the block methods return none); ``tuning`` pins the tiles of the hyper
    kernels (tests); ``key_mask``: a boolean key-padding mask [B, 1, 1, Nk] (select only)."""
    if config.method == "select":
        return _flex.select_forward(
            q, k, v, is_causal=is_causal, scale=scale, config=config, key_mask=key_mask
        )
    if key_mask is not None:
        raise ValueError(f"key_mask needs method='select', got method={config.method!r}")
    if config.block_sparse:
        return _flex.pattern_forward(q, k, v, is_causal=is_causal, scale=scale, config=config)
    return _hyper.hyper_attention_forward(
        q, k, v, is_causal=is_causal, scale=scale, config=config, with_lse=with_lse,
        tuning=tuning,
    )  # fmt: skip


def hyper_attention_backward(
    grad_out, q, k, v, *, is_causal: bool, scale: float | None, config: HyperConfig,
    tuning: Tuning | None = None,
):  # fmt: skip
    """(dq, dk, dv) of ``method="hyper"``, in the inputs' dtypes."""
    if backward_by_autograd(config):
        raise ValueError(f"method={config.method!r}: differentiate the forward instead")
    return _hyper.hyper_attention_backward(
        grad_out, q, k, v, is_causal=is_causal, scale=scale, config=config, tuning=tuning
    )


def backward_by_autograd(config: HyperConfig) -> bool:
    """The method's gradients come from differentiating its forward (FlexAttention's autograd),
    not from :func:`hyper_attention_backward`."""
    return config.block_sparse
