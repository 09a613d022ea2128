"""TensorRT plugin: fields equal to the ONNX attributes, its computation, version errors.

Tests marked ``needs_tensorrt`` run only where TensorRT >= 10.6 and a CUDA GPU are present; the
others run everywhere (TensorRT is not installable on the CI machines).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import hyperpass
from hyperpass.config import HyperConfig
from hyperpass.integrations import tensorrt as hp_trt
from hyperpass.integrations.onnx import attributes as deploy_attrs
from tests.helpers.configs import SMALL_HYPER

hyperpass_onnx = pytest.importorskip("hyperpass.integrations.onnx.exporter")

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason=f"needs a CUDA GPU and {hp_trt.SUPPORTED}",
)
LONG = dict(SMALL_HYPER, seed=1)
ONNX_TYPES = {int: onnx.AttributeProto.INT, float: onnx.AttributeProto.FLOAT}


class Attention(torch.nn.Module):
    def __init__(self, **params):
        super().__init__()
        self.params = params

    def forward(self, q, k, v):
        return hyperpass.hyper_attention(q, k, v, **self.params)


def _qkv(batch=2, n=64, hq=4, hkv=2, d=16, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, hq, n, d), (batch, hkv, n, d), (batch, hkv, n, d)]
    return [torch.randn(s, generator=gen).to(device) for s in shapes]


def _dims():
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2)
    return tuple({0: batch, 2: seq} for _ in range(3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A causal GQA call exported to ONNX, with its node's attribute values."""
    path = tmp_path_factory.mktemp("trt") / "attention.onnx"
    model = Attention(is_causal=True, enable_gqa=True, **LONG)
    hyperpass_onnx.export(model, tuple(_qkv()), path, dynamic_shapes=_dims())
    (node,) = [n for n in onnx.load(path).graph.node if n.domain == deploy_attrs.DOMAIN]
    return path, model, node


def test_plugin_fields_equal_onnx_attributes(exported):
    _, _, node = exported
    fields = hp_trt.plugin_fields()
    node_types = {a.name: a.type for a in node.attribute}
    lookup = {a.name for a in deploy_attrs.LOOKUP_ATTRIBUTES}
    # the parser consumes the lookup attributes; every other attribute is a field, same type
    assert set(fields) == set(node_types) - lookup
    for name, field_type in fields.items():
        assert node_types[name] == ONNX_TYPES.get(field_type, onnx.AttributeProto.STRING), name
    assert lookup <= set(node_types)
    # impl receives the fields in the order they were registered, as TensorRT requires
    impl_params = list(hp_trt.impl_signature().parameters)
    assert impl_params == ["q", "k", "v", *fields, "outputs", "stream"]
    assert list(hp_trt.register_signature().parameters) == ["q", "k", "v", *fields]


def test_plugin_forward_computes_what_pytorch_computes(exported):
    """The plugin's computation, fed the attributes read back from the ONNX node (on CPU)."""
    _, model, node = exported
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    fields = {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}
    q, k, v = _qkv(batch=1, n=80, seed=7)
    out = hp_trt.plugin_forward(q, k, v, fields)
    torch.testing.assert_close(out, model(q, k, v))
    # N=80 >= min_len: the approximation really ran (it is not exact attention)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert not torch.allclose(out, exact, atol=1e-3)
    # below min_len the plugin is exact, like the op
    q, k, v = _qkv(batch=1, n=12, seed=8)
    torch.testing.assert_close(
        hp_trt.plugin_forward(q, k, v, fields),
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    )


def _fx_node(model, args, dynamic_shapes=None):
    program = torch.export.export(model, tuple(args), dynamic_shapes=dynamic_shapes)
    (node,) = [n for n in program.graph.nodes if n.target is hyperpass.op.hyper_attention_op]
    return node


