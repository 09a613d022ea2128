"""The ``method="select"`` kernels against the reference (``hyperpass.block_select``), interpreted.

Same harness as tests/test_kernels.py (poisoned allocations, fp64 oracle, bound = twice the
reference's own low-precision error plus a few ulps), forward and backward. Small blocks (query
blocks of 16, key blocks of 32, window 40, top-2) so that ~100 keys hold local spans, sinks,
several candidate blocks on both sides (non-causal) and samples that fall in every part; with
window 16, sinks of 40 reach past the first query blocks' local span (non-causal).
"""

from __future__ import annotations

import pytest
import torch
from hyperpass.kernels.block_bound import select_blocks
from test_kernels import _check, _inputs, poisoned  # noqa: F401

from hyperpass import kernels
from hyperpass.config import HyperConfig

SELECT = HyperConfig(
    method="select", window=40, sinks=0, select_topk=2, select_block=32, query_block=16,
    sample_size=0,
)  # fmt: skip


@pytest.mark.parametrize(
    "params,causal,shape",
    [
        (dict(), True, (1, 3, 1, 100, 100, 64)),
        (dict(), False, (1, 3, 1, 100, 100, 64)),
        (dict(sinks=5), True, (1, 2, 2, 97, 97, 64)),
        (dict(window=16, sinks=40, sample_size=32), False, (1, 3, 1, 83, 200, 64)),
        (dict(sinks=3, sample_size=24), True, (2, 3, 1, 90, 90, 64)),
        (dict(sinks=7, sample_size=16, select_topk=3, select_block=48), False,
         (1, 2, 1, 120, 75, 128)),
    ],
    ids=[
        "causal-gqa3",
        "noncausal-gqa3",
        "causal-sinks",
        "noncausal-window16-sinks40-samples-nq83-nk200",
        "causal-sinks-samples-batch2",
        "noncausal-block48-nq120-nk75-d128",
    ],
)  # fmt: skip
def test_select(params, causal, shape):
    _check(*_inputs(*shape, torch.float32), is_causal=causal, cfg=SELECT.replace(**params))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_select_fp16(causal):
    cfg = SELECT.replace(sinks=4, sample_size=16)
    _check(*_inputs(1, 2, 1, 90, 90, 64, torch.float16), is_causal=causal, cfg=cfg)


def test_select_query_block_32_topk_beyond_candidates():
    """Query blocks of 32 (two 16-row programs each) and more top-k than candidate blocks:
    the missing blocks are -1 and count nothing."""
    cfg = SELECT.replace(query_block=32, select_topk=8, sinks=2)
    _check(*_inputs(1, 2, 1, 96, 96, 64, torch.float32), is_causal=True, cfg=cfg)


@pytest.mark.parametrize(
    "params,shape,scale",
    [
        (dict(sinks=20, select_topk=3), (1, 4, 2, 150, 150, 64), 0.125),
        (dict(query_block=48, select_block=96, window=100, select_topk=2),
         (2, 2, 1, 301, 301, 64), 0.3),
        (dict(query_block=128, select_block=128, window=128, select_topk=2, sinks=3),
         (1, 2, 2, 700, 700, 32), 0.2),
        (dict(sinks=1, select_topk=4), (1, 3, 1, 83, 250, 128), -0.1),
        (dict(select_topk=70, select_block=16, window=16), (1, 1, 1, 1200, 1200, 32), 0.2),
    ],
    ids=[
        "qb16-gqa2", "qb48-odd-batch2", "qb128-two-row-steps", "gqa3-nq83-nk250-negative-scale",
        "topk70-beyond-registers",
    ],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_selected_blocks_match_the_reference(params, shape, scale, dtype, monkeypatch):
    """The bound kernel picks the reference's blocks: top-k in registers (top-k <= 64), or the
    bounds written for ``torch.topk`` (top-k 70), also chunked over query blocks (a tiny chunk
    budget forces several chunks)."""
    from hyperpass.kernels import block_bound

    from hyperpass.block_select import _LocalSpans, _select_blocks

    cfg = SELECT.replace(**params)
    batch, q_heads, kv_heads, nq, nk, dim = shape
    q, k, _, _ = _inputs(*shape, dtype)
    group = q_heads // kv_heads
    for causal, budget in ((False, 1 << 24), (True, 1 << 24), (True, 1)):
        if causal and nq != nk:
            continue
        monkeypatch.setattr(block_bound, "_BOUND_ELEMENTS", budget)
        ours = select_blocks(q, k, scale, cfg, causal)
        spans = _LocalSpans(nq, nk, cfg, causal, q.device)
        scaled = (q.float() * scale).view(batch, kv_heads, group, nq, dim)
        ref = _select_blocks(scaled, k.float(), spans, cfg).reshape(ours.shape)
        assert ours.dtype == torch.int32
        # ties may come in another order: compare the sets of blocks per query block
        assert torch.equal(ours.long().sort(-1).values, ref.sort(-1).values), (causal, budget)
        assert (ours >= 0).any()


def test_select_is_served():
    q, k, v, _ = _inputs(1, 2, 1, 40, 40, 64, torch.float32)
    assert kernels.unsupported_reason(q, k, v, True, SELECT) is None
