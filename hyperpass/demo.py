"""A short demo: a small causal transformer compiled through hyperpass.

    python -m hyperpass.demo [--seq-len 8192] [--min-len 2048] [--inner aot_eager]

It builds a 4-layer model whose attention is written two ways (an ``F.scaled_dot_product_attention``
call and a hand-written matmul-softmax-matmul), prints what the compiler pass does at each site,
then runs the model at a length below ``min_len`` and at one above, and prints the wall time and the
error of the output against the un-rewritten model. Runs on the CPU (the reference) or on a GPU.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import hyperpass


class Attention(nn.Module):
    """Causal self-attention with 3 query heads per KV head; ``hand_written`` picks the form."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hand_written: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.hand_written = hand_written

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if self.hand_written:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            y = scores.softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class TinyTransformer(nn.Module):
    def __init__(self, dim=192, heads=3, kv_heads=1, layers=4, vocab=1000):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            Attention(dim, heads, kv_heads, hand_written=i % 2 == 1) for i in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for norm, attn in zip(self.norms, self.layers, strict=True):
            x = x + attn(norm(x))
        return self.head(x)


def _timed(fn, *args):
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(*args)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--min-len", type=int, default=2048)
    parser.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = TinyTransformer().to(device).eval()
    params = {"min_len": args.min_len}  # everything else: the defaults (docs/quality.md)
    short = torch.randint(0, 1000, (1, args.min_len // 2), device=device)
    long = torch.randint(0, 1000, (1, args.seq_len), device=device)

    print(f"hyperpass demo on {device}: 4 attention layers (2 SDPA, 2 hand-written), GQA 3:1\n")
    print("What the compiler pass does with each attention site (sequence length symbolic):")
    hyperpass.explain(model, long, dynamic=True, **params)

    compiled = torch.compile(
        model, backend=hyperpass.backend(inner=args.inner, **params), dynamic=True
    )
    plain = torch.compile(model, backend=args.inner, dynamic=True)  # the same compiler, no pass
    print(f"\n{'tokens':>8} {'path':<34} {'exact s':>8} {'hyperpass s':>11} {'rel. error':>10}")
    for tokens in (short, long):
        n = tokens.shape[1]
        _timed(plain, tokens)  # both timed warm: the first call compiles
        exact, t_exact = _timed(plain, tokens)
        _timed(compiled, tokens)
        approx, t_approx = _timed(compiled, tokens)
        err = ((approx - exact).norm() / exact.norm()).item()
        path = (
            "exact SDPA (below min_len)" if n < args.min_len else "hyper_attention (approximated)"
        )
        print(f"{n:>8} {path:<34} {t_exact:>8.2f} {t_approx:>11.2f} {err:>10.2e}")
    print(
        "\nBoth columns are warm calls of the same compiler, with and without the rewrite. The"
        "\nmodel is random, so the error says how far the approximation moves the logits;"
        "\ndocs/quality.md measures quality on a real language model. On a CPU the op runs the"
        "\nplain-PyTorch reference, which is slower than exact attention: with the default"
        "\nmin_len=0 a CPU stays exact (this demo sets --min-len to show the approximation). On a"
        "\nGPU the kernels run (docs/performance.md)."
    )


if __name__ == "__main__":
    main()
