"""sortLSH and the seeded random draws, shared by the reference and the CUDA kernels' launcher.

Both paths take their hyperplanes and sample indices from here, so for one seed they hash and
sample identically. Drawn on the CPU, then moved, so the draw does not depend on the device.
Imports only torch.
"""

from __future__ import annotations

import math

import torch

_MIX = 0x9E3779B1  # golden-ratio constant: spreads nearby seeds/tags over the 63-bit seed space


def hyperplanes(head_dim: int, num_projs: int, seed: int, device) -> torch.Tensor:
    """[head_dim, num_projs] Gaussian hyperplanes (fp32), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, num_projs, generator=gen).to(device)


def gray_rank(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Position of each code along the binary-reflected Gray code sequence.

    The i-th bucket of the sequence has code ``i ^ (i >> 1)``, so buckets with adjacent ranks
    differ in exactly one sign bit. The rank of a code is therefore the *inverse* Gray transform
    (prefix XOR of its bits from the top); applying the forward transform instead (as the published
    code does) puts buckets that differ in several bits next to each other.
    """
    rank = codes.clone()
    shift = 1
    while shift < num_bits:
        rank ^= rank >> shift
        shift *= 2
    return rank


def lsh_ranks(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Gray-code bucket rank (int64) of every row of ``x`` [..., N, D] -> [..., N]."""
    bits = (x.float() @ planes.float()) > 0
    weights = 2 ** torch.arange(planes.shape[1], device=x.device)
    codes = (bits.long() * weights).sum(-1)
    return gray_rank(codes, planes.shape[1])


def sort_by_rank(ranks: torch.Tensor) -> torch.Tensor:
    """Stable argsort along the last dim: ties keep sequence order."""
    return torch.sort(ranks, dim=-1, stable=True).indices


def sample_indices(seed: int, tag: int, shape: tuple[int, ...], high: int, device) -> torch.Tensor:
    """Uniform key indices in [0, high), with replacement, for the sub-problem named by ``tag``."""
    gen = torch.Generator().manual_seed((seed * _MIX + tag) % (2**63))
    return torch.randint(0, high, shape, generator=gen).to(device)


def subproblem_tag(q_offset: int, k_offset: int) -> int:
    """A distinct sampling stream per (query range, key range) of the causal recursion."""
    return (q_offset * _MIX) ^ (k_offset + 1)


def lsh_block_shape(nq: int, nk: int, block_size: int) -> tuple[int, int, int]:
    """(queries per block, number of query blocks, number of key blocks).

    Key blocks hold ``block_size`` sorted keys; query blocks hold ``block_size * nq / nk`` sorted
    queries (rounded up), so the j-th query block and the j-th key block cover the same quantiles
    of the two sorted orders. Query block j attends to key block ``min(j, key_blocks - 1)``.
    """
    q_per_block = max(1, math.ceil(block_size * nq / nk))
    return q_per_block, math.ceil(nq / q_per_block), math.ceil(nk / block_size)
