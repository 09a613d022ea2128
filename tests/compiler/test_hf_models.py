"""Real Hugging Face architectures, built from tiny random configs (no weights downloaded).

For each: the pass finds every attention site (SDPA and the hand-written ``eager`` attention);
with parameters that make the approximation exact (block_size and min_seq_len >= N) the compiled
model's outputs and gradients equal the uncompiled model's; below ``min_len`` the graph is left
as it was, so outputs equal the plain compiled model's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hyperpass
from hyperpass.compiler.report import COUNTERS
from tests.helpers.configs import PAPER_ALGO

transformers = pytest.importorskip("transformers")

N_LAYERS, SEQ, VOCAB = 2, 32, 64
EXACT = {
    **PAPER_ALGO,
    "block_size": 64,
    "min_seq_len": 64,
    "sample_size": 16,
}
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}


def _configs():
    t = transformers
    return {
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(**_COMMON, num_key_value_heads=2)),
        "mistral": (
            t.MistralForCausalLM,
            t.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None),
        ),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(**_COMMON, num_key_value_heads=2)),
        "gpt2": (
            t.GPT2LMHeadModel,
            t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=128),
        ),
        "bert": (t.BertModel, t.BertConfig(**_COMMON)),
        "gpt_neox": (t.GPTNeoXForCausalLM, t.GPTNeoXConfig(**_COMMON)),
        "phi3": (t.Phi3ForCausalLM, t.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0)),
        "gemma": (t.GemmaForCausalLM, t.GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=8)),
    }


ARCHS = list(_configs())
GQA = {"llama", "mistral", "qwen2", "phi3", "gemma"}
ENCODERS = {"bert"}


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    COUNTERS.reset()
    yield
    torch._dynamo.reset()


def _model(arch: str, impl: str):
    cls, config = _configs()[arch]
    config._attn_implementation = impl
    torch.manual_seed(0)
    return cls(config).eval()


def _ids(seq=SEQ, batch=2):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))


def _output(out):
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _call_kwargs(arch: str, use_cache: bool) -> dict:
    return {} if arch in ENCODERS else {"use_cache": use_cache}


# use_cache=False is how perplexity evaluation, training and prefill-only code call a model; HF
# builds a different mask on each path (and differently per transformers version)
@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_sites_rewritten_and_exact_limit_matches(arch, impl, use_cache):
    if use_cache and arch in ENCODERS:
        pytest.skip("encoders have no cache")
    model = _model(arch, impl)
    reference = copy.deepcopy(model)
    ids = _ids()
    kw = _call_kwargs(arch, use_cache)
    be = hyperpass.backend(min_len=16, inner="aot_eager", **EXACT)
    out = _output(torch.compile(model, backend=be, fullgraph=True)(ids, **kw))
    ref = _output(reference(ids, **kw))

    assert len(be.reports) == N_LAYERS
    assert all(r.decision == "rewritten" for r in be.reports), be.reports
    assert all(r.is_causal == (arch not in ENCODERS) for r in be.reports)
    assert all(r.gqa == (arch in GQA) for r in be.reports)
    if impl == "eager":
        assert all(r.form.startswith("handwritten") for r in be.reports)
        assert all(r.mask == ("none" if arch in ENCODERS else "causal") for r in be.reports)
    torch.testing.assert_close(out, ref)

    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        got, want = p.grad, ref_params[name].grad
        if got is None and want is None:
            continue
        # an unused parameter (BERT's pooler) may get None on one side and zeros on the other
        got = torch.zeros_like(p) if got is None else got
        want = torch.zeros_like(p) if want is None else want
        # large summed embedding gradients (~600): fp32 summation order differs
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_below_min_len_matches_plain_compile(arch):
    model = _model(arch, "sdpa")
    ids = _ids()
    be = hyperpass.backend(min_len=4096, inner="aot_eager")
    with torch.no_grad():
        out = _output(torch.compile(model, backend=be, fullgraph=True)(ids, use_cache=False))
        torch._dynamo.reset()
        ref = _output(
            torch.compile(model, backend="aot_eager", fullgraph=True)(ids, use_cache=False)
        )
    assert [r.code for r in be.reports] == ["short"] * N_LAYERS
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# select with a window over every key: the approximation is exact attention, so real positions
# equal eager's
COVERING_SELECT = {"window": 4096}


def _padding(ids, side: str):
    keep = torch.ones_like(ids)
    if side == "left":
        keep[1, :5] = 0
    else:
        keep[1, -5:] = 0
    return keep


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_padded_batch_rewritten_and_real_positions_exact(arch, side):
    """A batch of prompts of different lengths: HF builds causal AND key padding (key padding
    alone for encoders); the pass proves it per batch row and key, and the op takes the last
    row of the mask. Real positions equal eager; padded ones are never read as keys."""
    model = _model(arch, "sdpa")
    ids = _ids()
    keep = _padding(ids, side)
    be = hyperpass.backend(min_len=16, inner="aot_eager", **COVERING_SELECT)
    with torch.no_grad():
        out = _output(torch.compile(model, backend=be, fullgraph=True)(ids, attention_mask=keep))
        ref = _output(model(ids, attention_mask=keep))
    mask = "padding" if arch in ENCODERS else "causal+padding"
    assert [(r.code, r.mask) for r in be.reports] == [("rewritten", mask)] * N_LAYERS
    real = keep.bool()
    torch.testing.assert_close(out[real], ref[real])


def test_hf_padded_batch_with_eager_attention_stays_exact():
    model = _model("llama", "eager")  # hand-written attention: its padding is not taken yet
    ids = _ids()
    keep = _padding(ids, "left")
    be = hyperpass.backend(min_len=16, inner="aot_eager", **COVERING_SELECT)
    with torch.no_grad():
        out = _output(torch.compile(model, backend=be, fullgraph=True)(ids, attention_mask=keep))
        ref = _output(model(ids, attention_mask=keep))
    assert [r.code for r in be.reports] == ["mask:causal+padding"] * N_LAYERS
    torch.testing.assert_close(out, ref)


def test_hf_dynamic_lengths_one_compilation():
    from torch._dynamo.utils import counters

    model = _model("llama", "sdpa")
    be = hyperpass.backend(min_len=32, inner="aot_eager", **EXACT)
    compiled = torch.compile(model, backend=be, fullgraph=True, dynamic=True)
    counters.clear()
    with torch.no_grad():
        for seq in (24, 40, 56):  # below and above min_len
            ids = _ids(seq)
            torch.testing.assert_close(
                _output(compiled(ids, use_cache=False)), _output(model(ids, use_cache=False))
            )
    assert counters["stats"]["unique_graphs"] == 1
    # (Dynamo may trace the frame twice before settling: it restarts once to specialize HF's
    # float attributes, without hyperpass too; each trace reports its sites)
    assert {r.code for r in be.reports} == {"rewritten"}
    assert len(be.reports) % N_LAYERS == 0


def _gemma3(impl: str):
    """Gemma 3's structure at toy size: 5 sliding-window layers to 1 global, one KV head, dual
    RoPE; its sliding window (16) is shorter than the sequence, so those layers stay exact."""
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=16,
        max_position_embeddings=128,
    )  # fmt: skip
    config._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gemma3_global_layers_rewritten_sliding_layers_exact(impl, use_cache):
    if not hasattr(transformers, "Gemma3ForCausalLM"):
        pytest.skip("this transformers has no Gemma 3")
    model = _gemma3(impl)
    ids = _ids()
    be = hyperpass.backend(min_len=16, inner="aot_eager", **EXACT)
    with torch.no_grad():
        out = torch.compile(model, backend=be, fullgraph=True)(ids, use_cache=use_cache).logits
        ref = model(ids, use_cache=use_cache).logits
    kinds = model.config.layer_types
    assert len(be.reports) == len(kinds)
    for report, kind in zip(be.reports, kinds, strict=True):
        want = "rewritten" if kind == "full_attention" else "mask:sliding-window"
        assert report.code == want, (report.module, report.reason)
    torch.testing.assert_close(out, ref)


def test_explain_reports_a_padded_batch_rewritten():
    model = _model("qwen2", "sdpa")
    ids = _ids()
    reports = hyperpass.explain(model, ids, model_kwargs={"attention_mask": _padding(ids, "left")},
                                min_len=16, print_table=False)  # fmt: skip
    assert [(r.decision, r.mask) for r in reports] == [("rewritten", "causal+padding")] * N_LAYERS
