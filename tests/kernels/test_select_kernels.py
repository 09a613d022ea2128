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
from hyperpass.kernels.select_blocks import key_block_extremes, select_block_lists
from hyperpass.reference import hyper_attention_reference
from hyperpass.reference.select import select_block_mask
from tests.kernels.harness import close, inputs

SELECT = HyperConfig(
    method="select", window=48, sinks=0, select_topk=3, select_block=32, query_block=32,
    query_groups=4, min_len=1,
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
]
IDS = ["gqa3", "sinks40", "qb64-batch2-odd", "kb16-d128", "adaptive", "adaptive-all-nq190-nk120"]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("params,shape", CASES, ids=IDS)
def test_block_lists_equal_the_reference_selection(params, shape, causal):
    cfg = SELECT.replace(**params)
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
    if causal:  # partial blocks (causal mask applied) are only those on the diagonal
        assert (lists[0] <= cfg.query_block // cfg.select_block + 1).all()
    else:
        assert (lists[0] == 0).all()


def test_block_lists_of_fp16_rows_rank_like_the_reference():
    """16-bit rows: the GPU ranks with the group means rounded to fp16, as the reference does
    when told the inputs' dtype; the choice agrees but for ties at a bucket edge."""
    cfg = SELECT.replace(select_topk=4)
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
