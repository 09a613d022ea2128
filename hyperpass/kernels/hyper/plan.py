"""Host-side plan of one HyperAttention call: sub-problems, tile tables, segment ids, samples.

The kernels never branch on the recursion: the plan flattens Algorithm 4 into *levels*. Level
``l`` holds every off-diagonal sub-problem of depth ``l`` (queries = second half of a node, keys =
its first half); the diagonal leaves (at most ``min_seq_len`` long) are exact and causal. A
non-causal or flat-causal call is one level with one sub-problem covering everything.

Segment ids let one stable ``torch.sort`` per level sort every sub-problem of that level at once:
the key ``segment * 2^r + rank`` keeps each segment's sorted entries inside the segment's own
position range, so sub-problem ``(q_off, nq)`` finds its sorted queries at sorted positions
``[q_off, q_off + nq)``. Everything here is small (O(levels * N) int32) and cached per shape.

Imports only torch and the project's config/lsh modules.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from hyperpass.config import HyperConfig
from hyperpass.reference import lsh
from hyperpass.reference.lsh import lsh_block_shape

# columns of a sub-problem row in Level.subs
SUB_FIELDS = ("q_off", "nq", "k_off", "nk", "q_per_block", "q_blocks", "k_blocks", "unused")


@dataclass(frozen=True)
class Level:
    """All sub-problems of one depth, and the tile tables of the kernels that serve them.

    Attributes:
        subs: [S, 8] int32, one row per sub-problem (``SUB_FIELDS``).
        q_tiles: [T, 3] int32 (sub, query block, sub-tile): forward and dq programs.
        k_tiles: [T2, 3] int32 (sub, key block, sub-tile): dk/dv programs of the LSH blocks.
        s_tiles: [T3, 3] int32 (sub, sample chunk, query split): dk/dv programs of the samples.
        samples: [S, B, Hkv, m] int32 local key indices of each sub-problem's samples.
        sample_slot: [S, B, Hkv, m] int32 index of each sample's key in ``sample_keys``.
        sample_keys: [S, B, Hkv, m] int32 the distinct sampled keys (local), padded with -1:
            the backward sums each distinct key's gradient once (samples repeat).
        q_split: queries per split in ``s_tiles`` (a multiple of the row block).
        even: no query tile, key step or sample step of the forward/dQ programs runs past the
            end of its block or sub-problem (the kernels then need no masks).
    """

    subs: torch.Tensor
    q_tiles: torch.Tensor
    k_tiles: torch.Tensor
    s_tiles: torch.Tensor
    samples: torch.Tensor
    sample_slot: torch.Tensor
    sample_keys: torch.Tensor
    q_split: int
    even: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything but the data: levels, sort segments, exact leaves.

    Attributes:
        levels: the approximated levels, shallowest first.
        segments: [L, N] int32 monotone segment id of each position per level (None if L == 1
            and the single segment is everything).
        leaf_start: [Nq] int32 first key of the exact causal leaf of each row (causal recursive),
            else None.
        leaf_end: [Nq] int32 one past the last row of that leaf, else None.
        only_past: the approximation masks future keys and counts the diagonal (flat causal).
        n_segments: one more than the largest segment id.
        edges: per level, the sorted segment boundaries (0 and N included), the counting sort's
            view of ``segments``; None when the single segment is everything.
    """

    levels: tuple[Level, ...]
    segments: torch.Tensor | None
    leaf_start: torch.Tensor | None
    leaf_end: torch.Tensor | None
    only_past: bool
    n_segments: int = 1
    edges: tuple[tuple[int, ...], ...] | None = None


def _tree(n: int, min_seq_len: int):
    """Algorithm 4's recursion, flattened: (off-diagonal nodes by depth, leaves)."""
    nodes: dict[int, list[tuple[int, int]]] = {}
    leaves: list[tuple[int, int]] = []

    def visit(off: int, size: int, depth: int) -> None:
        if size <= min_seq_len:
            leaves.append((off, size))
            return
        half = size // 2
        nodes.setdefault(depth, []).append((off, size))
        visit(off, half, depth + 1)
        visit(off + half, size - half, depth + 1)

    visit(0, n, 0)
    return [sorted(nodes[d]) for d in sorted(nodes)], sorted(leaves)


def _sub_row(q_off: int, nq: int, k_off: int, nk: int, block_size: int) -> list[int]:
    qpb, q_blocks, k_blocks = lsh_block_shape(nq, nk, block_size)
    return [q_off, nq, k_off, nk, qpb, q_blocks, k_blocks, 0]


