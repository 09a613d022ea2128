"""The reference algorithm: exact limits, unbiased sampling, GQA, determinism, sortLSH."""

import math

import pytest
import torch
import torch.nn.functional as F

from hyperpass.config import HyperConfig
from hyperpass.reference import exact_attention, hyper_attention_reference, lsh
from tests.helpers.configs import PAPER_ALGO

FP32 = {"atol": 2e-5, "rtol": 2e-5}


def hyper_config(**params) -> HyperConfig:
    """The sortLSH + sampling algorithm of the paper, whatever the package default is."""
    return HyperConfig(**{**PAPER_ALGO, **params})


def qkv(batch, q_heads, kv_heads, nq, nk, dim, dtype=torch.float32, dv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, nq, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, nk, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, nk, dv or dim, generator=gen, dtype=dtype)
    return q, k, v


def sdpa(q, k, v, is_causal=False, scale=None):
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


SHAPES = [  # batch, q heads, kv heads, nq, nk, dim
    pytest.param(1, 2, 2, 64, 64, 16, id="B1-H2-N64-D16"),
    pytest.param(2, 6, 2, 129, 129, 64, id="B2-GQA3-N129-D64"),
    pytest.param(1, 4, 1, 77, 200, 128, id="B1-MQA-Nq77-Nk200-D128"),
    pytest.param(3, 3, 3, 250, 61, 32, id="B3-Nq250-Nk61-D32"),
]


