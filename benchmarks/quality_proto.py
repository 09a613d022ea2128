"""Prototype (experiment, not library code): exact key blocks picked by a score bound.

HyperAttention's exact set is "the large entries": the paper finds them with sortLSH, but says a
predefined mask may supply them too. On SmolLM2 the LSH blocks miss the far tokens a retrieval
needs (passkey lost). This prototype picks the exact blocks by scoring them instead:

* keys are cut into contiguous blocks of ``block`` keys; each block keeps its per-channel min and
  max (``kmin``, ``kmax`` [B, H, n_blocks, D]);
* for a query q, ``sum_d max(q_d * kmin_d, q_d * kmax_d) = relu(q) @ kmax + min(q, 0) @ kmin``
  bounds q . k for every key of the block (Quest, Tang et al. 2024, uses the same bound);
* per block of ``qblock`` consecutive queries, the bound is aggregated (``agg="max"``: max over its
  queries; ``agg="mean"``: the bound of the block's mean query), and the ``topk`` past blocks
  with the largest aggregate that lie wholly before every query's window become exact blocks
  of all the block's queries (block-sparse, kernel friendly);
* the exact set of query i = its local part (from a key-block boundary about ``window`` keys
  back, to i) U sinks [0, sinks) U its selected blocks, each key counted once (a union of
  masks), then exact softmax over that set. With ``share_gqa``, the
  query heads of one KV head share their blocks (max of the aggregates), so a kernel loads
  each selected K/V block once per KV head.

Optional ``samples`` m > 0 adds HyperAttention's sampled residual: m uniform key positions per
(KV head, query block), weight n/m, dropping the keys of the exact set and the future.

This computes with dense masks in chunks of queries (fine on a GPU at 8192); a kernel would gather
only the selected blocks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK = 512  # queries per step: a multiple of every qblock used


def _defaults(params: dict) -> dict:
    p = {
        "window": 1024,
        "sinks": 16,
        "block": 64,
        "qblock": 64,
        "topk": 8,
        "agg": "max",
        "share_gqa": False,
        "samples": 0,
        "seed": 0,
    }
    p.update({k: v for k, v in params.items() if k != "proto"})
    return p


def _local_lo(qb_start, p: dict):
    """First key of the local part of each query block: a key-block boundary."""
    lo = qb_start + p["qblock"] - p["window"]
    lo = lo.clip(min=0) if isinstance(lo, torch.Tensor) else np.maximum(lo, 0)
    return (lo // p["block"]) * p["block"]


def _block_bounds(k: torch.Tensor, block: int):
    """Per-channel min and max of each block of keys: k [B, H, N, D] -> 2 x [B, H, nb, D]."""
    n = k.shape[-2]
    nb = math.ceil(n / block)
    pad = nb * block - n
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf"))
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf"))
    shape = (*k.shape[:-2], nb, block, k.shape[-1])
    return lo.view(shape).amin(-2), hi.view(shape).amax(-2)


@torch.inference_mode()
def attention(q, k, v, scale, params: dict):
    """Causal attention by the prototype. q [B, Hq, N, D], k/v [B, Hkv, N, D] -> (out, lse)."""
    p = _defaults(params)
    batch, q_heads, n, dim = q.shape
    group = q_heads // k.shape[1]
    qs = q.float() * scale
    kf = k.float().repeat_interleave(group, 1)
    vf = v.float().repeat_interleave(group, 1)
    kmin, kmax = _block_bounds(kf, p["block"])  # [B, Hq, nb, D]
    nb = kmin.shape[-2]
    dev = q.device
    key_pos = torch.arange(n, device=dev)
    block_end = (torch.arange(nb, device=dev) + 1) * p["block"]  # one past each block's last key
    gen = torch.Generator(device="cpu").manual_seed(p["seed"])
    outs, lses = [], []
    for c0 in range(0, n, _CHUNK):
        c1 = min(c0 + _CHUNK, n)
        qc = qs[..., c0:c1, :]
        n_qb = math.ceil((c1 - c0) / p["qblock"])
        qb_start = c0 + torch.arange(n_qb, device=dev) * p["qblock"]  # [n_qb]
        if p["agg"] == "mean":
            qpad = torch.nn.functional.pad(qc, (0, 0, 0, n_qb * p["qblock"] - (c1 - c0)))
            qrep = qpad.view(batch, q_heads, n_qb, p["qblock"], dim).mean(-2)
            bound = qrep.clamp(min=0) @ kmax.transpose(-1, -2)
            bound = bound + qrep.clamp(max=0) @ kmin.transpose(-1, -2)
        else:
            bound = qc.clamp(min=0) @ kmax.transpose(-1, -2) + qc.clamp(max=0) @ kmin.transpose(
                -1, -2
            )  # [B, Hq, c, nb]
            bound = torch.nn.functional.pad(
                bound, (0, 0, 0, n_qb * p["qblock"] - (c1 - c0)), value=float("-inf")
            )
            bound = bound.view(batch, q_heads, n_qb, p["qblock"], nb).amax(-2)
        if p["share_gqa"]:
            bound = bound.view(batch, -1, group, n_qb, nb).amax(2, keepdim=True)
            bound = bound.expand(-1, -1, group, -1, -1).reshape(batch, q_heads, n_qb, nb)
        # the local part is block-aligned: keys from local_lo on (the last query of the block
        # sees about `window` keys); candidates are the blocks wholly before it, not wholly sinks
        local_lo = _local_lo(qb_start, p)  # [n_qb]
        cand = (block_end.unsqueeze(0) <= local_lo.unsqueeze(1)) & (
            block_end.unsqueeze(0) > p["sinks"]
        )  # [n_qb, nb]
        score = bound.masked_fill(~cand, float("-inf"))
        top = min(p["topk"], nb)
        chosen = torch.zeros_like(score, dtype=torch.bool)
        if top > 0:
            val, idx = score.topk(top, dim=-1)
            chosen.scatter_(-1, idx, torch.isfinite(val))
        chosen_keys = chosen.repeat_interleave(p["block"], -1)[..., :n]  # [B, Hq, n_qb, N]
        chosen_keys = chosen_keys.repeat_interleave(p["qblock"], -2)[..., : c1 - c0, :]
        q_pos = c0 + torch.arange(c1 - c0, device=dev)
        d = q_pos.unsqueeze(-1) - key_pos  # [c, N]
        lo = local_lo.repeat_interleave(p["qblock"])[: c1 - c0].unsqueeze(-1)  # [c, 1]
        keep = (d >= 0) & ((key_pos >= lo) | (key_pos < p["sinks"]) | chosen_keys)
        scores = (qc @ kf.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        out = torch.exp(scores - lse.unsqueeze(-1)) @ vf
        if p["samples"] > 0:
            out, lse = _add_samples(qc, kf, vf, keep, q_pos, p, gen, (out, lse), n_qb)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, -2).to(q.dtype)
    return out, torch.cat(lses, -1)


def _add_samples(qc, kf, vf, keep, q_pos, p, gen, exact, n_qb):
    """Uniform samples per (head, query block), weight n/m, outside the exact set and the past."""
    batch, heads, c, _ = qc.shape
    n, m = kf.shape[-2], p["samples"]
    idx = torch.randint(0, n, (batch, heads, n_qb, m), generator=gen).to(qc.device)
    idx_q = idx.repeat_interleave(p["qblock"], -2)[..., :c, :]  # [B, H, c, m]
    k_s = kf.gather(-2, idx.flatten(-2).unsqueeze(-1).expand(-1, -1, -1, kf.shape[-1]))
    v_s = vf.gather(-2, idx.flatten(-2).unsqueeze(-1).expand(-1, -1, -1, vf.shape[-1]))
    k_s = k_s.view(batch, heads, n_qb, m, -1).repeat_interleave(p["qblock"], 2)[:, :, :c]
    v_s = v_s.view(batch, heads, n_qb, m, -1).repeat_interleave(p["qblock"], 2)[:, :, :c]
    s = (qc.unsqueeze(-2) @ k_s.transpose(-1, -2)).squeeze(-2)  # [B, H, c, m]
    in_exact = keep.gather(-1, idx_q)
    ok = (idx_q <= q_pos.unsqueeze(-1)) & ~in_exact
    s = s.masked_fill(~ok, float("-inf")) + math.log(n / m)
    lse_s = torch.logsumexp(s, -1)
    out_s = (torch.exp(s - lse_s.unsqueeze(-1)).nan_to_num().unsqueeze(-2) @ v_s).squeeze(-2)
    lse = torch.logaddexp(exact[1], lse_s)
    w_exact = torch.exp(exact[1] - lse).unsqueeze(-1)
    w_s = torch.exp(lse_s - lse).nan_to_num().unsqueeze(-1)
    return w_exact * exact[0] + w_s * out_s, lse


def keys_per_query(params: dict, n: int) -> float:
    """Scores per query: window + sinks (once) + selected blocks in full + block bounds.

    A bound costs two dot products per key block (``relu(q) @ kmax + min(q, 0) @ kmin``); with
    ``agg="mean"`` it is paid once per query block, so per query it is divided by ``qblock``.
    """
    p = _defaults(params)
    q_pos = np.arange(n)
    qb_start = (q_pos // p["qblock"]) * p["qblock"]
    local_lo = _local_lo(qb_start, p)
    window = q_pos - local_lo + 1
    sinks = np.maximum(np.minimum(local_lo, p["sinks"]), 0)  # sinks before the local part
    n_blocks = math.ceil(n / p["block"])
    block_end = (np.arange(n_blocks) + 1) * p["block"]
    cand = (block_end[None, :] <= local_lo[:, None]) & (block_end[None, :] > p["sinks"])
    n_cand = cand.sum(1)
    chosen = np.minimum(n_cand, p["topk"]) * p["block"]
    past_blocks = q_pos // p["block"] + 1
    bounds = 2 * past_blocks / (p["qblock"] if p["agg"] == "mean" else 1)
    return float((window + sinks + chosen + bounds + p["samples"]).mean())
