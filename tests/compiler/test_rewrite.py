"""The compiler pass on the attention corpus: what it finds, what it decides, what it computes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hyperpass
from hyperpass.compiler.gqa import unwrap_repeat_kv
from hyperpass.compiler.report import COUNTERS
from hyperpass.compiler.rewrite import RewriteOptions, rewrite_graph
from hyperpass.config import HyperConfig
from hyperpass.op import hyper_attention_op
from tests.helpers.attention_corpus import Fn, corpus, qkv
from tests.helpers.configs import PAPER_ALGO

# block_size and min_seq_len >= N make the approximation exact at the corpus' lengths
EXACT = {
    **PAPER_ALGO,
    "block_size": 64,
    "min_seq_len": 64,
    "sample_size": 16,
}
CASES = {c.name: c for c in corpus()}


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    COUNTERS.reset()
    yield
    torch._dynamo.reset()


def _grad_inputs(inputs):
    return tuple(
        t.detach().clone().requires_grad_(t.is_floating_point() and t.dim() == 4) for t in inputs
    )


@pytest.mark.parametrize("name", list(CASES))
def test_corpus_decision_and_outputs(name):
    case = CASES[name]
    be = hyperpass.backend(min_len=16, inner="aot_eager", **EXACT)
    compiled = torch.compile(case.module, backend=be, fullgraph=True)
    inputs = _grad_inputs(case.inputs)
    ref_inputs = _grad_inputs(case.inputs)
    out = compiled(*inputs)
    ref = case.module(*ref_inputs)

    assert tuple((r.code, r.mask) for r in be.reports) == case.expect
    rewritten = [r for r in be.reports if r.rewritten]
    assert all(r.gqa == case.gqa for r in rewritten)
    assert COUNTERS.rewritten == len(rewritten)
    assert sum(COUNTERS.skipped.values()) == len(be.reports) - len(rewritten)
    if not case.numeric:
        return
    torch.testing.assert_close(out, ref, **case.tol)
    out = out[0] if isinstance(out, tuple) else out
    ref = ref[0] if isinstance(ref, tuple) else ref
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(inputs, ref_inputs, strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, **case.tol)


def _captured_graph(fn, *inputs, **options):
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    be = hyperpass.backend(inner=inner, **options)
    torch.compile(Fn(fn), backend=be, fullgraph=True)(*inputs)
    (gm,) = graphs
    return gm, be.reports


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_rewritten_graph_has_one_op_call_and_no_attention_left():
    gm, _ = _captured_graph(CASES["hw_llama_eager"].module.fn, *qkv(h_kv=2), min_len=16)
    targets = _targets(gm)
    assert targets.count(hyper_attention_op) == 1
    assert not {torch.matmul, F.softmax, torch.where, "expand", "reshape"} & set(targets)
    (call,) = [n for n in gm.graph.nodes if n.target is hyper_attention_op]
    # native GQA: the un-repeated k/v (2 heads) feed the op, causal, explicit scale, full config
    assert call.args[1].meta["example_value"].shape[1] == 2
    assert call.args[3:8] == (None, 0.0, True, 8**-0.5, True)
    assert call.args[8:] == tuple(HyperConfig(min_len=16).as_dict().values())


def test_exact_site_graph_untouched():
    gm, reports = _captured_graph(CASES["hw_returns_weights"].module.fn, *qkv(), min_len=16)
    assert [r.code for r in reports] == ["weights_used"]
    assert hyper_attention_op not in _targets(gm)
    assert torch.softmax in _targets(gm)


def test_rewrite_runs_the_approximation_with_the_site_config():
    """Not exact parameters: the compiled model computes hyper_attention's approximation."""
    q, k, v = qkv(n_q=128, d=16)
    params = {**PAPER_ALGO, "block_size": 16, "sample_size": 16, "min_seq_len": 32, "min_len": 64}
    be = hyperpass.backend(inner="aot_eager", **params)
    out = torch.compile(Fn(CASES["hw_masked_fill_tril"].module.fn), backend=be)(q, k, v)
    expected = hyperpass.hyper_attention(q, k, v, is_causal=True, scale=0.25, **params)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected)
    assert (out - exact).abs().max() > 1e-3  # the approximation really ran


def test_decode_shaped_causal_stays_exact():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    _, reports = _captured_graph(fn, *qkv(n_q=32, n_k=48), min_len=16)
    assert [r.code for r in reports] == ["decode"]


