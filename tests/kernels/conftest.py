"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter
(``tests/conftest.py``
sets ``TRITON_INTERPRET=1`` on machines without a GPU); every new tensor is poisoned."""

import importlib.util
import os

import pytest
import torch

# no Triton, or a GPU machine (the GPU checks are tools/gpu_check*.py): collect nothing here
if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """torch.empty/empty_like hand out NaN (floats) or the largest int instead of stale memory."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.requires_grad or t.dtype == torch.bool:  # compile machinery's own buffers
            return t
        return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_like(*a, **kw)))