@pytest.mark.parametrize("batch,hq,hkv,nq,nk,dim", SHAPES)
@pytest.mark.parametrize("sample_size", [0, 32])
def test_noncausal_equals_exact_when_one_block_covers_all_keys(
    batch, hq, hkv, nq, nk, dim, sample_size
):
    q, k, v = qkv(batch, hq, hkv, nq, nk, dim)
    cfg = hyper_config(block_size=16 * math.ceil(nk / 16), sample_size=sample_size)
    out, lse = hyper_attention_reference(q, k, v, config=cfg)
    torch.testing.assert_close(out, sdpa(q, k, v), **FP32)
    exact_lse = torch.logsumexp((q @ k.repeat_interleave(hq // hkv, 1).mT) / math.sqrt(dim), -1)
    torch.testing.assert_close(lse, exact_lse, **FP32)


@pytest.mark.parametrize("batch,hq,hkv,n,dim", [(1, 2, 2, 64, 16), (2, 6, 2, 133, 64)])
@pytest.mark.parametrize("causal_algo", ["recursive", "flat"])
def test_causal_equals_exact_in_the_exact_limits(batch, hq, hkv, n, dim, causal_algo):
    q, k, v = qkv(batch, hq, hkv, n, n, dim)
    # recursive: one exact diagonal block; flat: a window covering every past key
    cfg = hyper_config(min_seq_len=n, causal_algo=causal_algo, window=n, sample_size=16)
    out, _ = hyper_attention_reference(q, k, v, is_causal=True, config=cfg)
    torch.testing.assert_close(out, sdpa(q, k, v, is_causal=True), **FP32)


def test_causal_recursion_with_exact_off_diagonal_blocks_is_exact():
    # min_seq_len < n forces recursion; one LSH block per off-diagonal makes each level exact
    q, k, v = qkv(2, 4, 2, 200, 200, 32)
    cfg = hyper_config(min_seq_len=48, block_size=112, sample_size=8)
    out, lse = hyper_attention_reference(q, k, v, is_causal=True, config=cfg)
    torch.testing.assert_close(out, sdpa(q, k, v, is_causal=True), **FP32)
    _, exact_lse = exact_attention(
        q / math.sqrt(32), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), True
    )
    torch.testing.assert_close(lse, exact_lse, **FP32)


@pytest.mark.parametrize("is_causal", [False, True])
def test_custom_scale_and_value_dim(is_causal):
    q, k, v = qkv(1, 2, 2, 40, 40, 16, dv=24)
    cfg = hyper_config(block_size=48, min_seq_len=48, sample_size=0)
    out, _ = hyper_attention_reference(q, k, v, is_causal=is_causal, scale=0.3, config=cfg)
    torch.testing.assert_close(out, sdpa(q, k, v, is_causal=is_causal, scale=0.3), **FP32)


def test_sampled_row_sums_are_unbiased():
    """E_seed[exp(lse)] equals the exact row sum: the n/m-weighted samples, with the keys counted
    exactly removed, estimate the rest without bias. 400 seeds; each row's mean must be within
    5 standard errors (a false alarm has probability ~1e-6 per row, checked over 64 rows)."""
    q, k, v = qkv(1, 1, 1, 64, 64, 8, dtype=torch.float64)
    exact_rowsum = torch.exp(torch.logsumexp(q @ k.mT / math.sqrt(8), -1))
    sums = torch.stack(
        [
            torch.exp(
                hyper_attention_reference(
                    q,
                    k,
                    v,
                    config=hyper_config(block_size=16, sample_size=16, lsh_num_projs=3, seed=s),
                )[1].double()
            )
            for s in range(400)
        ]
    )
    mean, stderr = sums.mean(0), sums.std(0) / math.sqrt(len(sums))
    assert (stderr > 0).all(), "the estimate never varied: nothing was sampled"
    z = (mean - exact_rowsum).abs() / stderr
    assert z.max() < 5.0, f"biased row sums: max z-score {z.max():.2f}"


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window,sinks", [(0, 0), (24, 4)])
def test_gqa_equals_repeated_kv_heads(is_causal, window, sinks):
    q, k, v = qkv(2, 6, 2, 150, 150, 16)
    cfg = hyper_config(block_size=32, sample_size=16, min_seq_len=40, window=window, sinks=sinks)
    out, lse = hyper_attention_reference(q, k, v, is_causal=is_causal, config=cfg)
    rep = [t.repeat_interleave(3, dim=1) for t in (k, v)]
    out_rep, lse_rep = hyper_attention_reference(q, *rep, is_causal=is_causal, config=cfg)
    torch.testing.assert_close(out, out_rep, **FP32)
    torch.testing.assert_close(lse, lse_rep, **FP32)


@pytest.mark.parametrize("is_causal", [False, True])
def test_batch_rows_are_independent(is_causal):
    q, k, v = qkv(3, 2, 2, 96, 96, 16)
    cfg = hyper_config(block_size=32, sample_size=0, min_seq_len=32)
    out, _ = hyper_attention_reference(q, k, v, is_causal=is_causal, config=cfg)
    for b in range(3):
        row, _ = hyper_attention_reference(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], is_causal=is_causal, config=cfg
        )
        torch.testing.assert_close(out[b : b + 1], row, **FP32)


def test_deterministic_for_a_seed_and_seed_matters():
    q, k, v = qkv(1, 2, 2, 300, 300, 16)
    cfg = hyper_config(block_size=32, sample_size=32, min_seq_len=64)
    a = hyper_attention_reference(q, k, v, is_causal=True, config=cfg)[0]
    b = hyper_attention_reference(q, k, v, is_causal=True, config=cfg)[0]
    c = hyper_attention_reference(q, k, v, is_causal=True, config=cfg.replace(seed=1))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v = qkv(1, 2, 2, 128, 128, 64)
    cfg = hyper_config(block_size=32, sample_size=16, min_seq_len=32)
    ref, ref_lse = hyper_attention_reference(q, k, v, is_causal=True, config=cfg)
    low = [t.to(dtype) for t in (q, k, v)]
    out, lse = hyper_attention_reference(*low, is_causal=True, config=cfg)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # only input rounding differs (hash ties aside): error of the order of the dtype's epsilon
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 30 * torch.finfo(dtype).eps, rel


def test_approximation_is_close_on_structured_inputs():
    """Not exact, but on keys with clear structure (each query matches a few keys strongly) the
    LSH blocks find the large entries: relative error far below uniform-noise levels."""
    gen = torch.Generator().manual_seed(0)
    n, dim = 512, 32
    keys = torch.randn(1, 1, n, dim, generator=gen)
    q = 3 * keys[:, :, torch.randperm(n, generator=gen)] + 0.1 * torch.randn(
        1, 1, n, dim, generator=gen
    )
    v = torch.randn(1, 1, n, dim, generator=gen)
    out, _ = hyper_attention_reference(
        q, keys, v, config=hyper_config(block_size=64, sample_size=64)
    )
    exact = sdpa(q, keys, v)
    rel = (out - exact).norm() / exact.norm()
    assert rel < 0.5, rel


def test_rejects_shapes_it_cannot_serve():
    q, k, v = qkv(1, 3, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        hyper_attention_reference(q, k, v)
    q, k, v = qkv(1, 2, 2, 16, 32, 16)
    with pytest.raises(ValueError, match="causal needs Nq == Nk"):
        hyper_attention_reference(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="4-D"):
        hyper_attention_reference(q[0], k[0], v[0])


def test_gray_code_neighbours_differ_in_one_bit():
    for bits in (1, 3, 7, 10):
        codes = torch.arange(2**bits)
        order = torch.argsort(lsh.gray_rank(codes, bits))
        assert torch.equal(torch.sort(lsh.gray_rank(codes, bits)).values, codes), (
            "not a permutation"
        )
        flips = order[1:] ^ order[:-1]
        assert torch.all((flips & (flips - 1)) == 0) and torch.all(flips > 0)


def test_lsh_sorts_similar_vectors_together():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 32, generator=gen)
    x = torch.cat([base, base + 1e-3 * torch.randn(16, 32, generator=gen)])
    ranks = lsh.lsh_ranks(x, lsh.hyperplanes(32, 7, 0, "cpu"))
    assert torch.equal(ranks[:16], ranks[16:])


@pytest.mark.parametrize("is_causal", [False, True])
def test_the_largest_window_is_exact_attention_without_allocating_it(is_causal):
    q, k, v = qkv(1, 2, 2, 50, 50, 16)
    cfg = HyperConfig(method="local", window=2**31 - 1)
    out, _ = hyper_attention_reference(q, k, v, is_causal=is_causal, config=cfg)
    torch.testing.assert_close(out, sdpa(q, k, v, is_causal=is_causal), **FP32)
