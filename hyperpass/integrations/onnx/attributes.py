"""The attributes of the deployed HyperAttention node: one list for ONNX and TensorRT.

The ONNX exporter writes these attributes on each ``hyperpass::HyperAttention`` node, the ONNX
reference function declares them, and the TensorRT plugin declares them as its fields. All three
read :data:`ATTRIBUTES` (derived from :class:`~hyperpass.config.HyperConfig`), so they cannot drift
apart. Imports nothing heavy (no onnx, no tensorrt): tests check the lists everywhere; the
TensorRT plugin (``hyperpass.integrations.tensorrt``) reads them from here.

TensorRT's ONNX parser finds the plugin for a node by its op type plus the ``plugin_namespace`` and
``plugin_version`` attributes (:data:`LOOKUP_ATTRIBUTES`); it consumes those two and passes the
other attributes to the plugin as fields, by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from hyperpass.config import HyperConfig
from hyperpass.op.eligibility import structural_reason
from hyperpass.op.signature import config_from_arguments

OP_TYPE = "HyperAttention"
"""ONNX op type of the node and name of the TensorRT plugin."""
DOMAIN = "hyperpass"
"""ONNX domain of the node and namespace of the TensorRT plugin."""
DOMAIN_VERSION = 1
"""Version of the ``hyperpass`` ONNX domain (opset import of the model)."""
PLUGIN_VERSION = "1"
"""TensorRT plugin version (the parser's default is "1")."""


@dataclass(frozen=True)
class Attribute:
    """One node attribute / plugin field.

    Attributes:
        name: attribute name, identical in ONNX and TensorRT.
        type: ``int``, ``float`` or ``str``: the ONNX attribute type (INT, FLOAT, STRING) and the
            annotation of the TensorRT plugin field.
        doc: one line for schemas and docs.
    """

    name: str
    type: type
    doc: str


def _config_attributes() -> tuple[Attribute, ...]:
    return tuple(
        Attribute(f.name, type(f.default), f.metadata["doc"])
        for f in dataclasses.fields(HyperConfig)
    )


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("scale", float, "softmax scale, resolved at export (1/sqrt(D) when not given)"),
    Attribute("causal", int, "1: causal mask aligned top-left (SDPA's is_causal), 0: none"),
    *_config_attributes(),
)
"""The op's parameters: scale, causal, then every :class:`HyperConfig` field in schema order.
These are the TensorRT plugin's fields."""

LOOKUP_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("plugin_namespace", str, "TensorRT plugin namespace (the parser's lookup key)"),
    Attribute("plugin_version", str, "TensorRT plugin version (the parser's lookup key)"),
)
"""Attributes that only tell TensorRT's ONNX parser which plugin serves the node."""

NODE_ATTRIBUTES: tuple[Attribute, ...] = ATTRIBUTES + LOOKUP_ATTRIBUTES
"""Every attribute on an exported node, in order."""


def node_attributes(
    *, scale: float, causal: bool, config: HyperConfig
) -> dict[str, int | float | str]:
    """The attribute values of one node, keyed and ordered as :data:`NODE_ATTRIBUTES`.

    Args:
        scale: the softmax scale (a number: ``None`` must be resolved from the head dim first).
        causal: SDPA's ``is_causal``.
        config: the call's parameters.

    Raises:
        TypeError: ``scale`` is not a number.
        ValueError: ``scale`` is not finite and positive.
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise TypeError(f"scale must be a float (resolve None first), got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    values = {
        "scale": float(scale),
        "causal": int(bool(causal)),
        **config.as_dict(),
        "plugin_namespace": DOMAIN,
        "plugin_version": PLUGIN_VERSION,
    }
    return {a.name: values[a.name] for a in NODE_ATTRIBUTES}


def parse_attributes(values: Mapping[str, object]) -> tuple[float, bool, HyperConfig]:
    """Inverse of :func:`node_attributes`: ``(scale, causal, config)`` from attribute values.

    Lookup attributes may be present or not; any other unknown name is an error.

    Raises:
        TypeError: an unknown attribute name.
        ValueError: a missing attribute, or a value out of its range (names it).
    """
    known = {a.name for a in NODE_ATTRIBUTES}
    unknown = set(values) - known
    if unknown:
        raise TypeError(f"unknown HyperAttention attribute(s) {sorted(unknown)}; known: {known}")
    missing = [a.name for a in ATTRIBUTES if a.name not in values]
    if missing:
        raise ValueError(f"HyperAttention node is missing attribute(s) {missing}")
    fields = {a.name: a.type(values[a.name]) for a in ATTRIBUTES}
    scale, causal = fields.pop("scale"), bool(fields.pop("causal"))
    return scale, causal, HyperConfig(**fields)


def default_scale(head_dim: int) -> float:
    """SDPA's default softmax scale for a head dimension."""
    return 1.0 / math.sqrt(head_dim)


# ----------------------------------------------------------------------------- op calls -> nodes
def unsupported_reason(arguments: Mapping) -> str | None:
    """Why a call cannot become a node (it stays exact attention), or None: the op's
    structural eligibility rule (a mask, dropout, not [B, H, N, D]...; the node decides lengths
    itself, as the op does), read from the graph's fake values.

    Args:
        arguments: the call's arguments by name (``hyperpass.op.signature.arguments``) whose
            ``q``/``k``/``v`` are FX nodes carrying ``meta["val"]``.
    """
    metas = [getattr(arguments[n], "meta", {}).get("val") for n in ("q", "k", "v")]
    if any(m is None for m in metas):
        return "no shape metadata on q/k/v"
    reason = structural_reason(
        *metas, has_mask=arguments["attn_mask"] is not None, dropout_p=arguments["dropout_p"],
        is_causal=arguments["is_causal"], enable_gqa=arguments["enable_gqa"],
    )  # fmt: skip
    return None if reason is None else reason.words


def call_attributes(arguments: Mapping, head_dim: object) -> dict[str, int | float | str]:
    """The node attributes of one call: its parameters, with ``scale=None`` resolved.

    Args:
        arguments: by name, from ``hyperpass.op.signature.arguments``.
        head_dim: ``q``'s last dimension; needed only when the call's ``scale`` is None. Anything
            but an int (a symbolic size) cannot give a constant scale.

    Raises:
        ValueError: ``scale`` is None and ``head_dim`` is not a static int.
    """
    scale = arguments["scale"]
    if scale is None:
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise ValueError(
                f"the head dimension is symbolic ({head_dim}), so the node cannot carry "
                "scale=1/sqrt(D): make it static in dynamic_shapes or pass scale= explicitly"
            )
        scale = default_scale(head_dim)
    config = config_from_arguments(arguments)
    return node_attributes(scale=scale, causal=arguments["is_causal"], config=config)
