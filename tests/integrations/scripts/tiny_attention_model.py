"""A plain script that knows nothing of hyperpass: builds a tiny attention model, runs it, and
writes the output (and the calling thread's module count) to the file named by its argument."""

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(b, n, d))


class TinyModel(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyModel().eval()
    x = torch.randn(1, args.seq, 32)
    if args.compile:
        model = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        y = model(x)
    torch.save(y, args.out)
    print(f"wrote {args.out}")
    sys.exit(args.exit_code)


if __name__ == "__main__":
    main()
