"""Where each method starts to pay: the measured break-even lengths behind ``min_len=0`` (auto).

The default ``min_len=0`` approximates a call only from the length at which the method was
measured at least as fast as exact SDPA on the device, forward and forward+backward, for both
benchmark settings (``benchmarks/bench_attention.py``, ``docs/performance.md``). Shorter calls,
and every call on a CPU (where SDPA is faster at every length measured), stay exact. An explicit
``min_len`` overrides the table. Imports torch only.
"""

from __future__ import annotations

import functools

import torch

# Measured on an NVIDIA H200 (torch 2.11, bf16, causal; benchmarks/bench_attention.py, results in
# benchmarks/results/bench_attention_default_h200.json for select, bench_attention_h200.json for
# the other methods; bench_attention_compiled_h200.json for select under torch.compile): the
# shortest benchmarked length from which the method is no slower than SDPA forward *and*
# forward+backward in every path, eager and compiled training (the op's choice may depend on
# shapes only, or a backward could differentiate another computation than its forward). Keyed
# by the GPU work per token, B * Hq * D: below 2048 (12 heads of 64) the method pays later
# (select at 16k with 12 heads of 64: 0.94x forward+backward compiled, 1.32x eager; with 32
# heads of 128 at 8k: 0.95x compiled).
_HOPPER = {
    # method: (break-even when B * Hq * D >= 2048, below)
    "select": (16384, 32768),
    "longformer": (16384, 16384),
    "local": (16384, 16384),
    "dilated": (32768, 32768),  # every window block is partial: more mask work than longformer
    "hyper": (32768, 32768),
}
HEAVY_WORK = 2048
MEASURED_ON = "NVIDIA H200"


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    if device.type != "cuda" or not torch.cuda.is_available():
        return device.type
    return torch.cuda.get_device_name(device)


def break_even(method: str, device: torch.device, work_per_token) -> int | None:
    """The length from which ``method`` is approximated on ``device`` by default, or None where
    it never is (CPUs and other non-CUDA devices). ``work_per_token``: B * Hq * D (None or
    symbolic: the lighter, later break-even). CUDA GPUs other than the one measured use its
    table (non-causal calls the causal one, which they beat sooner): set ``min_len`` where that
    is wrong for yours."""
    if device.type != "cuda":
        return None
    heavy, light = _HOPPER[method]
    is_heavy = isinstance(work_per_token, int) and work_per_token >= HEAVY_WORK
    return heavy if is_heavy else light


def describe(device: torch.device) -> str:
    """The device's name as the reason texts give it."""
    return _device_name(torch.device(device))
