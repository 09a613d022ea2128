"""The Triton kernels against the reference, on the CPU through Triton's interpreter.

Sizes are tiny (the interpreter runs every program in numpy) but cover every path: non-causal
(also Nq != Nk), causal recursive (several levels, leaves not aligned to tiles), causal flat, GQA
group 3, head dims 64 and 128, odd lengths, no samples, fp32 and fp16 (the interpreter cannot do
bf16 dots; bf16 is checked on the GPU by tools/gpu_check.py).

Harness (tolerance, inputs, small tiles): ``tests/kernels/harness.py``; every new tensor is
poisoned (NaN, or a huge int: ``conftest.py``), so anything the kernels forget to write fails.
"""

from __future__ import annotations

import pytest
import torch

from hyperpass import kernels
from hyperpass.kernels.hyper import launch
from hyperpass.kernels.tuning import Tuning
from hyperpass.op.eligibility import skip_reason
from hyperpass.reference import lsh
from tests.kernels.harness import SMALL, SMALL_TILES, check, inputs


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    "nq,nk",
    [(83, 83), (40, 130), (130, 40)],
    ids=["n83", "nq40-nk130", "nq130-nk40"],
)
def test_noncausal_gqa3(nq, nk):
    check(*inputs(1, 3, 1, nq, nk, 64, torch.float32), is_causal=False, cfg=SMALL)


def test_noncausal_batch2_no_samples():
    cfg = SMALL.replace(sample_size=0)
    check(*inputs(2, 2, 2, 70, 70, 64, torch.float32), is_causal=False, cfg=cfg)


def test_causal_recursive_gqa3():
    # 150 -> 75 | 75 -> 37/38 -> leaves of 18..19: three levels, leaves cut across tiles
    check(*inputs(1, 3, 1, 150, 150, 64, torch.float32), is_causal=True, cfg=SMALL)


def test_causal_recursive_exact_only():
    # shorter than min_seq_len: one exact causal leaf, no approximated level
    check(*inputs(1, 2, 2, 29, 29, 64, torch.float32), is_causal=True, cfg=SMALL)


def test_causal_flat_gqa3():
    cfg = SMALL.replace(causal_algo="flat")
    check(*inputs(1, 3, 1, 90, 90, 64, torch.float32), is_causal=True, cfg=cfg)


@pytest.mark.parametrize("is_causal", [False, True], ids=["noncausal", "causal"])
def test_head_dim_128(is_causal):
    check(*inputs(1, 2, 1, 70, 70, 128, torch.float32), is_causal=is_causal, cfg=SMALL)


@pytest.mark.parametrize("algo", ["recursive", "flat"])
def test_fp16(algo):
    cfg = SMALL.replace(causal_algo=algo)
    check(*inputs(1, 2, 2, 75, 75, 64, torch.float16), is_causal=True, cfg=cfg)


def test_fp16_noncausal_forward():
    check(*inputs(1, 3, 1, 75, 75, 64, torch.float16), is_causal=False, cfg=SMALL, backward=False)


@pytest.mark.parametrize("n,is_causal", [(128, False), (83, False), (90, True)])
def test_one_level_forward_split_tiles(n, is_causal):
    """A one-level forward may run several programs per tile of the plan
    (``Tuning.one_level_fwd_rows``): same rows, same values as one program per tile."""
    cfg = SMALL.replace(causal_algo="flat")
    q, k, v, grad = inputs(1, 3, 1, n, n, 64, torch.float32)
    kw = dict(is_causal=is_causal, scale=None, config=cfg)
    tiles = Tuning(block_m=32, block_n=16, bwd_block_m=16)
    whole = kernels.hyper_attention_forward(q, k, v, **kw, tuning=tiles)
    split = Tuning(block_m=32, block_n=16, bwd_block_m=16, one_level_fwd_rows=16)
    parts = kernels.hyper_attention_forward(q, k, v, **kw, tuning=split)
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    check(q, k, v, grad, is_causal=is_causal, cfg=cfg, backward=False)
    with pytest.raises(ValueError, match="one_level_fwd_rows"):
        Tuning(block_m=32, one_level_fwd_rows=24)


