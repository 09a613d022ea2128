"""TensorRT deployment: the ``hyperpass::HyperAttention`` plugin and a Torch-TensorRT converter.

Two front ends, one plugin:

- ONNX: a model from :func:`hyperpass.onnx.export` carries ``hyperpass::HyperAttention`` nodes
  with ``plugin_namespace="hyperpass"`` and ``plugin_version="1"``. After
  :func:`register_plugin`, TensorRT's ONNX parser maps each node to this plugin and passes the
  node's attributes as its fields, by name
  (:data:`hyperpass.integrations.onnx.attributes.ATTRIBUTES`).
- Torch-TensorRT: :func:`register_torch_tensorrt_converter` converts each
  ``torch.ops.hyperpass.hyper_attention`` call into the same plugin layer.

The plugin is a TensorRT Python plugin (``tensorrt.plugin``, "quickly deployable plugin"): a shape
function, an autotune function and a JIT ``impl`` that runs :func:`plugin_forward` on TensorRT's
stream. :func:`plugin_forward` calls the op, whose CUDA path launches the Triton kernels of
``hyperpass.kernels`` (``hyper_attention_forward``) and which is exact below ``min_len`` and for
decode-shaped causal calls, exactly as in PyTorch.

There is no ``aot_impl``: TensorRT's ahead-of-time plugins embed one Triton kernel with one launch
grid, and HyperAttention is a pipeline of launches (hash, sort, block attention, sampled keys,
merge) whose count depends on the causal recursion depth. Engines with this plugin need Python,
torch and Triton at run time.

Supported versions: tensorrt >= 10.6 (``tensorrt.plugin`` with ``impl``); torch_tensorrt >= 2.7,
except 2.10 and 2.11, which disable Python plugins. Nothing here imports TensorRT until called.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from hyperpass.integrations.onnx import attributes as deploy_attrs
from hyperpass.op import hyper_attention_op, signature

log = logging.getLogger("hyperpass")

PLUGIN_ID = f"{deploy_attrs.DOMAIN}::{deploy_attrs.OP_TYPE}"
MIN_TENSORRT = (10, 6)
"""``tensorrt.plugin`` with ``register``/``impl``/``autotune``."""
MIN_TENSORRT_AOT = (10, 9)
"""First TensorRT with ``aot_impl`` (not used: see the module docstring)."""
MIN_TORCH_TENSORRT = (2, 7)
BROKEN_TORCH_TENSORRT = ((2, 10), (2, 11))
"""Torch-TensorRT releases that disable Python plugins (a TensorRT 10.14/10.15 bug)."""
SUPPORTED = (
    "tensorrt >= 10.6 (tensorrt.plugin; aot_impl would need >= 10.9), "
    "torch_tensorrt >= 2.7 except 2.10 and 2.11 (they disable Python plugins)"
)
_TENSORS = ("q", "k", "v")
_DTYPES = "FP32|FP16|BF16"


class TensorRTUnavailable(ImportError):
    """TensorRT (or Torch-TensorRT) is missing or of an unsupported version."""


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _import_tensorrt_plugin():
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailable(f"hyperpass.tensorrt needs {SUPPORTED}: {err}") from err
    if _version(tensorrt.__version__) < MIN_TENSORRT:
        raise TensorRTUnavailable(
            f"hyperpass.tensorrt needs {SUPPORTED}; found tensorrt {tensorrt.__version__}"
        )
    import tensorrt.plugin as trtp

    return trtp


def _import_torch_tensorrt():
    try:
        import torch_tensorrt
    except ImportError as err:
        raise TensorRTUnavailable(f"the converter needs {SUPPORTED}: {err}") from err
    version = _version(torch_tensorrt.__version__)
    if version < MIN_TORCH_TENSORRT or version in BROKEN_TORCH_TENSORRT:
        raise TensorRTUnavailable(
            f"the converter needs {SUPPORTED}; found torch_tensorrt {torch_tensorrt.__version__}"
        )
    return torch_tensorrt


# ----------------------------------------------------------------------------- signatures
def _params(names, annotation) -> list[inspect.Parameter]:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [inspect.Parameter(n, kind, annotation=annotation) for n in names]


def _field_params() -> list[inspect.Parameter]:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [inspect.Parameter(a.name, kind, annotation=a.type) for a in deploy_attrs.ATTRIBUTES]


def register_signature(tensor_desc: type = inspect.Parameter.empty) -> inspect.Signature:
    """The signature TensorRT reads the plugin's inputs and fields from.

    ``(q, k, v, scale: float, causal: int, min_len: int, ...) -> TensorDesc``: the tensors, then
    one field per entry of :data:`hyperpass.integrations.onnx.attributes.ATTRIBUTES`
    (no defaults: TensorRT
    does not allow them). Pass ``tensorrt.plugin.TensorDesc``; the default lets tests read the
    fields where TensorRT is not installed.
    """
    return inspect.Signature(
        _params(_TENSORS, tensor_desc) + _field_params(), return_annotation=tensor_desc
    )


def impl_signature(tensor: type = inspect.Parameter.empty) -> inspect.Signature:
    """``(q, k, v, <fields>, outputs, stream) -> None``, as TensorRT expects of ``impl``."""
    tail = [
        inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("stream", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int),
    ]
    return inspect.Signature(_params(_TENSORS, tensor) + _field_params() + tail)


def plugin_fields() -> dict[str, type]:
    """The plugin's declared fields, name -> type, in declaration order."""
    params = list(register_signature().parameters.values())[len(_TENSORS) :]
    return {p.name: p.annotation for p in params}


