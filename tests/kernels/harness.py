"""The kernel tests' harness: small configs and tiles, inputs, the error bound, ``check``.

Tolerance, from data: the kernel's max error vs an fp64 run of the reference may be at most twice
the reference's own error at the input precision, plus a floor of a few ulps of the output scale.
"""

from __future__ import annotations

import torch

from hyperpass import kernels
from hyperpass.config import HyperConfig
from hyperpass.kernels.tuning import Tuning
from hyperpass.reference import hyper_attention_reference
from tests.helpers.configs import PAPER_ALGO

# small problems: 32-key blocks, 16 samples, 3 hyperplanes, exact leaves of at most 32
SMALL = HyperConfig(
    **PAPER_ALGO,
    block_size=32,
    sample_size=16,
    lsh_num_projs=3,
    min_seq_len=32,
)
FLOOR_ULPS = {torch.float32: 8 * 2.0**-24, torch.float16: 2 * 2.0**-11}


# small tiles, so a few dozen rows still span several tiles and sub-tiles
SMALL_TILES = Tuning(block_m=16, block_n=16, bwd_block_m=16)


def inputs(batch, q_heads, kv_heads, nq, nk, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q = randn(batch, q_heads, nq, dim)
    k = randn(batch, kv_heads, nk, dim)
    v = randn(batch, kv_heads, nk, dim)
    grad = randn(batch, q_heads, nq, dim)
    return q, k, v, grad


def close(name, kern, low, oracle):
    """|kernel - oracle| <= 2 |reference(low precision) - oracle| + a few ulps of the scale."""
    assert torch.isfinite(kern).all(), f"{name}: non-finite values (unwritten or NaN)"
    oracle = oracle.double()
    ref_err = (low.double() - oracle).abs().max().item()
    floor = FLOOR_ULPS[low.dtype if low.dtype in FLOOR_ULPS else torch.float32]
    atol = 2 * ref_err + floor * max(1.0, oracle.abs().max().item())
    torch.testing.assert_close(
        kern.double(), oracle, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}"
    )


def check(q, k, v, grad, is_causal, cfg, backward=True, tuning=SMALL_TILES):
    assert kernels.unsupported_reason(q, k, v, is_causal, cfg) is None
    kw = dict(is_causal=is_causal, scale=None, config=cfg, tuning=tuning)
    out, lse = kernels.hyper_attention_forward(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape[:3] + v.shape[-1:]
    flex = kernels.backward_by_autograd(cfg)  # FlexAttention: no lse; its backward needs a GPU
    backward = backward and not flex
    if flex:
        assert lse is None
    else:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]

    low = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    high = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    with torch.enable_grad():
        low_out, low_lse = hyper_attention_reference(*low, is_causal=is_causal, config=cfg)
        high_out, high_lse = hyper_attention_reference(*high, is_causal=is_causal, config=cfg)
    close("out", out, low_out, high_out)
    if not flex:
        close("lse", lse, low_lse.to(q.dtype), high_lse)
    if not backward:
        return
    grads = kernels.hyper_attention_backward(grad, q, k, v, **kw)
    low_grads = torch.autograd.grad(low_out, low, grad)
    high_grads = torch.autograd.grad(high_out, high, grad.double())
    for name, g, lo, hi, t in zip("qkv", grads, low_grads, high_grads, (q, k, v), strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape
        close(f"d{name}", g, lo, hi)
