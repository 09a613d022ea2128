"""Block-sparse exact attention through PyTorch's FlexAttention: the engine of the block methods.

``method="select"`` gives each query tile its key blocks (``select_blocks.py``); the patterns
(``local``, ``dilated``, ``longformer``) give every head the same blocks, cached per shape. Both
run one compiled ``flex_attention`` call over a ``BlockMask`` (``BlockMask.from_kv_blocks``):
*full* blocks without a mask, *partial* blocks through a ``mask_mod`` (the causal diagonal, a
window's edge, a dilation). FlexAttention's kernels are PyTorch's own (Triton templates chosen
per GPU, forward and backward); measured against this project's own kernels in
``docs/performance.md``.

With gradients enabled (the op's backward recomputes its forward under autograd) the mask also
gets its query-major lists, which FlexAttention's backward reads. Must not import the op or the
compiler.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from hyperpass.config import HyperConfig
from hyperpass.kernels.host import cdiv
from hyperpass.kernels.query_major import query_major_lists
from hyperpass.reference import key_valid

log = logging.getLogger("hyperpass")

PATTERN_BLOCK = 128  # query and key tile of the pattern masks (FlexAttention's default)


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex_with_valid_keys(q, k, v, valid, **kw):
    """FlexAttention where only keys with ``valid[b, j]`` count: a score mod, so that full
    blocks (which skip mask_mod) drop padded keys too."""
    from torch.nn.attention.flex_attention import flex_attention

    def padding(score, b, h, q_idx, kv_idx):
        return torch.where(valid[b, kv_idx], score, float("-inf"))

    return flex_attention(q, k, v, score_mod=padding, **kw)


@functools.cache
def _compiled(dynamic: bool, padded: bool = False):
    from torch.nn.attention.flex_attention import flex_attention

    # fullgraph: past Dynamo's recompile limit, a call raises instead of running FlexAttention
    # uncompiled, which evaluates mask_mod densely and reads no block list (a wrong answer here)
    fn = _flex_with_valid_keys if padded else flex_attention
    return torch.compile(fn, dynamic=dynamic, fullgraph=True)


_RECOMPILE_LIMIT = 64  # masks and shape families one process may compile FlexAttention for
_LIMIT_HIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", RuntimeError)


def _flex(q, k, v, block_mask, scale, gqa: bool, kernel_options, dynamic: bool, valid=None):
    kw = dict(block_mask=block_mask, scale=scale, enable_gqa=gqa, kernel_options=kernel_options)
    args = (q, k, v) if valid is None else (q, k, v, valid)
    # uncompiled, FlexAttention reads no block list (it evaluates mask_mod densely): always
    # compile, on a CPU too (the tests). Select's masks take no constant: on CUDA one compile
    # serves every length; patterns and CPUs (whose lowering takes static shapes only) compile
    # per shape family (Dynamo's automatic dynamic shapes)
    try:
        with torch._dynamo.config.patch(
            recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=8 * _RECOMPILE_LIMIT
        ):
            return _compiled(q.is_cuda and dynamic, valid is not None)(*args, **kw)
    except _LIMIT_HIT:
        log.warning(
            "hyperpass: FlexAttention was compiled for more than %d masks and shapes in this "
            "process; this call runs the reference implementation (correct, slower)",
            _RECOMPILE_LIMIT,
        )
        return None


# ----------------------------------------------------------------------------- mask mods
@functools.cache
def causal_mod():
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return causal


@functools.cache
def no_mask_mod():
    """Non-causal select has no partial block; FlexAttention still traces a mask_mod (its own
    default fails under fake tensors on torch 2.13)."""

    def everything(b, h, q_idx, kv_idx):
        return kv_idx >= 0

    return everything


@functools.cache
def pattern_mod(window: int, dilation: int, sinks: int, causal: bool):
    """The reference's window/dilation/sinks predicate (``positions.in_window`` plus sinks)."""

    def pattern(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        near = (d >= 0) & (d < window) if causal else (d < window) & (d > -window)
        if dilation > 1:
            near = near & (d % dilation == 0)
        sink = kv_idx < sinks
        if causal:
            sink = sink & (d >= 0)
        return near | sink

    return pattern


# ----------------------------------------------------------------------------- block masks
def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(counts, ascending ids) of the True entries of ``dense`` [..., rows, cols], int32."""
    counts = dense.sum(-1, dtype=torch.int32)
    cols = torch.arange(dense.shape[-1], device=dense.device, dtype=torch.int32)
    key = torch.where(dense, cols, dense.shape[-1] + cols)  # True ids first, in order
    return counts, key.argsort(-1).to(torch.int32)


def block_mask_from_lists(part_num, part_idx, full_num, full_idx, nq, nk, qb, kb, mask_mod,
                          backward: bool):  # fmt: skip
    """A BlockMask of per-tile lists ([B, H, n_tiles, n_blocks] int32, ids up to the counts);
    ``backward`` adds the query-major lists FlexAttention's backward reads (``query_major``:
    no sort, unlike ``BlockMask.from_kv_blocks``)."""
    from torch.nn.attention.flex_attention import BlockMask

    q_lists = (None,) * 4
    if backward:
        q_lists = query_major_lists(part_num, part_idx, full_num, full_idx, cdiv(nk, kb))
    return BlockMask(
        (nq, nk), part_num, part_idx, full_num, full_idx, q_lists[0], q_lists[1], q_lists[2],
        q_lists[3], BLOCK_SIZE=(qb, kb), mask_mod=mask_mod,
    )  # fmt: skip


@functools.lru_cache(maxsize=32)
def pattern_block_mask(nq: int, nk: int, window: int, dilation: int, sinks: int, causal: bool,
                       device: torch.device):  # fmt: skip
    """The BlockMask of a window/dilation/sinks pattern (one for every batch row and head),
    from each tile/block pair's range of query-key distances."""
    from torch.nn.attention.flex_attention import BlockMask

    b = PATTERN_BLOCK
    r0 = torch.arange(cdiv(nq, b), device=device)[:, None] * b  # first row of each tile
    r1 = (r0 + b).clamp(max=nq) - 1
    c0 = torch.arange(cdiv(nk, b), device=device)[None, :] * b  # first key of each block
    c1 = (c0 + b).clamp(max=nk) - 1
    d_min, d_max = r0 - c1, r1 - c0
    if causal:
        win_any = (d_max >= 0) & (d_min < window)
        win_all = (d_min >= 0) & (d_max < window)
        sink_any = (c0 < sinks) & (c0 <= r1)
        sink_all = (c1 < sinks) & (c1 <= r0)
    else:
        win_any = (d_max > -window) & (d_min < window)
        win_all = (d_min > -window) & (d_max < window)
        sink_any = (c0 < sinks).expand_as(win_any)
        sink_all = (c1 < sinks).expand_as(win_any)
    full = (win_all & (dilation == 1)) | sink_all
    partial = (win_any | sink_any) & ~full
    part_num, part_idx = _ordered(partial[None, None])
    full_num, full_idx = _ordered(full[None, None])
    return BlockMask.from_kv_blocks(
        part_num, part_idx, full_num, full_idx, BLOCK_SIZE=b,
        mask_mod=pattern_mod(window, dilation, sinks, causal), seq_lengths=(nq, nk),
    )  # fmt: skip


