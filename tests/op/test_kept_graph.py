"""The forward's autograd graph handed to the backward (``registration.KEEP_FORWARD_GRAPH``).

On a GPU the block methods' eager calls keep FlexAttention's graph instead of recomputing it;
here the kernels' routing is replaced by a stand-in that sends the call down that path, with
the reference (differentiable by autograd) as the forward, so the handshake itself is tested:
which backward runs, the gradients, once only, no stale graph reused.
"""

import types

import pytest
import torch

from hyperpass.config import DEFAULT
from hyperpass.op import hyper_attention, registration
from hyperpass.reference import hyper_attention_reference

OVERRIDES = dict(min_len=16, window=32, select_block=16, query_block=16, select_rows=4)
CFG = DEFAULT.replace(**OVERRIDES)


def qkv(seed=0, n=70):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 4, n, 16), (1, 2, n, 16), (1, 2, n, 16)]
    return [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]


@pytest.fixture
def autograd_kernels(monkeypatch):
    """Every approximated call takes the kept-graph path; counts the backward op's calls."""
    stand_in = types.SimpleNamespace(backward_by_autograd=lambda cfg: True)
    monkeypatch.setattr(registration, "serving_kernels", lambda *args: stand_in)
    calls = []
    real = registration.hyper_attention_backward

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(registration, "hyper_attention_backward", counted)
    return calls


def _grads(q, k, v, grad_out, **kw):
    out = hyper_attention(q, k, v, is_causal=True, enable_gqa=True, config=CFG)
    return out, torch.autograd.grad(out, (q, k, v), grad_out, **kw)


def test_kept_graph_gives_the_references_gradients_without_the_backward_op(autograd_kernels):
    q, k, v = qkv()
    grad_out = torch.randn(1, 4, 70, 16)
    out, grads = _grads(q, k, v, grad_out)
    ref, _ = hyper_attention_reference(q, k, v, is_causal=True, config=CFG)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert autograd_kernels == []  # no recomputation
    torch.testing.assert_close(out, ref)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)


def test_a_second_backward_recomputes(autograd_kernels):
    q, k, v = qkv(1)
    grad_out = torch.randn(1, 4, 70, 16)
    out = hyper_attention(q, k, v, is_causal=True, enable_gqa=True, config=CFG)
    first = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad_out)
    assert autograd_kernels == [1]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


def test_switched_off_the_backward_recomputes(autograd_kernels, monkeypatch):
    monkeypatch.setattr(registration, "KEEP_FORWARD_GRAPH", False)
    q, k, v = qkv(2)
    grad_out = torch.randn(1, 4, 70, 16)
    _out, grads = _grads(q, k, v, grad_out)
    monkeypatch.setattr(registration, "KEEP_FORWARD_GRAPH", True)
    _out, kept = _grads(q, k, v, grad_out)
    assert autograd_kernels == [1]
    for a, b in zip(grads, kept, strict=True):
        torch.testing.assert_close(a, b)


def test_a_graph_left_under_no_grad_is_never_taken_by_another_call(autograd_kernels):
    """Inputs requiring grad under no_grad keep a graph no backward takes; the next call, on
    other inputs, must differentiate its own forward."""
    q0, k0, v0 = qkv(3)
    with torch.no_grad():
        hyper_attention(q0, k0, v0, is_causal=True, enable_gqa=True, config=CFG)
    q, k, v = qkv(4)
    grad_out = torch.randn(1, 4, 70, 16)
    _out, grads = _grads(q, k, v, grad_out)
    ref, _ = hyper_attention_reference(q, k, v, is_causal=True, config=CFG)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), grad_out), strict=True):
        torch.testing.assert_close(got, want)


def test_compiled_calls_recompute(autograd_kernels):
    """A traced call's setup_context sees fake tensors; a graph an eager call left (under
    no_grad) must not be taken there."""
    q, k, v = qkv(5)
    with torch.no_grad():
        hyper_attention(*qkv(6), is_causal=True, enable_gqa=True, config=CFG)
    grad_out = torch.randn(1, 4, 70, 16)

    def attend(q, k, v):  # overrides, not a config: torch 2.11's Dynamo cannot rebuild one
        return hyper_attention(q * 1.0, k, v, is_causal=True, enable_gqa=True, **OVERRIDES)

    out = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref, _ = hyper_attention_reference(q, k, v, is_causal=True, config=CFG)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), grad_out), strict=True):
        torch.testing.assert_close(got, want)
