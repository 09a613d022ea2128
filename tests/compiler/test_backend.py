"""The torch.compile backend: options, registration by name, inner compilers, reports, logging."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hyperpass
from hyperpass.compiler.report import COUNTERS, SiteReport, reset_counters
from tests.helpers.attention_corpus import Fn, hw_masked_fill_tril, qkv, sdpa_hf_bool_mask
from tests.helpers.configs import PAPER_ALGO

EXACT = {**PAPER_ALGO, "block_size": 64, "min_seq_len": 64}


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    COUNTERS.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"block_sise": 64}, TypeError, "block_sise"),
        ({"block_size": 24}, ValueError, "block_size"),
        ({"min_len": -1}, ValueError, "min_len"),
        ({"method": "dense"}, ValueError, "method"),
        ({"inner": "tensorrt"}, ValueError, "inner"),
        ({"inner": 3}, TypeError, "inner"),
        ({"last_n_layers": -1}, ValueError, "last_n_layers"),
        ({"layers": [1]}, TypeError, "layers"),
        ({"overrides": {"layers.0": {"blocks": 1}}}, TypeError, "blocks"),
        ({"overrides": {"layers.0": {"block_size": 7}}}, ValueError, "block_size"),
    ],
)
def test_backend_rejects_bad_options(kwargs, error, names):
    with pytest.raises(error, match=names):
        hyperpass.backend(**kwargs)


def test_backend_options_reach_the_config():
    be = hyperpass.backend(min_len=128, block_size=32, sample_size=0, inner="eager")
    cfg = be.options.config
    assert (cfg.min_len, cfg.block_size, cfg.sample_size) == (128, 32, 0)
    assert be.inner == "eager"


def test_backend_name_resolves_after_import_hyperpass_only():
    """A fresh process: after ``import hyperpass`` only, the name "hyperpass" finds the backend
    (through the package's entry point) and compiles with it (default: Inductor)."""
    code = (
        "import hyperpass, sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "assert 'hyperpass.compiler' not in sys.modules\n"
        "found = lookup_backend('hyperpass')\n"
        "import hyperpass.compiler.backend as b\n"
        "assert found is b.hyperpass_backend\n"
        "sdpa = torch.nn.functional.scaled_dot_product_attention\n"
        "f = torch.compile(lambda q: sdpa(q, q, q), backend='hyperpass')\n"
        "f(torch.randn(1, 1, 8, 4))\n"
        "from hyperpass.compiler.report import COUNTERS\n"
        "assert COUNTERS.skipped == {'short': 1}, COUNTERS\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_backend_passed_uncalled_is_the_default_backend():
    """``torch.compile(fn, backend=hyperpass.backend)`` works like ``backend="hyperpass"``."""
    import hyperpass.compiler  # noqa: F401  (importing the module does not shadow the function)

    assert callable(hyperpass.backend) and hyperpass.backend.__name__ == "backend"
    assert hyperpass.backend(min_len=16, inner="eager").options.config.min_len == 16
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(1, 1, 8, 4)
    out = torch.compile(lambda q: sdpa(q, q, q), backend=hyperpass.backend)(q)
    torch.testing.assert_close(out, sdpa(q, q, q))


@pytest.mark.parametrize("backend", ["hyperpass", "called", "uncalled"])
def test_compile_mode_and_options_reach_inductor(monkeypatch, backend):
    """``torch.compile(..., backend=hyperpass..., mode=, options=)`` gives Inductor the config
    patches ``backend="inductor"`` would (reduce-overhead: CUDA graphs), after the rewrite."""
    import torch._inductor.compile_fx as inductor

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.append((config_patches, [n.target for n in gm.graph.nodes]))
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", fake_compile_fx)
    be = {
        "hyperpass": "hyperpass",
        "called": hyperpass.backend(min_len=16, **EXACT),
        "uncalled": hyperpass.backend,
    }[backend]
    q, k, v = qkv()
    options = {"max_autotune": False}
    fn = torch.compile(Fn(sdpa_hf_bool_mask), backend=be, mode="reduce-overhead")
    torch.testing.assert_close(fn(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch._dynamo.reset()
    torch.compile(Fn(sdpa_hf_bool_mask), backend=be, options=options)(q, k, v)
    assert [patches for patches, _ in seen] == [{"triton.cudagraphs": True}, options]
    rewritten = any(t == torch.ops.hyperpass.hyper_attention.default for t in seen[0][1])
    assert rewritten == (backend == "called")  # the defaults' min_len leaves 16 rows exact


def test_compile_mode_needs_inductor():
    be = hyperpass.backend(min_len=16, inner="aot_eager")
    fn = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend=be,
                       mode="reduce-overhead")  # fmt: skip
    with pytest.raises(Exception, match="inner compiler is 'aot_eager'"):
        fn(torch.randn(1, 1, 8, 4))


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_inner_compilers_fullgraph_outputs_and_grads(inner):
    be = hyperpass.backend(min_len=16, inner=inner, **EXACT)
    model = Fn(sdpa_hf_bool_mask)
    q, k, v = (t.requires_grad_() for t in qkv())
    out = torch.compile(model, backend=be, fullgraph=True)(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref)
    (gq,) = torch.autograd.grad(out.sum(), q)
    (rq,) = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(gq, rq)
    assert [r.code for r in be.reports] == ["rewritten"]


@pytest.mark.slow
def test_inductor_end_to_end():
    """The default inner compiler: Inductor compiles the graph around the opaque op."""
    be = hyperpass.backend(min_len=16, **EXACT)
    model = Fn(hw_masked_fill_tril)
    q, k, v = (t.requires_grad_() for t in qkv())
    out = torch.compile(model, backend=be, fullgraph=True)(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    assert COUNTERS.rewritten == 1


def test_counters_count_and_reset():
    be = hyperpass.backend(min_len=16, inner="eager")
    torch.compile(Fn(sdpa_hf_bool_mask), backend=be, dynamic=False)(*qkv())
    torch.compile(Fn(sdpa_hf_bool_mask), backend=be, dynamic=False)(*qkv(n_q=8))
    assert COUNTERS.rewritten == 1
    assert COUNTERS.skipped == {"short": 1}
    assert COUNTERS.graphs == 2
    reset_counters()
    assert (COUNTERS.rewritten, dict(COUNTERS.skipped), COUNTERS.graphs) == (0, {}, 0)


def test_logging_summary_and_decisions(caplog):
    be = hyperpass.backend(min_len=16, inner="eager")
    with caplog.at_level(logging.DEBUG, logger="hyperpass"):
        torch.compile(Fn(sdpa_hf_bool_mask), backend=be)(*qkv())
    records = [r for r in caplog.records if r.name == "hyperpass"]
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert any("1 of 1 attention sites rewritten" in m for m in info)
    assert any("rewritten" in m and "mask causal" in m for m in debug)


def test_explain_reports_without_rewriting(capsys):
    q, k, v = qkv()
    model = Fn(sdpa_hf_bool_mask)
    reports = hyperpass.explain(model, q, k, v, min_len=16)
    (r,) = reports
    assert isinstance(r, SiteReport)
    assert (r.decision, r.mask, r.is_causal, r.q_shape) == (
        "rewritten",
        "causal",
        True,
        (2, 4, 32, 8),
    )
    table = capsys.readouterr().out
    assert "rewritten" in table and "causal" in table and "1 of 1" in table
    assert COUNTERS.rewritten == 0  # report only
    short = hyperpass.explain(model, q, k, v, print_table=False)  # default min_len 4096
    assert [(s.decision, s.code) for s in short] == [("exact", "short")]


# ----------------------------------------------------------------------------- what users meet
class _Wrapper(torch.nn.Module):
    """A model whose attention sits two modules deep, like an HF decoder layer."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_Attn(), _Attn()])

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return x


class _Attn(torch.nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x, is_causal=True)


@pytest.mark.parametrize("how", ["module", "function-argument"])
def test_module_paths_are_the_models_own(how):
    """``layers=`` globs match the paths ``named_modules()`` gives, however the model is called."""
    model = _Wrapper()
    be = hyperpass.backend(min_len=16, inner="eager", layers="model.layers.*")
    x = torch.randn(1, 2, 32, 8)
    if how == "module":
        torch.compile(model, backend=be)(x)
    else:
        torch.compile(lambda s, x: s(x), backend=be)(model, x)
    assert [r.module for r in be.reports] == ["model.layers.0", "model.layers.1"]
    assert all(r.rewritten for r in be.reports)


def test_explain_of_a_compiled_model_uses_its_backend_settings():
    model = _Wrapper()
    compiled = torch.compile(model, backend=hyperpass.backend(min_len=16, inner="eager"))
    x = torch.randn(1, 2, 32, 8)
    reports = hyperpass.explain(compiled, x, print_table=False)
    assert all(r.rewritten for r in reports)  # min_len=16 from the backend, not the default
    reports = hyperpass.explain(compiled, x, min_len=64, print_table=False)
    assert not any(r.rewritten for r in reports)  # settings given here win


def test_on_a_cpu_the_defaults_stay_exact():
    """min_len=0 (auto): CPUs never approximate (SDPA is faster there at every length)."""
    be = hyperpass.backend(inner="eager")
    x = torch.randn(1, 2, 32, 8)
    out = torch.compile(_Attn(), backend=be)(x)
    assert [r.code for r in be.reports] == ["short"] and "exact on cpu" in be.reports[0].reason
    torch.testing.assert_close(out, F.scaled_dot_product_attention(x, x, x, is_causal=True))


def test_extra_positional_arguments_name_the_mistake():
    with pytest.raises(TypeError, match="only positional argument"):
        hyperpass.backend(4096, 128)


def test_mixed_dtypes_stay_exact_as_sdpa_would_refuse_them():
    q = torch.randn(1, 2, 64, 8)
    k = v = torch.randn(1, 2, 64, 8, dtype=torch.float16)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError):  # the op computes exactly what SDPA computes: it refuses
        hyperpass.hyper_attention(q, k, v, min_len=16)
