"""The planned op of compiled training graphs (``hyperpass.op.planned``) and the backend's swap
(``hyperpass.compiler.training``).

On a GPU the plan is select's block lists and FlexAttention runs over them; here a stand-in
for the kernels writes the reference's selection as the plan and differentiates the
reference's block-sparse attention over the plan it is handed, so the handshake itself is
tested: the forward's value, the selection run once (not again in the backward), the
gradients, the fake's shapes, and exact calls whose backward recomputes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hyperpass
from hyperpass.compiler import training
from hyperpass.config import DEFAULT
from hyperpass.op import planned, signature
from hyperpass.reference import hyper_attention_reference
from hyperpass.reference.select import block_sparse_attention, select_block_mask

OVERRIDES = dict(min_len=48, window=32, select_block=16, query_block=16, select_rows=4)
CFG = DEFAULT.replace(**OVERRIDES)


class StandIn:
    """The kernels' planned entry points, on the reference; counts selections and backwards."""

    def __init__(self):
        self.selections = 0
        self.backwards = 0

    @staticmethod
    def plan_shapes(batch, q_heads, kv_heads, nq, nk, cfg):
        del kv_heads
        n_tiles, n_kb = -(-nq // cfg.query_block), -(-nk // cfg.select_block)
        counts = (batch, q_heads, n_tiles)
        return counts, (*counts, n_kb), counts, (*counts, n_kb)

    def select_forward_with_plan(self, q, k, v, plan, *, is_causal, scale, config, key_mask):
        self.selections += 1
        part_num, _part_idx, full_num, full_idx = plan
        groups = q.shape[1] // k.shape[1]
        qg = q.view(q.shape[0], k.shape[1], groups, *q.shape[2:])
        blocks = select_block_mask(qg, k, config, is_causal).flatten(1, 2)  # [B, Hq, T, n_kb]
        part_num.zero_()
        full_num.copy_(blocks.sum(-1))
        ids = torch.arange(blocks.shape[-1], dtype=torch.int32)
        full_idx.copy_(torch.where(blocks, ids, blocks.shape[-1] + ids).argsort(-1))
        return hyper_attention_reference(
            q, k, v, is_causal=is_causal, scale=scale, config=config, key_mask=key_mask
        )[0]

    def select_backward_over_plan(self, grad_out, q, k, v, plan, *, is_causal, scale, config,
                                  key_mask):  # fmt: skip
        self.backwards += 1
        _part_num, _part_idx, full_num, full_idx = plan
        n_kb = full_idx.shape[-1]
        listed = torch.arange(n_kb) < full_num[..., None]
        blocks = torch.zeros(full_idx.shape, dtype=torch.bool)
        blocks.scatter_(-1, full_idx.long().clamp(0, n_kb - 1), listed)
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        batch, q_heads, nq, dim = q.shape
        groups = q_heads // k.shape[1]
        qg = (inputs[0] * (scale or 1 / math.sqrt(dim))).view(batch, -1, groups, nq, dim)
        out, _ = block_sparse_attention(
            qg, inputs[1], inputs[2], blocks.view(batch, -1, groups, *blocks.shape[2:]),
            config.query_block, config.select_block, is_causal,
        )  # fmt: skip
        out = out.reshape(batch, q_heads, nq, -1)
        return tuple(torch.autograd.grad(out, inputs, grad_out))


@pytest.fixture
def stand_in(monkeypatch):
    kernels = StandIn()
    monkeypatch.setattr(planned, "kernel_module", lambda: kernels)
    monkeypatch.setattr(planned, "keeps_plan", lambda q, k, cfg: cfg.method == "select")
    monkeypatch.setattr(training, "keeps_plan", lambda q, k, cfg: cfg.method == "select")

    # the public op's serving check stays the real one (CPU: the reference)
    def serving(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, cfg):
        return kernels if q.shape[-2] >= cfg.min_len else None

    monkeypatch.setattr(planned, "serving_kernels", serving)
    return kernels


def qkv(seed=0, n=70, heads=(4, 2)):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, heads[0], n, 16), (1, heads[1], n, 16), (1, heads[1], n, 16)]
    return [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]


def _planned(q, k, v, cfg=CFG):
    args = signature.op_args(q, k, v, is_causal=True, enable_gqa=True, config=cfg)
    return planned.hyper_attention_with_plan_op(*args)


def test_planned_call_gives_the_references_value_and_gradients_selecting_once(stand_in):
    q, k, v = qkv()
    grad_out = torch.randn(1, 4, 70, 16)
    out, *plan = _planned(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref, _ = hyper_attention_reference(q, k, v, is_causal=True, config=CFG)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert (stand_in.selections, stand_in.backwards) == (1, 1)
    assert [tuple(p.shape) for p in plan] == [(1, 4, 5), (1, 4, 5, 5)] * 2
    assert not any(p.requires_grad for p in plan)
    torch.testing.assert_close(out, ref)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)


def test_exact_call_leaves_the_plan_unset_and_recomputes(stand_in):
    q, k, v = qkv(1, n=40)  # below min_len=48: exact
    grad_out = torch.randn(1, 4, 40, 16)
    out, *plan = _planned(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert (stand_in.selections, stand_in.backwards) == (0, 0)
    assert [tuple(p.shape) for p in plan] == [(1, 4, 3), (1, 4, 3, 3)] * 2  # the fake's shapes
    torch.testing.assert_close(out, ref)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)


def test_without_kernels_the_plan_is_empty_and_the_call_is_the_public_ops():
    q, k, v = qkv(2)  # CPU tensors: no plan
    out, *plan = _planned(q, k, v)
    assert [p.numel() for p in plan] == [0, 0, 0, 0]
    ref, _ = hyper_attention_reference(q, k, v, is_causal=True, config=CFG)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.proj(out)


def _targets(graphs):
    return {node.target for gm in graphs for node in gm.graph.nodes}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_training_graph_keeps_the_plan_and_matches_eager(stand_in, dynamic):
    torch._dynamo.reset()
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)

    model = Attention()
    compiled = torch.compile(
        model, backend=hyperpass.backend(inner=inner, **OVERRIDES), dynamic=dynamic
    )
    for n in (70, 90) if dynamic else (70,):
        q, k, v = qkv(3, n=n)
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, model.proj.weight))
        ref = model.proj(hyper_attention_reference(q, k, v, is_causal=True, config=CFG)[0])
        want = torch.autograd.grad(ref.square().sum(), (q, k, v, model.proj.weight))
        torch.testing.assert_close(out, ref)
        for got, expected in zip(grads, want, strict=True):
            torch.testing.assert_close(got, expected)
    runs = 2 if dynamic else 1
    assert (stand_in.selections, stand_in.backwards) == (runs, runs)
    assert planned.hyper_attention_with_plan_op in _targets(graphs)
    torch._dynamo.reset()


def test_inference_graph_keeps_the_public_op(stand_in):
    torch._dynamo.reset()
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(Attention(), backend=hyperpass.backend(inner=inner, **OVERRIDES))
    with torch.no_grad():
        compiled(*qkv(4))
    targets = _targets(graphs)
    assert planned.hyper_attention_with_plan_op not in targets
    assert torch.ops.hyperpass.hyper_attention.default in targets
    torch._dynamo.reset()
