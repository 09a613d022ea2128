"""attn_implementation="hyperpass" on tiny transformers models (Llama, Qwen2, Mistral)."""

import copy

import pytest
import torch

import hyperpass
from hyperpass.integrations import hf, patching
from tests.helpers.configs import PAPER_ALGO

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

EXACT = dict(**PAPER_ALGO, min_len=16, block_size=128, min_seq_len=128)
APPROX = dict(**PAPER_ALGO, min_len=16, block_size=16, sample_size=16, min_seq_len=16)
COVERING = dict(min_len=16, window=4096)  # select over every key: exact attention
N_LAYERS, SEQ, VOCAB = 2, 64, 96

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
ARCHS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    hyperpass.register_hf(**EXACT)
    hyperpass.register_hf("hyperpass-approx", **APPROX)
    hyperpass.register_hf("hyperpass-last1", last_n_layers=1, **APPROX)
    hyperpass.register_hf("hyperpass-covering", **COVERING)


@pytest.fixture(autouse=True)
def fresh_reports():
    for r in hf.reports():
        r.reset()


def _model(arch, attn="sdpa", **overrides):
    torch.manual_seed(0)
    config = ARCHS[arch](**TINY, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def _ids(batch=2, seq=SEQ):
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (batch, seq))


def _sites(name="hyperpass"):
    return {site: (s.approximated, dict(s.exact)) for site, s in hf.report(name).sites.items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_settings_match_sdpa_and_count_sites(arch):
    model = _model(arch)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        model.set_attn_implementation("hyperpass")
        out = model(ids).logits
    torch.testing.assert_close(out, ref)
    assert _sites() == {f"layer {i}": (1, {}) for i in range(N_LAYERS)}


def test_from_pretrained_with_attn_implementation(tmp_path):
    _model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hyperpass")
    assert model.config._attn_implementation == "hyperpass"
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, ref(_ids()).logits)
    assert hf.report().totals().approximated == N_LAYERS


@pytest.mark.parametrize("arch", list(ARCHS))
def test_approximation_is_the_op_through_either_path(arch):
    """The HF function and the eager patch of the sdpa model give the same approximation."""
    sdpa = _model(arch)
    ids = _ids()
    with torch.no_grad():
        ref = sdpa(ids).logits
        hyperpass.patch(sdpa, **APPROX)
        patched = sdpa(ids).logits
        hyperpass.unpatch(sdpa)
        out = _model(arch, "hyperpass-approx")(ids).logits
    torch.testing.assert_close(out, patched)
    assert not torch.allclose(out, ref, atol=1e-3)
    assert hf.report("hyperpass-approx").totals().approximated == N_LAYERS


@pytest.mark.parametrize("arch", list(ARCHS))
def test_padded_batch_is_approximated_and_real_positions_exact(arch):
    """The mask function hands the attention a [B, 1, 1, N] key mask for a padded prompt batch
    (causal AND padding); with a window over every key, real positions equal sdpa's."""
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding in the first row
    mask[1, -4:] = 0  # right padding in the second
    with torch.no_grad():
        ref = _model(arch)(ids, attention_mask=mask).logits
        out = _model(arch, "hyperpass-covering")(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()])
    totals = hf.report("hyperpass-covering").totals()
    assert (totals.approximated, sum(totals.exact.values())) == (N_LAYERS, 0)


def test_all_ones_mask_is_approximated():
    ids = _ids()
    with torch.no_grad():
        out = _model("llama", "hyperpass-approx")(ids, attention_mask=torch.ones_like(ids))
        no_mask = _model("llama", "hyperpass-approx")(ids)
    torch.testing.assert_close(out.logits, no_mask.logits)
    assert hf.report("hyperpass-approx").totals().approximated == 2 * N_LAYERS


