"""ONNX export: one hyperpass::HyperAttention node per call, a reference function, ORT runs."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
import torch
import torch.nn.functional as F

import hyperpass
from hyperpass.config import HyperConfig
from hyperpass.integrations.onnx import attributes as deploy_attrs
from tests.helpers.configs import SMALL_HYPER

ort = pytest.importorskip("onnxruntime")
hyperpass_onnx = pytest.importorskip("hyperpass.integrations.onnx.exporter")

HEAD_DIM = 8
LONG = dict(SMALL_HYPER, seed=3)
SHORT = dict(min_len=1 << 20)


class TwoSites(torch.nn.Module):
    """Two GQA calls: causal, approximated in PyTorch from N=16; non-causal, always exact."""

    def forward(self, q, k, v):
        long = hyperpass.hyper_attention(q, k, v, is_causal=True, enable_gqa=True, **LONG)
        short = hyperpass.hyper_attention(q, k, v, scale=0.25, enable_gqa=True, **SHORT)
        return long, short


def _qkv(batch, n, hq=4, hkv=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n, HEAD_DIM, generator=gen)
    k = torch.randn(batch, hkv, n, HEAD_DIM, generator=gen)
    v = torch.randn(batch, hkv, n, HEAD_DIM, generator=gen)
    return q, k, v


def _dims():
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    return tuple({0: batch, 2: seq} for _ in range(3))


def _run(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _nodes(model):
    return [n for n in model.graph.node if n.domain == deploy_attrs.DOMAIN]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "two_sites.onnx"
    hyperpass_onnx.export(TwoSites(), _qkv(2, 32), path, dynamic_shapes=_dims())
    return path, onnx.load(path)


def test_checker_full_check_in_a_fresh_process(exported):
    path, model = exported
    onnx.checker.check_model(model, full_check=True)
    # without hyperpass imported (no registered schema): what a deployment machine sees
    code = f"import onnx; onnx.checker.check_model(onnx.load({str(path)!r}), full_check=True)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_node_per_site_with_all_attributes(exported):
    _, model = exported
    nodes = _nodes(model)
    assert [n.op_type for n in nodes] == ["HyperAttention", "HyperAttention"]
    expected_types = {int: onnx.AttributeProto.INT, float: onnx.AttributeProto.FLOAT}
    for node in nodes:
        attrs = {a.name: a for a in node.attribute}
        assert sorted(attrs) == sorted(a.name for a in deploy_attrs.NODE_ATTRIBUTES)
        for a in deploy_attrs.NODE_ATTRIBUTES:
            assert attrs[a.name].type == expected_types.get(a.type, onnx.AttributeProto.STRING)
    values = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    by_min_len = {v["min_len"]: v for v in values}
    long, short = by_min_len[LONG["min_len"]], by_min_len[SHORT["min_len"]]
    assert long["causal"] == 1 and short["causal"] == 0
    assert long["scale"] == pytest.approx(HEAD_DIM**-0.5) and short["scale"] == 0.25
    assert long["plugin_namespace"] == b"hyperpass" and long["plugin_version"] == b"1"
    decoded = {k: v.decode() if isinstance(v, bytes) else v for k, v in long.items()}
    assert deploy_attrs.parse_attributes(decoded)[2] == HyperConfig(**LONG)


def test_reference_function_has_the_model_opset(exported):
    _, model = exported
    (function,) = model.functions
    assert (function.domain, function.name) == ("hyperpass", "HyperAttention")
    model_opsets = {o.domain: o.version for o in model.opset_import}
    function_opsets = {o.domain: o.version for o in function.opset_import}
    assert function_opsets[""] == model_opsets[""]
    assert model_opsets["hyperpass"] == deploy_attrs.DOMAIN_VERSION
    assert set(function.attribute) == {a.name for a in deploy_attrs.NODE_ATTRIBUTES}


def test_batch_and_sequence_dims_are_symbolic(exported):
    _, model = exported
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert (dims[0].dim_param, dims[2].dim_param) == ("batch", "seq"), value.name
        assert dims[3].dim_value == HEAD_DIM


@pytest.mark.parametrize("batch,n", [(2, 32), (1, 7), (3, 50)], ids=lambda x: str(x))
def test_onnxruntime_matches_exact_attention(exported, batch, n):
    path, _ = exported
    q, k, v = _qkv(batch, n, seed=n)
    long, short = _run(path, q, k, v)
    torch.testing.assert_close(
        long, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    )
    kv_exact = F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(short, kv_exact)
    # below min_len, PyTorch is exact too: the exported model computes what the model computes
    torch.testing.assert_close(short, TwoSites()(q, k, v)[1])


def test_masked_call_stays_sdpa(tmp_path):
    class Masked(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return hyperpass.hyper_attention(q, k, v, attn_mask=mask, **LONG)

    q, k, v = _qkv(2, 24, hq=2)
    mask = torch.randn(2, 1, 24, 24)
    dims = (*_dims(), None)
    path = tmp_path / "masked.onnx"
    hyperpass_onnx.export(Masked(), (q, k, v, mask), path, dynamic_shapes=dims)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert _nodes(model) == []
    (out,) = _run(path, q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_dropout_is_refused(tmp_path):
    class Dropout(torch.nn.Module):
        def forward(self, q, k, v):
            return hyperpass.hyper_attention(q, k, v, dropout_p=0.1, **LONG)

    with pytest.raises(ValueError, match=r"dropout_p=0.1.*eval\(\)"):
        hyperpass_onnx.export(Dropout(), _qkv(2, 16, hq=2), tmp_path / "d.onnx")


def test_symbolic_head_dim_without_scale_is_refused(tmp_path):
    class Plain(torch.nn.Module):
        def forward(self, q, k, v):
            return hyperpass.hyper_attention(q, k, v, **LONG)

    # dynamic_shapes=None: every dim is Dim.AUTO, the head dim included
    with pytest.raises(ValueError, match="head dimension is symbolic"):
        hyperpass_onnx.export(Plain(), _qkv(2, 16, hq=2), tmp_path / "p.onnx")


def test_translation_table_with_torch_onnx_export(tmp_path):
    """The lower-level path: the table passed to torch.onnx.export, then the function attached."""

    class Plain(torch.nn.Module):
        def forward(self, q, k, v):
            return hyperpass.hyper_attention(q, k, v, is_causal=True, **LONG)

    q, k, v = _qkv(2, 20, hq=2)
    program = torch.onnx.export(
        Plain(),
        (q, k, v),
        dynamo=True,
        dynamic_shapes=_dims(),
        opset_version=18,
        custom_translation_table=hyperpass_onnx.translation_table(),
        verbose=False,
    )
    hyperpass_onnx.attach_reference_function(program.model)
    path = tmp_path / "table.onnx"
    program.save(path)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.functions[0].opset_import if o.domain == ""] == [18]
    q, k, v = _qkv(1, 33, hq=2, seed=5)
    (out,) = _run(path, q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_node_attributes_round_trip_and_errors():
    cfg = HyperConfig(min_len=64, block_size=32, method="local", window=64)
    attrs = deploy_attrs.node_attributes(scale=0.5, causal=True, config=cfg)
    assert list(attrs) == [a.name for a in deploy_attrs.NODE_ATTRIBUTES]
    assert deploy_attrs.parse_attributes(attrs) == (0.5, True, cfg)
    with pytest.raises(TypeError, match="scale"):
        deploy_attrs.node_attributes(scale=None, causal=False, config=cfg)
    with pytest.raises(ValueError, match="scale"):
        deploy_attrs.node_attributes(scale=-1.0, causal=False, config=cfg)
    with pytest.raises(TypeError, match="unknown"):
        deploy_attrs.parse_attributes({**attrs, "blocksize": 1})
    with pytest.raises(ValueError, match="block_size"):
        deploy_attrs.parse_attributes({**attrs, "block_size": 20})


class Block(torch.nn.Module):
    """A causal GQA attention block written the way models write it (SDPA, no hyperpass)."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=True, enable_gqa=True)
        return self.o(a.transpose(1, 2).reshape(b, n, -1))


