"""The one rule that says whether an attention call may be approximated.

Used by the op at run time (with real tensors), by the compiler pass at compile time (with the
graph's fake tensors, whose sizes may be symbolic: a check it cannot decide is left to the op)
and by the exporters (only the structural part: a node decides the length itself). The kernels
and ONNX add only limits of their own. Imports torch and the config only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hyperpass.config import HyperConfig
from hyperpass.op import cost_model

APPROX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Reason(NamedTuple):
    """Why a call stays exact: a short code (a report key) and the reason in words."""

    code: str
    words: str


def _known(x):
    """An int size, or None for a symbolic one (the op decides it at run time)."""
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def structural_reason(
    q, k, v, *, has_mask: bool, dropout_p, is_causal: bool, enable_gqa: bool
) -> Reason | None:
    """What makes a call exact whatever its length: a mask, dropout, shapes or dtypes the
    approximation does not take. ``q``/``k``/``v`` are tensors (real or fake)."""
    del is_causal
    if _sequence_sharded(q) or _sequence_sharded(k):
        return Reason(
            "context_parallel",
            "q/k/v sharded on the sequence (context parallel): SDPA's ring attention serves it",
        )
    if has_mask:
        return Reason("mask", "attention mask the approximation cannot serve")
    if not (isinstance(dropout_p, int | float) and dropout_p == 0):
        return Reason("dropout", f"dropout_p={dropout_p} (the op serves dropout exactly only)")
    if not (q.dim() == k.dim() == v.dim() == 4):
        return Reason("not_4d", "q/k/v are not 4-D [B, H, N, D]")
    if not (q.dtype == k.dtype == v.dtype):
        return Reason("dtype", f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in APPROX_DTYPES:
        return Reason("dtype", f"dtype {q.dtype}")
    if not _compatible(q, k, v):
        return Reason("shapes", f"incompatible q {_dims(q)}, k {_dims(k)}, v {_dims(v)}")
    hq, hkv = _known(q.shape[1]), _known(k.shape[1])
    if hq is not None and hkv is not None and hq != hkv and (not enable_gqa or hq % hkv):
        return Reason("heads", "query heads do not match KV heads (and enable_gqa is off)")
    return None


def _sequence_sharded(t) -> bool:
    """A DTensor sharded on its sequence dim (context parallelism), read without importing
    torch.distributed."""
    placements = getattr(t, "placements", None)
    if not placements:
        return False
    dims = {getattr(p, "dim", None) for p in placements if getattr(p, "is_shard", lambda: False)()}
    return bool(dims & {t.dim() - 2, -2})


def _dims(t) -> list:
    return [s if isinstance(s, int) else str(s) for s in t.shape]


def _compatible(q, k, v) -> bool:
    """Batch and head dims agree (q's heads a multiple of k's is checked apart), k and v have
    the same length, q and k the same head dim; symbolic sizes count as agreeing."""

    def differ(a, b):
        return _known(a) is not None and _known(b) is not None and a != b

    pairs = ((q.shape[0], k.shape[0]), (k.shape[0], v.shape[0]), (k.shape[1], v.shape[1]))
    pairs += ((k.shape[2], v.shape[2]), (q.shape[3], k.shape[3]))
    return not any(differ(a, b) for a, b in pairs)


def min_len_for(cfg: HyperConfig, device, work_per_token=None) -> int | None:
    """The shortest length approximated: ``cfg.min_len``, or with ``min_len=0`` the measured
    break-even of the method on ``device`` (``cost_model``); None: never (a CPU on auto)."""
    if cfg.min_len > 0:
        return cfg.min_len
    return cost_model.break_even(cfg.method, torch.device(device), work_per_token)


def work_per_token(q):
    """B * Hq * D of q [B, Hq, N, D] when static, else None."""
    dims = [_known(s) for s in (q.shape[0], q.shape[1], q.shape[-1])]
    return None if None in dims else dims[0] * dims[1] * dims[2]


def length_reason(nq, nk, is_causal: bool, cfg: HyperConfig, device="cuda",
                  work=None) -> Reason | None:  # fmt: skip
    """What makes a call exact at these lengths (ints, or symbolic: then undecided, None)."""
    nq, nk = _known(nq), _known(nk)
    if is_causal and nq is not None and nk is not None and nq != nk:
        return Reason("decode", f"causal with Nq={nq} != Nk={nk} (decode or chunked prefill)")
    if nq == 1:  # whatever min_len says: one query reads each key once, nothing to save
        return Reason("decode", "one query (decode step): exact")
    least = min_len_for(cfg, device, work)
    if least is None:
        return Reason(
            "short",
            f"min_len=0 (auto): exact on {cost_model.describe(device)}, where the approximation "
            "is not faster than SDPA (set min_len to approximate anyway)",
        )
    shortest = min(nq, nk) if nq is not None and nk is not None else nq
    if shortest is not None and shortest < least:
        if cfg.min_len > 0:
            return Reason("short", f"sequence {shortest} shorter than min_len={cfg.min_len}")
        return Reason(
            "short",
            f"sequence {shortest} shorter than {least}, where method={cfg.method!r} starts to be "
            f"faster than SDPA (min_len=0: auto, measured on {cost_model.MEASURED_ON})",
        )
    return None


def key_mask_reason(attn_mask, q, k, cfg: HyperConfig) -> Reason | None:
    """None when ``attn_mask`` is a key-padding mask the method serves: boolean, one row for
    every query and head (``[B or 1, 1, 1, Nk]``, ``[1, 1, Nk]`` or ``[1, Nk]``; True = attend),
    with ``method="select"``. With ``is_causal`` such a mask means causal AND the mask (SDPA
    takes one or the other; this op takes both). Sizes the graph leaves symbolic pass."""
    if cfg.method != "select":
        return Reason("mask", f"attention mask: method={cfg.method!r} takes none (select takes a "
                              "key-padding mask)")  # fmt: skip
    shape = tuple(attn_mask.shape)

    def differs(a, b):
        return _known(a) is not None and _known(b) is not None and a != b

    key_only = (
        attn_mask.dtype == torch.bool
        and 2 <= len(shape) <= 4
        and all(_known(s) == 1 for s in shape[-3:-1])
        and not differs(shape[-1], k.shape[-2])
        and (len(shape) < 4 or _known(shape[0]) == 1 or not differs(shape[0], q.shape[0]))
    )
    if not key_only:
        return Reason("mask", "attention mask that is not a boolean key-padding mask "
                              "[B, 1, 1, Nk]")  # fmt: skip
    return None


def skip_reason(
    q, k, v, attn_mask, dropout_p, is_causal: bool, enable_gqa: bool, cfg: HyperConfig
) -> Reason | None:
    """Why this call must be exact, or None when it is approximated (SDPA's arguments)."""
    reason = structural_reason(
        q, k, v, has_mask=False, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=enable_gqa
    )
    if reason is None and attn_mask is not None:
        reason = key_mask_reason(attn_mask, q, k, cfg)
    return reason or length_reason(
        q.shape[-2], k.shape[-2], is_causal, cfg, q.device, work_per_token(q)
    )


def one_exact_leaf(nq: int, is_causal: bool, cfg: HyperConfig) -> bool:
    """The causal recursion on ``nq <= min_seq_len`` rows is one exact leaf: exact attention,
    which SDPA computes faster and in less memory than any approximation kernel."""
    return cfg.causal_recursion(is_causal) and nq <= cfg.min_seq_len


def skip_reason_words(*args) -> str | None:
    """:func:`skip_reason`'s reason in words (routing reports count calls by it), or None."""
    reason = skip_reason(*args)
    return None if reason is None else reason.words
