"""hyperpass: near-linear long-context attention (HyperAttention) for any PyTorch model.

Importing hyperpass registers ``torch.ops.hyperpass.hyper_attention``; it never imports Triton.
Layers (each imports only the ones above it):

- :mod:`hyperpass.config` - the parameters; :mod:`hyperpass.selection` - which layers;
- :mod:`hyperpass.reference` - the algorithm in plain PyTorch (the oracle, the CPU path);
- :mod:`hyperpass.kernels` - the Triton kernels (CUDA);
- :mod:`hyperpass.op` - the op: signature, eligibility, registration;
- :mod:`hyperpass.compiler` - the ``torch.compile`` backend and its pass;
- :mod:`hyperpass.integrations` - patching, ``hyperpass run``, transformers, ONNX, TensorRT.

The compiler, patching and export helpers load on first use.
"""

import importlib as _importlib
import sys as _sys

from hyperpass.config import HyperConfig
from hyperpass.op import hyper_attention

if "torch.distributed.tensor" in _sys.modules:  # DTensor in use: the op's sharding rules
    _importlib.import_module("hyperpass.integrations.distributed")

__version__ = "0.2.0"

# public name -> module that defines it (loaded lazily: torch._dynamo, onnx... are heavy)
_LAZY = {
    "backend": "hyperpass.compiler.backend",
    "explain": "hyperpass.compiler.explain",
    "patch": "hyperpass.integrations.patching",
    "unpatch": "hyperpass.integrations.patching",
    "register_hf": "hyperpass.integrations.hf",
}
# short names of the integration modules: ``hyperpass.onnx.export(...)`` after ``import hyperpass``
_MODULES = {
    "onnx": "hyperpass.integrations.onnx",
    "tensorrt": "hyperpass.integrations.tensorrt",
    "hf": "hyperpass.integrations.hf",
    "patching": "hyperpass.integrations.patching",
    "distributed": "hyperpass.integrations.distributed",
    "kernels": "hyperpass.kernels",
    "reference": "hyperpass.reference",
    "compiler": "hyperpass.compiler",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    if name in _MODULES:
        return _importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'hyperpass' has no attribute {name!r}")


__all__ = ["HyperConfig", "__version__", "hyper_attention", *_LAZY]
