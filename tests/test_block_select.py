"""method="select": score-bound block selection, against a dense mask built from its definition."""

import math

import pytest
import torch
import torch.nn.functional as F

from hyperpass.config import HyperConfig
from hyperpass.op import hyper_attention
from hyperpass.reference import hyper_attention_reference

FP32 = {"atol": 2e-5, "rtol": 2e-5}


def qkv(batch, hq, hkv, n, dim, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, dim, generator=gen, dtype=dtype) for h in (hq, hkv, hkv)]


def dense_select_mask(q, k, cfg: HyperConfig, causal: bool) -> torch.Tensor:
    """[B, Hq, N, N] keep-mask of local U sinks U selected blocks, written from the definition
    with plain loops (independent of the vectorized reference)."""
    batch, hq, n, dim = q.shape
    group = hq // k.shape[1]
    qs, kb, bs = cfg.query_block, cfg.select_block, cfg.select_block
    n_kb = math.ceil(n / kb)
    mask = torch.zeros(batch, hq, n, n, dtype=torch.bool)
    scaled = q / math.sqrt(dim)
    for b in range(batch):
        for h in range(hq):
            keys = k[b, h // group]
            for s in range(0, n, qs):
                e = min(s + qs, n)
                lo = (max(s + qs - cfg.window, 0) // bs) * bs
                hi = min(math.ceil((s + cfg.window) / bs) * bs, n)
                for i in range(s, e):
                    end = i + 1 if causal else hi
                    mask[b, h, i, lo:end] = True
                    mask[b, h, i, : min(cfg.sinks, end if causal else n)] = True
                bounds = []
                for j in range(n_kb):
                    start, stop = j * kb, min((j + 1) * kb, n)
                    outside = stop <= lo or (not causal and start >= hi)
                    if not outside or stop <= cfg.sinks:
                        continue
                    blk = keys[start:stop]
                    per_query = [
                        (scaled[b, h, i].clamp(min=0) * blk.amax(0)).sum()
                        + (scaled[b, h, i].clamp(max=0) * blk.amin(0)).sum()
                        for i in range(s, e)
                    ]
                    bounds.append((max(per_query).item(), j))
                for _, j in sorted(bounds, reverse=True)[: cfg.select_topk]:
                    mask[b, h, s:e, j * kb : min((j + 1) * kb, n)] = True
    return mask


CASES = [
    pytest.param(1, 2, 2, 130, 16, {}, id="N130"),
    pytest.param(2, 6, 2, 200, 16, {"sinks": 5}, id="B2-GQA3-sinks5"),
    pytest.param(1, 3, 1, 257, 32, {"query_block": 32, "select_topk": 2}, id="MQA-qb32-N257"),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch,hq,hkv,n,dim,extra", CASES)
def test_select_equals_dense_mask_of_its_definition(batch, hq, hkv, n, dim, extra, causal):
    base = {"window": 48, "select_block": 32, "query_block": 16, "select_topk": 3, "sinks": 0}
    cfg = HyperConfig(method="select", sample_size=0, **{**base, **extra})
    q, k, v = qkv(batch, hq, hkv, n, dim)
    out, lse = hyper_attention_reference(q, k, v, is_causal=causal, config=cfg)
    mask = dense_select_mask(q, k, cfg, causal)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv)
    torch.testing.assert_close(out, want, **FP32)
    scores = q @ k.repeat_interleave(hq // hkv, 1).mT / math.sqrt(dim)
    torch.testing.assert_close(
        lse, torch.logsumexp(scores.masked_fill(~mask, -math.inf), -1), **FP32
    )


@pytest.mark.parametrize("causal", [False, True])
def test_select_is_exact_when_the_window_or_the_blocks_cover_every_key(causal):
    q, k, v = qkv(2, 4, 2, 150, 16)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    for cfg in (
        HyperConfig(method="select", window=160, sample_size=0),
        HyperConfig(method="select", window=16, select_block=32, select_topk=5, sample_size=64),
    ):
        out, _ = hyper_attention_reference(q, k, v, is_causal=causal, config=cfg)
        torch.testing.assert_close(out, want, **FP32)


@pytest.mark.parametrize("causal", [False, True])
def test_samples_never_count_an_exact_key_twice(causal):
    """With q = 0 every score is 0, so exp(lse) counts keys: the exact set once each, plus n/m
    per sample that lands outside it (and, causal, not in the future)."""
    n, m = 160, 40
    cfg = HyperConfig(
        method="select",
        window=32,
        select_block=32,
        query_block=16,
        select_topk=1,
        sinks=3,
        sample_size=m,
        seed=7,
    )
    _, k, v = qkv(1, 1, 1, n, 16)
    q = torch.zeros(1, 1, n, 16)
    # the bound is 0 for every block at q = 0, so the selection is a tie: read it back from the
    # sample-free run instead of assuming an order
    _, lse0 = hyper_attention_reference(
        q, k, v, is_causal=causal, config=cfg.replace(sample_size=0)
    )
    exact_count = torch.exp(lse0)[0, 0]
    _, lse = hyper_attention_reference(q, k, v, is_causal=causal, config=cfg)
    extra = torch.exp(lse)[0, 0] - exact_count
    samples_outside = extra / (n / m)
    assert torch.allclose(samples_outside, samples_outside.round(), atol=1e-3), samples_outside
    assert (samples_outside >= 0).all() and (samples_outside <= m).all()
    # some rows do get samples outside their exact set, and never more than the keys left
    assert samples_outside.sum() > 0
    keys_left = (torch.arange(n) + 1 if causal else torch.full((n,), n)) - exact_count
    assert (samples_outside <= keys_left.clamp(min=0) * m).all()


@pytest.mark.parametrize("causal", [False, True])
def test_select_gradients_through_the_op(causal):
    cfg = HyperConfig(
        min_len=16,
        method="select",
        window=16,
        select_block=16,
        query_block=16,
        select_topk=1,
        sinks=2,
        sample_size=8,
    )
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 2, 1, 50, 8))
    fn = lambda q, k, v: hyper_attention(q, k, v, is_causal=causal, enable_gqa=True, config=cfg)
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"window": 8}, "window >= query_block"),
        ({"window": 64, "select_block": 48, "query_block": 32}, "must divide"),
        ({"window": 64, "query_block": 24}, "multiples of 16"),
        ({"window": 64, "select_topk": 0}, "select_topk"),
    ],
)
def test_select_parameters_are_validated(params, message):
    with pytest.raises(ValueError, match=message):
        HyperConfig(method="select", **params)