def test_sliding_window_shorter_than_sequence_stays_exact():
    ids = _ids()
    with torch.no_grad():
        ref = _model("mistral", sliding_window=16)(ids).logits
        out = _model("mistral", "hyperpass-approx", sliding_window=16)(ids).logits
    torch.testing.assert_close(out, ref)
    assert hf.report("hyperpass-approx").totals().approximated == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_steps_after_prefill_are_exact(arch):
    """Prefill is approximated; each decode step over that cache equals sdpa's on the same cache."""
    model = _model(arch, "hyperpass-approx")
    sdpa = _model(arch)
    ids = _ids(batch=1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            ref = sdpa(token, past_key_values=copy.deepcopy(cache), use_cache=True).logits
            step = model(token, past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(step, ref)
            token = step.argmax(-1)
    totals = hf.report("hyperpass-approx").totals()
    assert totals.approximated == N_LAYERS
    assert totals.exact == {"one query (decode step): exact": 3 * N_LAYERS}


def test_last_n_layers_keeps_earlier_layers_exact():
    with torch.no_grad():
        _model("llama", "hyperpass-last1")(_ids())
    assert _sites("hyperpass-last1") == {
        "layer 0": (0, {"layer not selected": 1}),
        "layer 1": (1, {}),
    }


def test_compiled_model_gets_the_op_without_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _model("llama", "hyperpass-approx")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        counter = CompileCounterWithBackend("eager")
        out = torch.compile(model, backend=counter, fullgraph=True)(ids).logits
    torch.testing.assert_close(out, ref)
    targets = [n.target for g in counter.graphs for n in g.graph.nodes]
    assert targets.count(torch.ops.hyperpass.hyper_attention.default) == N_LAYERS
    assert hf.report("hyperpass-approx").totals().traced == N_LAYERS


def test_plain_causal_mask_skipped_even_where_transformers_cannot_tell_compile_from_export(
    monkeypatch,
):
    """Before torch 2.14, Dynamo answered torch.compiler.is_exporting() with True under compile,
    and transformers' SDPA mask function then refused to skip the causal mask."""
    import transformers.masking_utils
    from torch._dynamo.testing import CompileCounterWithBackend

    if not hasattr(transformers.masking_utils, "_ignore_causal_mask_sdpa"):
        pytest.skip("this transformers decides mask skipping elsewhere")
    monkeypatch.setattr(transformers.masking_utils, "_ignore_causal_mask_sdpa", lambda *a: False)
    ids = _ids()
    graphs = {}
    for attn in ("sdpa", "hyperpass-approx"):
        counter = CompileCounterWithBackend("eager")
        with torch.no_grad():
            torch.compile(_model("llama", attn), backend=counter, fullgraph=True)(ids)
        graphs[attn] = [n for g in counter.graphs for n in g.graph.nodes]
    sdpa_calls = [
        n for n in graphs["sdpa"] if n.target is torch._C._nn.scaled_dot_product_attention
    ]
    assert len(sdpa_calls) == N_LAYERS
    assert all(n.kwargs.get("attn_mask") is not None for n in sdpa_calls)  # old behaviour
    ops = [n.target for n in graphs["hyperpass-approx"]]
    assert ops.count(torch.ops.hyperpass.hyper_attention.default) == N_LAYERS


def test_mask_function_keeps_padding_and_windows():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS["hyperpass"]
    assert mask_fn(batch_size=1, q_length=8, kv_length=8) is None
    assert mask_fn(batch_size=1, q_length=1, kv_length=9) is None
    padding = torch.ones(1, 8, dtype=torch.bool)
    padding[0, 0] = False
    mask = mask_fn(batch_size=1, q_length=8, kv_length=8, attention_mask=padding)
    assert mask.shape == (1, 1, 1, 8) and not mask[0, 0, 0, 0] and mask[0, 0, 0, 1:].all()
    ones = torch.ones(1, 8, dtype=torch.bool)
    assert mask_fn(batch_size=1, q_length=8, kv_length=8, attention_mask=ones) is None
    cached = mask_fn(batch_size=1, q_length=4, kv_length=8, attention_mask=padding)
    assert cached.shape == (1, 1, 4, 8)  # queries after a cache: HF's own mask
    windowed = mask_fn(batch_size=1, q_length=8, kv_length=8, local_size=4)
    assert windowed is not None and windowed.shape == (1, 1, 8, 8)
    assert mask_fn(batch_size=1, q_length=8, kv_length=8, allow_is_causal_skip=False) is not None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(name="sdpa"), ValueError, "new attention implementation name"),
        (dict(layer_indices=[0], last_n_layers=1), ValueError, "not both"),
        (dict(last_n_layers=0), ValueError, "last_n_layers must be an int >= 1"),
        (dict(layer_indices="0"), TypeError, "sequence of layer indices"),
        (dict(layers=[0]), TypeError, "layer_indices"),
        (dict(block_size=17), ValueError, "block_size"),
    ],
)
def test_register_hf_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        hyperpass.register_hf(**kwargs)


def test_unregistered_report_name():
    with pytest.raises(ValueError, match="not registered"):
        hf.report("never-registered")
    assert patching.RoutingReport("x").format() == "x: no attention call seen"