def test_converter_capability():
    assert hp_trt.convertible(_fx_node(Attention(**LONG), _qkv(hq=2)))

    class Masked(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return hyperpass.hyper_attention(q, k, v, attn_mask=mask, **LONG)

    mask = torch.zeros(2, 1, 64, 64)
    assert not hp_trt.convertible(_fx_node(Masked(), [*_qkv(hq=2), mask]))
    all_dynamic = tuple({0: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO} for _ in range(3))
    args = _qkv(hq=2)
    assert not hp_trt.convertible(_fx_node(Attention(**LONG), args, all_dynamic))
    assert hp_trt.convertible(_fx_node(Attention(scale=0.3, **LONG), args, all_dynamic))


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_supported_versions():
    with pytest.raises(hp_trt.TensorRTUnavailable, match=r"tensorrt >= 10\.6"):
        hp_trt.register_plugin()
    with pytest.raises(ImportError, match=r"torch_tensorrt >= 2\.7 except 2\.10 and 2\.11"):
        hp_trt.register_torch_tensorrt_converter()


@pytest.mark.parametrize(
    "module,version,call",
    [
        ("tensorrt", "10.5.0", "register_plugin"),
        ("torch_tensorrt", "2.6.1", "register_torch_tensorrt_converter"),
        ("torch_tensorrt", "2.10.0", "register_torch_tensorrt_converter"),
    ],
)
def test_unsupported_versions_are_refused(monkeypatch, module, version, call):
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(__version__=version))
    with pytest.raises(hp_trt.TensorRTUnavailable, match=f"found {module} {version}"):
        getattr(hp_trt, call)()


# ----------------------------------------------------------------------------- needs TensorRT
def _build_engine_from_onnx(path):
    import tensorrt as trt

    hp_trt.register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [
        parser.get_error(i) for i in range(parser.num_errors)
    ]
    layer_types = [network.get_layer(i).type for i in range(network.num_layers)]
    assert trt.LayerType.PLUGIN_V3 in layer_types  # the node became the plugin, not the function
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        heads, dim = tensor.shape[1], tensor.shape[3]
        profile.set_shape(
            tensor.name, (1, heads, 2, dim), (2, heads, 64, dim), (2, heads, 256, dim)
        )
    config.add_optimization_profile(profile)
    return trt.Runtime(logger).deserialize_cuda_engine(
        builder.build_serialized_network(network, config)
    )


@needs_tensorrt
def test_tensorrt_engine_from_onnx_matches_the_op(exported):
    path, model, _ = exported
    engine = _build_engine_from_onnx(path)
    context = engine.create_execution_context()
    q, k, v = _qkv(batch=2, n=96, device="cuda", seed=3)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    out = torch.empty_like(q)
    for name, tensor in zip(names, (q, k, v, out), strict=True):
        if tensor is not out:
            context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    torch.testing.assert_close(out, model(q, k, v))


@needs_tensorrt
def test_torch_tensorrt_converter_matches_the_op():
    torch_tensorrt = pytest.importorskip("torch_tensorrt")
    hp_trt.register_torch_tensorrt_converter()
    model = Attention(is_causal=True, enable_gqa=True, **LONG).cuda().eval()
    args = _qkv(batch=2, n=96, device="cuda", seed=4)
    compiled = torch_tensorrt.compile(model, ir="dynamo", inputs=args, min_block_size=1)
    torch.testing.assert_close(compiled(*args), model(*args))
    assert np.isfinite(compiled(*args).cpu().numpy()).all()


# ----------------------------------------------------------------------------- a stand-in TensorRT
class _Desc:
    """Stands in for tensorrt.plugin.TensorDesc: a shape expression and ``like()``."""

    def __init__(self, shape):
        self.shape_expr = list(shape)

    def like(self):
        return _Desc(self.shape_expr)


