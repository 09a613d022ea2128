"""sortLSH on the GPU: Gray-code ranks of the rows, then a stable sort of every level.

The rank kernels read each row once and write one rank: neither the projections nor a scaled
copy of Q exist in memory. Ranks equal :func:`hyperpass.reference.lsh.lsh_ranks` of the same
rows except where a projection is within rounding of zero (the two sum in different orders;
16-bit rows are projected by tensor-core dots on the planes split into three 16-bit parts).
``CountingSort`` sorts by counting (up to 2^8 buckets) in four launches, for Q and K together
when they have the same length; ``TorchSort`` uses ``torch.sort`` beyond.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from hyperpass.kernels.host import cdiv, last_dim_contiguous, next_pow2
from hyperpass.reference import lsh


@triton.jit
def _gray_rank(x, PLANES, cols, D: tl.constexpr, R: tl.constexpr, N_SHIFTS: tl.constexpr):
    """Gray-code rank (int32) of each row of ``x`` [rows, BLOCK_D] fp32: projections on the R
    planes in registers, sign bits, then the inverse Gray transform (prefix XOR from the top
    bit), as ``lsh.gray_rank``."""
    code = tl.zeros([x.shape[0]], dtype=tl.int32)
    for r in tl.static_range(R):
        plane = tl.load(PLANES + cols * R + r, mask=cols < D, other=0.0)
        proj = tl.sum(x * plane[None, :], axis=1)
        code += (proj > 0).to(tl.int32) << r
    return _inverse_gray(code, N_SHIFTS)


@triton.jit
def _gray_rank_dot(x, PLANES, cols, scale, D: tl.constexpr, R: tl.constexpr,
                   N_SHIFTS: tl.constexpr):  # fmt: skip
    """``_gray_rank`` of the rows of ``x * scale``, ``x`` [rows, BLOCK_D] in fp16/bf16, by
    tensor-core dots: the fp32 planes split into three parts of x's dtype (high, middle, low:
    24 bits for bf16), each product exact, summed in fp32, so the projections carry about the
    fp32 row sums' rounding (two parts flip too many ranks: docs/performance.md)."""
    r = tl.arange(0, 16)  # a dot's smallest width; R <= 8 planes
    ok = (cols < D)[:, None] & (r < R)[None, :]
    planes = tl.load(PLANES + cols[:, None] * R + r[None, :], mask=ok, other=0.0)
    high = planes.to(x.dtype)
    rest = planes - high.to(tl.float32)
    middle = rest.to(x.dtype)
    low = (rest - middle.to(tl.float32)).to(x.dtype)
    proj = tl.dot(x, middle, acc=tl.dot(x, low))  # the small parts first
    proj = tl.dot(x, high, acc=proj) * scale
    code = tl.sum(((proj > 0) & (r < R)[None, :]).to(tl.int32) << r[None, :], axis=1)
    return _inverse_gray(code, N_SHIFTS)


@triton.jit
def _inverse_gray(code, N_SHIFTS: tl.constexpr):
    """Position along the binary-reflected Gray sequence: prefix XOR from the top bit."""
    rank = code
    for s in tl.static_range(N_SHIFTS):
        rank = rank ^ (rank >> (1 << s))
    return rank


