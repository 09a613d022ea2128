"""The compiler pass: find attention in a Dynamo FX graph and rewrite it into hyper_attention.

Runs on the graph Dynamo hands a backend, before AOTAutograd, so the op's own autograd is used.
A site is either one ``torch._C._nn.scaled_dot_product_attention`` node (arguments by position
or keyword) or a hand-written matmul-softmax-matmul (``hyperpass.compiler.handwritten``).
For each site:

1. the mask is classified from how the graph built it (``hyperpass.compiler.masks``): a provably
   lower-triangular mask becomes ``is_causal=True``; padding and other masks stay exact;
2. KV heads repeated by ``repeat_kv`` (expand + reshape) or ``repeat_interleave`` are unwrapped
   into native GQA (``enable_gqa=True``);
3. static lengths below ``min_len`` stay untouched; symbolic lengths are rewritten and the op
   decides at run time (``hyperpass.op.eligibility``), so crossing ``min_len`` never recompiles;
4. the site is replaced by one call of ``torch.ops.hyperpass.hyper_attention`` with the site's
   full :class:`~hyperpass.config.HyperConfig` passed positionally, and dead nodes are removed.

The pass never raises on a model: a site it cannot serve is left as it was and its report says
why. Must not import the kernels.
"""

from __future__ import annotations

import itertools
import logging
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from hyperpass.compiler.fx_utils import emit, meta_of, remove_orphans
from hyperpass.compiler.gqa import unwrap_repeat_kv
from hyperpass.compiler.handwritten import FailedMatch, match_handwritten
from hyperpass.compiler.masks import MaskInfo
from hyperpass.compiler.masks.values import MASKED_AT_OR_BELOW
from hyperpass.compiler.report import COUNTERS, SiteReport, log_reports
from hyperpass.compiler.sites import SDPA_TARGETS, Site, module_path, sdpa_site
from hyperpass.config import HyperConfig
from hyperpass.op import hyper_attention_op
from hyperpass.op.eligibility import (
    key_mask_reason,
    length_reason,
    structural_reason,
    work_per_token,
)
from hyperpass.op.signature import op_args
from hyperpass.selection import layer_index, path_matches

log = logging.getLogger("hyperpass")


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class RewriteOptions:
    """What to rewrite and with which parameters (built and validated by ``backend``).

    Attributes:
        config: the parameters of every rewritten site (``min_len`` included).
        layers: module-path patterns (glob or regex, full match) of the sites to rewrite; None
            means all.
        last_n_layers: rewrite only the sites of the last N layers (by the layer index in
            their module path, ``hyperpass.selection``); None means all.
        overrides: ``(pattern, {field: value})`` pairs; a site whose module path matches gets those
            fields (later pairs win).
    """

    config: HyperConfig = field(default_factory=HyperConfig)
    layers: tuple[str, ...] | None = None
    last_n_layers: int | None = None
    overrides: tuple[tuple[str, tuple], ...] = ()

    def config_for(self, module: str) -> HyperConfig:
        changes: dict = {}
        for pattern, params in self.overrides:
            if path_matches(module, pattern):
                changes.update(dict(params))
        return self.config.replace(**changes) if changes else self.config

    def selected(self, module: str) -> bool:
        return self.layers is None or any(path_matches(module, p) for p in self.layers)


# ----------------------------------------------------------------------------- sites
def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every attention site of the graph, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            sites.append(sdpa_site(node))
        else:
            site = match_handwritten(node)
            if isinstance(site, FailedMatch):
                site = _unrecognized(site)
            if site is not None:
                site.module = module_path(site.out)
                sites.append(site)
    return sites


def _unrecognized(failed: FailedMatch) -> Site:
    """A site the pass reports but cannot rewrite: softmax(...) @ v it did not recognize."""
    return Site(
        form="unrecognized", out=failed.node, q=None, k=None, v=None,
        mask=MaskInfo("unknown", "not recognized"),
        exact_reason=("not_recognized", f"not recognized: {failed.reason}"),
    )  # fmt: skip


# ----------------------------------------------------------------------------- decision
def _shape(meta) -> tuple:
    return (
        tuple(s if isinstance(s, int) else str(s) for s in meta.shape) if meta is not None else ()
    )


class _Shaped:
    """The shape and dtype the op would see for one of q/k/v (3-D lifted to 4-D, a given k^T
    transposed back), for the eligibility rule."""

    def __init__(self, meta, lift: bool = False, transposed: bool = False):
        shape = tuple(meta.shape)
        if transposed:
            shape = (*shape[:-2], shape[-1], shape[-2])
        self.shape = (1, *shape) if lift else shape
        self.dtype = meta.dtype
        self.device = meta.device

    def dim(self) -> int:
        return len(self.shape)


