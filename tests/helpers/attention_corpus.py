"""A corpus of attention written the ways models write it, with what the pass must decide.

Each :class:`Case` builds a module and its inputs and lists, per attention site in graph order,
``(code, mask)``: ``code`` is ``"rewritten"`` or the reason code of an exact site, ``mask`` the
mask kind the pass must report. Lengths are small (N = 32 by default); tests use ``min_len=16``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

B, H, N, D = 2, 4, 32, 8


@dataclass
class Case:
    name: str
    module: nn.Module
    inputs: tuple
    expect: tuple  # per site: (code, mask kind)
    gqa: bool = False
    numeric: bool = True  # compare with eager (False: training dropout draws differently)
    tol: dict = field(default_factory=dict)  # assert_close tolerances (low precision cases)


def qkv(n_q=N, n_k=None, h=H, h_kv=None, d=D, dtype=torch.float32, batch=B, layout="bhnd"):
    n_k = n_q if n_k is None else n_k
    h_kv = h if h_kv is None else h_kv
    g = torch.Generator().manual_seed(n_q * 131 + n_k + h_kv)

    def t(heads, n):
        shape = (batch, heads, n, d) if layout == "bhnd" else (batch, n, heads, d)
        return torch.randn(shape, generator=g).to(dtype)

    return t(h, n_q), t(h_kv, n_k), t(h_kv, n_k)


def _causal_bool(n_q, n_k, device):
    """Hugging Face masking_utils' construction: arange comparisons broadcast by indexing."""
    q_idx = torch.arange(n_q, device=device)[None, None, :, None]
    kv_idx = torch.arange(n_k, device=device)[None, None, None, :]
    return q_idx.new_ones((), dtype=torch.bool) & (kv_idx <= q_idx)


class Fn(nn.Module):
    """A module around a function of the inputs, named for the report."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# ----------------------------------------------------------------------------- SDPA
def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal_kwarg(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_all_positional(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.3)


def sdpa_hf_bool_mask(q, k, v):
    mask = _causal_bool(q.shape[-2], k.shape[-2], q.device).expand(q.shape[0], -1, -1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)


def sdpa_tril_bool(q, k, v):
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, mask)


def sdpa_additive_triu(q, k, v):
    n = q.shape[-2]
    mask = torch.full((n, n), float("-inf"), device=q.device).triu(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_additive_where(q, k, v):
    """Hugging Face eager_mask: where(bool causal, 0, finfo.min)."""
    mask = _causal_bool(q.shape[-2], k.shape[-2], q.device)
    zero = torch.zeros((), device=q.device, dtype=q.dtype)
    mask = torch.where(mask, zero, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_padding(q, k, v, keep):
    mask = keep[:, None, None, :].bool()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_causal_and_padding(q, k, v, keep):
    """Hugging Face with an attention_mask: causal & padding[batch, kv]."""
    n = q.shape[-2]
    b_idx = torch.arange(q.shape[0], device=q.device)[:, None, None, None]
    kv_idx = torch.arange(n, device=q.device)[None, None, None, :]
    mask = _causal_bool(n, n, q.device) & keep.bool()[b_idx, kv_idx]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_upper_triangular(q, k, v):
    """Anti-causal (j >= i): must not be taken for causal."""
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] >= i[:, None])


def sdpa_sliding_window(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 8)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_shifted_causal(q, k, v):
    """Causal with an offset (tril(diagonal=1)): not SDPA's is_causal."""
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_scattered_mask(q, k, v):
    """A fixed scattered pattern (modular arithmetic) plus the diagonal."""
    i = torch.arange(q.shape[-2], device=q.device)
    mask = ((i[:, None] * 7 + i[None, :] * 3) % 5 != 0) | (i[:, None] == i[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def repeat_kv(x, n_rep):
    """Hugging Face's repeat_kv."""
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def sdpa_gqa_repeat_kv(q, k, v):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), is_causal=True)


