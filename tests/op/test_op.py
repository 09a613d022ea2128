"""torch.ops.hyperpass.hyper_attention: registrations, dispatch, gradients, configuration."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import hyperpass
from hyperpass.config import DEFAULT, HyperConfig, field_names
from hyperpass.op import FORWARD_SCHEMA, hyper_attention, hyper_attention_op, skip_reason
from hyperpass.reference import hyper_attention_reference
from tests.helpers.configs import PAPER_ALGO

SMALL = {
    **PAPER_ALGO,
    "min_len": 16,
    "block_size": 16,
    "sample_size": 8,
    "min_seq_len": 16,
}


def qkv(batch=1, hq=2, hkv=2, n=40, dim=16, dtype=torch.float32, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, hq, n, dim), (batch, hkv, n, dim), (batch, hkv, n, dim)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_(grad) for s in shapes]


def op_args(q, k, v, cfg, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, gqa=False):
    return (q, k, v, attn_mask, dropout_p, is_causal, scale, gqa, *cfg.as_dict().values())


def test_schema_is_sdpa_shaped_and_lists_every_config_field():
    assert FORWARD_SCHEMA.startswith("(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None")
    for name in field_names():
        assert f" {name}=" in FORWARD_SCHEMA
    assert str(torch.ops.hyperpass.hyper_attention.default._schema).count("=") >= 8


@pytest.mark.parametrize("is_causal", [False, True])
def test_opcheck(is_causal):
    cfg = HyperConfig(**SMALL)
    q, k, v = qkv(batch=2, hq=4, hkv=2, n=37, grad=True)
    torch.library.opcheck(
        torch.ops.hyperpass.hyper_attention.default,
        op_args(q, k, v, cfg, is_causal=is_causal, gqa=True),
    )


def test_opcheck_exact_fallback():
    q, k, v = qkv(n=8, grad=True)
    torch.library.opcheck(torch.ops.hyperpass.hyper_attention.default, op_args(q, k, v, DEFAULT))


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradcheck_float64(is_causal):
    cfg = HyperConfig(**SMALL)
    q, k, v = qkv(batch=1, hq=2, hkv=1, n=21, dim=4, dtype=torch.float64, grad=True)
    fn = lambda q, k, v: hyper_attention_op(*op_args(q, k, v, cfg, is_causal=is_causal, gqa=True))
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradients_equal_autograd_through_the_reference(is_causal):
    cfg = HyperConfig(**{**SMALL, "window": 4, "sinks": 2})
    q, k, v = qkv(batch=2, hq=6, hkv=2, n=70, grad=True)
    grad_out = torch.randn(2, 6, 70, 16)
    out = hyper_attention(q, k, v, is_causal=is_causal, enable_gqa=True, config=cfg)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref, _ = hyper_attention_reference(q, k, v, is_causal=is_causal, config=cfg)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_below_min_len_equals_sdpa_bitwise(is_causal, dtype):
    q, k, v = qkv(batch=2, hq=4, hkv=2, n=50, dtype=dtype)
    out = hyper_attention(q, k, v, is_causal=is_causal, enable_gqa=True, min_len=51)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    assert torch.equal(out, want)


def test_above_min_len_approximates():
    q, k, v = qkv(n=64)
    out = hyper_attention(q, k, v, **SMALL)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v))


def test_exact_fallbacks_match_sdpa():
    q, k, v = qkv(n=64)
    mask = torch.rand(64, 64) > 0.3
    exact_masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(hyper_attention(q, k, v, attn_mask=mask, **SMALL), exact_masked)
    # decode-shaped: one query against a long cache
    q1 = q[:, :, -1:]
    assert torch.equal(hyper_attention(q1, k, v, **SMALL), F.scaled_dot_product_attention(q1, k, v))
    # dropout goes to SDPA with the same RNG stream
    torch.manual_seed(3)
    got = hyper_attention(q, k, v, dropout_p=0.5, **SMALL)
    torch.manual_seed(3)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"attn_mask": torch.ones(64, 64, dtype=torch.bool)}, "mask"),
        ({"dropout_p": 0.1}, "dropout"),
        ({"is_causal": True, "q_len": 1}, "causal with Nq=1"),
        ({"q_len": 8}, "shorter than min_len"),
    ],
)
def test_skip_reason_names_the_cause(kwargs, reason):
    q, k, v = qkv(n=64)
    q = q[:, :, : kwargs.pop("q_len", 64)]
    args = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, **kwargs}
    got = skip_reason(
        q,
        k,
        v,
        args["attn_mask"],
        args["dropout_p"],
        args["is_causal"],
        False,
        HyperConfig(min_len=16),
    )
    assert got is not None and reason in got.words


def test_one_query_is_exact_whatever_min_len():
    """A decode step (one query, non-causal as HF calls it) is exact even at min_len=1: the
    approximation's tiles would place it at the start of the keys, away from its recent ones."""
    q, k, v = qkv(n=64)
    q1 = q[:, :, -1:]
    got = skip_reason(q1, k, v, None, 0.0, False, False, HyperConfig(min_len=1))
    assert got is not None and got.code == "decode"
    small = {**SMALL, "min_len": 1}
    assert torch.equal(hyper_attention(q1, k, v, **small), F.scaled_dot_product_attention(q1, k, v))