def decide(site: Site, cfg: HyperConfig, selected: bool) -> tuple[str, str]:
    """``(code, reason)`` why the site stays exact, or ``("", reason)`` when it is rewritten.

    The pass's own knowledge first (selection, the hand-written form, the mask's kind), then the
    op's eligibility rule on the graph's shapes; a length it cannot know is left to the op."""
    if not selected:
        return "not_selected", "module path not selected (layers / last_n_layers)"
    if site.exact_reason is not None:
        return site.exact_reason
    key_padding = _key_padding(site)
    if site.mask.kind not in ("none", "causal") and not key_padding:
        return f"mask:{site.mask.kind}", site.mask.reason
    mq, mk, mv = meta_of(site.q), meta_of(site.k), meta_of(site.v)
    if mq is None or mk is None or mv is None:
        return "no_meta", "no shape metadata on q/k/v"
    ndim = 3 if site.unsqueeze_batch else 4
    if not (mq.dim() == mk.dim() == mv.dim() == ndim):
        return "not_4d", f"q/k/v are not {ndim}-D"
    lift = site.unsqueeze_batch
    q, k, v = _Shaped(mq, lift), _Shaped(mk, lift, site.k_transposed), _Shaped(mv, lift)
    is_causal = _is_causal(site)
    reason = structural_reason(
        q, k, v, has_mask=False, dropout_p=site.dropout_p, is_causal=is_causal,
        enable_gqa=bool(site.enable_gqa),
    ) or (key_padding and _key_mask_reason(site, q, k, cfg)) or length_reason(
        q.shape[-2], k.shape[-2], is_causal, cfg, q.device, work_per_token(q)
    )  # fmt: skip
    if reason is not None:
        return reason
    dynamic = not (isinstance(q.shape[-2], int) and isinstance(k.shape[-2], int))
    return "", "symbolic length: the op decides at run time" if dynamic else "long enough"


def _key_padding(site: Site) -> bool:
    """The site's SDPA mask is proven (causal and) key padding: the op takes its last row."""
    return site.form == "sdpa" and site.mask.keys_only and isinstance(site.mask_node, fx.Node)


def _is_causal(site: Site) -> bool:
    return bool(site.is_causal or site.mask.kind in ("causal", "causal+padding"))


def _key_mask_reason(site: Site, q, k, cfg: HyperConfig) -> tuple[str, str] | None:
    """Why the op cannot take the site's proven key-padding mask (the method), with the
    mask's kind as the code."""
    reason = key_mask_reason(_KeyMask(q, k), q, k, cfg)
    if reason is None:
        return None
    return f"mask:{site.mask.kind}", f"{site.mask.reason}; {reason.words}"


class _KeyMask:
    """The key mask the op would get ([B, 1, 1, Nk] bool), for the eligibility rule."""

    def __init__(self, q, k):
        self.shape, self.dtype = (q.shape[0], 1, 1, k.shape[-2]), torch.bool


# ----------------------------------------------------------------------------- rewrite
def rewrite_graph(
    gm: fx.GraphModule, example_inputs=None, options: RewriteOptions | None = None, *,
    dry_run: bool = False,
) -> list[SiteReport]:  # fmt: skip
    """Rewrite every eligible attention site of ``gm`` in place; one report per site.

    Args:
        gm: a Dynamo graph (``torch.compile`` backend input).
        example_inputs: the backend's example inputs (unused; the graph's metadata has the
            shapes). Accepted so the signature matches a backend's.
        options: what to rewrite; defaults to all sites with the default HyperConfig.
        dry_run: decide and report only, leave the graph as it is.

    Returns:
        One :class:`~hyperpass.compiler.report.SiteReport` per attention site, in graph order.
    """
    del example_inputs
    options = options or RewriteOptions()
    sites = find_sites(gm)
    keep = _last_n(sites, options.last_n_layers)
    reports = []
    changed = False
    replaced: dict = {}  # a rewritten site's old output -> its new one (sites can chain)
    key_masks: dict = {}  # a padding mask -> its key mask, one per mask (see _key_mask)
    for i, site in enumerate(sites):
        site.q, site.k, site.v = (replaced.get(t, t) for t in (site.q, site.k, site.v))
        cfg = options.config_for(site.module)
        selected = options.selected(site.module) and i in keep
        code, reason = decide(site, cfg, selected)
        gqa = bool(site.enable_gqa)
        k, v = site.k, site.v
        if not code:
            k, v, gqa = _native_gqa(site)
        report = SiteReport(
            module=site.module,
            form=site.form,
            q_shape=_shape(meta_of(site.q)),
            k_shape=_shape(meta_of(k)),
            v_shape=_shape(meta_of(v)),
            mask=site.mask.kind,
            is_causal=_is_causal(site),
            gqa=gqa,
            decision="exact" if code else "rewritten",
            code=code or "rewritten",
            reason=reason,
            params=cfg.as_dict(),
            node=site.out.name,
        )
        reports.append(report)
        if not code and not dry_run:
            replaced[site.out] = _replace(gm, site, k, v, gqa, report.is_causal, cfg, key_masks)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    if not dry_run:
        COUNTERS.record(reports)
    log_reports(reports, f"graph {next(_GRAPH_ORDINAL)}{' (dry run)' if dry_run else ''}")
    return reports