def sdpa_gqa_repeat_interleave(q, k, v):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), torch.repeat_interleave(v, rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_enable_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_tiled_heads(q, k, v):
    """k.repeat(1, r, 1, 1) maps head h to h % H: rewritten, but not as GQA."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1))


class SdpaDropout(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)


# ----------------------------------------------------------------------------- hand-written
def hw_matmul_div(q, k, v):
    """Inductor's first shape: matmul, div by sqrt(d), softmax, matmul."""
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(q.shape[-1])).softmax(dim=-1) @ v


def hw_matmul_mul(q, k, v):
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
    return torch.softmax(scores, dim=-1).matmul(v)


class HwDropout(nn.Module):
    """softmax -> nn.Dropout -> @ v; the dropout is inactive in eval."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        w = F.softmax(q @ k.transpose(2, 3) / math.sqrt(q.shape[-1]), dim=-1)
        return self.drop(w) @ v


def hw_llama_eager(q, k, v):
    """Hugging Face eager_attention_forward: additive where-mask, fp32 softmax, repeat_kv."""
    rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    n_q, n_k = q.shape[-2], k.shape[-2]
    mask = torch.where(_causal_bool(n_q, n_k, q.device), 0.0, torch.finfo(q.dtype).min)
    w = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5)
    w = w + mask[:, :, :, :n_k]
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=0.0, training=False)
    return torch.matmul(w, v)


def hw_bert_permute(q, k, v):
    """BERT-style inputs [B, N, H, D] permuted inside, k permuted straight to [B, H, D, N]."""
    qp, kt, vp = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
    w = (torch.matmul(qp, kt) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    return torch.matmul(w, vp)


def hw_fp32_softmax_casts(q, k, v):
    """Inductor's half-precision shape: scores cast to fp32, weights cast back."""
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).to(torch.float32)
    w = torch.softmax(s, dim=-1).to(q.dtype)
    return w @ v.to(w.dtype)


def hw_prescaled_q(q, k, v):
    """DistilBERT: q divided by sqrt(d) before the product."""
    q = q / math.sqrt(q.shape[-1])
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def hw_prescaled_qk(q, k, v):
    """Both q and k scaled by d^-1/4."""
    s = q.shape[-1] ** -0.25
    return torch.softmax((q * s) @ (k * s).transpose(-2, -1), dim=-1) @ v


def hw_bmm_3d(q, k, v):
    """Inductor's bmm shape: [B*H, N, D], unscaled."""
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))
    w = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
    return torch.bmm(w, v).unflatten(0, (B, -1))


def hw_masked_fill_tril(q, k, v):
    """nanoGPT's mask, built in forward: masked_fill(tril == 0, -inf)."""
    n = q.shape[-2]
    tril = torch.tril(torch.ones(n, n, device=q.device))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(tril[None, None, :n, :n] == 0, float("-inf"))
    return F.softmax(att, dim=-1) @ v


class HwNanoGptBuffer(nn.Module):
    """nanoGPT with its tril kept in a buffer: a graph input whose data the pass cannot trust."""

    def __init__(self, n_max=64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n_max, n_max)).view(1, 1, n_max, n_max))

    def forward(self, q, k, v):
        n = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :n, :n] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


def hw_gpt2_where(q, k, v):
    """GPT-2 / Inductor: div by torch.full([], c), where(causal, scores, finfo.min)."""
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None, None]
    w = torch.matmul(q, k.permute(0, 1, 3, 2))
    w = w.div(torch.full([], math.sqrt(q.shape[-1]), dtype=w.dtype, device=w.device))
    w = torch.where(causal, w, torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype))
    return F.dropout(w.softmax(dim=-1).type(v.dtype), 0.0).matmul(v)


def hw_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def hw_t5_unscaled(q, k, v):
    """T5: no scale, fp32 softmax, type_as back."""
    s = torch.matmul(q, k.transpose(3, 2))
    return torch.matmul(s.float().softmax(dim=-1).type_as(s), v)


