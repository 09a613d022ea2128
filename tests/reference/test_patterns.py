"""Exact sparse patterns of the reference against dense masks of the same definitions.

* each pattern (local, dilated, longformer) equals softmax attention restricted to a dense mask
  built from its definition (distance ``d = q_pos - k_pos``);
* combined exact sets (window + sinks + sortLSH block) count every entry once: the output and the
  log-sum-exp equal those of the dense union mask;
* with uniform scores, the sampled residual adds exactly ``n / m`` per sample outside the exact
  set and the future (the weights of a row sum to what the estimator promises);
* on Q/K/V captured from SmolLM2-135M (``tests/assets/``), the default configuration's error
  vs exact stays within the bound measured in ``docs/quality.md``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hyperpass.config import DEFAULT, PAPER, HyperConfig
from hyperpass.reference import exact_attention, hyper_attention_reference, lsh
from hyperpass.reference.lsh import lsh_block_shape

ASSET = Path(__file__).parent / "assets" / "smollm2_qkv.pt"


def _dense(q, k, v, keep, scale):
    """Softmax attention restricted to keep [Nq, Nk] or [B, H, Nq, Nk], fp64; GQA expanded."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    scores = (q.double() * scale) @ k.transpose(-1, -2)
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse


def _distance(nq, nk):
    return torch.arange(nq).unsqueeze(-1) - torch.arange(nk)


def _pattern_mask(cfg: HyperConfig, n: int, causal: bool):
    """The definition: window/dilated distances, sinks, causality."""
    d = _distance(n, n)
    near = (d >= 0) & (d < cfg.window) if causal else d.abs() < cfg.window
    keep = near & (d % cfg.dilation == 0)
    keep |= torch.arange(n) < cfg.sinks
    if causal:
        keep &= d >= 0
    return keep