@pytest.mark.parametrize(
    "is_causal,algo,window",
    [(False, "recursive", 0), (True, "recursive", 0), (True, "flat", 0), (False, "recursive", 5)],
    ids=["noncausal", "causal-recursive", "causal-flat", "noncausal-window"],
)
def test_even_tiles_run_unmasked(is_causal, algo, window):
    """Lengths that fill every tile, key step and sample step take the kernels' unmasked path
    (``Level.even``); the odd lengths of the other tests take the masked one."""
    _setup = launch._setup

    cfg = SMALL.replace(causal_algo=algo, window=window)
    q, k, v, grad = inputs(2, 4, 2, 128, 128, 64, torch.float32)
    call = _setup(q, k, v, is_causal, None, cfg, backward=False, tuning=SMALL_TILES)
    assert call.plan.levels and all(call.even(level) for level in call.plan.levels)
    check(q, k, v, grad, is_causal=is_causal, cfg=cfg)


@pytest.mark.parametrize(
    "is_causal,change,shape",
    [
        (True, dict(), (2, 4, 2, 80, 80, 64)),
        (False, dict(window=12, sinks=3), (1, 4, 4, 70, 90, 64)),
    ],
    ids=["causal-recursive-batch2-gqa2", "noncausal-window-sinks"],
)  # fmt: skip
def test_head_groups_change_nothing(is_causal, change, shape, monkeypatch):
    """Where backward launches accumulate in fp32, heads run in groups that bound the scratch
    memory: one KV head per group gives bit-identical gradients, correct vs the oracle."""
    attention = launch

    cfg = SMALL.replace(**change)
    q, k, v, grad = inputs(*shape, torch.float32)
    kw = dict(is_causal=is_causal, scale=None, config=cfg, tuning=SMALL_TILES)
    whole = kernels.hyper_attention_forward(q, k, v, **kw)
    whole += kernels.hyper_attention_backward(grad, q, k, v, **kw)
    monkeypatch.setattr(attention, "GROUP_BUDGET", 1e-9)
    assert len(attention.head_groups(q, k, v, is_causal, cfg)) == shape[2]
    grouped = kernels.hyper_attention_forward(q, k, v, **kw)
    grouped += kernels.hyper_attention_backward(grad, q, k, v, **kw)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], whole, grouped, strict=True):
        assert torch.equal(a, b), name
    check(q, k, v, grad, is_causal=is_causal, cfg=cfg)


def test_head_groups_only_where_launches_accumulate():
    head_groups = launch.head_groups

    q, k, v, _ = inputs(1, 8, 8, 64, 64, 64, torch.float32)
    big = SMALL.replace(min_seq_len=16)  # recursive: fp32 accumulators
    assert len(head_groups(q, k, v, False, SMALL)) == 1  # one writer per row
    assert len(head_groups(q, k, v, True, SMALL.replace(causal_algo="flat"))) == 1
    groups = head_groups(q, k, v, True, big)
    assert len(groups) > 1  # recursive: the backward's fp32 scratch exceeds the budget
    # the groups cover every KV head once, each with its own query heads
    assert [h for kv, _ in groups for h in range(8)[kv]] == list(range(8))
    assert all(range(8)[qh] == range(8)[kv] for kv, qh in groups)  # group of 1 query head


# ----------------------------------------------------------------------------- pieces
def test_ranks_match_lsh():
    from hyperpass.kernels.hyper.hashing import lsh_rank

    x = torch.randn(2, 3, 77, 64)
    planes = lsh.hyperplanes(64, 7, seed=3, device="cpu")
    expected = lsh.lsh_ranks(x * 0.5, planes)
    assert torch.equal(lsh_rank(x, planes, 0.5).long(), expected)


@pytest.mark.parametrize(
    "change,causal",
    [
        (dict(window=8), False),
        (dict(sinks=4), True),
        (dict(method="local", window=8), True),
        (dict(method="longformer", window=8, sinks=2, dilation=3), False),
    ],
)
def test_pattern_configs_served(change, causal):
    """Window, dilation, sinks and the pattern-only methods run in the kernels
    (numerics: tests/kernels/test_pattern_kernels.py)."""
    q, k, v, _ = inputs(1, 1, 1, 8, 8, 64, torch.float32)
    assert kernels.unsupported_reason(q, k, v, causal, SMALL.replace(**change)) is None


