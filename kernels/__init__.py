"""Triton kernels of hyperpass (imported as ``hyperpass.kernels``).

``hyperpass.op`` calls these three for CUDA tensors; the reference stays the oracle:

* :func:`unsupported_reason` - None when the kernels serve the inputs and config exactly;
* :func:`hyper_attention_forward` - (out, lse);
* :func:`hyper_attention_backward` - the true (dq, dk, dv) of the approximation.

Importing needs Triton but no GPU (the tests run the kernels with ``TRITON_INTERPRET=1``).
"""

from .attention import (
    Tuning,
    hyper_attention_backward,
    hyper_attention_forward,
    set_tuning,
    unsupported_reason,
)

__all__ = [
    "Tuning",
    "hyper_attention_backward",
    "hyper_attention_forward",
    "set_tuning",
    "unsupported_reason",
]