def _tril(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


@pytest.mark.parametrize(
    ("build", "kind"),
    [
        # a float 0/1 lower triangle added to the scores does not mask anything
        (lambda n: torch.ones(n, n).tril(), "arbitrary"),
        # BERT's old -10000 is not a large enough negative to count as masked out
        (lambda n: torch.full((n, n), -10000.0).triu(1), "arbitrary"),
        (lambda n: torch.full((n, n), -1e9).triu(1), "causal"),
        (lambda n: torch.ones(n, n, dtype=torch.bool).tril().transpose(0, 1), "arbitrary"),
        (lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1), "arbitrary"),
        (lambda n: ~torch.ones(n, n, dtype=torch.bool).triu(1), "causal"),
        (lambda n: _tril(n)[None, None].expand(2, 4, n, n), "causal"),
        (lambda n: torch.ones(n + 8, n + 8, dtype=torch.bool).tril()[:n, :n], "causal"),
        (lambda n: torch.ones(n + 8, n + 8, dtype=torch.bool).tril()[8:, 8:], "causal"),
        (lambda n: torch.ones(n + 8, n + 8, dtype=torch.bool).tril()[8:, :n], "arbitrary"),
        # causal in fact, but a union the classifier does not prove: kept exact (conservative)
        (lambda n: _tril(n) | torch.eye(n, dtype=torch.bool), "arbitrary"),
        (lambda n: torch.ones(n, n, dtype=torch.bool), "none"),
    ],
    ids=[
        "float01_tril", "minus_1e4_triu", "minus_1e9_triu", "transposed_tril", "tril_below",
        "not_triu1", "expanded_tril", "sliced_tril", "sliced_tril_offset_both",
        "sliced_tril_offset_rows", "tril_or_eye", "all_true",
    ],
)  # fmt: skip
def test_mask_classification(build, kind):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build(q.shape[-2]))

    q, k, v = qkv()
    _, reports = _captured_graph(fn, q, k, v, min_len=16, **EXACT)
    assert [r.mask for r in reports] == [kind]
    torch.testing.assert_close(Fn(fn)(q, k, v), torch.compile(Fn(fn), backend="eager")(q, k, v))


