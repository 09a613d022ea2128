"""ONNX export of models that call ``torch.ops.hyperpass.hyper_attention``.

One call, :func:`export`, produces a model with one ``hyperpass::HyperAttention`` node per call
site (domain ``hyperpass``), its parameters as attributes
(:mod:`hyperpass.integrations.onnx.attributes`), and a
reference ONNX function that computes exact attention, so stock onnxruntime runs the model.
TensorRT with the plugin of :mod:`hyperpass.integrations.tensorrt` runs the approximation instead.

Calls the node cannot represent stay ordinary attention: a call with an ``attn_mask`` (or not
[B, H, N, D]) computes exact SDPA in PyTorch too, so :func:`export` turns it back into
``aten.scaled_dot_product_attention`` before translation. A call with ``dropout_p > 0`` is refused:
export in ``eval()`` mode.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re

import onnx
import onnx_ir as ir
import onnxscript
import torch

from hyperpass.integrations.onnx import attributes as deploy_attrs
from hyperpass.integrations.onnx.function import reference_function
from hyperpass.op import hyper_attention_op, signature

log = logging.getLogger("hyperpass")

__all__ = ["attach_reference_function", "export", "register_schema", "translation_table"]

_SDPA_OP = torch.ops.aten.scaled_dot_product_attention.default


# ----------------------------------------------------------------------------- the node's schema
def register_schema() -> None:
    """Register ``hyperpass::HyperAttention`` with ``onnx.defs`` (once per process).

    onnxscript builds nodes only for ops with a schema, and ``onnx.checker`` then validates the
    attribute names and types against
    :data:`~hyperpass.integrations.onnx.attributes.NODE_ATTRIBUTES`.
    """
    if onnx.defs.has(deploy_attrs.OP_TYPE, deploy_attrs.DOMAIN):
        return
    attr_types = {
        int: onnx.defs.OpSchema.AttrType.INT,
        float: onnx.defs.OpSchema.AttrType.FLOAT,
        str: onnx.defs.OpSchema.AttrType.STRING,
    }
    tensor = "T"
    schema = onnx.defs.OpSchema(
        deploy_attrs.OP_TYPE,
        deploy_attrs.DOMAIN,
        deploy_attrs.DOMAIN_VERSION,
        "HyperAttention (arXiv 2310.05869) with exact attention below min_len.",
        inputs=[
            onnx.defs.OpSchema.FormalParameter("q", tensor, "[B, Hq, Nq, D]"),
            onnx.defs.OpSchema.FormalParameter("k", tensor, "[B, Hkv, Nk, D]"),
            onnx.defs.OpSchema.FormalParameter("v", tensor, "[B, Hkv, Nk, Dv]"),
        ],
        outputs=[onnx.defs.OpSchema.FormalParameter("out", tensor, "[B, Hq, Nq, Dv]")],
        type_constraints=[
            (
                tensor,
                ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"],
                "floats",
            )
        ],
        attributes=[
            onnx.defs.OpSchema.Attribute(a.name, attr_types[a.type], a.doc, required=True)
            for a in deploy_attrs.NODE_ATTRIBUTES
        ],
    )
    onnx.defs.register_schema(schema)


# ----------------------------------------------------------------------------- the translation
def _translate_hyper_attention(*args, **kwargs):
    """Translation of one ``hyper_attention`` call into one ``hyperpass::HyperAttention`` node."""
    a = signature.arguments(args, kwargs)
    q = a["q"]
    if a["attn_mask"] is not None or a["dropout_p"] > 0.0 or len(q.shape) != 4:
        raise ValueError(
            "a hyper_attention call with a mask, dropout or not [B, H, N, D] has no "
            "HyperAttention node; hyperpass.onnx.export keeps such calls as SDPA (and refuses "
            "dropout: use eval())"
        )
    attrs = deploy_attrs.call_attributes(a, q.shape[3])
    return _hyperpass_opset().HyperAttention(q, a["k"], a["v"], **attrs)


# The exporter reads inputs and attributes from the signature and its annotations.
_translate_hyper_attention.__signature__ = signature.PYTHON_SIGNATURE
_translate_hyper_attention.__annotations__ = {
    p.name: p.annotation
    for p in signature.PYTHON_SIGNATURE.parameters.values()
    if p.annotation is not inspect.Parameter.empty
}


@functools.cache
def _hyperpass_opset() -> onnxscript.values.Opset:
    register_schema()
    return onnxscript.values.Opset(deploy_attrs.DOMAIN, deploy_attrs.DOMAIN_VERSION)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.

    Users who call ``torch.onnx.export`` themselves also need :func:`attach_reference_function`
    on the result (stock runtimes need it) and must keep masked and dropout calls out of the op.
    """
    _hyperpass_opset()
    return {hyper_attention_op: _translate_hyper_attention}


# ----------------------------------------------------------------------------- before and after
def _keep_exact_calls(program: torch.export.ExportedProgram) -> int:
    """Turn calls a node cannot carry back into SDPA; refuse dropout. Returns the node count."""
    sites = 0
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not hyper_attention_op:
            continue
        a = signature.arguments(node.args, node.kwargs)
        if a["dropout_p"] > 0.0:
            raise ValueError(
                f"hyper_attention call {node.name!r} has dropout_p={a['dropout_p']}; export the "
                "model in eval() mode (dropout is a training-time operation)"
            )
        if a["attn_mask"] is not None and a["is_causal"]:
            raise ValueError(
                f"hyper_attention call {node.name!r} is causal with a key-padding mask, which "
                "SDPA (the exact body) takes only as one combined mask: export the model "
                "unpadded, or pass the combined mask"
            )
        q_val = node.args[0].meta["val"]
        reason = deploy_attrs.unsupported_reason(a)
        if reason is None:
            deploy_attrs.call_attributes(a, q_val.shape[-1])  # fails here, not deep in torch
            sites += 1
            continue
        log.info("hyperpass.onnx: %s keeps exact SDPA (%s)", node.name, reason)
        node.target = _SDPA_OP
        node.args = (a["q"], a["k"], a["v"], a["attn_mask"], a["dropout_p"], a["is_causal"])
        node.kwargs = {"scale": a["scale"], "enable_gqa": a["enable_gqa"]}
    program.graph_module.recompile()
    return sites


