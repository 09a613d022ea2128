"""method="select": block selection per query tile, against a dense mask built from its definition
with plain loops (independent of the vectorized reference), fixed and adaptive budgets."""

import math

import pytest
import torch
import torch.nn.functional as F

from hyperpass.config import HyperConfig
from hyperpass.op import hyper_attention
from hyperpass.reference import hyper_attention_reference
from hyperpass.reference.select import BUCKET_WIDTH, N_BUCKETS, ROW_SHARE_CAP

FP32 = {"atol": 2e-5, "rtol": 2e-5}


def qkv(batch, hq, hkv, n, dim, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, dim, generator=gen, dtype=dtype) for h in (hq, hkv, hkv)]


def _tile_blocks(q_tile, keys, cfg: HyperConfig, s: int, n: int, causal: bool,
                 allowed: set[int] | None = None) -> set[int]:  # fmt: skip
    """The key blocks of the tile starting at ``s`` (q_tile: its scaled rows), by the docstring
    of hyperpass.reference.select, one block at a time; ``allowed``: the only candidates the
    tile may rank (its coarse tile's, ``_coarse_allowed``)."""
    qb, kb = cfg.query_block, cfg.select_block
    n_kb = math.ceil(n / kb)
    lo = (max(s + qb - cfg.window, 0) // kb) * kb
    hi = min(s + qb, n) if causal else min(math.ceil((s + cfg.window) / kb) * kb, n)
    local, sinks, candidates = set(), set(), []
    for j in range(n_kb):
        start, end = j * kb, min((j + 1) * kb, n)
        if end > lo and start < hi:
            local.add(j)
        elif start < cfg.sinks and (not causal or start < hi):
            sinks.add(j)
        elif end <= lo or (not causal and start >= hi):
            candidates.append(j)
    if cfg.select_score == "bound":
        size = qb // cfg.query_groups
        reps = [q_tile[g : g + size].mean(0) for g in range(0, len(q_tile), size)]
        scores = {}
        for j in range(n_kb):
            blk = keys[j * kb : (j + 1) * kb]
            scores[j] = max(
                ((r.clamp(min=0) * blk.amax(0)).sum() + (r.clamp(max=0) * blk.amin(0)).sum())
                for r in reps
            ).item()
    else:  # rows: each sampled row's log mass per block against its local and sink mass
        scores = {j: -math.inf for j in range(n_kb)}
        m = min(qb, n - s)  # the tile's queries
        for i in range(cfg.select_rows):
            r = s + max(m - 1 - i * max(m // cfg.select_rows, 1), 0)
            row = keys @ q_tile[r - s]
            if causal:
                row[r + 1 :] = -math.inf
            block_lse = [torch.logsumexp(row[j * kb : (j + 1) * kb], 0).item() for j in range(n_kb)]
            fixed = [block_lse[j] for j in local | sinks]
            norm = torch.logsumexp(torch.tensor(fixed), 0).item()
            for j in range(n_kb):  # each visible key's ratio to the local mass, clipped
                keys_j = row[j * kb : (j + 1) * kb]
                ratio = (keys_j[keys_j > -math.inf] - norm).clamp(-ROW_SHARE_CAP, ROW_SHARE_CAP)
                share = torch.logsumexp(ratio, 0).item() - math.log(min((j + 1) * kb, n) - j * kb)
                scores[j] = max(scores[j], share)
    if allowed is not None:
        scores = {j: (x if j in allowed else -math.inf) for j, x in scores.items()}
    budget = min(cfg.select_topk, len(candidates))
    if candidates:
        best = max(scores[j] for j in candidates)
        best = 0.0 if best == -math.inf else best  # (unranked blocks: the last bucket)
        bucket = {j: int(min((best - scores[j]) / BUCKET_WIDTH, N_BUCKETS - 1)) for j in candidates}
        if cfg.select_mass > 0:
            allowed = [*local, *sinks, *candidates]
            top = max(scores[j] for j in allowed)
            mass = {j: (min((j + 1) * kb, n) - j * kb) * math.exp(scores[j] - top) for j in allowed}
            total = sum(mass.values())
            have = sum(mass[j] for j in [*local, *sinks])
            need = 0
            if have < cfg.select_mass * total:
                need = len(candidates)
                for b in range(N_BUCKETS):
                    inside = [j for j in candidates if bucket[j] <= b]
                    if have + sum(mass[j] for j in inside) >= cfg.select_mass * total:
                        need = len(inside)
                        break
            budget = min(max(need, cfg.select_min), cfg.select_topk, len(candidates))

        def nearness(j):  # blocks before the local span, then after it (non-causal)
            return (lo // kb - 1 - j, 0) if (j + 1) * kb <= lo else (j - math.ceil(hi / kb), 1)

        if causal and s + qb >= n:  # the last tile keeps at least select_last
            budget = min(max(budget, cfg.select_last), len(candidates))
        ranked = sorted(candidates, key=lambda j: (bucket[j], *nearness(j)))
        chosen = set(ranked[:budget])
    else:
        chosen = set()
    return local | sinks | chosen


def _coarse_allowed(q_rows, keys, cfg: HyperConfig, s: int, n: int, causal: bool):
    """The candidates a coarse tile starting at ``s`` (``q_rows``: its scaled rows) lets its
    tiles rank: the blocks a tile of ``select_coarse`` tiles selects with a window grown by the
    tiles between and ``select_candidates * select_topk`` blocks (its local span among them);
    None (every block) with one tile per coarse tile, for a causal call's last, or with the
    bound (which is cheap)."""
    c, qb = cfg.select_coarse, cfg.query_block
    if c == 1 or cfg.select_score != "rows" or (causal and s + c * qb >= n):
        return None
    coarse = cfg.replace(
        query_block=c * qb, window=cfg.window + (c - 1) * qb, select_coarse=1, select_mass=0.0,
        select_topk=cfg.select_candidates * cfg.select_topk, select_min=0, select_last=0,
    )  # fmt: skip
    return _tile_blocks(q_rows, keys, coarse, s, n, causal)


def dense_select_mask(q, k, cfg: HyperConfig, causal: bool) -> torch.Tensor:
    """[B, Hq, N, N] keep-mask of the selection, with the causal mask on top."""
    batch, hq, n, dim = q.shape
    group = hq // k.shape[1]
    mask = torch.zeros(batch, hq, n, n, dtype=torch.bool)
    scaled = q / math.sqrt(dim)
    span = cfg.select_coarse * cfg.query_block
    for b in range(batch):
        for h in range(hq):
            keys = k[b, h // group]
            for s in range(0, n, cfg.query_block):
                e = min(s + cfg.query_block, n)
                c0 = s // span * span  # the tile's coarse tile
                allowed = _coarse_allowed(scaled[b, h, c0 : c0 + span], keys, cfg, c0, n, causal)
                for j in _tile_blocks(scaled[b, h, s:e], keys, cfg, s, n, causal, allowed):
                    mask[b, h, s:e, j * cfg.select_block : (j + 1) * cfg.select_block] = True
    if causal:
        mask &= torch.ones(n, n, dtype=torch.bool).tril()
    return mask


BASE = dict(window=48, select_block=32, query_block=32, select_topk=3, sinks=0, select_last=0)
CASES = [
    pytest.param(1, 2, 2, 130, 16, {}, id="N130"),
    pytest.param(2, 6, 2, 200, 16, {"sinks": 40, "query_groups": 4}, id="B2-GQA3-sinks40"),
    pytest.param(
        1, 3, 1, 257, 32, {"query_block": 64, "window": 64, "select_topk": 2}, id="MQA-qb64-N257"
    ),
    pytest.param(1, 2, 1, 230, 16, {"select_mass": 0.6, "select_min": 1}, id="adaptive"),
    pytest.param(1, 2, 2, 190, 16, {"select_mass": 1.0, "select_topk": 9}, id="adaptive-all"),
    pytest.param(1, 2, 1, 301, 16, {"select_last": 5}, id="last-tile-5"),
    pytest.param(1, 2, 1, 330, 16, {"select_mass": 0.6, "select_last": 4}, id="adaptive-last4"),
    pytest.param(1, 3, 1, 417, 16, {"select_coarse": 4, "select_candidates": 1}, id="coarse4"),
    pytest.param(2, 4, 2, 300, 16, {"select_coarse": 3, "select_candidates": 2, "sinks": 40,
                                    "select_topk": 2, "select_last": 4}, id="coarse3-sinks-last"),
    pytest.param(1, 2, 1, 350, 16, {"select_coarse": 2, "select_candidates": 1,
                                    "select_mass": 0.6, "select_min": 1}, id="coarse2-adaptive"),
]  # fmt: skip


@pytest.mark.parametrize("score", ["rows", "bound"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch,hq,hkv,n,dim,extra", CASES)
def test_select_equals_dense_mask_of_its_definition(batch, hq, hkv, n, dim, extra, causal, score):
    cfg = HyperConfig(method="select", select_score=score, **{**BASE, **extra})
    q, k, v = qkv(batch, hq, hkv, n, dim)
    out, lse = hyper_attention_reference(q, k, v, is_causal=causal, config=cfg)
    mask = dense_select_mask(q, k, cfg, causal)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv)
    torch.testing.assert_close(out, want, **FP32)
    scores = q @ k.repeat_interleave(hq // hkv, 1).mT / math.sqrt(dim)
    torch.testing.assert_close(
        lse, torch.logsumexp(scores.masked_fill(~mask, -math.inf), -1), **FP32
    )


def test_adaptive_budget_spends_where_the_mass_is():
    """A higher mass target never selects fewer blocks; the budget stays in [min, topk]."""
    q, k, v = qkv(1, 2, 2, 320, 16, seed=3)
    counts = []
    for share in (0.3, 0.7, 0.95):
        cfg = HyperConfig(method="select", **{**BASE, "select_topk": 6, "select_min": 1},
                          select_mass=share)  # fmt: skip
        counts.append(dense_select_mask(q, k, cfg, True).sum().item())
    assert counts == sorted(counts) and counts[0] < counts[-1]


@pytest.mark.parametrize("causal", [False, True])
def test_select_is_exact_when_the_window_or_the_blocks_cover_every_key(causal):
    q, k, v = qkv(2, 4, 2, 150, 16)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    for cfg in (
        HyperConfig(method="select", window=160),
        HyperConfig(method="select", window=32, select_block=32, query_block=32, select_topk=5),
    ):
        out, _ = hyper_attention_reference(q, k, v, is_causal=causal, config=cfg)
        torch.testing.assert_close(out, want, **FP32)


@pytest.mark.parametrize("causal", [False, True])
def test_select_gradients_through_the_op(causal):
    cfg = HyperConfig(
        min_len=16, method="select", window=16, select_block=16, query_block=16,
        query_groups=2, select_topk=1, sinks=2,
    )  # fmt: skip
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 2, 1, 50, 8))
    fn = lambda q, k, v: hyper_attention(q, k, v, is_causal=causal, enable_gqa=True, config=cfg)
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"window": 8, "query_block": 16}, "window >= query_block"),
        ({"window": 64, "query_block": 32, "query_groups": 3}, "must divide"),
        ({"window": 64, "query_block": 32, "select_rows": 3}, "select_rows .3. must divide"),
        ({"window": 64, "select_score": "max"}, "select_score must be one of"),
        ({"window": 64, "query_block": 24}, "multiples of 16"),
        ({"window": 256, "select_topk": 0}, "select_topk"),
        ({"window": 256, "sample_size": 64}, "sample_size applies to method='hyper'"),
        ({"window": 256, "select_mass": 1.5}, "select_mass"),
        ({"window": 256, "select_min": 20, "select_topk": 4}, "select_min"),
    ],
)
def test_select_parameters_are_validated(params, message):
    with pytest.raises(ValueError, match=message):
        HyperConfig(method="select", **params)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_attention_equals_dense_masked_attention(causal):
    """Any block pattern (tiles with no block, uneven counts, a ragged last block), with a key
    mask that leaves some rows no key: the gathered computation equals dense masked softmax,
    outputs, log-sum-exps and gradients."""
    from hyperpass.reference.select import block_sparse_attention
    from hyperpass.reference.softmax import attend

    gen = torch.Generator().manual_seed(3)
    batch, kv_heads, groups, n, dim, qb, kb = 2, 2, 3, 150, 16, 32, 16
    q = torch.randn(batch, kv_heads, groups, n, dim, generator=gen).requires_grad_()
    k = torch.randn(batch, kv_heads, n, dim, generator=gen).requires_grad_()
    v = torch.randn(batch, kv_heads, n, dim, generator=gen).requires_grad_()
    n_t, n_b = math.ceil(n / qb), math.ceil(n / kb)
    blocks = torch.rand(batch, kv_heads, groups, n_t, n_b, generator=gen) < 0.3
    blocks[0, 0, 0, 1] = False  # a tile with no block
    key_valid = torch.ones(batch, n, dtype=torch.bool)
    key_valid[1, :40] = False  # left padding: early rows of batch 1 have no valid key
    out, lse = block_sparse_attention(q, k, v, blocks, qb, kb, causal, key_valid)

    keep = blocks.repeat_interleave(kb, -1)[..., :n].repeat_interleave(qb, -2)[..., :n, :]
    keep = keep & key_valid[:, None, None, None, :]
    if causal:
        keep = keep & torch.ones(n, n, dtype=torch.bool).tril()
    want_out, want_lse = attend(q, k.unsqueeze(2), v.unsqueeze(2), keep)
    torch.testing.assert_close(out, want_out, **FP32)
    torch.testing.assert_close(lse, want_lse, **FP32)
    assert (lse == -math.inf).any() and lse.isfinite().any()  # both kinds of rows are exercised

    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * grad).sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        assert g.isfinite().all()
        torch.testing.assert_close(g, w, **FP32)


