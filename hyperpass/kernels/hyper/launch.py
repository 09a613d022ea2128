"""Launchers of ``method="hyper"`` and the pattern methods: forward and backward on CUDA tensors.

Same semantics as :mod:`hyperpass.reference.hyper` (the oracle). One call:

1. hash Q and K once and count every level's sort at once, then scatter one level's order
   when that level runs (``hashing.CountingSort``: Q and K in the same launches when
   Nq == Nk, 4 launches for both; ``torch.sort`` beyond 8 hyperplanes);
2. non-causal / flat causal: one launch of the fused approximation writes out and lse;
   causal recursive: one launch per level (each merging into the output, by its lse), then
   one launch of the exact diagonal leaves that merges everything and writes the output;
3. backward: recompute (out, lse), then dQ/dK/dV with the merged lse: per level three launches
   (dQ, dK/dV of the blocks, dK/dV of the samples), plus two for the diagonal leaves; with one
   level and no pattern, dK/dV are written in the input dtype and one more launch merges the
   samples' fp32 gradients (one row per distinct sampled key) into them.
4. window/dilation/sinks (``pattern.py``): one more launch merges the exact pattern part (and
   two or three in the backward); the pattern-only methods run only that launch, unhashed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from hyperpass.config import HyperConfig
from hyperpass.kernels.common import row_delta
from hyperpass.kernels.host import LOG2E, cdiv, last_dim_contiguous, next_pow2
from hyperpass.kernels.hyper.approx import (
    _approx_dkdv_block_kernel,
    _approx_dkdv_sample_kernel,
    _approx_dq_kernel,
    _approx_fwd_kernel,
    _gather_samples_kernel,
    _sample_merge_kernel,
)
from hyperpass.kernels.hyper.exact import _diag_dkdv_kernel, _diag_dq_kernel, _diag_fwd_kernel
from hyperpass.kernels.hyper.hashing import (
    CountingSort,
    TorchSort,
    counting_sort_supported,
    planes_for,
)
from hyperpass.kernels.hyper.plan import Plan, make_plan
from hyperpass.kernels.pattern import (
    LIMIT_ALL,
    LIMIT_LEAF,
    LIMIT_PAST,
    _pattern_dkdv_kernel,
    _pattern_dq_kernel,
    _pattern_fwd_kernel,
    _sinks_dkdv_kernel,
)
from hyperpass.kernels.tuning import Tuning, tuning_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- shared setup
@dataclass(frozen=True)
class _Pattern:
    """The exact window/sinks part of one call, as the kernels take it (see ``pattern.py``)."""

    window: int  # effective window (flat causal: at least 1), clamped to the sequence
    dilation: int
    reach: int  # window keys per side in the residue class: (window - 1) // dilation + 1
    n_sinks: int  # min(sinks, Nk)
    causal: bool  # the op is causal: the window looks only back
    limit: int  # LIMIT_ALL / LIMIT_PAST / LIMIT_LEAF


def _pattern_of(nq: int, nk: int, is_causal: bool, cfg: HyperConfig) -> _Pattern | None:
    """None when the reference has no window/sinks part (the approximation's own paths)."""
    if cfg.uses_lsh and cfg.window == 0 and cfg.sinks == 0:
        return None
    recursive = cfg.causal_recursion(is_causal)
    flat = is_causal and not recursive
    # a flat causal pass lets every query see itself; |d| < max(nq, nk) + 1 always holds
    window = min(max(cfg.window, 1) if flat else cfg.window, max(nq, nk) + 1)
    limit = LIMIT_LEAF if recursive else LIMIT_PAST if flat else LIMIT_ALL
    reach = (window - 1) // cfg.dilation + 1 if window else 0
    return _Pattern(window, cfg.dilation, reach, min(cfg.sinks, nk), is_causal, limit)


@dataclass
class _Call:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    cfg: HyperConfig
    plan: Plan | None  # None: pattern-only method (no sortLSH, no samples)
    tune: Tuning
    pattern: _Pattern | None
    sorts: tuple[CountingSort | TorchSort, ...]  # Q's and K's sorted orders, on demand
    causal: bool

    def orders(self, level: int):
        """(q order [B, Hq, Nq], k order [B, Hkv, Nk], k inverse [B, Hkv, Nk]) int32 of one
        level: scattered when asked, so one level's orders exist at a time."""
        (q_order, _), (k_order, k_inverse) = [p for s in self.sorts for p in s.level(level)]
        return q_order, k_order, k_inverse

    def release_sorts(self, after_level: int) -> None:
        """The forward holds what it reads of level ``after_level`` (its orders, K's inverse
        until the sample gather): the sorts forget that level, and after the last level they
        go (ranks, tables, permutations)."""
        if after_level == len(self.plan.levels) - 1:
            self.sorts = ()
        for sort in self.sorts:
            sort.drop_level()

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def precision(self) -> str:
        return "ieee" if self.q.dtype == torch.float32 else "tf32"

    def exclusion_args(self) -> tuple[int, int, int]:
        """(window, dilation, sinks) that the LSH and sampled parts skip."""
        pat = self.pattern
        return (0, 1, 0) if pat is None else (pat.window, pat.dilation, pat.n_sinks)

    def exclusion_flags(self) -> dict:
        pattern = self.pattern is not None
        causal = pattern and self.pattern.causal
        seed_self = self.plan.only_past and not pattern  # else the pattern part has the diagonal
        return dict(PATTERN=pattern, CAUSAL_WINDOW=causal, SEED_SELF=seed_self)

    def leaf_start(self) -> torch.Tensor:
        if self.plan is not None and self.plan.leaf_start is not None:
            return self.plan.leaf_start
        return torch.zeros(1, dtype=torch.int32, device=self.q.device)  # unused

    def even(self, level) -> bool:
        """No tile of ``level`` runs past its rows, keys or samples, and the head dims are
        their own tile widths: the approximated kernels drop their masks."""
        dims = (self.q.shape[-1], self.v.shape[-1])
        return level.even and all(d == next_pow2(d) for d in dims)

    def strides(self, *tensors):
        return [s for t in tensors for s in t.stride()[:3]]

    def shape_kwargs(self, warps: int) -> dict:
        dim, dim_v = self.q.shape[-1], self.v.shape[-1]
        return dict(
            GROUP=self.group,
            D=dim,
            DV=dim_v,
            BLOCK_D=next_pow2(dim),
            BLOCK_DV=next_pow2(dim_v),
            PRECISION=self.precision,
            num_warps=warps,
        )


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _setup(q, k, v, is_causal: bool, scale: float | None, cfg: HyperConfig, backward: bool,
           tuning: Tuning | None = None):  # fmt: skip
    """Everything a launch needs: contiguous rows, the plan, and the sorts (the backward keeps
    every level's orders, which it reads twice; the forward scatters one level at a time)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    batch, _, nq, dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    tune = tuning or tuning_for(max(dim, v.shape[-1]), q.dtype)
    pattern = _pattern_of(nq, nk, is_causal, cfg)
    if not cfg.uses_lsh:
        return _Call(q, k, v, scale, cfg, None, tune, pattern, (), is_causal)
    plan = make_plan(
        nq, nk, is_causal, cfg, batch, kv_heads, q.device,
        tune.block_m, tune.block_n, _num_sms(q.device),
    )  # fmt: skip
    if not plan.levels:  # one exact causal leaf: no part but the diagonal, nothing to hash
        return _Call(q, k, v, scale, cfg, plan, tune, None, (), is_causal)
    planes = planes_for(dim, cfg.lsh_num_projs, cfg.seed, q.device)
    q_part, k_part = (q, scale), (k, 1.0)
    if not counting_sort_supported(cfg.lsh_num_projs):
        # more than 256 buckets: torch.sort of (segment, rank) keys, every level at once
        sorts = (TorchSort((q_part, k_part), planes, plan.segments, True, plan.n_segments),)
    elif nq == nk:  # Q and K hashed and sorted together: each launch serves both
        sorts = (CountingSort((q_part, k_part), planes, plan.edges, True, keep_levels=backward),)
    else:
        sorts = (
            CountingSort((q_part,), planes, plan.edges, keep_levels=backward),
            CountingSort((k_part,), planes, plan.edges, inverse=True, keep_levels=backward),
        )
    return _Call(q, k, v, scale, cfg, plan, tune, pattern, sorts, is_causal)


def _samples(level) -> torch.Tensor:
    s = level.samples
    return s if s.numel() else torch.zeros(1, dtype=torch.int32, device=s.device)


def _sample_rows(call: _Call, index: int, k_inverse) -> tuple:
    """(sample indices, K rows, V rows, block ids) of level ``index``'s samples, the compact
    copies that the forward and dQ kernels read (``_gather_samples_kernel``): m rows per
    sub-problem and KV head, the same for every query tile. The block ids (from K's inverse
    order) also serve the samples' dK/dV kernel."""
    k, v, level = call.k, call.v, call.plan.levels[index]
    subs, batch, kv_heads, m = level.samples.shape
    if m == 0:
        dummy = _samples(level)
        return dummy, k, v, dummy
    ks = torch.empty(subs, batch, kv_heads, m, k.shape[-1], dtype=k.dtype, device=k.device)
    vs = torch.empty(subs, batch, kv_heads, m, v.shape[-1], dtype=v.dtype, device=v.device)
    blocks = torch.empty(subs, batch, kv_heads, m, dtype=torch.int32, device=k.device)
    kw = call.shape_kwargs(4)
    _gather_samples_kernel[(cdiv(m, 64), subs * batch * kv_heads)](
        k, v, k_inverse, level.samples, level.subs, ks, vs, blocks,
        *call.strides(k, v), batch, kv_heads, k.shape[2], m, call.cfg.block_size,
        D=kw["D"], DV=kw["DV"], BLOCK_D=kw["BLOCK_D"], BLOCK_DV=kw["BLOCK_DV"], BLOCK_N=64,
    )  # fmt: skip
    return level.samples, ks, vs, blocks


# ----------------------------------------------------------------------------- forward
def hyper_attention_forward(
    q, k, v, *, is_causal: bool, scale: float | None, config: HyperConfig, with_lse: bool = True,
    tuning: Tuning | None = None,
):  # fmt: skip
    """HyperAttention forward (the reference's semantics) with the Triton kernels.

    Args:
        q: [B, Hq, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv], one of fp16/bf16/fp32.
        with_lse: also return the log-sum-exp. The op's forward asks for none (its backward
            recomputes it): a one-level call then neither writes nor allocates it.
        tuning: tiles and warps; None: the table's (``tuning.tuning_for``).

    Returns:
        (out [B, Hq, Nq, Dv] in q's dtype, lse [B, Hq, Nq] fp32 natural-log log-sum-exp, or
        None without ``with_lse``)
    """
    call = _setup(q, k, v, is_causal, scale, config, backward=False, tuning=tuning)
    return _forward(call, with_lse, release_sorts=True)


# ----------------------------------------------------------------------------- head groups
# fp32 scratch of the backward (dQ/dK/dV and a group's forward) allowed at once, as a multiple of
# the bytes of q; the other heads wait for a later group. SDPA's own backward (cuDNN) needs about
# 3x the bytes of q above its inputs and gradients, so 3.0 keeps ours at or below its peak.
GROUP_BUDGET = 3.0


def launches_add_up(is_causal: bool, cfg: HyperConfig) -> bool:
    """Several launches add into one output / gradient row: the causal recursion (its levels
    and exact leaves) or sortLSH plus a window/sinks pattern. The forward merges those through
    its output; the backward keeps fp32 dQ/dK/dV (else written once, in the input dtype)."""
    pattern = cfg.window > 0 or cfg.sinks > 0
    return cfg.causal_recursion(is_causal) or (cfg.uses_lsh and pattern)


def head_groups(q, k, v, is_causal: bool, cfg: HyperConfig):
    """[(kv head slice, q head slice)]: the heads whose backward runs together.

    Where several launches add into one gradient row (``launches_add_up``) the backward keeps
    fp32 dQ/dK/dV. Heads are independent, so they run in groups small enough that those
    buffers stay within ``GROUP_BUDGET`` x the bytes of q; one group (no copies) when nothing
    accumulates or it all fits. Grouping changes no result: every launch is per head.
    """
    batch, q_heads, nq, dim = q.shape
    kv_heads, nk, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    if not launches_add_up(is_causal, cfg) or kv_heads == 1:
        return [(slice(0, kv_heads), slice(0, q_heads))]
    group = q_heads // kv_heads
    recursive = cfg.causal_recursion(is_causal)
    levels = max(1, math.ceil(math.log2(max(nq / cfg.min_seq_len, 1)))) if recursive else 1
    rows = batch * group * nq  # query rows per KV head
    # every level's int32 orders and inverses (the backward keeps them), int16 ranks
    orders = 4 * levels * (rows + 2 * batch * nk) + 2 * (rows + batch * nk)
    # fp32 dQ and dK/dV, the recomputed output, its lse and delta
    per_head = 4 * rows * dim + 4 * batch * nk * (dim + dim_v)
    per_head += q.element_size() * rows * dim_v + 8 * rows + orders
    budget = GROUP_BUDGET * q.numel() * q.element_size()
    size = kv_heads if budget >= kv_heads * per_head else max(1, int(budget // per_head))
    return [
        (slice(h, min(h + size, kv_heads)), slice(h * group, min(h + size, kv_heads) * group))
        for h in range(0, kv_heads, size)
    ]


def _outputs(call: _Call, with_lse: bool):
    """(out, lse) of a forward; without ``with_lse`` the lse is a placeholder no kernel
    writes."""
    q = call.q
    out = torch.empty(*q.shape[:3], call.v.shape[-1], dtype=q.dtype, device=q.device)
    lse_shape = q.shape[:3] if with_lse else (1,)
    return out, torch.empty(lse_shape, dtype=torch.float32, device=q.device)


def _forward(call: _Call, with_lse: bool = True, release_sorts: bool = False):
    """(out, lse or None). ``release_sorts``: nobody needs the sorts after this forward."""
    q, k, v, plan = call.q, call.k, call.v, call.plan
    batch, q_heads, nq, _ = q.shape
    if plan is not None and plan.leaf_start is None:  # non-causal or flat causal
        return _one_level_forward(call, with_lse, release_sorts)
    out, lse = _outputs(call, with_lse=True)
    if plan is None:  # pattern-only method: one launch
        _pattern_forward(call, out, out, lse, merge=False)
        return out, lse if with_lse else None
    # Launches that add parts of one row merge them through ``out`` itself (in its dtype) and
    # the fp32 lse: no fp32 accumulator, so the forward needs no more memory than SDPA's (+ the
    # sort orders). Each merge rounds the row once more (within the GPU check's bound).
    if plan.levels:
        if call.pattern is None:
            lse.fill_(float("-inf"))
        else:  # the window/sinks of every off-diagonal sub-problem, in one launch
            _pattern_forward(call, out, out, lse, merge=False)
        for level in range(len(plan.levels)):
            _approx_forward(call, level, out, lse, merge=True, release=release_sorts)
    grid = (cdiv(nq, call.tune.block_m), batch * q_heads)
    _diag_fwd_kernel[grid](
        q, k, v, out, out, lse, plan.leaf_start,
        call.scale * LOG2E,
        *call.strides(q, k, v, out),
        q_heads, nq,
        BLOCK_M=call.tune.block_m, BLOCK_N=call.tune.block_n, MERGE=bool(plan.levels),
        num_stages=call.tune.stages, **call.shape_kwargs(call.tune.fwd_warps),
    )  # fmt: skip
    return out, lse if with_lse else None


def _one_level_forward(call: _Call, with_lse: bool, release_sorts: bool):
    """One fused launch (+ the pattern's). The orders and sample rows come first, so that the
    ranks and tables they are made from can go before the output exists (peak memory)."""
    inputs = _approx_inputs(call, 0, release_sorts)
    needs_lse = with_lse or call.pattern is not None  # the pattern merges through it
    out, lse = _outputs(call, needs_lse)
    _approx_launch(call, 0, inputs, out, lse, merge=False, store_lse=needs_lse)
    if call.pattern is not None:
        _pattern_forward(call, out, out, lse, merge=True)
    return out, lse if with_lse else None


def _approx_inputs(call: _Call, index: int, release: bool = False) -> tuple:
    """What level ``index``'s fused forward reads besides Q/K/V: (q order, k order, sample
    indices, sample K rows, sample V rows, sample block ids).

    ``release``: no later launch of this call reads level ``index``'s K inverse (the sample
    gather is its last reader), nor, after the last level's scatter, the sorts at all: they go
    as soon as possible, so that fewer of them coexist with the output and the sample rows (the
    forward's peak memory)."""
    q_order, k_order, k_inverse = call.orders(index)
    if release:
        call.release_sorts(after_level=index)  # k_inverse lives on until the gather is issued
    return q_order, k_order, *_sample_rows(call, index, k_inverse)


def _approx_forward(call: _Call, index: int, out, lse, merge: bool, release: bool = False):
    """One level's fused forward; returns the launched (compiled) kernel."""
    return _approx_launch(call, index, _approx_inputs(call, index, release), out, lse, merge)


def _approx_launch(call: _Call, index: int, inputs, out, lse, merge: bool, store_lse=True):
    q, k, v, level, tune = call.q, call.k, call.v, call.plan.levels[index], call.tune
    batch, q_heads, nq, _ = q.shape
    rows, stages, limits = tune.block_m, tune.stages, {}
    if call.plan.leaf_start is None and tune.one_level_fwd_rows is not None:
        rows, stages = tune.one_level_fwd_rows, tune.one_level_fwd_stages or tune.stages
        if tune.one_level_fwd_maxnreg is not None:
            limits = dict(maxnreg=tune.one_level_fwd_maxnreg)
    split = tune.block_m // rows
    grid = (level.q_tiles.shape[0] * split, batch * q_heads)
    return _approx_fwd_kernel[grid](
        q, k, v, out, lse, *inputs, level.subs, level.q_tiles,
        call.scale * LOG2E,
        *call.strides(q, k, v, out),
        batch, q_heads, k.shape[1], nq, k.shape[2], level.samples.shape[-1],
        call.cfg.block_size, *call.exclusion_args(),
        BLOCK_M=rows, BLOCK_N=tune.block_n, MERGE=merge, ONLY_PAST=call.plan.only_past,
        EVEN=call.even(level), SPLIT=split, STORE_LSE=store_lse, num_stages=stages,
        **call.exclusion_flags(), **call.shape_kwargs(tune.fwd_warps), **limits,
    )  # fmt: skip


def _pattern_forward(call: _Call, acc, out, lse, merge: bool) -> None:
    """Window + sinks; with ``merge`` it starts from ``acc`` (fp32) and ``lse`` and writes
    the merged output to ``out``."""
    q, k, v, pat, tune = call.q, call.k, call.v, call.pattern, call.tune
    batch, q_heads, nq, _ = q.shape
    classes, tiles = _classes(nq, pat.dilation, tune.block_m)
    _pattern_fwd_kernel[(classes * tiles, batch * q_heads)](
        q, k, v, acc, out, lse, call.leaf_start(),
        call.scale * LOG2E,
        *call.strides(q, k, v, out),
        q_heads, nq, k.shape[2], pat.window, pat.dilation, pat.reach, pat.n_sinks, tiles,
        BLOCK_M=tune.block_m, BLOCK_N=tune.block_n, CAUSAL=pat.causal, LIMIT=pat.limit,
        MERGE=merge, num_stages=tune.stages, **call.shape_kwargs(tune.fwd_warps),
    )  # fmt: skip


def _classes(n: int, dilation: int, block: int) -> tuple[int, int]:
    """(residue classes, tiles per class) of ``n`` positions in tiles of ``block``."""
    return min(dilation, n), cdiv(cdiv(n, dilation), block)


# ----------------------------------------------------------------------------- backward
def hyper_attention_backward(
    grad_out, q, k, v, *, is_causal: bool, scale: float | None, config: HyperConfig,
    tuning: Tuning | None = None,
):  # fmt: skip
    """True gradients of the approximation (through the gathers and the log-sum-exp merge).

    Recomputes (out, lse) with the forward kernels, then runs the backward kernels with the
    merged lse, so every part's probabilities are its share of the final softmax.

    Returns:
        (dq [B, Hq, Nq, D], dk [B, Hkv, Nk, D], dv [B, Hkv, Nk, Dv]) in the inputs' dtypes.
    """
    groups = head_groups(q, k, v, is_causal, config)
    if len(groups) == 1:
        call = _setup(q, k, v, is_causal, scale, config, backward=True, tuning=tuning)
        grads = _backward(call, grad_out)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True))
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    for kv_heads, q_heads in groups:
        heads = (q[:, q_heads], k[:, kv_heads], v[:, kv_heads])
        call = _setup(*heads, is_causal, scale, config, backward=True, tuning=tuning)
        dq_g, dk_g, dv_g = _backward(call, grad_out[:, q_heads])
        dq[:, q_heads], dk[:, kv_heads], dv[:, kv_heads] = dq_g, dk_g, dv_g
        del call, dq_g, dk_g, dv_g  # the next group reuses the memory
    return dq, dk, dv


def _backward(call: _Call, grad_out):
    """(dq, dk, dv) of one call, fp32 where several launches add into them."""
    out, lse = _forward(call)
    q, k, v, plan, tune = call.q, call.k, call.v, call.plan, call.tune
    grad_out = last_dim_contiguous(grad_out)
    batch, q_heads, nq, dim = q.shape
    kv_heads, nk, dim_v = k.shape[1], k.shape[2], v.shape[-1]

    delta = row_delta(out, grad_out)
    diagonal = plan is not None and plan.leaf_start is not None
    # Unless launches add up, every gradient row has one writer (its tile's, block's or
    # window's program): dQ/dK/dV are written in the input dtype, and the atomics of the
    # samples (one fp32 row per distinct sampled key, ``compact``) or of the sinks (fp32 rows
    # of the sinks) go to small buffers merged once. Otherwise fp32 dQ/dK/dV that launches add to
    adds_up = launches_add_up(call.causal, call.cfg)
    grad_dtype = torch.float32 if adds_up else None
    compact = plan is not None and not adds_up
    dq = torch.empty(batch, q_heads, nq, dim, dtype=grad_dtype or q.dtype, device=q.device)
    kv_dtype = grad_dtype or k.dtype
    dk = torch.empty(batch, kv_heads, nk, dim, dtype=kv_dtype, device=q.device)
    dv = torch.empty(batch, kv_heads, nk, dim_v, dtype=kv_dtype, device=q.device)
    common = (call.scale, call.scale * LOG2E, *call.strides(q, k, v, grad_out))
    kw = call.shape_kwargs(tune.bwd_warps)

    if diagonal:
        _diag_dq_kernel[(cdiv(nq, tune.block_m), batch * q_heads)](
            q, k, v, grad_out, lse, delta, dq, plan.leaf_start, *common, q_heads, nq,
            BLOCK_M=tune.block_m, BLOCK_N=tune.block_n, **kw,
        )  # fmt: skip
        _diag_dkdv_kernel[(cdiv(nk, tune.block_n), batch * kv_heads)](
            q, k, v, grad_out, lse, delta, dk, dv, plan.leaf_start, plan.leaf_end, *common,
            q_heads, kv_heads, nq,
            BLOCK_M=tune.bwd_block_m, BLOCK_N=tune.block_n, **kw,
        )  # fmt: skip

    for index, level in enumerate(plan.levels if plan is not None else ()):
        q_ord, k_ord, k_inv = call.orders(index)
        samples, sample_k, sample_v, sample_blocks = _sample_rows(call, index, k_inv)
        n_samples = level.samples.shape[-1]
        _approx_dq_kernel[(level.q_tiles.shape[0], batch * q_heads)](
            q, k, v, grad_out, lse, delta, dq, q_ord, k_ord,
            samples, sample_k, sample_v, sample_blocks, level.subs, level.q_tiles, *common,
            batch, q_heads, kv_heads, nq, nk, n_samples, call.cfg.block_size,
            *call.exclusion_args(),
            BLOCK_M=tune.block_m, BLOCK_N=tune.block_n, ACCUMULATE=diagonal,
            ONLY_PAST=plan.only_past, EVEN=call.even(level), **call.exclusion_flags(), **kw,
        )  # fmt: skip
        _approx_dkdv_block_kernel[(level.k_tiles.shape[0], batch * kv_heads)](
            q, k, v, grad_out, lse, delta, dk, dv, q_ord, k_ord, level.subs, level.k_tiles,
            *common, q_heads, kv_heads, nq, nk, call.cfg.block_size, *call.exclusion_args(),
            BLOCK_M=tune.bwd_block_m, BLOCK_N=tune.block_n,
            ACCUMULATE=diagonal, ONLY_PAST=plan.only_past, **call.exclusion_flags(), **kw,
        )  # fmt: skip
        if level.s_tiles.shape[0]:
            sample_dk, sample_dv = dk, dv
            if compact:
                slots = level.samples.shape
                sample_dk = torch.zeros(*slots, dim, dtype=torch.float32, device=q.device)
                sample_dv = torch.zeros(*slots, dim_v, dtype=torch.float32, device=q.device)
            _approx_dkdv_sample_kernel[(level.s_tiles.shape[0], batch * kv_heads)](
                q, k, v, grad_out, lse, delta, sample_dk, sample_dv, q_ord,
                level.samples, sample_blocks, level.sample_slot, level.subs, level.s_tiles,
                *common,
                batch, q_heads, kv_heads, nq, nk, n_samples, level.q_split,
                *call.exclusion_args(),
                BLOCK_M=tune.bwd_block_m, BLOCK_N=tune.block_n, ONLY_PAST=plan.only_past,
                PATTERN=call.pattern is not None, CAUSAL_WINDOW=call.causal, COMPACT=compact,
                **kw,
            )  # fmt: skip
            if compact:
                grid = (level.subs.shape[0], cdiv(n_samples, tune.block_n), batch * kv_heads)
                _sample_merge_kernel[grid](
                    dk, dv, sample_dk, sample_dv, level.sample_keys, level.subs,
                    batch, kv_heads, nk, n_samples,
                    D=dim, DV=dim_v, BLOCK_D=kw["BLOCK_D"], BLOCK_DV=kw["BLOCK_DV"],
                    BLOCK_N=tune.block_n, num_warps=kw["num_warps"],
                )  # fmt: skip
    if call.pattern is not None:
        _pattern_backward(call, common, kw, lse, delta, grad_out, dq, dk, dv,
                          accumulate=adds_up)  # fmt: skip
    return dq, dk, dv


def _pattern_backward(call: _Call, common, kw, lse, delta, grad_out, dq, dk, dv, accumulate):
    """dQ/dK/dV of window + sinks: added to what earlier launches wrote when ``accumulate``."""
    q, k, v, pat, tune = call.q, call.k, call.v, call.pattern, call.tune
    batch, q_heads, nq, _ = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    leaf = call.leaf_start()
    geometry = (pat.window, pat.dilation)
    classes, tiles = _classes(nq, pat.dilation, tune.block_m)
    _pattern_dq_kernel[(classes * tiles, batch * q_heads)](
        q, k, v, grad_out, lse, delta, dq, leaf, *common,
        q_heads, nq, nk, *geometry, pat.reach, pat.n_sinks, tiles,
        BLOCK_M=tune.block_m, BLOCK_N=tune.block_n, CAUSAL=pat.causal, LIMIT=pat.limit,
        ACCUMULATE=accumulate, **kw,
    )  # fmt: skip
    if pat.reach or not accumulate:  # (nothing to add without a window)
        classes, tiles = _classes(nk, pat.dilation, tune.block_n)
        _pattern_dkdv_kernel[(classes * tiles, batch * kv_heads)](
            q, k, v, grad_out, lse, delta, dk, dv, leaf, *common,
            q_heads, kv_heads, nq, nk, *geometry, pat.reach, tiles,
            BLOCK_M=tune.bwd_block_m, BLOCK_N=tune.block_n, CAUSAL=pat.causal,
            LIMIT=pat.limit, ACCUMULATE=accumulate, **kw,
        )  # fmt: skip
    if pat.n_sinks:
        sink_tiles = cdiv(pat.n_sinks, tune.block_n)
        wanted = 4 * _num_sms(q.device) // (sink_tiles * batch * kv_heads)
        splits = max(1, min(cdiv(nq, tune.bwd_block_m), wanted))
        q_split = cdiv(cdiv(nq, splits), tune.bwd_block_m) * tune.bwd_block_m
        splits = cdiv(nq, q_split)
        sink_dk, sink_dv, dk_rows = dk, dv, nk
        if dk.dtype != torch.float32:  # dK/dV in the input dtype: add the sinks' rows once
            dk_rows = pat.n_sinks
            sink_dk = torch.zeros(batch, kv_heads, dk_rows, dk.shape[-1], device=dk.device)
            sink_dv = torch.zeros(batch, kv_heads, dk_rows, dv.shape[-1], device=dv.device)
        _sinks_dkdv_kernel[(sink_tiles * splits, batch * kv_heads)](
            q, k, v, grad_out, lse, delta, sink_dk, sink_dv, leaf, *common,
            q_heads, kv_heads, nq, nk, *geometry, pat.n_sinks, splits, q_split, dk_rows,
            BLOCK_M=tune.bwd_block_m, BLOCK_N=tune.block_n, CAUSAL=pat.causal,
            LIMIT=pat.limit, **kw,
        )  # fmt: skip
        if sink_dk is not dk:
            dk[:, :, :dk_rows] += sink_dk  # (the window share of these rows was rounded once)
            dv[:, :, :dk_rows] += sink_dv
