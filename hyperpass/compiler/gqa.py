"""Grouped-query attention in a Dynamo FX graph: KV heads repeated by ``repeat_kv`` or
``repeat_interleave``, unwrapped so the op reads the shared heads natively (``enable_gqa``).
Imports the FX helpers only."""

from __future__ import annotations

from torch import fx

from hyperpass.compiler.fx_utils import is_call, meta_of, same_size


def unwrap_repeat_kv(node) -> tuple[fx.Node, int] | None:
    """``(base, n_rep)`` when ``node`` repeats each KV head of ``base`` ``n_rep`` times in place
    (head h reads base head ``h // n_rep``), else None.

    Recognizes ``base[:, :, None].expand(B, H, n_rep, N, D).reshape(B, H * n_rep, N, D)`` (HF's
    ``repeat_kv``, also with ``unsqueeze(2)``, ``view`` or ``flatten(1, 2)``) and
    ``repeat_interleave(base, n_rep, dim=1)``. ``base.repeat(1, n_rep, 1, 1)`` maps head h to
    ``h % H`` instead and is not unwrapped.
    """
    if not isinstance(node, fx.Node):
        return None
    out = meta_of(node)
    if out is None or out.dim() != 4:
        return None
    if is_call(node, "repeat_interleave"):
        base = node.args[0]
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        mb = meta_of(base)
        if isinstance(reps, int) and dim in (1, -3) and mb is not None and mb.dim() == 4:
            return base, reps
        return None
    if not (is_call(node, "reshape") or is_call(node, "view") or is_call(node, "flatten")):
        return None
    expanded = node.args[0]
    if not (is_call(expanded, "expand") and isinstance(expanded, fx.Node)):
        return None
    unsq = expanded.args[0]
    me, mu = meta_of(expanded), meta_of(unsq)
    if me is None or mu is None or me.dim() != 5 or mu.dim() != 5 or mu.shape[2] != 1:
        return None
    if is_call(unsq, "unsqueeze") and unsq.args[1:2] in ((2,), (-3,)):
        base = unsq.args[0]
    elif is_call(unsq, "getitem") and _is_none_at_2(unsq.args[1]):
        base = unsq.args[0]
    else:
        return None
    mb = meta_of(base)
    if mb is None or mb.dim() != 4 or not isinstance(me.shape[2], int):
        return None
    n_rep = me.shape[2]
    dims_ok = all(same_size(mb.shape[i], me.shape[j]) for i, j in ((0, 0), (1, 1), (2, 3), (3, 4)))
    out_ok = same_size(out.shape[0], mb.shape[0]) and same_size(out.shape[1], mb.shape[1] * n_rep)
    out_ok = (
        out_ok and same_size(out.shape[2], mb.shape[2]) and same_size(out.shape[3], mb.shape[3])
    )
    return (base, n_rep) if dims_ok and out_ok else None


def _is_none_at_2(index) -> bool:
    if not isinstance(index, tuple):
        return False
    full = slice(None, None, None)
    return index[:3] == (full, full, None) and all(i == full for i in index[3:])
