"""Key padding proven from how the graph built the mask: rewritten only when the part read from
an input varies with the batch row and key alone (the op then takes the mask's last row).

Each program mixes a padding tensor into a causal (or no) mask; with a window over every key the
approximation is exact attention, so a right rewrite equals eager on rows that keep a key, and a
wrong "keys only" proof (a padding that varies with the query, or the head) gives another answer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hyperpass

COVERING = dict(min_len=32, window=4096, query_block=32, select_block=32, query_groups=4)
N = 96


def _tril(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def lengths_causal(q, k, v, lengths):
    n = q.shape[-2]
    keys = (torch.arange(n)[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keys & _tril(n))


def lengths_noncausal_float(q, k, v, lengths):
    n = q.shape[-2]
    keys = torch.arange(n)[None, None, None, :] < lengths[:, None, None, None]
    mask = torch.zeros(keys.shape).masked_fill(~keys, torch.finfo(torch.float32).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def gathered_left_padding(q, k, v, keep):
    n = q.shape[-2]
    b = torch.arange(q.shape[0])[:, None, None, None]
    kv = torch.arange(n)[None, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_tril(n) & keep.bool()[b, kv])


def query_padding(q, k, v, lengths):
    n = q.shape[-2]
    rows = (torch.arange(n)[:, None] < lengths[:, None, None])[:, None]  # varies with the query
    return F.scaled_dot_product_attention(q, k, v, attn_mask=rows & _tril(n) | (_tril(n) & False))


def per_head_padding(q, k, v, keep):
    n = q.shape[-2]
    heads = torch.stack([keep.bool(), keep.bool().roll(7, -1)], 1)[:, :, None, :]  # [B, 2, 1, N]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=heads & _tril(n))


def padding_plus_offset(q, k, v, lengths):
    n = q.shape[-2]
    shifted = lengths[:, None, None] + torch.arange(n)[None, :, None] // 2  # varies with query
    keys = (torch.arange(n)[None, None, :] < shifted)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keys & _tril(n))


def key_bias(q, k, v, bias):
    """A per-key float bias (not a padding: values other than 0 and -inf)."""
    b = torch.arange(q.shape[0])[:, None, None, None]
    kv = torch.arange(q.shape[-2])[None, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[b, kv])


def key_bias_where(q, k, v, keep):
    """where(keep, 0.5, -inf): a padding with a bias on the kept keys."""
    mask = torch.where(keep.bool()[:, None, None, :], 0.5, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _keep():
    keep = torch.ones(2, N, dtype=torch.long)
    keep[0, :11] = 0
    keep[1, -13:] = 0
    return keep


LENGTHS = torch.tensor([61, N])
CASES = {
    "lengths_causal": (lengths_causal, LENGTHS, ("rewritten", "causal+padding")),
    "lengths_noncausal_float": (lengths_noncausal_float, LENGTHS, ("rewritten", "padding")),
    "gathered_left_padding": (gathered_left_padding, _keep(), ("rewritten", "causal+padding")),
    "query_padding": (query_padding, LENGTHS, None),
    "per_head_padding": (per_head_padding, _keep(), None),
    "padding_plus_offset": (padding_plus_offset, LENGTHS, None),
    "key_bias": (key_bias, torch.randn(2, N), None),
    "key_bias_where": (key_bias_where, _keep(), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_key_padding_rewritten_only_when_proven(name):
    fn, padding, expect = CASES[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, N, 16, generator=gen) for _ in range(3))
    torch._dynamo.reset()
    be = hyperpass.backend(inner="aot_eager", **COVERING)
    got = torch.compile(fn, backend=be)(q, k, v, padding)
    want = fn(q, k, v, padding)
    (report,) = be.reports
    if expect is None:
        assert report.decision == "exact", report
        torch.testing.assert_close(got, want, equal_nan=True)
        return
    assert (report.code, report.mask) == expect
    rows = ~want.isnan().any(-1, keepdim=True)  # rows SDPA leaves without a key are NaN there
    torch.testing.assert_close(got[rows.expand_as(got)], want[rows.expand_as(want)])