# ----------------------------------------------------------------------------- the computation
def plugin_forward(q: Tensor, k: Tensor, v: Tensor, fields: Mapping[str, object]) -> Tensor:
    """What the plugin computes for one node: the op, with the node's fields as parameters.

    Args:
        q: [B, Hq, N, D]; k, v: [B, Hkv, N, D] / [B, Hkv, N, Dv]; Hkv divides Hq (GQA).
        fields: the plugin fields / ONNX attributes (lookup attributes may be included).

    Returns:
        [B, Hq, N, Dv], the same as ``torch.ops.hyperpass.hyper_attention`` in PyTorch: exact
        below ``min_len``, the Triton kernels on CUDA where they serve the call.
    """
    scale, causal, config = deploy_attrs.parse_attributes(fields)
    enable_gqa = q.shape[1] != k.shape[1]
    return hyper_attention_op(
        *signature.op_args(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa, config=config
        )
    )


# ----------------------------------------------------------------------------- the plugin
_registered = False


def register_plugin() -> None:
    """Register ``hyperpass::HyperAttention`` with ``tensorrt.plugin`` (idempotent).

    Call before parsing an exported ONNX model or building a Torch-TensorRT engine.

    Raises:
        TensorRTUnavailable: TensorRT is missing or older than 10.6.
    """
    global _registered
    if _registered:
        return
    trtp = _import_tensorrt_plugin()

    def shape(*args, **kwargs):
        bound = register_signature().bind(*args, **kwargs)
        q, v = bound.arguments["q"], bound.arguments["v"]
        out = q.like()  # [B, Hq, N, D] of q's dtype, then the value head dim
        out.shape_expr[3] = v.shape_expr[3]
        return out

    # No annotations here: with postponed annotations they would be strings, which TensorRT's
    # validation rejects; the other two functions get real types through __signature__.
    def autotune(q, k, v, outputs):
        # one dtype for all four tensors, row-major
        return [trtp.AutoTuneCombination(", ".join([_DTYPES] * 4), "LINEAR")]

    def impl(*args, **kwargs) -> None:
        bound = impl_signature().bind(*args, **kwargs)
        a = bound.arguments
        fields = {name: a[name] for name in plugin_fields()}
        with torch.cuda.stream(torch.cuda.ExternalStream(a["stream"])):
            q, k, v = (torch.as_tensor(a[n], device="cuda") for n in _TENSORS)
            out = torch.as_tensor(a["outputs"][0], device="cuda")
            out.copy_(plugin_forward(q, k, v, fields))

    shape.__signature__ = register_signature(trtp.TensorDesc)
    impl.__signature__ = impl_signature(trtp.Tensor)
    trtp.register(PLUGIN_ID)(shape)
    trtp.autotune(PLUGIN_ID)(autotune)
    trtp.impl(PLUGIN_ID)(impl)
    _registered = True
    log.info("hyperpass: registered TensorRT plugin %s", PLUGIN_ID)


# ----------------------------------------------------------------------------- Torch-TensorRT
def convertible(node: torch.fx.Node, settings=None) -> bool:
    """Whether a ``hyper_attention`` FX node becomes the plugin (else it stays in PyTorch)."""
    a = signature.arguments(node.args, node.kwargs)
    q_val = node.args[0].meta.get("val")
    if q_val is None or deploy_attrs.unsupported_reason(a) is not None:
        return False
    return a["scale"] is not None or isinstance(q_val.shape[-1], int)


_converter = None


def register_torch_tensorrt_converter():
    """Register a Torch-TensorRT converter: ``hyper_attention`` calls -> the plugin layer.

    Calls with a mask, dropout or a symbolic head dim without ``scale`` stay in PyTorch
    (:func:`convertible`). Idempotent; returns the converter.

    Raises:
        TensorRTUnavailable: TensorRT or Torch-TensorRT is missing or unsupported.
    """
    global _converter
    if _converter is not None:
        return _converter
    _import_torch_tensorrt()
    register_plugin()
    import tensorrt.plugin as trtp
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    def convert(ctx, target, args, kwargs, name):
        a = signature.arguments(args, kwargs)
        tensors = [get_trt_tensor(ctx, a[n], f"{name}_{n}") for n in _TENSORS]
        head_dim = tensors[0].shape[-1]  # -1 when dynamic: then the call must carry scale
        attrs = deploy_attrs.call_attributes(a, head_dim if head_dim >= 0 else None)
        fields = {field: attrs[field] for field in plugin_fields()}
        plugin = getattr(getattr(trtp.op, deploy_attrs.DOMAIN), deploy_attrs.OP_TYPE)
        layer = ctx.net.add_plugin(plugin(*tensors, **fields))
        layer.name = f"[{target}]-[{name}]"
        return layer.get_output(0)

    _converter = dynamo_tensorrt_converter(
        hyper_attention_op, capability_validator=convertible, supports_dynamic_shapes=True
    )(convert)
    return _converter
