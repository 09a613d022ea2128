"""Test-session setup shared by the whole suite (kernel-specific only; see tests/test_kernels.py).

Triton decorates its own language helpers (``tl.zeros``...) with ``@jit`` when it is imported, so
its interpreter mode must be chosen before anything imports triton. On a machine without a GPU,
the kernel tests run under ``TRITON_INTERPRET=1``: set it here, before any test module loads.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
