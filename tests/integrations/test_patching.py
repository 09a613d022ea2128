"""hyperpass.patch / unpatch: routing of SDPA calls, layer selection, round trip, torch.compile."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as early_bound_sdpa

import hyperpass
from hyperpass.integrations import patching
from tests.helpers.configs import PAPER_ALGO

DIM, HEADS = 32, 2
# block and recursion as long as the sequence: the approximation is exact attention
EXACT = dict(**PAPER_ALGO, min_len=16, block_size=128, min_seq_len=128)
# small blocks and samples: an approximation that differs from SDPA
APPROX = dict(**PAPER_ALGO, min_len=16, block_size=16, sample_size=16, min_seq_len=16)


class Block(nn.Module):
    """Attention as models write it: SDPA imported early (bypasses a swap of F's attribute)."""

    def __init__(self, causal=True):
        super().__init__()
        self.causal = causal
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.mask = None
        self.dropout = 0.0

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        y = early_bound_sdpa(
            query=q,
            key=k,
            value=v,
            attn_mask=self.mask,
            dropout_p=self.dropout,
            is_causal=self.causal,
        )
        return x + self.proj(y.transpose(1, 2).reshape(b, n, DIM))


class Tiny(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(depth))

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 64, DIM)


def _attention_inputs(block, x):
    b, n, _ = x.shape
    return block.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)


def test_patch_exact_settings_match_sdpa_and_count_sites(model, x):
    ref = model(x)
    hyperpass.patch(model, **EXACT)
    torch.testing.assert_close(model(x), ref)
    totals = patching.report(model).totals()
    assert (totals.calls, totals.approximated) == (3, 3)


def test_patch_routes_to_the_op(model, x):
    ref = model(x)
    hyperpass.patch(model, layers="layers.0", **APPROX)
    out = model(x)
    assert not torch.allclose(out, ref, atol=1e-3)
    # the first layer's attention output is the op's on the same inputs
    block = model.layers[0]
    h = model.embed(x)
    q, k, v = _attention_inputs(block, h)
    expected = hyperpass.hyper_attention(q, k, v, is_causal=True, **APPROX)
    y = expected.transpose(1, 2).reshape(*h.shape)
    torch.testing.assert_close(block(h), h + block.proj(y))


def test_unpatch_round_trip_is_bit_identical(model, x):
    model.layers[1].register_forward_hook(lambda m, i, o: o)
    ref = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dicts = {n: dict(vars(m)) for n, m in model.named_modules()}
    hooks = {n: dict(m._forward_hooks) for n, m in model.named_modules()}

    hyperpass.patch(model, last_n_layers=2, **APPROX)
    assert not torch.equal(model(x), ref)
    hyperpass.unpatch(model)

    assert torch.equal(model(x), ref)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    for n, m in model.named_modules():
        assert vars(m).keys() == dicts[n].keys(), n
        assert all(vars(m)[a] is dicts[n][a] for a in dicts[n]), n
        assert dict(m._forward_hooks) == hooks[n], n
    assert not patching.is_patched(model)
    hyperpass.patch(model, **APPROX)  # patchable again
    hyperpass.unpatch(model)


def test_unpatch_restores_an_instance_forward(model, x):
    own = model.forward
    model.forward = own  # an instance attribute set by the user
    hyperpass.patch(model, **APPROX)
    hyperpass.unpatch(model)
    assert model.__dict__["forward"] is own


def test_mask_and_dropout_stay_exact_sdpa(model, x):
    block = model.layers[0]
    n = x.shape[1]
    block.mask = torch.ones(n, n, dtype=torch.bool).tril()
    block.causal = False
    ref = block(x)
    hyperpass.patch(block, **APPROX)
    assert torch.equal(block(x), ref)  # the very same SDPA call
    block.mask, block.causal, block.dropout = None, True, 0.5
    torch.manual_seed(3)
    out = block(x)
    assert patching.report(block).totals().exact == {"attention mask": 1, "dropout": 1}
    hyperpass.unpatch(block)
    torch.manual_seed(3)
    assert torch.equal(out, block(x))


def test_report_gives_exact_reasons(model, x):
    hyperpass.patch(model, min_len=128)
    model(x)
    totals = patching.report(model).totals()
    assert totals.approximated == 0
    assert totals.exact == {"sequence 64 shorter than min_len=128": 3}
    assert "exact x3: sequence 64 shorter than min_len=128" in patching.report(model).format()


def test_last_n_layers_patches_only_those(model, x):
    hyperpass.patch(model, last_n_layers=2, **APPROX)
    model(x)
    assert list(patching.report(model).sites) == ["layers.1", "layers.2"]


def test_layer_patterns(model, x):
    hyperpass.patch(model, layers=["layers.[02]", "layers.2.proj", "layers.0"], **APPROX)
    model(x)
    assert list(patching.report(model).sites) == ["layers.0", "layers.2"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="fast"), ValueError, "mode must be one of"),
        (dict(min_len=-1), ValueError, "min_len"),
        (dict(block_sizes=16), TypeError, "block_sizes"),
        (dict(layers="decoder.*"), ValueError, "'decoder.\\*' matches no module"),
        (dict(last_n_layers=4), ValueError, r"last_n_layers must be in \[1, 3\]"),
        (dict(last_n_layers=1, layers="layers.0"), ValueError, "not both"),
        (dict(inner="aot_eager"), ValueError, "only used with mode='compile'"),
    ],
)
def test_patch_rejects_bad_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        hyperpass.patch(model, **kwargs)
    assert not patching.is_patched(model)
    assert "forward" not in vars(model)