def _needle_blocks_chosen(cfg: HyperConfig, n: int, needle: int, asker: int, seed: int):
    """The blocks the last tile selects besides its local span, when only query ``asker``
    matches the key at ``needle`` (score 64 against about N(0, 8) elsewhere)."""
    from hyperpass.reference.select import select_block_mask

    gen = torch.Generator().manual_seed(seed)
    dim = 16
    k = torch.randn(1, 1, n, dim, generator=gen)
    q = torch.randn(1, 1, 1, n, dim, generator=gen) / 4
    direction = torch.randn(dim, generator=gen)
    direction = direction / direction.norm()
    k[0, 0, needle] = 8 * direction
    q[0, 0, 0, asker] = 8 * direction
    blocks = select_block_mask(q, k, cfg, True)[0, 0, 0, -1]
    chosen = set(torch.nonzero(blocks).flatten().tolist())
    last_tile = (n - 1) // cfg.query_block * cfg.query_block
    first_local = max(last_tile + cfg.query_block - cfg.window, 0) // cfg.select_block
    return chosen - set(range(first_local, (n - 1) // cfg.select_block + 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_find_the_far_block_one_query_needs(seed):
    """A key planted far back that only the tile's last query matches (a passkey): its block is
    the one block the rows estimator selects."""
    n, needle = 512, 40 + 17 * seed  # blocks 1-2 of 16, far before the last tile
    cfg = HyperConfig(method="select", **{**BASE, "select_topk": 1})
    assert _needle_blocks_chosen(cfg, n, needle, n - 1, seed) == {needle // cfg.select_block}


@pytest.mark.parametrize("present", [3, 13, 31])
def test_rows_spread_over_a_partial_last_tile(present):
    """A prompt's last tile holds fewer rows than ``query_block``: its sampled rows are spread
    over those it has (not all clipped to the last), so a far key that only an earlier row of
    that tile matches is still selected for it."""
    cfg = HyperConfig(method="select", **{**BASE, "select_topk": 1, "select_rows": 4})
    n, needle = 480 + present, 50  # the last tile: rows 480 .. n - 1
    asker = n - 1 - max(present // 4, 1)  # a sampled row, not the last
    got = _needle_blocks_chosen(cfg, n, needle, asker, present)
    assert got == {needle // cfg.select_block}