# ----------------------------------------------------------------------------- entry points
def _kernel_options(config: HyperConfig, head_dim: int) -> dict | None:
    """FlexAttention's tiles for select's lists. Head dims <= 64 and query tiles of 128: forward
    tiles of 128 x 64 with 4 warps (H200, ``tools/profile_select.py``: 13% faster at 32k-128k
    than FlexAttention's choice; no gain at head dim 128). Key blocks below 128 need tiles that
    divide them."""
    kb, options = config.select_block, {}
    if head_dim <= 64 and config.query_block % 128 == 0 and kb % 64 == 0:
        options.update(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_stages=3, fwd_num_warps=4)
    if kb < 128:
        options.update(fwd_BLOCK_N=kb, bwd_BLOCK_N1=kb, bwd_BLOCK_M2=kb)
    return options or None


# (query head, tile) pairs of one KV head reading one copy of a sink block in the backward
# (H200, tools/probe_backward.py: 512 and 128 ran within 2%; one copy for 4096 pairs, 1.4x slower)
_PAIRS_PER_SINK_COPY = 128  # the fastest middle of 32..1024 (docs/performance.md)


def sink_copies(config: HyperConfig, nq: int, nk: int, group: int, causal: bool,
                padded: bool) -> int:  # fmt: skip
    """Copies of the sink blocks for FlexAttention's backward (0: none). Every tile reads the
    sink blocks, so in the backward their key-major programs walk every tile of every query
    head of a KV head while the others walk a few dozen; copies split that walk. The keys are
    padded to whole blocks before the copies: allowed where the causal mask (or the key
    padding mask) hides the pad."""
    from hyperpass.kernels.select_blocks import sink_blocks

    kb = config.select_block
    n_sink = sink_blocks(config, nk)
    hidden = nk % kb == 0 or padded or (causal and nq <= nk)
    if n_sink == 0 or n_sink * kb > nk or not hidden:
        return 0
    copies = cdiv(cdiv(nq, config.query_block) * group, _PAIRS_PER_SINK_COPY)
    return copies if copies > 1 else 0