def test_unsupported_shapes():
    """Shapes no method serves stay exact by the op's rule; the kernels' own limits on top."""
    q, k, v, _ = inputs(1, 2, 1, 8, 12, 64, torch.float32)
    cfg = SMALL.replace(min_len=1)
    assert skip_reason(q, k, v, None, 0.0, True, True, cfg).code == "decode"
    assert "dtype" in kernels.unsupported_reason(q.double(), k.double(), v.double(), False, SMALL)
    q3, k3, v3, _ = inputs(1, 3, 2, 8, 8, 64, torch.float32)
    assert skip_reason(q3, k3, v3, None, 0.0, False, True, cfg).code == "heads"
    q8, k8, v8, _ = inputs(1, 1, 1, 8, 8, 8, torch.float32)
    assert "head dims" in kernels.unsupported_reason(q8, k8, v8, False, SMALL)


@pytest.mark.parametrize(
    "causal,change",
    [(False, {}), (True, {}), (False, dict(window=4, sinks=2))],
    ids=["one-level", "recursive", "one-level-pattern"],
)
def test_forward_without_lse(causal, change):
    """with_lse=False (the op's forward) returns no lse and the same output, bit for bit."""
    q, k, v, _ = inputs(1, 2, 1, 70, 70, 64, torch.float32)
    cfg = SMALL.replace(**change)
    kw = dict(is_causal=causal, scale=None, config=cfg, tuning=SMALL_TILES)
    out, lse = kernels.hyper_attention_forward(q, k, v, **kw)
    alone, none = kernels.hyper_attention_forward(q, k, v, **kw, with_lse=False)
    assert none is None and lse is not None and torch.equal(out, alone)


@pytest.mark.parametrize("num_projs", [3, 9], ids=["counting-sort", "torch-sort"])
@pytest.mark.parametrize("causal", [False, True], ids=["one-level", "recursive"])
def test_forward_releases_sorts(causal, num_projs):
    """The forward lets each level's sort go once its orders are read (and every sort after
    the last level): the same output, bit for bit, as a forward that keeps them all."""
    attention = launch

    q, k, v, _ = inputs(1, 2, 1, 90, 90, 64, torch.float32)
    cfg = SMALL.replace(lsh_num_projs=num_projs)
    call = attention._setup(q, k, v, causal, None, cfg, backward=False, tuning=SMALL_TILES)
    levels = len(call.plan.levels)
    assert levels == (2 if causal else 1)  # a recursion deep enough to release mid-way
    kept, _ = attention._forward(call, release_sorts=False)
    assert call.sorts  # nothing released
    released, _ = kernels.hyper_attention_forward(
        q, k, v, is_causal=causal, scale=None, config=cfg, tuning=SMALL_TILES
    )
    assert torch.equal(released, kept)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "recursive"])
def test_more_hyperplanes_than_counting_sort(causal):
    """Beyond 8 hyperplanes torch.sort orders the rows, and the samples' block ids come from
    its inverse (``TorchSort``): forward and backward against the reference."""
    cfg = SMALL.replace(lsh_num_projs=9)
    check(*inputs(1, 2, 1, 90, 90, 64, torch.float32), is_causal=causal, cfg=cfg)


@pytest.mark.parametrize("n_segments", [3, 300], ids=["int16-keys", "int32-keys"])
def test_sort_levels_segments(n_segments):
    from hyperpass.kernels.hyper.hashing import sort_levels

    n, r = 600, 7
    ranks = torch.randint(0, 2**r, (2, 3, n), dtype=torch.int32)
    segments = (torch.arange(n) * n_segments // n).to(torch.int32).unsqueeze(0)
    order, inverse = sort_levels(ranks, segments, r, inverse=True, n_segments=n_segments)
    for b in range(2):
        for h in range(3):
            pairs = sorted(range(n), key=lambda i: (int(segments[0, i]), int(ranks[b, h, i]), i))
            assert order[0, b, h].tolist() == pairs
    positions = torch.arange(n, dtype=torch.int32).expand(2, 3, n)
    assert torch.equal(inverse[0].gather(-1, order[0].long()), positions)


@pytest.mark.parametrize(
    "num_projs,chunk,edges",
    [
        (7, 1024, None),
        (3, 16, None),
        (
            8,
            16,
            ((0, 300, 601), (0, 150, 300, 451, 601), (0, 75, 150, 225, 300, 375, 451, 526, 601)),
        ),
        (5, 64, ((0, 601),)),
    ],
    ids=["one-chunk", "chunks", "levels-odd-bounds", "one-level"],
)
def test_counting_sort_matches_torch_sort(num_projs, chunk, edges):
    """The counting sort orders every level exactly as a stable sort by (segment, rank)."""
    from hyperpass.kernels.hyper.hashing import CountingSort

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 601, 32, generator=gen)
    planes = lsh.hyperplanes(32, num_projs, 0, "cpu")
    levels = 1 if edges is None else len(edges)
    for keep_levels in (False, True):
        sorter = CountingSort(((x, 0.5),), planes, edges, True, keep_levels, chunk)
        # the last level first: every level is right whichever scatter sorts the chunks
        by_level = {level: sorter.level(level)[0] for level in reversed(range(levels))}
        order = torch.stack([by_level[level][0] for level in range(levels)])
        inverse = torch.stack([by_level[level][1] for level in range(levels)])
        _check_sorted(x, planes, num_projs, edges, order, inverse)