def test_patched_model_with_default_dynamic_shapes(tmp_path):
    """The user's path: patch an unmodified model, export in one call (Dim.AUTO), run in ORT."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block()).eval()
    path = tmp_path / "patched.onnx"
    hyperpass.patch(model, **SMALL_HYPER)
    try:
        hyperpass_onnx.export(model, (torch.randn(2, 40, 32),), path)
    finally:
        hyperpass.unpatch(model)
    onnx_model = onnx.load(path)
    onnx.checker.check_model(onnx_model, full_check=True)
    assert len(_nodes(onnx_model)) == 2
    dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_param and dims[2].dim_value == 32
    for n in (9, 70):
        x = torch.randn(3, n, 32)
        (out,) = _run(path, x)
        torch.testing.assert_close(out, model(x))  # the un-patched model: exact attention


def test_hugging_face_model_exports_exact_and_says_why(tmp_path, caplog):
    """A tiny HF Llama (attn_implementation="hyperpass", or patched): under export transformers
    adds a packed-sequence term to the causal mask it cannot drop, so the calls stay SDPA with
    the mask, the export warns and names them, and ORT computes the model's exact logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, vocab_size=100,
    )  # fmt: skip
    hyperpass.register_hf("hyperpass-onnx-test", **SMALL_HYPER)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(
        config, attn_implementation="hyperpass-onnx-test"
    ).eval()

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids, use_cache=False).logits

    path = tmp_path / "hf.onnx"
    with caplog.at_level("WARNING", logger="hyperpass"):
        hyperpass_onnx.export(Logits(model), (torch.randint(0, 100, (1, 40)),), path)
    assert "no HyperAttention node" in caplog.text and "scaled_dot_product" in caplog.text
    assert not _nodes(onnx.load(path))
    ids = torch.randint(0, 100, (1, 24))
    (out,) = _run(path, ids)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)

    caplog.clear()
    patched = Logits(model)
    hyperpass.patch(patched, **SMALL_HYPER)
    try:
        with caplog.at_level("WARNING", logger="hyperpass"):
            hyperpass_onnx.export(patched, (torch.randint(0, 100, (1, 40)),), tmp_path / "p.onnx")
    finally:
        hyperpass.unpatch(patched)
    assert "no HyperAttention node" in caplog.text