def _with_sink_copies(k, v, valid, kb: int, n_sink: int, copies: int):
    """(k, v, valid) padded to whole blocks of ``kb`` and followed by ``copies`` copies of the
    first ``n_sink`` blocks (gradients flow back to the originals)."""
    nk = k.shape[-2]
    pad = cdiv(nk, kb) * kb - nk

    def extend(t, dim):
        head = t.narrow(dim, 0, n_sink * kb)
        padding = [t.new_zeros(*t.shape[:dim], pad, *t.shape[dim + 1 :])] if pad else []
        reps = [1] * t.dim()
        reps[dim] = copies
        return torch.cat([t, *padding, head.repeat(*reps)], dim=dim)

    return extend(k, 2), extend(v, 2), None if valid is None else extend(valid, 1)


def _records_autograd(*tensors: Tensor) -> bool:
    """Autograd records this call: gradients are on and not below the autograd dispatch (as
    inside the op's forward, whose backward recomputes it)."""
    below = torch._C._dispatch_tls_is_dispatch_key_excluded(
        torch._C.DispatchKey.AutogradFunctionality
    )
    return torch.is_grad_enabled() and not below and any(t.requires_grad for t in tensors)


def select_forward(q, k, v, *, is_causal: bool, scale: float | None, config: HyperConfig,
                   key_mask=None, copies: int | None = None):  # fmt: skip
    """``method="select"``: the selection kernel's lists, then FlexAttention. (out, None).
    ``key_mask``: a boolean key-padding mask [B, 1, 1, Nk]; its padded keys are never read.
    Under autograd the mask gets the lists of the backward, and the sink blocks their copies
    (:func:`sink_copies`; ``copies`` overrides it, for tests)."""
    backward = _records_autograd(q, k, v)
    if copies is None:
        copies = _copies(q, k, is_causal, config, key_mask) if backward else 0
    lists = _select_lists(q, k, scale, config, is_causal, copies)
    out = select_over_lists(q, k, v, lists, copies, is_causal=is_causal, scale=scale,
                            config=config, key_mask=key_mask, backward=backward)  # fmt: skip
    if out is None:
        out = _reference(q, k, v, is_causal, _scale(q, scale), config, key_mask)
    return out, None


def select_forward_with_plan(q, k, v, plan, *, is_causal: bool, scale: float | None,
                             config: HyperConfig, key_mask=None):  # fmt: skip
    """``method="select"`` that also keeps its lists for the backward: writes them into
    ``plan`` (:func:`plan_shapes`: four int32 tensors, filled from their first entries), with
    the sink copies the backward uses. The output; None where FlexAttention cannot serve (past
    the recompile limit), whose caller answers by the reference and recomputes its gradients."""
    copies = _copies(q, k, is_causal, config, key_mask)
    lists = _select_lists(q, k, scale, config, is_causal, copies, out=plan)
    return select_over_lists(q, k, v, lists, copies, is_causal=is_causal, scale=scale,
                             config=config, key_mask=key_mask, backward=False)  # fmt: skip


def select_backward_over_plan(grad_out, q, k, v, plan, *, is_causal: bool,
                              scale: float | None, config: HyperConfig, key_mask=None):  # fmt: skip
    """(dq, dk, dv) of :func:`select_forward_with_plan` from the lists it wrote into ``plan``:
    FlexAttention's forward and backward over them, no selection. None where FlexAttention
    cannot serve. Runs where autograd records (the op's backward lifts the exclusion)."""
    copies = _copies(q, k, is_causal, config, key_mask)
    lists = plan_lists(plan, q, k, config, copies)
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = select_over_lists(*inputs, lists, copies, is_causal=is_causal, scale=scale,
                            config=config, key_mask=key_mask, backward=True)  # fmt: skip
    if out is None:
        return None
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return tuple(
        torch.zeros_like(t) if g is None else g.contiguous()
        for g, t in zip(grads, inputs, strict=True)
    )


