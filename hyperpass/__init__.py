"""hyperpass: near-linear long-context attention (HyperAttention) for any PyTorch model.

Importing hyperpass registers ``torch.ops.hyperpass.hyper_attention``; it never imports Triton.
The compiler backend, patching and export helpers load on first use.
"""

import importlib as _importlib
import os as _os

from hyperpass.config import HyperConfig
from hyperpass.op import hyper_attention

# The Triton kernels live in the top-level kernels/ folder. Installed, setuptools maps them to
# hyperpass/kernels; from a plain checkout, this lets ``import hyperpass.kernels`` find them.
_checkout_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout_root, "kernels", "__init__.py")) and not _os.path.isdir(
    _os.path.join(__path__[0], "kernels")
):
    __path__.append(_checkout_root)

# public name -> module that defines it (loaded lazily: torch._dynamo, onnx... are heavy)
_LAZY = {
    "backend": "hyperpass.compiler",
    "explain": "hyperpass.report",
    "patch": "hyperpass.patching",
    "unpatch": "hyperpass.patching",
    "register_hf": "hyperpass.hf",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    if name in ("onnx", "tensorrt", "kernels", "reference", "hf", "patching"):
        return _importlib.import_module(f"hyperpass.{name}")
    raise AttributeError(f"module 'hyperpass' has no attribute {name!r}")


__all__ = ["HyperConfig", "hyper_attention", *_LAZY]
