"""Masks edited in place after they were built: never read as they were before the edit.

Each program builds a mask the classifier could prove (causal, no mask), then edits it in place
(or edits something it was computed from, or edits it through a view). With parameters that make
the approximation exact (a window covering every key), a site wrongly rewritten as plain causal
gives another answer than eager; a right pass keeps it exact and says why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hyperpass

COVERING = dict(min_len=128, window=4096, query_block=32, select_block=32, query_groups=4)


def _tril(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def setitem_column(q, k, v):
    m = _tril(q.shape[-2])
    m[:, 0] = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def masked_fill_inplace(q, k, v):
    n = q.shape[-2]
    m = _tril(n)
    m.masked_fill_(torch.arange(n) % 7 == 0, False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def tril_inplace(q, k, v):
    m = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool)
    m.tril_(-1)
    m[:, 0] = True  # every row keeps a key
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def logical_and_inplace(q, k, v):
    n = q.shape[-2]
    m = _tril(n)
    m.logical_and_(torch.arange(n) > 3)
    m[:, 0] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def augmented_and(q, k, v):
    n = q.shape[-2]
    m = _tril(n)
    m &= torch.arange(n) != 5
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def float_mask_add_inplace(q, k, v):
    n = q.shape[-2]
    m = torch.zeros(n, n).masked_fill(~_tril(n), float("-inf"))
    m.add_(torch.where(torch.arange(n) == 5, float("-inf"), 0.0))
    m[:, 0] = 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def edit_through_a_view(q, k, v):
    m = _tril(q.shape[-2])
    m[:, :3].zero_()
    m[:, 0] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def edit_an_ingredient(q, k, v):
    n = q.shape[-2]
    pos = torch.arange(n)
    pos[:4] = 0  # the positions the causal comparison reads
    m = pos[None, :] <= torch.arange(n)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def padding_with_ones(q, k, v):
    m = torch.ones(q.shape[0], 1, 1, k.shape[-2], dtype=torch.bool)
    m[..., -7:] = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


PROGRAMS = [
    setitem_column, masked_fill_inplace, tril_inplace, logical_and_inplace, augmented_and,
    float_mask_add_inplace, edit_through_a_view, edit_an_ingredient, padding_with_ones,
]  # fmt: skip


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.__name__ for p in PROGRAMS])
def test_edited_masks_are_never_read_as_built(program):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 320, 16, generator=gen) for _ in range(3))
    be = hyperpass.backend(inner="aot_eager", **COVERING)
    got = torch.compile(program, backend=be, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, program(q, k, v), atol=1e-5, rtol=1e-5)
    (report,) = be.reports
    assert not report.rewritten and "edited in place" in report.reason


def test_an_unedited_causal_mask_is_still_rewritten():
    torch._dynamo.reset()

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_tril(q.shape[-2]))

    q, k, v = (torch.randn(2, 4, 320, 16) for _ in range(3))
    be = hyperpass.backend(inner="aot_eager", **COVERING)
    got = torch.compile(causal, backend=be, fullgraph=True)(q, k, v)
    assert [r.rewritten for r in be.reports] == [True]
    torch.testing.assert_close(got, causal(q, k, v), atol=1e-5, rtol=1e-5)


class BufferMaskAttention(torch.nn.Module):
    """nanoGPT's attention: a causal ``bias`` buffer sliced to the sequence; the buffer is then
    edited between calls, which no recompilation follows."""

    def __init__(self, n_max=256):
        super().__init__()
        self.register_buffer("bias", torch.ones(n_max, n_max).tril().view(1, 1, n_max, n_max))

    def forward(self, q, k, v):
        n = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        att = att.masked_fill(self.bias[:, :, :n, :n] == 0, float("-inf"))
        return att.softmax(-1) @ v


def test_causal_buffer_mask_stays_exact_and_says_why():
    model = BufferMaskAttention()
    q, k, v = (torch.randn(2, 4, 200, 16, generator=torch.Generator().manual_seed(i))
               for i in range(3))  # fmt: skip
    be = hyperpass.backend(inner="aot_eager", **COVERING)
    compiled = torch.compile(model, backend=be)
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v))
    assert [r.code for r in be.reports] == ["mask:arbitrary"]
    assert "module state" in be.reports[0].reason
    with torch.no_grad():
        model.bias[..., 0] = 0  # no key 0 any more: a rewrite read at compile time would be wrong
        model.bias[..., 0, 0] = 1
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v))
