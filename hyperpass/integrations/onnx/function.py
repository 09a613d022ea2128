"""The ONNX reference function of ``hyperpass::HyperAttention``: exact attention in stock ops.

An exported model carries this ``FunctionProto`` next to its graph, so a runtime that has no
kernel or plugin for the node (stock onnxruntime, for one) inlines the function and computes
**exact** scaled-dot-product attention. The approximation runs only where a plugin serves the node
(TensorRT with :mod:`hyperpass.integrations.tensorrt`); ``min_len`` and the other parameters
are declared but unused here. Built with ``onnx.helper`` so that it can take the model's own
opset version.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from hyperpass.integrations.onnx import attributes as deploy_attrs

MIN_OPSET = 18
"""Oldest default-domain opset the function is written for (the torch exporter's own floor)."""


def _node(op_type: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, [output], name=output, **attrs)


def _attr_ref(name: str, attr: str, attr_type: int) -> onnx.AttributeProto:
    """A Constant's value taken from the calling node's attribute ``attr``."""
    return onnx.AttributeProto(name=name, ref_attr_name=attr, type=attr_type)


def _constant_from_attr(output: str, value_kind: str, attr: str, attr_type: int):
    node = helper.make_node("Constant", [], [output], name=output)
    node.attribute.append(_attr_ref(value_kind, attr, attr_type))
    return node


def _repeat_heads(x: str, prefix: str) -> list[onnx.NodeProto]:
    """[B, Hkv, N, D] -> [B, Hq, N, D], KV head h serving query heads h*G .. h*G+G-1 (GQA).

    With Hq == Hkv this is a reshape to the same shape.
    """
    p = prefix
    return [
        _node("Shape", [x], f"{p}_b", start=0, end=1),
        _node("Shape", [x], f"{p}_h", start=1, end=2),
        _node("Shape", [x], f"{p}_nd", start=2),
        _node("Div", ["hq", f"{p}_h"], f"{p}_g"),
        _node("Concat", [f"{p}_b", f"{p}_h", f"{p}_g", f"{p}_nd"], f"{p}_shape5", axis=0),
        _node("Concat", [f"{p}_b", "hq", f"{p}_nd"], f"{p}_shape4", axis=0),
        _node("Unsqueeze", [x, "axis2"], f"{p}_5d"),
        _node("Expand", [f"{p}_5d", f"{p}_shape5"], f"{p}_rep"),
        _node("Reshape", [f"{p}_rep", f"{p}_shape4"], f"{p}_full"),
    ]


def reference_function(opset_version: int) -> onnx.FunctionProto:
    """Exact attention for ``hyperpass::HyperAttention(q, k, v) -> out``.

    Inputs q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv]; output [B, Hq, Nq, Dv].
    Reads the node's ``scale`` and ``causal`` attributes; ``causal=1`` masks key j for query i when
    j > i (top-left aligned, as SDPA's ``is_causal``). Hkv must divide Hq.

    Args:
        opset_version: the model's default-domain opset (>= :data:`MIN_OPSET`).

    Raises:
        ValueError: ``opset_version`` below :data:`MIN_OPSET`.
    """
    if opset_version < MIN_OPSET:
        raise ValueError(f"opset_version must be >= {MIN_OPSET}, got {opset_version}")
    neg_inf = helper.make_tensor("neg_inf", TensorProto.FLOAT, [], [float("-inf")])
    nodes = [
        _constant_from_attr("scale_f", "value_float", "scale", onnx.AttributeProto.FLOAT),
        _constant_from_attr("causal_i", "value_int", "causal", onnx.AttributeProto.INT),
        helper.make_node("Constant", [], ["axis2"], value_ints=[2]),
        helper.make_node("Constant", [], ["axis0"], value_ints=[0]),
        helper.make_node("Constant", [], ["axis1"], value_ints=[1]),
        helper.make_node("Constant", [], ["zero"], value_int=0),
        helper.make_node("Constant", [], ["one"], value_int=1),
        helper.make_node("Constant", [], ["neg_inf_f"], value=neg_inf),
        _node("Shape", ["q"], "hq", start=1, end=2),
        *_repeat_heads("k", "k"),
        *_repeat_heads("v", "v"),
        # scores = (q * scale) @ k^T: [B, Hq, Nq, Nk]
        _node("CastLike", ["scale_f", "q"], "scale_t"),
        _node("Mul", ["q", "scale_t"], "q_scaled"),
        _node("Transpose", ["k_full"], "k_t", perm=[0, 1, 3, 2]),
        _node("MatMul", ["q_scaled", "k_t"], "scores"),
        # causal: key j > query i is masked, only when the attribute says so
        _node("Shape", ["q"], "nq_1d", start=-2, end=-1),
        _node("Shape", ["k"], "nk_1d", start=-2, end=-1),
        _node("Squeeze", ["nq_1d", "axis0"], "nq"),
        _node("Squeeze", ["nk_1d", "axis0"], "nk"),
        _node("Range", ["zero", "nq", "one"], "rows"),
        _node("Range", ["zero", "nk", "one"], "cols"),
        _node("Unsqueeze", ["rows", "axis1"], "rows_col"),
        _node("Unsqueeze", ["cols", "axis0"], "cols_row"),
        _node("Greater", ["cols_row", "rows_col"], "future"),
        _node("Cast", ["causal_i"], "causal_b", to=TensorProto.BOOL),
        _node("And", ["future", "causal_b"], "masked"),
        _node("CastLike", ["neg_inf_f", "scores"], "neg_inf_t"),
        _node("Where", ["masked", "neg_inf_t", "scores"], "scores_masked"),
        _node("Softmax", ["scores_masked"], "probs", axis=-1),
        _node("MatMul", ["probs", "v_full"], "out"),
    ]
    return helper.make_function(
        deploy_attrs.DOMAIN,
        deploy_attrs.OP_TYPE,
        inputs=["q", "k", "v"],
        outputs=["out"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset_version)],
        attributes=[a.name for a in deploy_attrs.NODE_ATTRIBUTES],
        doc_string="Exact scaled-dot-product attention (the fallback of the hyperpass plugin).",
    )
