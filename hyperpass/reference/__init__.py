"""HyperAttention in plain PyTorch: the oracle of every test, and the CPU implementation.

One module per method: :mod:`~hyperpass.reference.hyper` (sortLSH, samples, the causal
recursion; also the window/sinks patterns ``local``, ``dilated``, ``longformer``) and
:mod:`~hyperpass.reference.select` (key blocks ranked by the exact scores of sampled rows, or by
a score bound); shared parts:
:mod:`~hyperpass.reference.softmax` (partial softmax, log-sum-exp merge),
:mod:`~hyperpass.reference.positions`, :mod:`~hyperpass.reference.lsh`,
:mod:`~hyperpass.reference.exact`. :func:`hyper_attention_reference` is the one place that
dispatches on the method. Must not import the kernels or Triton.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hyperpass.config import DEFAULT, HyperConfig
from hyperpass.reference.exact import exact_attention
from hyperpass.reference.hyper import hyper_attention
from hyperpass.reference.select import select_attention

__all__ = ["exact_attention", "hyper_attention_reference"]


def hyper_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    config: HyperConfig = DEFAULT,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """HyperAttention of q [B, Hq, Nq, D] over k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv].

    Always approximates (the op decides when to; see :mod:`hyperpass.op.eligibility`).
    Accumulates in fp32 (fp64 for fp64 inputs). Deterministic for a given ``config.seed``.
    Query head h reads KV head ``h // (Hq / Hkv)``; internally q is viewed as
    [B, Hkv, G, Nq, D].

    ``key_mask``: a boolean key-padding mask broadcastable to [B, 1, 1, Nk] (``method="select"``
    only): masked keys are never attended (the selection still scores their blocks); a query
    with no key left gets 0.

    Returns:
        (out [B, Hq, Nq, Dv] in q's dtype, lse [B, Hq, Nq] fp32 natural-log log-sum-exp)

    Raises:
        ValueError: on shapes it cannot serve (not 4-D, Hq not a multiple of Hkv, causal with
            Nq != Nk, a key mask with a method other than select).
    """
    _check_shapes(q, k, v, is_causal)
    if key_mask is not None and config.method != "select":
        raise ValueError(f"key_mask needs method='select', got method={config.method!r}")
    batch, q_heads, nq, dim = q.shape
    kv_heads = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    qg = (q.to(acc) * scale).view(batch, kv_heads, q_heads // kv_heads, nq, dim)
    k_acc, v_acc = k.to(acc), v.to(acc)
    if config.method == "select":
        valid = None if key_mask is None else key_valid(key_mask, batch, k.shape[2])
        out, lse = select_attention(qg, k_acc, v_acc, config, is_causal, rep_dtype=k.dtype,
                                    key_valid=valid)  # fmt: skip
    else:
        out, lse = hyper_attention(qg, k_acc, v_acc, config, is_causal)
    out = out.reshape(batch, q_heads, nq, v.shape[-1]).to(q.dtype)
    return out, lse.reshape(batch, q_heads, nq).float()


def key_valid(key_mask: Tensor, batch: int, n_keys: int) -> Tensor:
    """[B, Nk] bool of a key-padding mask broadcastable to [B, 1, 1, Nk]."""
    if (
        key_mask.dtype != torch.bool
        or key_mask.dim() < 1
        or key_mask.numel() not in (n_keys, batch * n_keys)
    ):
        raise ValueError(
            f"key_mask must be a boolean [B, 1, 1, Nk] mask, got {key_mask.dtype} "
            f"{tuple(key_mask.shape)} for B={batch}, Nk={n_keys}"
        )
    return key_mask.reshape(-1, n_keys).expand(batch, n_keys)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> None:
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(
            f"q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})"
        )
    if is_causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal needs Nq == Nk, got Nq={q.shape[2]}, Nk={k.shape[2]}")