@triton.jit
def _rank_kernel(
    X,
    PLANES,
    RANK,
    stride_xb,
    stride_xh,
    stride_xn,
    heads,
    n_rows,
    scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R: tl.constexpr,
    N_SHIFTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x = tl.load(base + rows[:, None].to(tl.int64) * stride_xn + cols[None, :], mask=mask, other=0.0)
    rank = _gray_rank(x.to(tl.float32) * scale, PLANES, cols, D, R, N_SHIFTS)
    tl.store(RANK + pid_bh.to(tl.int64) * n_rows + rows, rank, mask=rows < n_rows)


@triton.jit
def _rows_ranked(X, row, heads, stride_b, stride_h, stride_n, rows, cols, ok, scale, PLANES,
                 D: tl.constexpr, R: tl.constexpr, N_SHIFTS: tl.constexpr,
                 DOT: tl.constexpr):  # fmt: skip
    """Gray-code ranks of rows ``rows`` of (batch, head) row ``row`` of X [B, heads, N, D],
    times ``scale``: by tensor-core dots (DOT: 16-bit X) or fp32 row sums."""
    base = X + (row // heads).to(tl.int64) * stride_b + (row % heads).to(tl.int64) * stride_h
    offs = rows[:, None].to(tl.int64) * stride_n + cols[None, :]
    x = tl.load(base + offs, mask=ok[:, None] & (cols < D)[None, :], other=0.0)
    if DOT:
        return _gray_rank_dot(x, PLANES, cols, scale, D, R, N_SHIFTS)
    return _gray_rank(x.to(tl.float32) * scale, PLANES, cols, D, R, N_SHIFTS)


@triton.jit
def _chunk_rank_kernel(
    X, Y, PLANES, RANK, CHUNKS,
    stride_xb, stride_xh, stride_xn, stride_yb, stride_yh, stride_yn,
    heads_x, heads_y, rows_x, n_rows, scale_x, scale_y,
    D: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr, N_SHIFTS: tl.constexpr,
    CHUNK: tl.constexpr, SUB: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Ranks (int16) of SUB rows of one chunk, of X's (batch, head) rows first (``rows_x`` of
    them), then Y's: one launch hashes Q and K. Many small programs: one program per chunk was
    3x slower. DOT: projections by tensor-core dots (16-bit X and Y)."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    c = pid // (CHUNK // SUB)
    start = tl.load(CHUNKS + c) + (pid % (CHUNK // SUB)) * SUB
    end = tl.load(CHUNKS + c + 1)
    cols = tl.arange(0, BLOCK_D)
    rows = start + tl.arange(0, SUB)
    ok = rows < end
    if row < rows_x:
        rank = _rows_ranked(X, row, heads_x, stride_xb, stride_xh, stride_xn, rows, cols, ok,
                            scale_x, PLANES, D, R, N_SHIFTS, DOT)  # fmt: skip
    else:
        rank = _rows_ranked(Y, row - rows_x, heads_y, stride_yb, stride_yh, stride_yn, rows,
                            cols, ok, scale_y, PLANES, D, R, N_SHIFTS, DOT)  # fmt: skip
    tl.store(RANK + row.to(tl.int64) * n_rows + rows, rank.to(tl.int16), mask=ok)


@triton.jit
def _chunk_hist_kernel(
    RANK, HIST, CHUNKS, n_rows, n_chunks, BUCKETS: tl.constexpr, CHUNK: tl.constexpr
):  # fmt: skip
    """HIST[row, chunk] = how many of the chunk's ranks fall in each bucket (every bucket is
    written: no zeroing), from the int16 ranks: cheaper than an atomic per row in the rank
    kernel."""
    c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = tl.load(CHUNKS + c)
    length = tl.load(CHUNKS + c + 1) - start
    i = tl.arange(0, CHUNK)
    rank = tl.load(RANK + row * n_rows + start + i, mask=i < length, other=0).to(tl.int32)
    bucket = tl.arange(0, BUCKETS)
    counts = tl.histogram(rank, BUCKETS) - tl.where(bucket == 0, CHUNK - length, 0)  # padding
    tl.store(HIST + (row * n_chunks + c) * BUCKETS + bucket, counts)


@triton.jit
def _scan_kernel(
    HIST, TABLE, SEGS, rows_total, n_chunks,
    BUCKETS: tl.constexpr, CB: tl.constexpr,
):  # fmt: skip
    """For one segment of one level and one (batch, head) row: TABLE[level, row, chunk, bucket]
    = where the chunk's first key of that bucket goes, minus the number of the chunk's keys in
    smaller buckets (so the scatter adds the key's position in the sorted chunk)."""
    g = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    level = tl.load(SEGS + g * 4)
    c0 = tl.load(SEGS + g * 4 + 1)
    c1 = tl.load(SEGS + g * 4 + 2)
    seg_start = tl.load(SEGS + g * 4 + 3)
    bucket = tl.arange(0, BUCKETS)
    totals = tl.zeros([BUCKETS], dtype=tl.int32)
    for cc in range(c0, c1, CB):
        chunks = cc + tl.arange(0, CB)
        ok = (chunks < c1)[:, None]
        tile = tl.load(
            HIST + (row * n_chunks + chunks)[:, None] * BUCKETS + bucket, mask=ok, other=0
        )
        totals += tl.sum(tile, axis=0)
    # the segment's keys of bucket b start after all its keys of smaller buckets
    bucket_start = seg_start + tl.cumsum(totals, axis=0) - totals
    earlier = tl.zeros([BUCKETS], dtype=tl.int32)  # keys of each bucket in earlier chunks
    for cc in range(c0, c1, CB):
        chunks = cc + tl.arange(0, CB)
        ok = (chunks < c1)[:, None]
        tile = tl.load(
            HIST + (row * n_chunks + chunks)[:, None] * BUCKETS + bucket, mask=ok, other=0
        )
        before = earlier[None, :] + tl.cumsum(tile, axis=0) - tile
        smaller_in_chunk = tl.cumsum(tile, axis=1) - tile
        out = bucket_start[None, :] + before - smaller_in_chunk
        dst = ((level * rows_total + row) * n_chunks + chunks)[:, None] * BUCKETS + bucket
        tl.store(TABLE + dst, out, mask=ok)
        earlier += tl.sum(tile, axis=0)


@triton.jit
def _scatter_kernel(
    RANK, PERM, TABLE, CHUNKS, ORDER, INVERSE,
    rows_total, n_rows, n_chunks, first_level, n_levels, inverse_from,
    BUCKETS: tl.constexpr, CHUNK: tl.constexpr, WITH_INVERSE: tl.constexpr,
    SORT: tl.constexpr, KEEP_PERM: tl.constexpr,
):  # fmt: skip
    """Sorted orders (and inverses) of one chunk for levels [first_level, first_level +
    n_levels), into ORDER [n_levels, rows, N]: destination = TABLE[level, row, chunk, rank] +
    the row's place in the chunk sorted by (rank, position). With SORT the chunk is sorted in
    registers (and, with KEEP_PERM, its permutation kept in PERM, int16, for later launches);
    else the permutation is read from PERM. Inverses: of rows from ``inverse_from`` on, into
    INVERSE [n_levels, rows_total - inverse_from, N]."""
    c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = tl.load(CHUNKS + c)
    length = tl.load(CHUNKS + c + 1) - start
    i = tl.arange(0, CHUNK)
    valid = i < length  # sorted: the chunk's rows first, the padding (rank BUCKETS) last
    line = row * n_rows + start
    if SORT:
        rank = tl.load(RANK + line + i, mask=valid, other=BUCKETS).to(tl.int32)
        key = tl.sort(rank * CHUNK + i)  # unique keys: a stable order by rank
        bucket = key // CHUNK
        local = key % CHUNK
        if KEEP_PERM:
            tl.store(PERM + line + i, local.to(tl.int16), mask=valid)
    else:
        local = tl.load(PERM + line + i, mask=valid, other=0).to(tl.int32)
        bucket = tl.load(RANK + line + local, mask=valid, other=0).to(tl.int32)
    for lv in range(n_levels):
        plane = ((first_level + lv) * rows_total + row) * n_chunks + c
        dest = tl.load(TABLE + plane * BUCKETS + bucket, mask=valid, other=0) + i
        out_line = (lv * rows_total + row) * n_rows
        tl.store(ORDER + out_line + dest, start + local, mask=valid)
        if WITH_INVERSE:
            if row >= inverse_from:
                inv_line = (lv * (rows_total - inverse_from) + row - inverse_from) * n_rows
                tl.store(INVERSE + inv_line + start + local, dest, mask=valid)


def lsh_rank(x: torch.Tensor, planes: torch.Tensor, scale: float) -> torch.Tensor:
    """Gray-code rank [B, H, N] int32 of the rows of ``x * scale``; x [B, H, N, D]."""
    batch, heads, n, dim = x.shape
    x = last_dim_contiguous(x)
    num_projs = planes.shape[1]
    ranks = torch.empty(batch, heads, n, dtype=torch.int32, device=x.device)
    n_shifts = max(0, (num_projs - 1).bit_length())
    block = 64
    grid = (cdiv(n, block), batch * heads)
    _rank_kernel[grid](
        x,
        planes.contiguous(),
        ranks,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        heads,
        n,
        scale,
        D=dim,
        BLOCK_D=next_pow2(dim),
        R=num_projs,
        N_SHIFTS=n_shifts,
        BLOCK=block,
    )
    return ranks


def sort_levels(
    ranks: torch.Tensor,
    segments: torch.Tensor | None,
    num_projs: int,
    inverse: bool = False,
    n_segments: int = 1,
):
    """Stable sort of every level at once.

    Args:
        ranks: [B, H, N] int32 Gray-code ranks.
        segments: [L, N] int32 monotone segment ids, or None for a single level of one segment.
        n_segments: one more than the largest segment id (a host int: no device sync).

    Returns:
        (order [L, B, H, N] int32 original positions in sorted order,
         inverse [L, B, H, N] int32 sorted position of each original position, or None)
    """
    if segments is None:
        keys = ranks.unsqueeze(0)
    else:
        keys = (segments[:, None, None, :] << num_projs) + ranks.unsqueeze(0)
    if n_segments << num_projs <= 2**15:  # 16-bit keys halve the radix sort's passes
        keys = keys.to(torch.int16)
    order = torch.sort(keys, dim=-1, stable=True).indices.to(torch.int32)
    if not inverse:
        return order, None
    n = ranks.shape[-1]
    positions = torch.arange(n, device=ranks.device, dtype=torch.int32).expand_as(order)
    return order, torch.empty_like(order).scatter_(-1, order.long(), positions)


CHUNK = 1024  # positions per counting-sort chunk: one program sorts it in registers
MAX_COUNTING_BITS = 8  # up to 256 buckets; more hyperplanes take torch.sort
_SCAN_CHUNKS = 32  # chunk rows per step of the scan kernel


def scatter_warps(chunk: int) -> int:
    """Warps of a scatter program (one chunk): 64 positions each (more warps were faster)."""
    return max(1, min(16, chunk // 64))


@functools.lru_cache(maxsize=64)
def _chunk_tables(n: int, edges: tuple[tuple[int, ...], ...], chunk: int, device) -> tuple:
    """Chunks of at most ``chunk`` positions that never straddle a segment of any level, and per
    (level, segment) its chunk range: (chunks [C + 1] int32 starts and the end n,
    segs [G, 4] int32 rows (level, first chunk, one past the last chunk, first position))."""
    finest = sorted(set().union(*edges))
    starts = [p for a, b in itertools.pairwise(finest) for p in range(a, b, chunk)]
    index = {p: c for c, p in enumerate(starts)}
    index[n] = len(starts)
    segs = [
        (level, index[a], index[b], a)
        for level, bounds in enumerate(edges)
        for a, b in itertools.pairwise(bounds)
    ]
    chunks = torch.tensor(starts + [n], dtype=torch.int32, device=device)
    return chunks, torch.tensor(segs, dtype=torch.int32, device=device)


def counting_sort_supported(num_projs: int) -> bool:
    return num_projs <= MAX_COUNTING_BITS


class CountingSort:
    """Every level's stable sort, by (segment, Gray-code rank), of the rows of one or two tensors
    of the same length (Q and K: each launch serves both, as rows of one table).

    Construction hashes and counts for all levels at once (three launches: int16 ranks, their
    per-chunk histograms, a scan of the histograms per segment of every level). Then, by
    default, ``level(l)`` scatters one level's orders in one launch, so a caller holds one
    level's int32 orders, not all ``L`` (``L`` grows as log N: all at once cost 12 bytes per
    query/key row and level, ~12% of the causal forward's memory at 131072). The first scatter
    sorts each chunk in registers and, when there are more levels, keeps its permutation
    (int16) for the others. With ``keep_levels`` the first call scatters every level in one
    launch and keeps them (the backward asks for each level twice: fewer launches for that
    memory). No device sync.

    Args:
        parts: one or two (x [B, H, N, D], scale) with the same B, N and D (H may differ);
            the rows hashed are ``x * scale``.
        planes: [D, r] with r <= MAX_COUNTING_BITS.
        edges: per level, sorted segment boundaries (0 and N included); None: one segment.
        inverse: also scatter each position's sorted position, of the last part.
        keep_levels: scatter and keep every level at the first call.
        chunk: positions per chunk (a power of two); None: CHUNK, or less when every segment
            of the finest level is shorter.
    """

    def __init__(self, parts, planes, edges, inverse=False, keep_levels=False, chunk=None):
        (_, scale_x), (_, scale_y) = parts[0], parts[-1]
        xs = [last_dim_contiguous(t) for t, _ in parts]
        x, y = xs[0], xs[-1]
        batch, _, n, dim = x.shape
        if y.shape[0] != batch or y.shape[2:] != x.shape[2:]:
            raise ValueError(f"parts of shapes {x.shape} and {y.shape}: B, N and D must match")
        num_projs = planes.shape[1]
        self.buckets = max(16, 1 << num_projs)
        edges = edges if edges is not None else ((0, n),)
        if chunk is None:
            longest = max(b - a for a, b in itertools.pairwise(edges[-1]))
            chunk = min(CHUNK, max(16, next_pow2(longest)))
        self.chunk, self.levels, self.inverse = chunk, len(edges), inverse
        self.keep_levels = keep_levels
        self.chunks, segs = _chunk_tables(n, edges, chunk, x.device)
        self.heads = [t.shape[1] for t in xs]
        self.batch, self.n = batch, n
        n_chunks, rows = self.chunks.shape[0] - 1, batch * sum(self.heads)
        rows_x = batch * self.heads[0]  # rows of the first part (all of them with one part)
        self.inverse_from = rows - batch * self.heads[-1]
        self.ranks = torch.empty(rows, n, dtype=torch.int16, device=x.device)
        sub = min(64, chunk)
        # projections by tensor-core dots when both parts are 16-bit (fp32: row sums)
        dot = x.dtype in (torch.float16, torch.bfloat16) and y.dtype == x.dtype
        _chunk_rank_kernel[(n_chunks * (chunk // sub), rows)](
            x, y, planes, self.ranks, self.chunks, *x.stride()[:3], *y.stride()[:3],
            x.shape[1], y.shape[1], rows_x, n, scale_x, scale_y,
            D=dim, BLOCK_D=next_pow2(dim), R=num_projs,
            N_SHIFTS=max(0, (num_projs - 1).bit_length()), CHUNK=chunk, SUB=sub, DOT=dot,
            num_warps=2 if dot else 4,  # the dot form is faster with 2
        )  # fmt: skip
        hist = torch.empty(rows, n_chunks, self.buckets, dtype=torch.int32, device=x.device)
        _chunk_hist_kernel[(n_chunks, rows)](
            self.ranks, hist, self.chunks, n, n_chunks, BUCKETS=self.buckets, CHUNK=chunk,
            num_warps=max(1, min(8, chunk // 128)),
        )  # fmt: skip
        self.table = torch.empty(
            self.levels, rows, n_chunks, self.buckets, dtype=torch.int32, device=x.device
        )
        _scan_kernel[(segs.shape[0], rows)](
            hist, self.table, segs, rows, n_chunks, BUCKETS=self.buckets, CB=_SCAN_CHUNKS
        )
        self.perm = None  # the chunks' sorted permutations, once a scatter has sorted them
        self.kept = None  # (first level, orders [n, rows, N], inverses or None) of the last call

    def level(self, level: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per part: (order [B, H, N] int32 original positions in sorted order, inverse
        [B, H, N] int32 sorted position of each original position, or None) of one level."""
        if self.kept is None or not 0 <= level - self.kept[0] < self.kept[1].shape[0]:
            self.kept = None  # let the previous level's orders go before allocating these
            first, count = (0, self.levels) if self.keep_levels else (level, 1)
            self.kept = (first, *self._scatter(first, count))
        first, orders, inverses = self.kept
        by_part = orders[level - first].split([self.batch * h for h in self.heads])
        shapes = [(self.batch, h, self.n) for h in self.heads]
        result = [(o.view(shape), None) for o, shape in zip(by_part, shapes, strict=True)]
        if inverses is not None:
            last = inverses[level - first].view(self.batch, self.heads[-1], self.n)
            result[-1] = (result[-1][0], last)
        return result

    def drop_level(self) -> None:
        """Forget the current level's orders and inverse: the caller holds what it still reads
        (the forward: the orders, not the inverse), and a later ``level()`` scatters again.
        Kept levels (the backward's) stay."""
        if not self.keep_levels:
            self.kept = None

    def _scatter(self, first: int, count: int):
        rows, n = self.ranks.shape
        device = self.ranks.device
        orders = torch.empty(count, rows, n, dtype=torch.int32, device=device)
        inverses = None
        if self.inverse:
            inverses = torch.empty(count, rows - self.inverse_from, n, dtype=torch.int32,
                                   device=device)  # fmt: skip
        sort = self.perm is None
        keep_perm = sort and count < self.levels  # other launches will need the permutation
        if keep_perm:
            self.perm = torch.empty_like(self.ranks)
        n_chunks = self.chunks.shape[0] - 1
        _scatter_kernel[(n_chunks, rows)](
            self.ranks, self.perm if self.perm is not None else self.ranks, self.table,
            self.chunks, orders, orders if inverses is None else inverses, rows, n, n_chunks,
            first, count, self.inverse_from,
            BUCKETS=self.buckets, CHUNK=self.chunk, WITH_INVERSE=self.inverse,
            SORT=sort, KEEP_PERM=keep_perm, num_warps=scatter_warps(self.chunk),
        )  # fmt: skip
        return orders, inverses


class TorchSort:
    """``CountingSort``'s interface over ``sort_levels`` (more than 2^8 buckets): every level
    of every part sorted at once by ``torch.sort``."""

    def __init__(self, parts, planes, segments, inverse: bool, n_segments: int):
        r = planes.shape[1]
        self.sorted = [
            sort_levels(lsh_rank(x, planes, scale), segments, r, inverse and i == len(parts) - 1,
                        n_segments)
            for i, (x, scale) in enumerate(parts)
        ]  # fmt: skip

    def level(self, level: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(order[level], None if inv is None else inv[level]) for order, inv in self.sorted]

    def drop_level(self) -> None:
        """Nothing to drop level by level: every level was sorted at once (one allocation)."""


_PLANES: dict = {}


def planes_for(head_dim: int, num_projs: int, seed: int, device) -> torch.Tensor:
    """The reference's hyperplanes [D, r] fp32 on ``device`` (cached)."""
    key = (head_dim, num_projs, seed, str(device))
    if key not in _PLANES:
        _PLANES[key] = lsh.hyperplanes(head_dim, num_projs, seed, device).contiguous()
    return _PLANES[key]