_GRAPH_ORDINAL = itertools.count(1)  # names graphs in the log


def _last_n(sites: list[Site], n: int | None) -> set[int]:
    """Indices of the sites in the last ``n`` layers (by the layer index of their module path;
    sites of a graph with no layer indices: the last ``n`` in graph order)."""
    if n is None:
        return set(range(len(sites)))
    layers = [layer_index(s.module) for s in sites]
    indexed = sorted({i for i in layers if i >= 0})
    if not indexed:
        return set(range(max(0, len(sites) - n), len(sites)))
    chosen = set(indexed[-n:])
    return {i for i, layer in enumerate(layers) if layer in chosen}


def _native_gqa(site: Site):
    """k, v with repeated KV heads unwrapped, and whether the op needs enable_gqa."""
    gqa = bool(site.enable_gqa)
    rk, rv = unwrap_repeat_kv(site.k), unwrap_repeat_kv(site.v)
    if rk is not None and rv is not None and rk[1] == rv[1] and not site.unsqueeze_batch:
        return rk[0], rv[0], True
    return site.k, site.v, gqa


def _replace(gm, site: Site, k, v, gqa: bool, is_causal: bool, cfg: HyperConfig,
             key_masks: dict) -> fx.Node:  # fmt: skip
    graph = gm.graph
    with graph.inserting_before(site.out):
        q = site.q
        if site.k_transposed:
            k = emit(graph, "call_method", "transpose", (k, -2, -1))
        if site.unsqueeze_batch:
            q, k, v = (emit(graph, "call_method", "unsqueeze", (t, 0)) for t in (q, k, v))
        scale = _scale_value(graph, site)
        key_mask = None
        if _key_padding(site):
            if site.mask_node not in key_masks:
                key_masks[site.mask_node] = _key_mask(graph, site.mask_node)
            key_mask = key_masks[site.mask_node]
        args = op_args(q, k, v, attn_mask=key_mask, is_causal=is_causal, scale=scale,
                       enable_gqa=gqa, config=cfg)  # fmt: skip
        new = emit(graph, "call_function", hyper_attention_op, args)
        out = emit(graph, "call_method", "squeeze", (new, 0)) if site.unsqueeze_batch else new
    for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
        if key in site.out.meta:
            new.meta.setdefault(key, site.out.meta[key])
    site.out.replace_all_uses_with(out)
    inputs = site.out.all_input_nodes
    graph.erase_node(site.out)
    remove_orphans(graph, inputs)  # the old attention's softmax, mask, repeated K/V
    return out


def _key_mask(graph, mask: fx.Node) -> fx.Node:
    """The [B, 1, 1, Nk] boolean key mask of a proven (causal and) key-padding SDPA mask: its
    last query row (every key a causal row may see), head 0. One per mask, shared by the
    layers that read it: the mask then has one reader, and Inductor computes that row alone
    where the mask is built elementwise (several readers would make it materialize the mask)."""
    meta = meta_of(mask)
    index = (Ellipsis, *([slice(0, 1)] if meta.dim() >= 3 else []), slice(-1, None), slice(None))
    row = emit(graph, "call_function", operator.getitem, (mask, index))
    if meta.dtype != torch.bool:  # additive: allowed where 0, masked at or below the threshold
        row = emit(graph, "call_function", operator.gt, (row, MASKED_AT_OR_BELOW))
    for _ in range(4 - meta.dim()):
        row = emit(graph, "call_method", "unsqueeze", (row, 0))
    return row


def _scale_value(graph, site: Site):
    """The op's ``scale``: SDPA's own, or the product of a hand-written site's factors."""
    if site.form == "sdpa":
        return site.scale
    value = 1.0
    for factor, power in site.scale_factors:
        if isinstance(factor, fx.Node) or isinstance(value, fx.Node):
            fn = operator.mul if power > 0 else operator.truediv
            value = emit(graph, "call_function", fn, (value, factor))
        else:
            value = value * factor if power > 0 else value / factor
    return value if isinstance(value, fx.Node) else float(value)
