"""The kernels' exact pattern parts (window, dilation, sinks) against the reference, interpreted.

The pattern-only methods run through FlexAttention (forward here; its backward on GPUs,
``tools/gpu_check_blocks.py``); with ``method="hyper"`` the project's pattern kernels. Same
harness as the other kernel tests (``harness.py``: small tiles of 16, poisoned
allocations, fp64
oracle, bound = twice the reference's own low-precision error plus a few ulps), forward and
backward. Windows of 17-20 straddle the 16-row tiles; in the causal recursion (leaves of at most
32) they reach across sub-problem boundaries, and sinks of 40 exceed the key offsets of several
off-diagonal sub-problems (offsets 0, 37, 75, ...).
"""

from __future__ import annotations

import pytest
import torch

from hyperpass import kernels
from tests.kernels.harness import SMALL, check, inputs


# ----------------------------------------------------------------------------- pattern-only
@pytest.mark.parametrize(
    "params,causal,shape",
    [
        (dict(method="local", window=5), False, (1, 3, 1, 45, 45, 64)),
        (dict(method="local", window=17), True, (1, 3, 1, 45, 45, 64)),
        (dict(method="dilated", window=9, dilation=3), False, (1, 2, 2, 40, 53, 64)),
        (dict(method="dilated", window=20, dilation=4), True, (2, 2, 1, 37, 37, 64)),
        (dict(method="longformer", window=6, sinks=3), False, (1, 2, 1, 60, 37, 64)),
        (dict(method="longformer", window=17, sinks=5, dilation=2), True, (1, 2, 1, 50, 50, 128)),
    ],
    ids=[
        "local",
        "local-causal",
        "dilated-nq40-nk53",
        "dilated-causal-batch2",
        "longformer-nq60-nk37",
        "longformer-causal-dilated-d128",
    ],
)
def test_pattern_methods(params, causal, shape):
    check(*inputs(*shape, torch.float32), is_causal=causal, cfg=SMALL.replace(**params))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(
    "dtype,shape,sinks",
    [
        (torch.float16, (1, 2, 1, 45, 45, 64), 4),
        (torch.float16, (2, 4, 2, 50, 50, 64), 20),  # sink rows over tiles, per (batch, head)
    ],
    ids=["fp16", "fp16-batch2-gqa2"],  # (the interpreter gives garbage in bf16: GPU-checked)
)
def test_pattern_method_low_precision(causal, dtype, shape, sinks):
    """dK/dV in the input dtype, the sinks' atomics in their own fp32 rows, added at the end."""
    cfg = SMALL.replace(method="longformer", window=17, sinks=sinks)
    check(*inputs(*shape, dtype), is_causal=causal, cfg=cfg)


# ----------------------------------------------------------------------------- hyper + pattern
@pytest.mark.parametrize(
    "params,shape",
    [
        (dict(window=9, sinks=4), (1, 3, 1, 70, 70, 64)),
        (dict(window=20, dilation=3, sinks=5), (1, 2, 1, 40, 90, 64)),
        (dict(window=0, sinks=17), (1, 2, 2, 61, 61, 64)),
    ],
    ids=["window-sinks-gqa3", "dilated-nq40-nk90", "sinks-only"],
)
def test_hyper_noncausal(params, shape):
    check(*inputs(*shape, torch.float32), is_causal=False, cfg=SMALL.replace(**params))


@pytest.mark.parametrize(
    "params",
    [dict(window=9, sinks=4), dict(window=0, sinks=4), dict(window=18, dilation=2)],
    ids=["window-sinks", "sinks-only", "dilated-window"],
)
def test_hyper_causal_flat(params):
    cfg = SMALL.replace(causal_algo="flat", **params)
    check(*inputs(1, 3, 1, 70, 70, 64, torch.float32), is_causal=True, cfg=cfg)


@pytest.mark.parametrize(
    "params,n",
    [
        (dict(window=20, sinks=40), 150),  # 3 levels; sinks beyond the offsets 37 and 75
        (dict(window=7, dilation=3, sinks=5), 100),
        (dict(window=0, sinks=40), 70),  # sinks beyond the offset 35
    ],
    ids=["window-sinks-3-levels", "dilated", "sinks-only"],
)
def test_hyper_causal_recursive(params, n):
    cfg = SMALL.replace(**params)
    check(*inputs(1, 2, 1, n, n, 64, torch.float32), is_causal=True, cfg=cfg)


@pytest.mark.parametrize("algo", ["recursive", "flat"])
def test_hyper_pattern_fp16(algo):
    cfg = SMALL.replace(causal_algo=algo, window=17, sinks=3)
    check(*inputs(1, 2, 2, 75, 75, 64, torch.float16), is_causal=True, cfg=cfg)


def test_batch2_head_dim_128_noncausal():
    cfg = SMALL.replace(window=12, sinks=2)
    check(*inputs(2, 2, 1, 50, 50, 128, torch.float32), is_causal=False, cfg=cfg)


# ----------------------------------------------------------------------------- pieces
def test_rows_with_no_key_are_empty():
    """Non-causal local with Nq > Nk: queries beyond the window of every key get out 0, as the
    reference (FlexAttention's empty rows; their gradients are GPU-checked)."""
    cfg = SMALL.replace(method="local", window=4)
    q, k, v, _ = inputs(1, 1, 1, 40, 20, 64, torch.float32)
    out, _ = kernels.hyper_attention_forward(q, k, v, is_causal=False, scale=None, config=cfg)
    assert torch.equal(out[..., 23:, :], torch.zeros_like(out[..., 23:, :]))
    assert torch.isfinite(out).all() and out[..., :23, :].abs().sum() > 0


def test_window_and_dilation_beyond_the_sequence():
    """A window and a dilation far beyond the sequence (clamped on the host): the pattern is
    the query itself. (The reference materializes the window's span: keep it moderate.)"""
    cfg = SMALL.replace(method="dilated", window=1000, dilation=65536)
    check(*inputs(1, 1, 1, 20, 20, 64, torch.float32), is_causal=True, cfg=cfg)


def test_huge_window_served_without_overflow():
    """window = 2**31 - 1 (the config's maximum): int32 tile bounds stay valid; non-causal local
    with it is full attention."""
    cfg = SMALL.replace(method="local", window=2**31 - 1)
    q, k, v, _ = inputs(1, 2, 1, 20, 33, 64, torch.float32)
    out, _ = kernels.hyper_attention_forward(q, k, v, is_causal=False, scale=None, config=cfg)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().expand(1, 2, 33, 64), v.double().expand(1, 2, 33, 64)
    )
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