def attach_reference_function(model: ir.Model) -> None:
    """Add the exact-attention function for ``hyperpass::HyperAttention`` to an exported model.

    The torch exporter inlines model-local functions, so this runs after export; the function
    takes the model's default-domain opset. Idempotent.
    """
    opset = model.opset_imports.get("", None)
    if opset is None:
        raise ValueError("the model imports no default ONNX opset")
    model.opset_imports[deploy_attrs.DOMAIN] = deploy_attrs.DOMAIN_VERSION
    function = ir.serde.deserialize_function(reference_function(opset))
    model.functions[function.identifier()] = function


def _dim_names(model, args: tuple, dynamic_shapes) -> list[dict[int, str]]:
    """Per tensor input, axis -> the name of the user's ``Dim`` (for readable symbolic dims)."""
    if isinstance(dynamic_shapes, dict):
        forward = model.forward if isinstance(model, torch.nn.Module) else model
        names = list(inspect.signature(forward).parameters)
        specs = [dynamic_shapes.get(name) for name in names[: len(args)]]
    else:
        specs = list(dynamic_shapes)
    names_per_input = []
    for arg, spec in zip(args, specs, strict=False):
        if not isinstance(arg, torch.Tensor):
            continue
        axes = spec.items() if isinstance(spec, dict) else enumerate(spec or ())
        names_per_input.append(
            {
                axis: dim.__name__
                for axis, dim in axes
                if isinstance(getattr(dim, "__name__", 0), str)
            }
        )
    return names_per_input


def _tidy_dims(model: ir.Model, names_per_input: list[dict[int, str]]) -> None:
    """Name the exporter's symbols (``s33``) after the user's ``Dim`` names (``batch``), and make
    the ones ``Dim.AUTO`` specialized (a symbol spelled ``"32"``) static."""
    mapping = {}
    if len(names_per_input) == len(model.graph.inputs):  # else specs and inputs do not line up
        for value, names in zip(model.graph.inputs, names_per_input, strict=True):
            for axis, name in names.items():
                dim = value.shape[axis] if value.shape is not None else None
                if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                    mapping.setdefault(dim.value, name)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b") if mapping else None

    def tidy(dim):
        if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
            return dim
        if dim.value.isdigit():
            return int(dim.value)
        return ir.SymbolicDim(
            pattern.sub(lambda m: mapping[m[1]], dim.value) if pattern else dim.value
        )

    values = [*model.graph.inputs, *model.graph.outputs]
    values += [out for node in model.graph.all_nodes() for out in node.outputs]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([tidy(d) for d in value.shape])


def _auto_dynamic_shapes(args: tuple):
    auto = torch.export.Dim.AUTO
    return tuple(
        {i: auto for i in range(a.dim())} if isinstance(a, torch.Tensor) else None for a in args
    )


def export(model, args, path, *, dynamic_shapes=None, **export_kwargs):
    """Export ``model`` to ONNX with one ``hyperpass::HyperAttention`` node per call site.

    Args:
        model: a ``torch.nn.Module`` whose forward calls ``hyperpass.hyper_attention`` (directly
            or after the compiler pass rewrote its attention).
        args: tuple of example positional inputs.
        path: where to write the ``.onnx`` file.
        dynamic_shapes: as in ``torch.export``. ``None`` marks every dimension of every tensor
            argument ``Dim.AUTO``: symbolic where the model allows (batch, sequence), static where
            it specializes (size-1 examples specialize: use batch >= 2 in the examples).
        **export_kwargs: passed to ``torch.onnx.export`` (``opset_version``, ``optimize``...).

    Returns:
        The ``torch.onnx.ONNXProgram``, its model carrying the reference function.

    Raises:
        ValueError: a call with ``dropout_p > 0``, or an unresolvable scale (symbolic head dim).
    """
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    if dynamic_shapes is None:
        dynamic_shapes = _auto_dynamic_shapes(args)
    with torch.no_grad():
        program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    sites = _keep_exact_calls(program)
    sdpa = [n.name for n in program.graph.nodes if n.op == "call_function" and n.target is _SDPA_OP]
    if sdpa and not sites:
        log.warning(
            "hyperpass.onnx: no HyperAttention node: %d attention call(s) (%s) stay exact "
            "scaled_dot_product_attention, with a mask or not routed to the op. Hugging Face "
            "models build their causal mask with a packed-sequence term under export, which "
            "cannot be dropped: their calls stay exact",
            len(sdpa), ", ".join(sdpa[:4]),
        )  # fmt: skip
    table = {**export_kwargs.pop("custom_translation_table", {}), **translation_table()}
    export_kwargs.setdefault("verbose", False)
    onnx_program = torch.onnx.export(
        program, args, dynamo=True, custom_translation_table=table, **export_kwargs
    )
    attach_reference_function(onnx_program.model)
    _tidy_dims(onnx_program.model, _dim_names(model, args, dynamic_shapes))
    log.info("hyperpass.onnx: %d HyperAttention node(s) -> %s", sites, path)
    onnx_program.save(path)
    return onnx_program