def hw_t5_position_bias(q, k, v, bias):
    """T5 with an input position bias: an additive mask from data."""
    s = torch.matmul(q, k.transpose(3, 2)) + bias
    return torch.matmul(s.float().softmax(dim=-1).type_as(s), v)


def hw_mqa_broadcast(q, k, v):
    """Multi-query attention by broadcasting: one KV head [B, 1, N, D] for all query heads."""
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def hw_returns_weights(q, k, v):
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v, w


def hw_k_pretransposed(q, kt, v):
    """k handed over already as [B, H, D, N]."""
    return torch.softmax(torch.matmul(q, kt) * q.shape[-1] ** -0.5, dim=-1) @ v


def hw_distilbert_padding(q, k, v, keep):
    """DistilBERT: masked_fill((mask == 0).view(bs, 1, 1, k).expand_as(scores), -inf)."""
    s = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)
    fill = torch.full((), -float("inf"), dtype=q.dtype)
    m = (keep == 0).view(q.shape[0], 1, 1, k.shape[-2]).expand_as(s)
    return torch.softmax(s.masked_fill(m, fill), dim=-1) @ v


def hw_cross_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _keep(n=N):
    keep = torch.ones(B, n, dtype=torch.long)
    keep[1, -5:] = 0
    return keep


def corpus() -> list[Case]:
    """Every case; fresh modules and inputs on each call."""
    rw = "rewritten"
    kt = qkv()
    cases = [
        Case("sdpa_plain", Fn(sdpa_plain), qkv(), ((rw, "none"),)),
        Case("sdpa_causal_kwarg", Fn(sdpa_causal_kwarg), qkv(), ((rw, "none"),)),
        Case("sdpa_all_positional", Fn(sdpa_all_positional), qkv(), ((rw, "none"),)),
        Case("sdpa_hf_bool_mask", Fn(sdpa_hf_bool_mask), qkv(), ((rw, "causal"),)),
        Case("sdpa_tril_bool", Fn(sdpa_tril_bool), qkv(), ((rw, "causal"),)),
        Case("sdpa_additive_triu", Fn(sdpa_additive_triu), qkv(), ((rw, "causal"),)),
        Case("sdpa_additive_where", Fn(sdpa_additive_where), qkv(), ((rw, "causal"),)),
        Case("sdpa_padding", Fn(sdpa_padding), (*qkv(), _keep()), (("mask:padding", "padding"),)),
        Case(
            "sdpa_causal_and_padding",
            Fn(sdpa_causal_and_padding),
            (*qkv(), _keep()),
            (("mask:causal+padding", "causal+padding"),),
        ),
        Case(
            "sdpa_upper_triangular",
            Fn(sdpa_upper_triangular),
            qkv(),
            (("mask:arbitrary", "arbitrary"),),
        ),
        Case(
            "sdpa_sliding_window",
            Fn(sdpa_sliding_window),
            qkv(),
            (("mask:sliding-window", "sliding-window"),),
        ),
        Case(
            "sdpa_shifted_causal",
            Fn(sdpa_shifted_causal),
            qkv(),
            (("mask:arbitrary", "arbitrary"),),
        ),
        Case(
            "sdpa_scattered_mask",
            Fn(sdpa_scattered_mask),
            qkv(),
            (("mask:arbitrary", "arbitrary"),),
        ),
        Case("sdpa_gqa_repeat_kv", Fn(sdpa_gqa_repeat_kv), qkv(h_kv=2), ((rw, "none"),), gqa=True),
        Case(
            "sdpa_gqa_repeat_interleave",
            Fn(sdpa_gqa_repeat_interleave),
            qkv(h_kv=2),
            ((rw, "none"),),
            gqa=True,
        ),
        Case("sdpa_enable_gqa", Fn(sdpa_enable_gqa), qkv(h_kv=1), ((rw, "none"),), gqa=True),
        Case("sdpa_tiled_heads", Fn(sdpa_tiled_heads), qkv(h_kv=2), ((rw, "none"),)),
        Case("sdpa_cross_attention", Fn(sdpa_plain), qkv(n_q=32, n_k=48), ((rw, "none"),)),
        Case("sdpa_decode", Fn(sdpa_plain), qkv(n_q=1, n_k=48), (("decode", "none"),)),
        Case("sdpa_short", Fn(sdpa_causal_kwarg), qkv(n_q=8), (("short", "none"),)),
        Case(
            "sdpa_dropout_training",
            SdpaDropout().train(),
            qkv(),
            (("dropout", "none"),),
            numeric=False,
        ),
        # hand-written
        Case("hw_matmul_div", Fn(hw_matmul_div), qkv(), ((rw, "none"),)),
        Case("hw_matmul_mul", Fn(hw_matmul_mul), qkv(), ((rw, "none"),)),
        Case("hw_dropout_eval", HwDropout().eval(), qkv(), ((rw, "none"),)),
        Case(
            "hw_dropout_training", HwDropout().train(), qkv(), (("dropout", "none"),), numeric=False
        ),
        Case("hw_llama_eager", Fn(hw_llama_eager), qkv(h_kv=2), ((rw, "causal"),), gqa=True),
        Case("hw_bert_permute", Fn(hw_bert_permute), qkv(layout="bnhd"), ((rw, "none"),)),
        Case(
            "hw_fp32_softmax_casts",
            Fn(hw_fp32_softmax_casts),
            qkv(dtype=torch.bfloat16),
            ((rw, "none"),),
            tol={"atol": 2e-2, "rtol": 2e-2},
        ),
        Case("hw_prescaled_q", Fn(hw_prescaled_q), qkv(), ((rw, "none"),)),
        Case("hw_prescaled_qk", Fn(hw_prescaled_qk), qkv(), ((rw, "none"),)),
        Case("hw_bmm_3d", Fn(hw_bmm_3d), qkv(), ((rw, "none"),)),
        Case("hw_masked_fill_tril", Fn(hw_masked_fill_tril), qkv(), ((rw, "causal"),)),
        Case("hw_nanogpt_buffer", HwNanoGptBuffer(), qkv(), (("mask:arbitrary", "arbitrary"),)),
        Case("hw_gpt2_where", Fn(hw_gpt2_where), qkv(), ((rw, "causal"),)),
        Case("hw_einsum", Fn(hw_einsum), qkv(), ((rw, "none"),)),
        Case("hw_t5_unscaled", Fn(hw_t5_unscaled), qkv(), ((rw, "none"),)),
        Case(
            "hw_t5_position_bias",
            Fn(hw_t5_position_bias),
            (*qkv(), torch.randn(1, H, N, N)),
            (("mask:padding", "padding"),),
        ),
        Case("hw_mqa_broadcast", Fn(hw_mqa_broadcast), qkv(h_kv=1), ((rw, "none"),), gqa=True),
        Case("hw_returns_weights", Fn(hw_returns_weights), qkv(), (("weights_used", "none"),)),
        Case(
            "hw_k_pretransposed",
            Fn(hw_k_pretransposed),
            (kt[0], kt[1].transpose(-2, -1).contiguous(), kt[2]),
            ((rw, "none"),),
        ),
        Case(
            "hw_distilbert_padding",
            Fn(hw_distilbert_padding),
            (*qkv(), _keep()),
            (("mask:padding", "padding"),),
        ),
        Case("hw_cross_attention", Fn(hw_cross_attention), qkv(n_q=32, n_k=48), ((rw, "none"),)),
        Case("hw_decode", Fn(hw_cross_attention), qkv(n_q=1, n_k=48), (("decode", "none"),)),
    ]
    return cases