def test_mask_with_cache_offset_is_not_causal():
    """kv_idx <= q_idx + past with a symbolic past: causal only when past == 0."""

    def fn(q, k, v, past):
        n = q.shape[-2]
        q_idx = torch.arange(past.shape[0], past.shape[0] + n)
        kv_idx = torch.arange(n)
        mask = kv_idx[None, :] <= q_idx[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    past = torch.zeros(3)
    torch._dynamo.mark_dynamic(past, 0)
    _, reports = _captured_graph(fn, *qkv(), past, min_len=16)
    assert [r.mask for r in reports] == ["arbitrary"]


def test_unwrap_repeat_kv_rejects_tiled_heads():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(k):
        return k.repeat(1, 2, 1, 1), k.repeat_interleave(2, dim=1)

    torch.compile(fn, backend=capture)(torch.randn(1, 2, 8, 4))
    tiled, interleaved = [n for n in graphs[0].graph.nodes if n.op == "call_method"]
    assert unwrap_repeat_kv(tiled) is None
    base, n_rep = unwrap_repeat_kv(interleaved)
    assert base.op == "placeholder" and n_rep == 2


class Stack(nn.Module):
    """Three attention layers in a ModuleList, like a decoder."""

    class Attn(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x, is_causal=True)

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([self.Attn() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize(
    ("options", "rewritten"),
    [
        ({}, ["layers.0", "layers.1", "layers.2"]),
        ({"last_n_layers": 1}, ["layers.2"]),
        ({"last_n_layers": 2}, ["layers.1", "layers.2"]),
        ({"layers": "layers.0"}, ["layers.0"]),
        ({"layers": ["layers.[12]"]}, ["layers.1", "layers.2"]),
        ({"layers": r"layers\.(0|2)"}, ["layers.0", "layers.2"]),
    ],
)
def test_site_selection(options, rewritten):
    be = hyperpass.backend(min_len=16, inner="eager", **options)
    torch.compile(Stack(), backend=be, fullgraph=True)(torch.randn(1, 2, 32, 8))
    assert [r.module for r in be.reports] == ["layers.0", "layers.1", "layers.2"]
    assert [r.module for r in be.reports if r.rewritten] == rewritten
    assert all(r.code == "not_selected" for r in be.reports if not r.rewritten)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_last_n_layers_must_be_positive(bad):
    """0 layers would rewrite nothing: rejected, as by patch() and the CLI."""
    with pytest.raises(ValueError, match="last_n_layers must be an int >= 1"):
        hyperpass.backend(min_len=16, last_n_layers=bad)


def test_per_site_overrides():
    be = hyperpass.backend(
        min_len=16,
        inner="eager",
        block_size=32,
        **PAPER_ALGO,
        overrides={"layers.1": {"block_size": 64, "window": 8}, "layers.*": {"seed": 3}},
    )
    torch.compile(Stack(), backend=be, fullgraph=True)(torch.randn(1, 2, 32, 8))
    params = [r.params for r in be.reports]
    assert [p["block_size"] for p in params] == [32, 64, 32]
    assert [p["window"] for p in params] == [0, 8, 0]
    assert [p["seed"] for p in params] == [3, 3, 3]


def test_rewrite_graph_dry_run_leaves_graph_and_counters():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(Stack(), backend=capture)(torch.randn(1, 2, 32, 8))
    before = graphs[0].code
    options = RewriteOptions(HyperConfig(min_len=16))
    reports = rewrite_graph(graphs[0], None, options, dry_run=True)
    assert [r.decision for r in reports] == ["rewritten"] * 3
    assert graphs[0].code == before
    assert COUNTERS.rewritten == 0
    reports = rewrite_graph(graphs[0], None, options)
    assert COUNTERS.rewritten == 3
    assert _targets(graphs[0]).count(hyper_attention_op) == 3


def test_dynamic_length_crosses_min_len_without_recompiling():
    from torch._dynamo.utils import counters

    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return torch.softmax(s, dim=-1) @ v

    params = {**PAPER_ALGO, "min_len": 48, "block_size": 16, "sample_size": 16, "min_seq_len": 16}
    be = hyperpass.backend(inner="aot_eager", **params)
    compiled = torch.compile(Fn(fn), backend=be, dynamic=True, fullgraph=True)
    counters.clear()
    for n in (32, 40, 96, 128):
        q, k, v = qkv(n_q=n, d=16)
        out = compiled(q, k, v)
        if n < 48:
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
        else:
            expected = hyperpass.hyper_attention(q, k, v, **params)
            torch.testing.assert_close(out, expected)
            assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-3
    assert counters["stats"]["unique_graphs"] == 1
    assert [r.code for r in be.reports] == ["rewritten"]
    assert "symbolic" in be.reports[0].reason


@pytest.mark.parametrize("name", ["sdpa_padding", "sdpa_causal_and_padding"])
def test_key_padding_masks_rewritten_with_select(name):
    """The corpus' key-padding masks (right padding: every query keeps a key) are rewritten for
    select, which takes a key mask; with a window over every key they equal eager, gradients
    too. (With the corpus' hyper parameters they stay exact: the cases above.)"""
    case = CASES[name]
    be = hyperpass.backend(min_len=16, inner="aot_eager", window=4096, query_block=32,
                           select_block=32, query_groups=4)  # fmt: skip
    compiled = torch.compile(case.module, backend=be, fullgraph=True)
    inputs, ref_inputs = _grad_inputs(case.inputs), _grad_inputs(case.inputs)
    out, ref = compiled(*inputs), case.module(*ref_inputs)
    assert [r.code for r in be.reports] == ["rewritten"]
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(inputs, ref_inputs, strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)


def test_rewrite_keeps_in_place_ops_whose_result_nobody_reads():
    """``buf.add_(1)``'s own value is unused, its effect is read: the rewrite removes only what
    the replaced attention left behind (a whole-graph dead-code pass dropped such nodes, and a
    tensor-parallel HF model computed another answer)."""

    def f(q, k, v):
        buf = torch.zeros(q.shape[-1])
        buf.add_(1.0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) + buf

    q, k, v = (torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))  # fmt: skip
    be = hyperpass.backend(min_len=16, inner="aot_eager", **EXACT)
    torch.testing.assert_close(torch.compile(f, backend=be)(q, k, v), f(q, k, v))
    assert [r.code for r in be.reports] == ["rewritten"]