def _level(rows, cfg, batch, kv_heads, device, block_m, block_n, n_sm) -> Level:
    q_tiles, k_tiles, s_tiles = [], [], []
    sub_tiles = math.ceil(rows[0][4] / block_m) if rows else 1
    m = cfg.sample_size if cfg.uses_samples else 0
    total_q = sum(r[1] for r in rows)
    # enough sample programs to fill the GPU: split every sub-problem's queries
    chunks = max(1, math.ceil(m / block_n)) if m else 0
    programs_wanted = 4 * n_sm
    splits = max(1, programs_wanted // max(1, chunks * len(rows) * batch * kv_heads))
    q_split = max(block_m, math.ceil(math.ceil(total_q / len(rows)) / splits / block_m) * block_m)
    for s, (_, nq, _, _, qpb, q_blocks, k_blocks, _) in enumerate(rows):
        sub_tiles = math.ceil(qpb / block_m)
        q_tiles += [(s, j, t) for j in range(q_blocks) for t in range(sub_tiles)]
        k_sub = math.ceil(cfg.block_size / block_n)
        k_tiles += [(s, b, u) for b in range(k_blocks) for u in range(k_sub)]
        if m:
            s_tiles += [(s, c, p) for c in range(chunks) for p in range(math.ceil(nq / q_split))]
    samples, slots, distinct = [], [], []
    for q_off, _, k_off, nk, *_ in rows:
        idx = torch.zeros(batch, 1, m, dtype=torch.int64)
        if m:
            tag = lsh.subproblem_tag(q_off, k_off)
            # as the reference: one sample set per batch row, shared by every head
            idx = lsh.sample_indices(cfg.seed, tag, (batch, 1, m), nk, "cpu")
        slot, keys = torch.empty_like(idx), torch.full_like(idx, -1)
        for b in range(batch):
            unique, inverse = torch.unique(idx[b, 0], return_inverse=True)
            slot[b, 0], keys[b, 0, : unique.numel()] = inverse, unique
        samples.append(idx.expand(batch, kv_heads, m))
        slots.append(slot.expand(batch, kv_heads, m))
        distinct.append(keys.expand(batch, kv_heads, m))

    def stacked(x):
        return torch.stack(x).to(torch.int32).to(device)

    def table(x):
        return torch.tensor(x, dtype=torch.int32).reshape(-1, 3).to(device)

    even = (
        cfg.block_size % block_n == 0
        and m % block_n == 0
        and all(qpb % block_m == 0 and nq % qpb == 0 and nk % cfg.block_size == 0
                for _, nq, _, nk, qpb, *_ in rows)
    )  # fmt: skip
    return Level(
        even=even,
        subs=torch.tensor(rows, dtype=torch.int32).to(device),
        q_tiles=table(q_tiles),
        k_tiles=table(k_tiles),
        s_tiles=table(s_tiles),
        samples=stacked(samples),
        sample_slot=stacked(slots),
        sample_keys=stacked(distinct),
        q_split=q_split,
    )


@functools.lru_cache(maxsize=64)
def make_plan(
    nq: int,
    nk: int,
    is_causal: bool,
    cfg: HyperConfig,
    batch: int,
    kv_heads: int,
    device: torch.device,
    block_m: int,
    block_n: int,
    n_sm: int = 132,
) -> Plan:
    """The plan of one call shape (cached: build cost is paid once per shape)."""
    recursive = cfg.causal_recursion(is_causal)
    if not recursive:
        rows = [_sub_row(0, nq, 0, nk, cfg.block_size)]
        level = _level(rows, cfg, batch, kv_heads, device, block_m, block_n, n_sm)
        return Plan((level,), None, None, None, only_past=is_causal)

    by_depth, leaves = _tree(nq, cfg.min_seq_len)
    levels, segments, level_edges = [], [], []
    bounds: set[int] = {0}
    for depth_nodes in by_depth:
        rows = []
        for off, size in depth_nodes:
            half = size // 2
            rows.append(_sub_row(off + half, size - half, off, half, cfg.block_size))
            bounds |= {off, off + half, off + size}
        levels.append(_level(rows, cfg, batch, kv_heads, device, block_m, block_n, n_sm))
        level_edges.append(tuple(sorted(bounds)))
        edges = torch.tensor(level_edges[-1])
        segments.append(torch.searchsorted(edges, torch.arange(nq), right=True) - 1)
    leaf_start = torch.empty(nq, dtype=torch.int32)
    leaf_end = torch.empty(nq, dtype=torch.int32)
    for off, size in leaves:
        leaf_start[off : off + size] = off
        leaf_end[off : off + size] = off + size
    seg = torch.stack(segments).to(torch.int32) if segments else None
    return Plan(
        tuple(levels),
        None if seg is None else seg.to(device),
        leaf_start.to(device),
        leaf_end.to(device),
        only_past=False,
        n_segments=1 if seg is None else int(seg.max()) + 1,
        edges=tuple(level_edges) if level_edges else None,
    )
