"""ONNX deployment: the ``hyperpass::HyperAttention`` node's attributes (``attributes``, shared
with TensorRT), its exact reference function (``function``) and the exporter (``exporter``).

``export``, ``translation_table``, ``attach_reference_function`` and ``register_schema`` load the
exporter on first use; without the ``onnx`` extra they raise an ImportError that names it.
"""

from __future__ import annotations

import importlib

_EXPORTER_NAMES = ("attach_reference_function", "export", "register_schema", "translation_table")
__all__ = list(_EXPORTER_NAMES)


def __getattr__(name):
    if name not in _EXPORTER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        exporter = importlib.import_module("hyperpass.integrations.onnx.exporter")
    except ImportError as err:
        raise ImportError(
            f"hyperpass ONNX export needs onnx, onnxscript and onnx_ir ({err}): "
            "pip install 'hyperpass[onnx]'"
        ) from err
    return getattr(exporter, name)
