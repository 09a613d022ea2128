"""Property: whatever mask a program builds, the compiled model computes what eager computes.

Hypothesis generates mask-building programs from the ops real code uses (``ones``/``zeros``/
``full``, ``arange`` comparisons, ``tril``/``triu`` and their in-place forms, setitem with slices
and scalars, ``masked_fill(_)``, ``where``, logical and/or/not, ``unsqueeze``/``expand``/
``view``, boolean and additive float masks with ``-inf`` / ``finfo.min`` / ``-1e4`` fills, padding
from a lengths tensor); each is compiled through the backend with parameters that make the
approximation exact (a window covering every key) and compared with eager. A mask the pass reads
wrong (or a causal site it misses, rewritten as something else) fails; a failure prints the
program.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hyperpass

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

N = 96
COVERING = dict(min_len=32, window=4096, query_block=32, select_block=32, query_groups=4)
FILLS = (float("-inf"), torch.finfo(torch.float32).min, -1e4)


def _pred(kind: str, a: int, n: int, lengths):
    """A boolean [n, n] (or [B, 1, 1, n]) predicate of positions or data."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    if kind == "causal":
        return j <= i
    if kind == "offset":
        return j <= i + a
    if kind == "window":
        return i - j < a + 1
    if kind == "column":
        return (j != a % n).expand(n, n)
    if kind == "padding":
        return (torch.arange(n)[None, :] < lengths[:, None])[:, None, None, :]
    return torch.ones(n, n, dtype=torch.bool)


STEPS = st.one_of(
    st.tuples(st.just("tril"), st.integers(-3, 3), st.booleans()),
    st.tuples(st.just("triu"), st.integers(-3, 3), st.booleans()),
    st.tuples(st.just("setitem"), st.integers(0, N - 1), st.booleans()),
    st.tuples(
        st.just("and"),
        st.sampled_from(["causal", "offset", "window", "column", "padding"]),
        st.integers(0, 40),
        st.booleans(),
    ),  # fmt: skip
    st.tuples(st.just("or"), st.sampled_from(["offset", "column"]), st.integers(0, 40)),
    st.tuples(st.just("not_not")),
    st.tuples(st.just("expand")),
)
STARTS = st.sampled_from(["ones", "causal_arange", "tril_ones", "full_triu", "zeros_tril"])


def build(program, n, lengths, as_float):
    """The mask a program describes, built the way model code builds masks."""
    start, steps, fill = program
    if start == "ones":
        m = torch.ones(n, n, dtype=torch.bool)
    elif start == "causal_arange":
        m = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    elif start == "tril_ones":
        m = torch.tril(torch.ones(n, n, dtype=torch.bool))
    elif start == "full_triu":
        m = torch.full((n, n), 1.0).triu(1) == 0
    else:
        m = torch.zeros(n, n, dtype=torch.bool) | torch.ones(n, n, dtype=torch.bool).tril()
    for step in steps:
        op = step[0]
        if op in ("tril", "triu"):
            _, d, in_place = step
            if in_place and m.dim() == 2:
                getattr(m, op + "_")(d)
            else:
                m = getattr(torch, op)(m, d)
        elif op == "setitem":
            _, col, value = step
            m = m.clone() if m.dim() != 2 else m
            m[..., col] = value
        elif op == "and":
            _, kind, a, in_place = step
            p = _pred(kind, a, n, lengths)
            if in_place and m.dim() == 2 and p.dim() == 2:
                m.logical_and_(p)
            else:
                m = m & p
        elif op == "or":
            m = m | _pred(step[1], step[2], n, lengths)
        elif op == "not_not":
            m = ~(~m)
        elif op == "expand":
            m = m.unsqueeze(0).unsqueeze(0) if m.dim() == 2 else m
    m = m.expand(lengths.shape[0], 1, n, n)
    if as_float:
        return torch.zeros(m.shape).masked_fill(~m, fill)
    return m


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
@hypothesis.given(
    program=st.tuples(STARTS, st.lists(STEPS, max_size=4), st.sampled_from(FILLS)),
    as_float=st.booleans(),
    lengths=st.lists(st.integers(40, N), min_size=2, max_size=2),
)
def test_compiled_equals_eager_for_any_mask_program(program, as_float, lengths):
    lengths = torch.tensor(lengths)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, N, 16, generator=gen) for _ in range(3))

    def model(q, k, v, lengths):
        mask = build(program, q.shape[-2], lengths, as_float)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch._dynamo.reset()
    be = hyperpass.backend(inner="aot_eager", **COVERING)
    got = torch.compile(model, backend=be)(q, k, v, lengths)
    want = model(q, k, v, lengths)
    # a row the mask empties is NaN in eager: so it must be compiled
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True,
                               msg=lambda m: f"{m}\nprogram={program} float={as_float} "
                               f"reports={[(r.code, r.reason) for r in be.reports]}")  # fmt: skip
