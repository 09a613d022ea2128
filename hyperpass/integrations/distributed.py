"""The op under ``torch.distributed``: DTensor sharding rules for ``hyper_attention`` and its
backward, so tensor parallelism (heads sharded) and data parallelism (batch sharded) run the op
locally, with no communication of its own.

Attention is independent per head and per batch row, so:

- q, k, v sharded on the head dim (``Shard(1)``), output and gradients sharded the same way.
  With GQA the query and KV heads shard consistently when both counts divide by the mesh size
  (query head h reads KV head h // G on every rank). Every method is exact per head this way:
  the hyperplanes and samples do not depend on the head count.
- sharded on the batch dim (``Shard(0)``): only for methods without samples (the sampled keys
  are drawn per batch row, so a local batch would draw other rows' samples).
- replicated everywhere: always allowed. Anything else (a sequence-sharded input, a mask) is
  redistributed by DTensor to one of these.

Importing this module registers the rules (``import hyperpass`` does it when
``torch.distributed.tensor`` is already loaded). Imports torch.distributed.tensor.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from hyperpass.op import hyper_attention_backward, hyper_attention_op
from hyperpass.op.signature import N_SDPA_ARGS, config_of

__all__ = ["strategies"]


def _divides(mesh_size: int, *sizes: int) -> bool:
    return all(size % mesh_size == 0 for size in sizes)


def strategies(q, k, n_tensors: int, has_mask: bool, uses_samples: bool, mesh_size: int | None):
    """[(output placements, input placements)] of an op call with ``n_tensors`` leading tensor
    arguments (q, k, v, or grad_out, q, k, v) and ``n_outputs`` as the op returns."""
    rest = [Replicate() if has_mask else None] + [None] * (N_SDPA_ARGS - 4)
    out_count = 1 if n_tensors == 3 else 3
    options = [([Replicate()] * out_count, [Replicate()] * n_tensors + rest)]
    if has_mask:
        return options
    heads_ok = mesh_size is None or _divides(mesh_size, q.shape[1], k.shape[1])
    if heads_ok:
        options.append(([Shard(1)] * out_count, [Shard(1)] * n_tensors + rest))
    if not uses_samples:
        options.append(([Shard(0)] * out_count, [Shard(0)] * n_tensors + rest))
    return options


def _mesh_size(t) -> int | None:
    mesh = getattr(t, "mesh", None) or getattr(getattr(t, "spec", None), "mesh", None)
    return None if mesh is None else mesh.size()


@register_sharding(hyper_attention_op)
def _forward_sharding(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *params):
    cfg = config_of(params)
    shardings = strategies(q, k, 3, attn_mask is not None, cfg.uses_samples, _mesh_size(q))
    return [(out, ins + [None] * len(params)) for out, ins in shardings]


@register_sharding(hyper_attention_backward)
def _backward_sharding(grad_out, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                       *params):  # fmt: skip
    cfg = config_of(params)
    shardings = strategies(q, k, 4, attn_mask is not None, cfg.uses_samples, _mesh_size(q))
    return [(out, ins + [None] * len(params)) for out, ins in shardings]