def test_gqa_needs_enable_gqa_like_sdpa():
    q, k, v = qkv(hq=4, hkv=2, n=64)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError):
        hyper_attention(q, k, v, **SMALL)


def test_compiles_fullgraph_with_dynamic_lengths():
    def f(q, k, v):
        return hyper_attention(q, k, v, is_causal=True, **SMALL)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (12, 40):  # below and above min_len, one graph
        q, k, v = qkv(n=n)
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


@pytest.mark.parametrize(
    "params,message",
    [
        ({"block_size": 10}, "block_size"),
        ({"block_size": 0}, r"block_size must be in \[16, 65536\]"),
        ({"sample_size": -1}, "sample_size"),
        ({"lsh_num_projs": 17}, "lsh_num_projs"),
        ({"method": "nope"}, "method must be one of"),
        ({"method": "local", "window": 0}, "window > 0"),
        ({"method": "longformer", "window": 8, "sinks": 0}, "sinks > 0"),
        ({"min_len": 2.5}, "min_len must be an int"),
        ({"causal_algo": "other"}, "causal_algo"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(params, message):
    with pytest.raises(ValueError, match=message):
        HyperConfig(**params)
    q, k, v = qkv(n=8)
    with pytest.raises(ValueError, match=message):
        hyper_attention(q, k, v, **params)


def test_unknown_parameter_is_a_type_error():
    q, k, v = qkv(n=8)
    with pytest.raises(TypeError, match="blocksize"):
        hyper_attention(q, k, v, blocksize=64)


def test_package_exports():
    assert hyperpass.hyper_attention is hyper_attention
    assert hyperpass.HyperConfig is HyperConfig
    # the top-level kernels/ folder is importable as hyperpass.kernels, from a checkout too
    assert importlib.import_module("hyperpass.kernels").__file__.endswith("kernels/__init__.py")


def test_one_exact_causal_leaf_runs_sdpa():
    """Causal sortLSH on at most min_seq_len rows is one exact leaf: the op computes SDPA's
    values and gradients (bit for bit), and longer sequences are still approximated."""
    cfg = HyperConfig(**{**SMALL, "min_seq_len": 40})
    q, k, v = qkv(batch=2, hq=4, hkv=2, n=40, grad=True)
    out = hyper_attention_op(*op_args(q, k, v, cfg, is_causal=True, gqa=True))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, exact)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    exact_grads = torch.autograd.grad(exact.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(grads, exact_grads, strict=True))
    longer = [t.detach().repeat(1, 1, 2, 1) for t in (q, k, v)]  # 80 rows: two leaves
    out = hyper_attention_op(*op_args(*longer, cfg, is_causal=True, gqa=True))
    approx, _ = hyper_attention_reference(*longer, is_causal=True, config=cfg)
    assert torch.equal(out, approx)
    assert not torch.allclose(
        out, F.scaled_dot_product_attention(*longer, is_causal=True, enable_gqa=True)
    )


# ----------------------------------------------------------------------------- key padding
COVERING_SELECT = dict(min_len=16, window=4096, query_block=32, select_block=32, query_groups=4)


def _key_mask(batch, n):
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[0, :13] = False  # left padding
    valid[-1, n - 9 :] = False  # right padding
    return valid[:, None, None, :]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("min_len", [16, 4096], ids=["approximated", "exact"])
def test_key_padding_mask_approximated_and_exact_like_sdpa(causal, min_len):
    """A [B, 1, 1, N] key mask with is_causal means causal AND the mask; approximated (with a
    covering window) or exact (below min_len), real rows equal SDPA over the combined mask."""
    q, k, v = qkv(batch=2, hq=4, hkv=2, n=70, grad=True)
    key_mask = _key_mask(2, 70)
    params = {**COVERING_SELECT, "min_len": min_len}
    out = hyper_attention(q, k, v, attn_mask=key_mask, is_causal=causal, enable_gqa=True,
                          **params)  # fmt: skip
    full = key_mask & torch.ones(70, 70, dtype=torch.bool).tril() if causal else key_mask
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=True)
    rows = full.expand(2, 1, 70, 70).any(-1, keepdim=True).expand_as(out)
    torch.testing.assert_close(out[rows], ref[rows])
    grad = torch.randn_like(out) * rows
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref.masked_fill(~rows, 0), (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "mask,params,words",
    [
        (torch.zeros(2, 1, 1, 70), {}, "not a boolean key-padding mask"),
        (torch.ones(2, 1, 70, 70, dtype=torch.bool), {}, "not a boolean key-padding mask"),
        (torch.ones(2, 2, 1, 70, dtype=torch.bool), {}, "not a boolean key-padding mask"),
        (
            torch.ones(2, 1, 1, 70, dtype=torch.bool),
            {"method": "longformer", "window": 64, "sinks": 4},
            "method='longformer'",
        ),
    ],
    ids=["float", "full", "per-head", "longformer"],
)
def test_other_masks_stay_exact_with_a_reason(mask, params, words):
    q, k, v = qkv(batch=2, n=70)
    cfg = HyperConfig(**{**COVERING_SELECT, **params})
    reason = skip_reason(q, k, v, mask, 0.0, False, False, cfg)
    assert reason is not None and reason.code == "mask" and words in reason.words