def _fake_tensorrt(monkeypatch, registry):
    def decorator(kind):
        def named(plugin_id):
            def record(fn):
                registry[(plugin_id, kind)] = fn
                return fn

            return record

        return named

    plugin = types.SimpleNamespace(
        TensorDesc=_Desc,
        Tensor=type("Tensor", (), {}),
        AutoTuneCombination=lambda types_, layouts: (types_, layouts),
        register=decorator("register"),
        autotune=decorator("autotune"),
        impl=decorator("impl"),
    )
    trt = types.SimpleNamespace(__version__="10.8.0", plugin=plugin)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
    monkeypatch.setattr(hp_trt, "_registered", False)
    return plugin


def test_register_plugin_signatures_follow_tensorrt_rules(monkeypatch):
    """What tensorrt.plugin checks at registration (its _validate.py), on a stand-in module."""
    registry = {}
    plugin = _fake_tensorrt(monkeypatch, registry)
    hp_trt.register_plugin()
    shape = registry[(hp_trt.PLUGIN_ID, "register")]
    impl = registry[(hp_trt.PLUGIN_ID, "impl")]
    autotune = registry[(hp_trt.PLUGIN_ID, "autotune")]
    fields = hp_trt.plugin_fields()

    sig = inspect.signature(shape)
    assert sig.return_annotation is plugin.TensorDesc
    for name, param in sig.parameters.items():  # annotated with real types, no defaults
        assert param.default is inspect.Parameter.empty, name
        expected = plugin.TensorDesc if name in ("q", "k", "v") else fields[name]
        assert param.annotation is expected, name
    impl_sig = inspect.signature(impl)
    assert list(impl_sig.parameters) == ["q", "k", "v", *fields, "outputs", "stream"]
    assert all(not isinstance(p.annotation, str) for p in impl_sig.parameters.values())
    assert list(inspect.signature(autotune).parameters) == ["q", "k", "v", "outputs"]
    assert inspect.signature(autotune).return_annotation is inspect.Signature.empty

    # the output shape: q's [B, Hq, N] with v's head dim
    values = {"q": _Desc(("B", 8, "N", 64)), "k": _Desc(("B", 2, "N", 64))}
    values["v"] = _Desc(("B", 2, "N", 32))
    attrs = deploy_attrs.node_attributes(scale=0.125, causal=True, config=HyperConfig())
    out = shape(**values, **{name: attrs[name] for name in fields})
    assert out.shape_expr == ["B", 8, "N", 32]
    ((dtypes, layout),) = autotune(None, None, None, None)
    assert dtypes.split(", ") == ["FP32|FP16|BF16"] * 4 and layout == "LINEAR"


class _CudaBuffer:
    """Stands in for tensorrt.plugin.Tensor: a device buffer torch reads through its interface."""

    def __init__(self, tensor):
        self.tensor = tensor

    @property
    def __cuda_array_interface__(self):
        return self.tensor.__cuda_array_interface__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_impl_on_a_cuda_stream(monkeypatch):
    """The registered impl, called as TensorRT calls it: buffers, fields, outputs, a stream."""
    registry = {}
    _fake_tensorrt(monkeypatch, registry)
    hp_trt.register_plugin()
    impl = registry[(hp_trt.PLUGIN_ID, "impl")]
    model = Attention(is_causal=True, enable_gqa=True, **LONG)
    attrs = deploy_attrs.node_attributes(scale=16**-0.5, causal=True, config=HyperConfig(**LONG))
    fields = {name: attrs[name] for name in hp_trt.plugin_fields()}
    for n in (12, 200):  # exact below min_len, the kernels above
        q, k, v = _qkv(batch=2, n=n, device="cuda", seed=n)
        out = torch.full_like(q, float("nan"))
        stream = torch.cuda.Stream()
        impl(
            *(_CudaBuffer(t) for t in (q, k, v)),
            **fields,
            outputs=(_CudaBuffer(out),),
            stream=stream.cuda_stream,
        )
        stream.synchronize()
        torch.testing.assert_close(out, model(q, k, v))
