"""What the compiler pass did: one :class:`SiteReport` per attention site, counters, ``explain``.

The pass (``hyperpass.compiler.rewrite``) fills the reports and the counters and logs them on
the ``hyperpass`` logger (INFO: one summary per graph; DEBUG: one line per decision);
``hyperpass.compiler.explain`` prints them as a table. Imports the standard library only.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

log = logging.getLogger("hyperpass")


@dataclass
class SiteReport:
    """One attention site found in a traced graph.

    Attributes:
        module: the module path of the site (``model.layers.3.self_attn``), or the graph node name
            when the graph carries no module path.
        form: how the attention was written: ``sdpa`` or a hand-written form's name.
        q_shape, k_shape, v_shape: ``[B, H, N, D]`` shapes (symbolic sizes as strings).
        mask: ``none``, ``causal``, ``causal+padding``, ``padding``, ``sliding-window``,
            ``arbitrary`` (see ``hyperpass.compiler.masks``), ``unknown`` (not recognized).
        is_causal: whether the rewritten op is causal.
        gqa: whether the KV heads are shared (``repeat_kv`` / ``repeat_interleave`` unwrapped,
            or ``enable_gqa`` already set).
        decision: ``rewritten`` or ``exact`` (left untouched).
        code: a short reason key, the key of :data:`COUNTERS` ``skipped``.
        reason: the reason in words.
        params: the parameters the op gets at this site (overrides included).
        node: the name of the graph node that was (or would be) replaced.
    """

    module: str
    form: str
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    mask: str
    is_causal: bool
    gqa: bool
    decision: str
    code: str
    reason: str
    params: dict = field(default_factory=dict)
    node: str = ""

    @property
    def rewritten(self) -> bool:
        return self.decision == "rewritten"


class Counters:
    """Resettable counts of the pass's decisions since the last :meth:`reset`.

    Attributes:
        rewritten: sites rewritten into ``hyper_attention``.
        skipped: sites left exact, by reason code (``short``, ``mask:padding``...).
        graphs: graphs the pass ran on.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rewritten = 0
        self.skipped: collections.Counter = collections.Counter()
        self.graphs = 0

    def record(self, reports: list[SiteReport]) -> None:
        self.graphs += 1
        for r in reports:
            if r.rewritten:
                self.rewritten += 1
            else:
                self.skipped[r.code] += 1

    def __repr__(self) -> str:
        return f"Counters(rewritten={self.rewritten}, skipped={dict(self.skipped)})"


COUNTERS = Counters()


def reset_counters() -> None:
    COUNTERS.reset()


def _shape(s) -> str:
    return "[" + ", ".join(str(x) for x in s) + "]"


def _mask_cell(r: SiteReport) -> str:
    if r.mask == "none":
        return "is_causal" if r.is_causal else "none"
    if r.rewritten and r.mask in ("padding", "causal+padding"):
        return r.mask + " -> key mask"  # the op takes the mask's last row, [B, 1, 1, Nk]
    return r.mask + (" -> causal op" if r.is_causal else "")


def format_table(reports: list[SiteReport]) -> str:
    """The reports as a plain-text table, one row per site."""
    header = ("module", "form", "q", "k", "mask", "decision", "reason")
    rows = [
        (
            r.module,
            r.form + (" +gqa" if r.gqa else ""),
            _shape(r.q_shape),
            _shape(r.k_shape),
            _mask_cell(r),
            r.decision,
            r.reason,
        )
        for r in reports
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_rw = sum(r.rewritten for r in reports)
    lines.append(f"{n_rw} of {len(reports)} attention sites rewritten")
    return "\n".join(lines)


def log_reports(reports: list[SiteReport], graph_name: str = "graph") -> None:
    for r in reports:
        log.debug(
            "hyperpass %s: %s (%s, q %s, k %s, mask %s): %s",
            r.decision,
            r.module,
            r.form,
            _shape(r.q_shape),
            _shape(r.k_shape),
            r.mask,
            r.reason,
        )
    if reports:
        n_rw = sum(r.rewritten for r in reports)
        skipped = collections.Counter(r.code for r in reports if not r.rewritten)
        log.info(
            "hyperpass: %s: %d of %d attention sites rewritten%s",
            graph_name,
            n_rw,
            len(reports),
            f"; exact: {dict(skipped)}" if skipped else "",
        )