def _inputs(n, q_heads=4, kv_heads=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_heads, n, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, kv_heads, n, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(1, kv_heads, n, dim, generator=gen, dtype=torch.float64)
    return q, k, v


PATTERNS = {
    "local_w7": dict(method="local", window=7),
    "local_w1": dict(method="local", window=1),
    "dilated_w20_x3": dict(method="dilated", window=20, dilation=3),
    "longformer_w5_s3": dict(method="longformer", window=5, sinks=3),
    "longformer_w64_s1": dict(method="longformer", window=64, sinks=1),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("n", [1, 63, 200])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_matches_dense_mask(name, n, causal):
    cfg = PAPER.replace(**PATTERNS[name])
    q, k, v = _inputs(n)
    scale = 0.3
    out, lse = hyper_attention_reference(q, k, v, is_causal=causal, scale=scale, config=cfg)
    ref_out, ref_lse = _dense(q, k, v, _pattern_mask(cfg, n, causal), scale)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse.double(), ref_lse)


def _lsh_union_mask(q, k, cfg: HyperConfig, scale, causal):
    """Dense [B, Hq, N, N] mask: each query's sortLSH block, then window, sinks (flat pass)."""
    batch, q_heads, n, dim = q.shape
    kv_heads = k.shape[1]
    planes = lsh.hyperplanes(dim, cfg.lsh_num_projs, cfg.seed, q.device)
    qg = (q.float() * scale).view(batch, kv_heads, q_heads // kv_heads, n, dim)
    q_order = lsh.sort_by_rank(lsh.lsh_ranks(qg, planes))
    k_order = lsh.sort_by_rank(lsh.lsh_ranks(k.float(), planes))
    qpb, _, n_kblocks = lsh_block_shape(n, n, cfg.block_size)
    q_block = torch.empty_like(q_order).scatter(
        -1, q_order, torch.arange(n).expand_as(q_order) // qpb
    )
    k_block = torch.empty_like(k_order).scatter(
        -1, k_order, torch.arange(n).expand_as(k_order) // cfg.block_size
    )
    same = q_block.clamp(max=n_kblocks - 1).unsqueeze(-1) == k_block.unsqueeze(2).unsqueeze(-2)
    keep = same.view(batch, q_heads, n, n) | _pattern_mask(cfg, n, causal)
    if causal:
        keep &= _distance(n, n) >= 0
    return keep


@pytest.mark.parametrize(
    "params",
    [
        dict(window=9, sinks=4, block_size=32),
        dict(window=1, sinks=0, block_size=16),
        dict(window=40, sinks=50, block_size=64, dilation=3),
    ],
    ids=["w9_s4_b32", "w1_b16", "w40_s50_b64_dil3"],
)
@pytest.mark.parametrize("causal", [True, False], ids=["flat_causal", "full"])
def test_combined_exact_sets_count_each_entry_once(params, causal):
    cfg = PAPER.replace(sample_size=0, causal_algo="flat", lsh_num_projs=3, **params)
    q, k, v = _inputs(150, seed=1)
    scale = 0.25
    out, lse = hyper_attention_reference(q, k, v, is_causal=causal, scale=scale, config=cfg)
    keep = _lsh_union_mask(q, k, cfg, scale, causal)
    ref_out, ref_lse = _dense(q, k, v, keep, scale)
    torch.testing.assert_close(lse.double(), ref_lse)
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("method", ["hyper", "longformer"])
def test_sampled_residual_weights_sum_correctly(method):
    """Uniform scores (q = 0): the row's total weight is |exact set| + n/m per outside sample."""
    n, m = 120, 40
    cfg = PAPER.replace(
        method=method, causal_algo="flat", window=10, sinks=3, block_size=16, sample_size=m
    )
    _, k, v = _inputs(n, seed=2)
    q = torch.zeros(1, 4, n, k.shape[-1], dtype=torch.float64)
    _, lse = hyper_attention_reference(q, k, v, is_causal=True, scale=1.0, config=cfg)
    if cfg.uses_lsh:
        exact = _lsh_union_mask(q, k, cfg, 1.0, True)  # [1, 4, n, n]
        # one sample set per batch row, shared by all heads (as the reference draws it)
        idx = lsh.sample_indices(cfg.seed, lsh.subproblem_tag(0, 0), (1, 1, m), n, "cpu")
        idx = idx.expand(1, 4, m)
        in_exact = exact.gather(-1, idx.unsqueeze(-2).expand(-1, -1, n, -1))
        past = idx.unsqueeze(-2) <= torch.arange(n).view(1, 1, n, 1)
        outside = (past & ~in_exact).sum(-1)
        expected = torch.log(exact.sum(-1) + (n / m) * outside)
    else:  # patterns have no samples: the row weight is the pattern's size
        expected = torch.log(_pattern_mask(cfg, n, True).sum(-1).double()).expand(1, 4, n)
    torch.testing.assert_close(lse.double(), expected.double())


def test_exact_set_covering_the_past_makes_samples_vanish():
    """When the window covers the whole past, every sample is excluded: the result is exact."""
    n = 90
    cfg = PAPER.replace(causal_algo="flat", window=n, sample_size=64, block_size=16)
    q, k, v = _inputs(n, seed=3)
    out, lse = hyper_attention_reference(q, k, v, is_causal=True, scale=0.2, config=cfg)
    ref_out, ref_lse = _dense(q, k, v, _distance(n, n) >= 0, 0.2)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse.double(), ref_lse)


# ----------------------------------------------------------------------------- real activations
# The configuration docs/quality.md recommends among the op's existing ones (perplexity within
# +5% of exact at 2.3x less work on SmolLM2-135M), and its measured error on the asset (layer 9,
# 4096 tokens: out 0.064, lse 0.0123) with a margin; the published recursive algorithm
# (min_seq_len=1024 at this length, as 2048 at 8192) measures out 0.138, lse 0.0199 there.
CHOSEN = dict(method="longformer", window=2048, sinks=16)
BOUNDS = {"out": 0.08, "lse": 0.016}


def _asset():
    if not ASSET.exists():
        pytest.skip(f"{ASSET} missing")
    return torch.load(ASSET)


def _errors(asset, cfg: HyperConfig):
    q, k, v = (asset[name].float() for name in ("q", "k", "v"))
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = hyper_attention_reference(q, k, v, is_causal=True, scale=scale, config=cfg)
    group = q.shape[1] // k.shape[1]
    ref_out, ref_lse = exact_attention(
        q.double() * scale,
        k.double().repeat_interleave(group, 1),
        v.double().repeat_interleave(group, 1),
        True,
    )
    out_err = ((out.double() - ref_out).norm() / ref_out.norm()).item()
    lse_err = ((lse.double() - ref_lse).norm() / ref_lse.norm()).item()
    return out_err, lse_err


def test_chosen_config_error_on_captured_activations():
    """The recommended configuration vs exact attention on SmolLM2-135M's own Q/K/V."""
    out_err, lse_err = _errors(_asset(), PAPER.replace(**CHOSEN))
    assert 0 < out_err < BOUNDS["out"], out_err  # > 0: it approximates at this length
    assert 0 < lse_err < BOUNDS["lse"], lse_err


def test_chosen_config_beats_published_algorithm_on_captured_activations():
    """On real activations window + sinks is closer to exact than the paper's causal recursion."""
    asset = _asset()
    chosen = _errors(asset, PAPER.replace(**CHOSEN))
    published = _errors(asset, PAPER.replace(min_seq_len=1024))
    assert chosen[0] < published[0] and chosen[1] < published[1], (chosen, published)


def test_default_config_is_closest_to_exact_on_captured_activations():
    """The package default (method="select", chosen in docs/quality.md) vs exact attention on the
    captured Q/K/V: measured out 0.019 / lse 0.0036 (bounds: 1.5x), and closer to exact than the
    window-only configuration and the paper's recursion."""
    asset = _asset()
    default = _errors(asset, DEFAULT.replace(min_len=16))
    assert 0 < default[0] < 0.03 and 0 < default[1] < 0.0055, default
    window_only = _errors(asset, PAPER.replace(**CHOSEN))
    published = _errors(asset, PAPER.replace(min_seq_len=1024))
    assert default[0] < window_only[0] < published[0], (default, window_only, published)
