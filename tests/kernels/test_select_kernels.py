"""``method="select"`` on the kernel path: the selection kernel's block lists against the
reference's selection (interpreted), and FlexAttention over them against the reference.

Small tiles (query tiles of 32 or 64, key blocks of 16 or 32) so that ~100-300 keys hold window,
sinks, several candidates on both sides (non-causal) and odd tails. FlexAttention runs compiled
on the CPU (a few compiles: each test family is one); its backward runs only on GPUs
(``tools/gpu_check.py``).
"""

from __future__ import annotations

import pytest
import torch

from hyperpass import kernels
from hyperpass.config import HyperConfig
from hyperpass.kernels.select_blocks import (
    coarse_prunes,
    key_block_extremes,
    select_block_lists,
)
from hyperpass.reference import hyper_attention_reference
from hyperpass.reference.select import select_block_mask
from tests.kernels.harness import close, inputs

SELECT = HyperConfig(
    method="select", window=48, sinks=0, select_topk=3, select_block=32, query_block=32,
    query_groups=4, min_len=1, select_last=0,
)  # fmt: skip


def _dense(part_num, part_idx, full_num, full_idx, n_blocks) -> torch.Tensor:
    """[B, H, n_tiles, n_blocks] bool of the lists (checking they are disjoint, ascending)."""
    batch, heads, tiles = full_num.shape
    dense = torch.zeros(batch, heads, tiles, n_blocks, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for t in range(tiles):
                full = full_idx[b, h, t, : full_num[b, h, t]].tolist()
                part = part_idx[b, h, t, : part_num[b, h, t]].tolist()
                assert full == sorted(full) and part == sorted(part)
                assert not set(full) & set(part)
                dense[b, h, t, full + part] = True
    return dense


CASES = [
    (dict(), (1, 3, 1, 100, 100, 64)),
    (dict(sinks=40), (1, 2, 2, 97, 97, 64)),
    (dict(select_topk=8, query_block=64, window=64), (2, 2, 1, 211, 211, 32)),
    (dict(select_block=16, select_topk=5, query_groups=8), (1, 4, 2, 150, 150, 128)),
    (dict(select_mass=0.7, select_min=1, select_topk=6), (1, 2, 1, 230, 230, 64)),
    (dict(select_mass=1.0, select_topk=16, sinks=5), (1, 1, 1, 190, 120, 32)),
    (dict(select_last=5), (1, 2, 1, 301, 301, 64)),
    (dict(select_mass=0.7, select_min=1, select_topk=6, select_last=4), (1, 2, 1, 330, 330, 64)),
    (dict(select_coarse=4, select_candidates=1, sinks=40), (1, 3, 1, 417, 417, 64)),
    (dict(select_coarse=3, select_candidates=2, select_block=16, select_topk=2),
     (2, 2, 1, 350, 350, 128)),
    (dict(select_coarse=2, select_candidates=1, select_mass=0.7, select_min=1, select_topk=4,
          select_last=4), (1, 2, 1, 330, 330, 64)),
]  # fmt: skip
IDS = ["gqa3", "sinks40", "qb64-batch2-odd", "kb16-d128", "adaptive", "adaptive-all-nq190-nk120",
       "last5", "adaptive-last4", "coarse4-gqa3-sinks-odd", "coarse3-kb16-d128-batch2",
       "coarse2-adaptive-last4"]  # fmt: skip


@pytest.mark.parametrize("score", ["rows", "bound"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("params,shape", CASES, ids=IDS)
def test_block_lists_equal_the_reference_selection(params, shape, causal, score):
    cfg = SELECT.replace(select_score=score, **params)
    batch, q_heads, kv_heads, nq, nk, dim = shape
    if causal and nq != nk:
        pytest.skip("causal needs Nq == Nk")
    q, k, _, _ = inputs(*shape, torch.float32)
    scale = dim**-0.5
    lists = select_block_lists(q, k, scale, cfg, causal)
    got = _dense(*lists, n_blocks=-(-nk // cfg.select_block))
    scaled = (q * scale).view(batch, kv_heads, q_heads // kv_heads, nq, dim)
    want = select_block_mask(scaled, k, cfg, causal, rep_dtype=torch.float32)
    assert torch.equal(got, want.reshape(got.shape))
    if cfg.select_coarse > 1 and score == "rows":  # the coarse tiles change the choice
        assert coarse_prunes(nq, nk, cfg, causal)
        full = select_block_mask(scaled, k, cfg.replace(select_coarse=1), causal, torch.float32)
        assert not torch.equal(want, full)
    if causal:  # partial blocks (causal mask applied) are only those on the diagonal
        assert (lists[0] <= cfg.query_block // cfg.select_block + 1).all()
    else:
        assert (lists[0] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_coarse_tiles_are_skipped_only_where_they_change_nothing(causal):
    """Where ``coarse_prunes`` says no coarse tile keeps fewer candidates than it has, the GPU
    ranks every block for every tile: the reference's choice with coarse tiles must be the
    same. Lengths around the first that prunes, for several coarse sizes and budgets."""
    gen = torch.Generator().manual_seed(5)
    pruned = kept = 0
    for coarse, keep, n in ((2, 2, 100), (2, 1, 150), (2, 1, 200), (3, 2, 260), (4, 1, 300),
                            (4, 2, 420)):  # fmt: skip
        cfg = SELECT.replace(select_coarse=coarse, select_candidates=keep, select_block=16,
                             query_block=16, window=32, sinks=20)  # fmt: skip
        q = torch.randn(1, 1, 2, n, 16, generator=gen)
        k = torch.randn(1, 1, n, 16, generator=gen)
        if coarse_prunes(n, n, cfg, causal):
            pruned += 1
            continue
        kept += 1
        full = select_block_mask(q, k, cfg.replace(select_coarse=1), causal)
        assert torch.equal(select_block_mask(q, k, cfg, causal), full), (coarse, keep, n)
    assert pruned and kept  # both sides of the rule are exercised


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_rows_cap_each_keys_share_as_the_reference(causal):
    """Keys that outscore the rest by far more than exp(ROW_SHARE_CAP): far away, their blocks
    tie at the cap (the nearest wins, not the strongest); in the local span, every candidate
    ties at the floor (a plain fp32 sum would underflow to nothing). In the kernel as in the
    reference."""
    cfg = SELECT.replace(select_score="rows", select_topk=1)
    n, dim = 256, 64
    q, k, _, _ = inputs(1, 1, 1, n, n, dim, torch.float32)
    direction = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    for key, strength in ((5, 40.0), (70, 30.0)):  # scores 200 and 150 with the last query
        k[0, 0, key] = strength * direction
    q[0, 0, :] = 0.1 * q[0, 0, :] + 40 * direction  # every row points at both keys
    scale = dim**-0.5
    got = _dense(*select_block_lists(q, k, scale, cfg, causal), n_blocks=n // cfg.select_block)
    want = select_block_mask((q * scale).unsqueeze(2), k, cfg, causal, rep_dtype=torch.float32)
    assert torch.equal(got, want.reshape(got.shape))
    last = want[0, 0, 0, -1]  # the last tile: both far blocks are candidates, tied at the cap
    assert last[70 // cfg.select_block] and not last[5 // cfg.select_block]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_ties_go_to_the_blocks_nearest_the_tile(causal):
    """Zero queries bound every block by 0: one bucket, the choice is the tie order alone.
    Tile 5 of 10 (local blocks 4-5 causal, 4-6 not): causal takes 3, 2, 1; non-causal alternates
    sides from the nearest, the earlier side first: 3, 7, 2."""
    q, k, _, _ = inputs(1, 2, 1, 320, 320, 32, torch.float32)
    q = torch.zeros_like(q)
    lists = select_block_lists(q, k, 32**-0.5, SELECT, causal)
    got = _dense(*lists, n_blocks=10)
    want = select_block_mask(q.view(1, 1, 2, 320, 32), k, SELECT, causal, torch.float32)
    assert torch.equal(got, want.reshape(got.shape))
    tile5 = set(torch.nonzero(got[0, 0, 5]).flatten().tolist())
    assert tile5 == ({1, 2, 3, 4, 5} if causal else {2, 3, 4, 5, 6, 7})


def test_sink_copies_list_the_same_blocks():
    """With R copies of the sink blocks, tile t lists copy t % R of each sink block it reads in
    full (the diagonal stays the original); mapped back, the lists are those without copies."""
    cfg = SELECT.replace(sinks=40)  # sink blocks 0 and 1
    q, k, _, _ = inputs(1, 3, 1, 200, 200, 32, torch.float32)
    n_kb, n_sink, reps = 7, 2, 3
    plain = select_block_lists(q, k, 32**-0.5, cfg, True)
    copied = select_block_lists(q, k, 32**-0.5, cfg, True, sink_copies=reps)
    assert copied[3].shape[-1] == n_kb + reps * n_sink
    copies_read = set()
    for h in range(3):
        for t in range(7):
            assert plain[0][0, h, t] == copied[0][0, h, t]
            assert torch.equal(plain[1][0, h, t, : plain[0][0, h, t]],
                               copied[1][0, h, t, : copied[0][0, h, t]])  # fmt: skip
            mapped = []
            for j in copied[3][0, h, t, : copied[2][0, h, t]].tolist():
                assert j >= n_sink  # a sink block read in full is read as a copy
                if j >= n_kb:
                    copy, j = divmod(j - n_kb, n_sink)
                    assert copy == t % reps
                    copies_read.add((copy, j))
                mapped.append(j)
            assert sorted(mapped) == plain[3][0, h, t, : plain[2][0, h, t]].tolist()
    assert copies_read == {(c, s) for c in range(reps) for s in range(n_sink)}


@pytest.mark.parametrize(
    "causal,shape,padded",
    [(True, (1, 3, 1, 200, 200, 32), False), (False, (2, 2, 2, 192, 192, 32), False),
     (False, (2, 2, 1, 230, 230, 32), True)],
    ids=["causal-gqa3-odd", "noncausal-whole-blocks", "noncausal-padding-mask-odd"],
)  # fmt: skip
def test_flex_over_sink_copies_equals_the_reference(causal, shape, padded):
    """Keys padded to whole blocks, then 3 copies of the two sink blocks: the pad is hidden by
    the causal mask or the key-padding mask, and every tile still reads each sink key once."""
    from hyperpass.kernels import flex

    cfg = SELECT.replace(sinks=40)
    q, k, v, _ = inputs(*shape, torch.float32)
    key_mask = None
    if padded:
        valid = torch.ones(shape[0], shape[3], dtype=torch.bool)
        valid[0, :50] = False
        key_mask = valid[:, None, None, :]
    out, _ = flex.select_forward(q, k, v, is_causal=causal, scale=None, config=cfg,
                                 key_mask=key_mask, copies=3)  # fmt: skip
    low, _ = hyper_attention_reference(q, k, v, is_causal=causal, config=cfg, key_mask=key_mask)
    high, _ = hyper_attention_reference(*(t.double() for t in (q, k, v)), is_causal=causal,
                                        config=cfg, key_mask=key_mask)  # fmt: skip
    close("out", out, low, high)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal-padding-mask"])
def test_planned_forward_keeps_the_lists_of_its_backward(monkeypatch, padded):
    """The planned forward (compiled training graphs) writes into shape-only plan buffers the
    lists its backward reads, sink copies included: those :func:`select_block_lists` gives,
    and its output is the reference's."""
    from hyperpass.kernels import flex

    monkeypatch.setattr(flex, "_PAIRS_PER_SINK_COPY", 8)  # 7 tiles x 3 heads: 3 copies
    cfg = SELECT.replace(sinks=40)
    q, k, v, _ = inputs(1, 3, 1, 200, 200, 32, torch.float32)
    key_mask = None
    if padded:
        key_mask = torch.ones(1, 1, 1, 200, dtype=torch.bool)
        key_mask[..., 150:] = False
    copies = flex._copies(q, k, True, cfg, key_mask)
    assert copies == 3
    shapes = flex.plan_shapes(1, 3, 1, 200, 200, cfg)
    assert shapes[1] == (1, 3, 7, 7 + 3 * 2)
    plan = tuple(torch.empty(s, dtype=torch.int32) for s in shapes)
    out = flex.select_forward_with_plan(q, k, v, plan, is_causal=True, scale=None, config=cfg,
                                        key_mask=key_mask)  # fmt: skip
    kept = flex.plan_lists(plan, q, k, cfg, copies)
    want = select_block_lists(q, k, 32**-0.5, cfg, True, sink_copies=copies)
    for num, ids, want_num, want_ids in ((kept[0], kept[1], want[0], want[1]),
                                         (kept[2], kept[3], want[2], want[3])):  # fmt: skip
        assert torch.equal(num, want_num)
        for h in range(3):
            for t in range(7):
                n = int(num[0, h, t])
                assert torch.equal(ids[0, h, t, :n], want_ids[0, h, t, :n])
    low, _ = hyper_attention_reference(q, k, v, is_causal=True, config=cfg, key_mask=key_mask)
    high, _ = hyper_attention_reference(*(t.double() for t in (q, k, v)), is_causal=True,
                                        config=cfg, key_mask=key_mask)  # fmt: skip
    close("out", out, low, high)


def test_plan_shapes_cover_every_call():
    """The plan's ids hold the lists of any copies :func:`sink_copies` asks for."""
    from hyperpass.config import DEFAULT
    from hyperpass.kernels.flex import plan_shapes, sink_copies

    for n, group in ((131072, 4), (8192, 1), (131077, 4), (1000, 8)):
        counts, ids, _, _ = plan_shapes(1, 8 * group, 8, n, n, DEFAULT)
        for causal, padded in ((True, False), (False, False), (False, True)):
            copies = sink_copies(DEFAULT, n, n, group, causal, padded)
            assert counts == (1, 8 * group, -(-n // 128))
            assert ids[-1] >= -(-n // 128) + copies


def test_sink_copies_rule():
    from hyperpass.config import DEFAULT
    from hyperpass.kernels.flex import sink_copies

    n = 131072
    assert sink_copies(DEFAULT, n, n, 4, True, False) == 32  # 1024 tiles x 4 heads / 128
    assert sink_copies(DEFAULT, n, n, 1, True, False) == 8
    assert sink_copies(DEFAULT, 8192, 8192, 4, True, False) == 2
    assert sink_copies(DEFAULT, 8192, 8192, 1, True, False) == 0  # 64 pairs: no copy
    assert sink_copies(DEFAULT.replace(sinks=0), n, n, 4, True, False) == 0
    odd = n + 5  # non-causal, keys not whole blocks: the pad would count in full blocks
    assert sink_copies(DEFAULT, odd, odd, 4, False, False) == 0
    assert sink_copies(DEFAULT, odd, odd, 4, False, True) > 0
    assert sink_copies(DEFAULT, odd, odd, 4, True, False) > 0


def test_copies_only_where_autograd_records():
    from hyperpass.kernels.flex import _records_autograd

    x = torch.zeros(2, requires_grad=True)
    assert _records_autograd(x) and not _records_autograd(x.detach())
    with torch.no_grad():
        assert not _records_autograd(x)
    with torch._C._AutoDispatchBelowAutograd():  # inside the op's forward
        assert not _records_autograd(x)


@pytest.mark.parametrize("score", ["rows", "bound"])
def test_block_lists_of_fp16_rows_rank_like_the_reference(score):
    """16-bit inputs: the GPU ranks with the scaled rows (or group means) rounded to fp16, as
    the reference does when told the inputs' dtype; the choice agrees but for ties at a bucket
    edge."""
    cfg = SELECT.replace(select_topk=4, select_score=score)
    q, k, _, _ = inputs(1, 2, 1, 200, 200, 64, torch.float16)
    lists = select_block_lists(q, k, 0.125, cfg, True)
    got = _dense(*lists, n_blocks=-(-200 // cfg.select_block))
    scaled = (q.float() * 0.125).view(1, 1, 2, 200, 64)
    want = select_block_mask(scaled, k.float(), cfg, True, rep_dtype=torch.float16)
    assert (got != want.reshape(got.shape)).float().mean() < 0.02


def test_key_block_extremes():
    k = torch.randn(2, 3, 77, 48)
    kmax, kmin = key_block_extremes(k, 16)
    blocks = torch.nn.functional.pad(k, (0, 0, 0, 3), value=float("nan")).unflatten(2, (5, 16))
    torch.testing.assert_close(kmax, blocks.nan_to_num(float("-inf")).amax(3))
    torch.testing.assert_close(kmin, blocks.nan_to_num(float("inf")).amin(3))


@pytest.mark.parametrize(
    "params,shape,causal",
    [
        (dict(sinks=20), (1, 3, 1, 300, 300, 32), True),
        (dict(select_mass=0.8, select_min=1), (2, 2, 2, 170, 130, 64), False),
    ],
    ids=["causal-gqa3-sinks", "noncausal-adaptive-nq170-nk130"],
)
def test_flex_over_the_lists_equals_the_reference(params, shape, causal):
    cfg = SELECT.replace(**params)
    q, k, v, _ = inputs(*shape, torch.float32)
    out, lse = kernels.hyper_attention_forward(q, k, v, is_causal=causal, scale=None, config=cfg)
    assert lse is None
    low, _ = hyper_attention_reference(q, k, v, is_causal=causal, config=cfg)
    high, _ = hyper_attention_reference(*(t.double() for t in (q, k, v)), is_causal=causal,
                                        config=cfg)  # fmt: skip
    close("out", out, low, high)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_flex_with_a_key_padding_mask_equals_the_reference(causal):
    """Left padding on one row, right on the other: padded keys sit in full blocks too (the
    sinks, selected blocks), which skip FlexAttention's mask_mod, and some queries have no key
    at all (they get 0, as in the reference)."""
    cfg = SELECT.replace(sinks=20)
    q, k, v, _ = inputs(2, 2, 1, 230, 230, 32, torch.float32)
    valid = torch.ones(2, 230, dtype=torch.bool)
    valid[0, :70] = False
    valid[1, 150:] = False
    key_mask = valid[:, None, None, :]
    out, _ = kernels.hyper_attention_forward(
        q, k, v, is_causal=causal, scale=None, config=cfg, key_mask=key_mask
    )
    low, _ = hyper_attention_reference(q, k, v, is_causal=causal, config=cfg, key_mask=key_mask)
    high, _ = hyper_attention_reference(*(t.double() for t in (q, k, v)), is_causal=causal,
                                        config=cfg, key_mask=key_mask)  # fmt: skip
    close("out", out, low, high)
    if causal:  # queries before the first valid key of row 0
        assert out[0, :, :70].abs().max() == 0


@pytest.mark.parametrize(
    "params,shape,causal",
    [
        (dict(method="longformer", window=40, sinks=20), (1, 2, 1, 300, 300, 32), True),
        (dict(method="dilated", window=70, dilation=3, sinks=0), (1, 2, 2, 260, 190, 32), False),
    ],
    ids=["longformer-causal", "dilated-noncausal-nq260-nk190"],
)
def test_flex_patterns_equal_the_reference(params, shape, causal):
    cfg = HyperConfig(min_len=1, **params)
    q, k, v, _ = inputs(*shape, torch.float32)
    out, _ = kernels.hyper_attention_forward(q, k, v, is_causal=causal, scale=None, config=cfg)
    low, _ = hyper_attention_reference(q, k, v, is_causal=causal, config=cfg)
    high, _ = hyper_attention_reference(*(t.double() for t in (q, k, v)), is_causal=causal,
                                        config=cfg)  # fmt: skip
    close("out", out, low, high)


def test_select_is_served():
    q, k, v, _ = inputs(1, 2, 1, 40, 40, 64, torch.float32)
    assert kernels.unsupported_reason(q, k, v, True, SELECT) is None
    assert kernels.backward_by_autograd(SELECT)


def test_past_the_recompile_limit_the_reference_answers(monkeypatch):
    """Past Dynamo's recompile limit FlexAttention would run uncompiled, reading no block list:
    the engine falls back to the reference instead of answering wrong."""
    from hyperpass.kernels import flex

    monkeypatch.setattr(flex, "_RECOMPILE_LIMIT", 1)
    torch._dynamo.reset()
    for n in (96, 128, 160):  # new shapes: past the limit of 1 from the second on
        q, k, v, _ = inputs(1, 2, 1, n, n, 32, torch.float32)
        out, _ = kernels.hyper_attention_forward(q, k, v, is_causal=True, scale=None,
                                                 config=SELECT)  # fmt: skip
        want, _ = hyper_attention_reference(q, k, v, is_causal=True, config=SELECT)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