def select_over_lists(q, k, v, lists, copies: int, *, is_causal: bool, scale: float | None,
                      config: HyperConfig, key_mask=None, backward: bool):  # fmt: skip
    """FlexAttention over select's lists (:func:`select_block_lists`, with ``copies`` sink
    copies); ``backward``: the mask also gets the backward's lists. None past the recompile
    limit."""
    from hyperpass.kernels.select_blocks import sink_blocks

    nq, nk, gqa = q.shape[-2], k.shape[-2], q.shape[1] != k.shape[1]
    valid = None if key_mask is None else key_valid(key_mask, q.shape[0], nk)
    keys, values = k, v
    if copies:
        n_sink = sink_blocks(config, nk)
        keys, values, valid = _with_sink_copies(k, v, valid, config.select_block, n_sink, copies)
    mask = block_mask_from_lists(
        *lists, nq, keys.shape[-2], config.query_block, config.select_block,
        causal_mod() if is_causal else no_mask_mod(), backward,
    )  # fmt: skip
    options = _kernel_options(config, q.shape[-1])
    return _flex(q, keys, values, mask, _scale(q, scale), gqa, options, True, valid)


def _scale(q, scale) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _copies(q, k, is_causal: bool, config: HyperConfig, key_mask) -> int:
    group = q.shape[1] // k.shape[1]
    return sink_copies(config, q.shape[-2], k.shape[-2], group, is_causal, key_mask is not None)


def _select_lists(q, k, scale, config, is_causal, copies, out=None):
    from hyperpass.kernels.select_blocks import select_block_lists

    return select_block_lists(q, k, _scale(q, scale), config, is_causal, copies, out=out)


# ----------------------------------------------------------------------------- kept plans
def plan_shapes(batch, q_heads, kv_heads, nq, nk, config: HyperConfig):
    """Shapes of the lists a planned forward keeps for its backward: counts [B, Hq, n_tiles],
    ids [B, Hq, n_tiles, width] (partial, then full: :func:`select_block_lists`'s order), with
    ``width`` the most sink copies :func:`sink_copies` can ask for, so that the shapes are
    expressions of the input shapes that install no guard (symbolic sizes stay symbolic). The
    lists fill the ids' first entries at their own width (:func:`plan_lists`)."""
    qb, kb = config.query_block, config.select_block
    n_tiles = (nq + qb - 1) // qb
    n_sink = (torch.sym_min(config.sinks, nk) + kb - 1) // kb
    most_copies = (n_tiles * (q_heads // kv_heads) + _PAIRS_PER_SINK_COPY - 1) // (
        _PAIRS_PER_SINK_COPY
    )
    width = (nk + kb - 1) // kb + most_copies * n_sink
    counts, ids = (batch, q_heads, n_tiles), (batch, q_heads, n_tiles, width)
    return counts, ids, counts, ids


def plan_lists(plan, q, k, config: HyperConfig, copies: int):
    """The lists a planned forward wrote into ``plan``: the ids as [B, Hq, n_tiles, width] views
    of their first entries, ``width`` being this call's (``copies`` sink copies)."""
    from hyperpass.kernels.select_blocks import sink_blocks

    part_num, part_idx, full_num, full_idx = plan
    nk, kb = k.shape[-2], config.select_block
    n_sink = sink_blocks(config, nk) if copies else 0
    width = cdiv(nk, kb) + copies * n_sink
    lead = part_num.shape

    def head(ids):
        return ids.reshape(-1)[: part_num.numel() * width].view(*lead, width)

    return part_num, head(part_idx), full_num, head(full_idx)


def pattern_forward(q, k, v, *, is_causal: bool, scale: float | None, config: HyperConfig):
    """``local`` / ``dilated`` / ``longformer``: the cached pattern mask, then FlexAttention."""
    nq, nk = q.shape[-2], k.shape[-2]
    window = min(config.window, nq + nk + 1)  # a wider window changes nothing
    mask = pattern_block_mask(nq, nk, window, config.dilation, config.sinks, is_causal, q.device)
    gqa = q.shape[1] != k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = _flex(q, k, v, mask, scale, gqa, None, False)
    return (_reference(q, k, v, is_causal, scale, config) if out is None else out), None


def _reference(q, k, v, is_causal, scale, config, key_mask=None):
    from hyperpass.reference import hyper_attention_reference

    return hyper_attention_reference(
        q, k, v, is_causal=is_causal, scale=scale, config=config, key_mask=key_mask
    )[0]