@pytest.mark.parametrize("scale", [0.5, -1.0])
@pytest.mark.parametrize("dim,num_projs", [(64, 7), (80, 8), (16, 3)])
def test_ranks_of_16bit_rows(dim, num_projs, scale):
    """fp16/bf16 rows are projected by tensor-core dots on the planes split into three 16-bit
    parts: the ranks of ``x * scale`` are still the reference's (a negative scale flips every
    sign; head dims that are not a power of two pad the dot)."""
    from hyperpass.kernels.hyper.hashing import CountingSort

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 301, dim, generator=gen).to(torch.float16)
    planes = lsh.hyperplanes(dim, num_projs, 2, "cpu")
    ranks = CountingSort(((x, scale),), planes, None, chunk=64).ranks
    expected = lsh.lsh_ranks(x.float() * scale, planes)
    assert torch.equal(ranks.view(3, 301).long(), expected.view(3, 301))


@pytest.mark.parametrize("keep_levels", [False, True])
def test_counting_sort_of_two_parts(keep_levels):
    """Q and K sorted in the same launches (GQA head counts, K a strided view): each part's
    orders are its own sort's, the inverses only the last part's."""
    from hyperpass.kernels.hyper.hashing import CountingSort

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 301, 32, generator=gen)
    k = torch.randn(2, 301, 2, 32, generator=gen).transpose(1, 2)  # [B, H, N, D], strided
    planes = lsh.hyperplanes(32, 6, 0, "cpu")
    edges = ((0, 150, 301), (0, 75, 150, 225, 301))
    joint = CountingSort(((q, 0.5), (k, 0.5)), planes, edges, True, keep_levels, chunk=64)
    alone = [
        CountingSort(((q, 0.5),), planes, edges, False, keep_levels, chunk=64),
        CountingSort(((k, 0.5),), planes, edges, True, keep_levels, chunk=64),
    ]
    for level in (1, 0):
        (q_order, q_inverse), (k_order, k_inverse) = joint.level(level)
        (q_alone, _), (k_alone, k_inverse_alone) = [s.level(level)[0] for s in alone]
        assert q_inverse is None and q_order.shape == (2, 4, 301)
        assert torch.equal(q_order, q_alone)
        assert torch.equal(k_order, k_alone) and torch.equal(k_inverse, k_inverse_alone)
    orders = torch.stack([joint.level(lv)[1][0] for lv in range(2)])
    inverses = torch.stack([joint.level(lv)[1][1] for lv in range(2)])
    _check_sorted(k, planes, 6, edges, orders, inverses)


def _check_sorted(x, planes, num_projs, edges, order, inverse):
    from hyperpass.kernels.hyper.hashing import lsh_rank, sort_levels

    segments = None
    if edges is not None:
        positions = torch.arange(x.shape[2])
        segments = torch.stack(
            [torch.searchsorted(torch.tensor(e), positions, right=True) - 1 for e in edges]
        ).to(torch.int32)
    n_segments = 1 if segments is None else int(segments.max()) + 1
    ranks = lsh_rank(x, planes, 0.5)
    expected, expected_inverse = sort_levels(
        ranks, segments, num_projs, inverse=True, n_segments=n_segments
    )
    assert torch.equal(order, expected)
    assert torch.equal(inverse, expected_inverse)