def test_patch_refuses_twice_and_compiled_models(model):
    hyperpass.patch(model, layers="layers.0")
    with pytest.raises(RuntimeError, match="already patched"):
        hyperpass.patch(model)
    with pytest.raises(RuntimeError, match="'0.layers.0' is already patched"):
        hyperpass.patch(nn.Sequential(model), layers="0.layers.0")
    hyperpass.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        hyperpass.unpatch(model)
    with pytest.raises(TypeError, match="already wrapped by torch.compile"):
        hyperpass.patch(torch.compile(model))


def test_other_threads_are_not_routed(model, x):
    """The routing is a thread-local torch function mode: a concurrent thread keeps SDPA."""
    other = Block().eval()
    ref = other(x)
    seen = {}

    def run_other():
        seen["out"] = other(x)

    class Spawner(nn.Module):
        def forward(self, x):
            t = threading.Thread(target=run_other)
            t.start()
            t.join()
            return F.scaled_dot_product_attention(x, x, x)

    spawner = Spawner()
    hyperpass.patch(spawner, **APPROX)
    spawner(x[:, None])
    assert torch.equal(seen["out"], ref)
    assert patching.report(spawner).totals().calls == 1


def test_gradients_match_sdpa_when_exact(model, x):
    ref = model(x).square().sum()
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    hyperpass.patch(model, **EXACT)
    out = model(x).square().sum()
    grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_user_torch_compile_traces_the_patch_without_breaks(model, x):
    from torch._dynamo.testing import CompileCounterWithBackend

    ref = model(x)
    hyperpass.patch(model, **EXACT)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(x), ref)
    torch.testing.assert_close(compiled(x + 1), model(x + 1))
    assert counter.frame_count == 1  # one graph, no recompile for a second call
    targets = [n.target for g in counter.graphs for n in g.graph.nodes]
    assert targets.count(torch.ops.hyperpass.hyper_attention.default) == 3
    assert F.scaled_dot_product_attention not in targets
    assert patching.report(model).totals().traced == 3


def test_user_torch_compile_recompiles_no_more_than_unpatched(model):
    """New lengths recompile the patched model exactly as often as the unpatched one."""
    from torch._dynamo.testing import CompileCounterWithBackend

    frames = []
    for patched in (False, True):
        torch._dynamo.reset()
        if patched:
            hyperpass.patch(model, **APPROX)
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for n in (32, 48, 64):
            compiled(torch.randn(1, n, DIM))
        frames.append(counter.frame_count)
    assert frames[1] == frames[0]


def _backend_available():
    try:
        import hyperpass.compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _backend_available(), reason="hyperpass.compiler (compiler pass) absent")
def test_compile_mode_rewrites_hand_written_attention(x):
    class HandWritten(nn.Module):
        def forward(self, q, k, v):
            scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
            return scores.softmax(dim=-1) @ v

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 64, 16).unbind(0)
    module = HandWritten()
    ref = module(q, k, v)
    hyperpass.patch(module, mode="compile", inner="aot_eager", **APPROX)
    out = module(q, k, v)
    expected = hyperpass.hyper_attention(q, k, v, **APPROX)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, ref, atol=1e-3)
    sites = patching.compiled_sites(module)
    assert [(s.form != "sdpa", s.rewritten) for s in sites] == [(True, True)]
    hyperpass.unpatch(module)
    assert "forward" not in vars(module)


def test_nested_patches_use_the_innermost_settings(model, x):
    hyperpass.patch(model, **EXACT)
    inner = model.layers[0]
    hyperpass.patch(inner, min_len=128)  # a second patch on a submodule: its own settings
    model(x)
    assert patching.report(model).totals().approximated == 2
    assert patching.report(inner).totals().exact == {"sequence 64 shorter than min_len=128": 1}
    hyperpass.unpatch(inner)
    hyperpass.unpatch(model)


def test_an_exception_in_forward_ends_the_routing(model, x):
    hyperpass.patch(model, **APPROX)
    with pytest.raises(RuntimeError):
        model(x[..., :5])  # wrong width: the first Linear raises
    assert patching.report(model).totals().calls == 0
    q = torch.randn(1, 2, 64, 16)
    F.scaled_dot_product_attention(q, q, q)
    assert patching.report(model).totals().calls == 0  # outside the module: not routed


def test_user_torch_compile_reports_masked_sites_as_exact(model, x):
    block = model.layers[0]
    block.mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    block.causal = False
    ref = block(x)
    hyperpass.patch(block, **APPROX)
    out = torch.compile(block, backend="eager", fullgraph=True)(x)
    assert torch.equal(out, ref)
    stats = patching.report(block).totals()
    assert (stats.traced, stats.traced_exact) == (1, {"attention mask": 1})
