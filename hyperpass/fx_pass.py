"""The compiler pass: find attention in a Dynamo FX graph and rewrite it into hyper_attention.

Runs on the graph Dynamo hands a backend, before AOTAutograd, so the op's own autograd is used.
A site is either one ``torch._C._nn.scaled_dot_product_attention`` node (arguments by position
or keyword) or a hand-written matmul-softmax-matmul (``hyperpass.patterns``). For each site:

1. the mask is classified from how the graph built it (``hyperpass.masks``): a provably
   lower-triangular mask becomes ``is_causal=True``; padding and other masks stay exact;
2. KV heads repeated by ``repeat_kv`` (expand + reshape) or ``repeat_interleave`` are unwrapped
   into native GQA (``enable_gqa=True``);
3. static lengths below ``min_len`` stay untouched; symbolic lengths are rewritten and the op
   decides at run time (``hyperpass.op.skip_reason``), so crossing ``min_len`` never recompiles;
4. the site is replaced by one call of ``torch.ops.hyperpass.hyper_attention`` with the site's
   full :class:`~hyperpass.config.HyperConfig` passed positionally, and dead nodes are removed.

The pass never raises on a model: a site it cannot serve is left as it was and its report says
why. Must not import the kernels.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hyperpass.config import HyperConfig
from hyperpass.masks import MaskInfo, classify_mask
from hyperpass.op import hyper_attention_op
from hyperpass.report import COUNTERS, SiteReport, log_reports

log = logging.getLogger("hyperpass")

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention,)
_SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}
_SDPA_DEFAULTS["enable_gqa"] = False


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class RewriteOptions:
    """What to rewrite and with which parameters (built and validated by ``backend``).

    Attributes:
        config: the parameters of every rewritten site (``min_len`` included).
        layers: module-path patterns (glob or regex, full match) of the sites to rewrite; None
            means all.
        last_n_layers: rewrite only the last N attention sites of each graph (by layer index in
            the module path, then graph order); None means all.
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


def path_matches(module: str, pattern: str) -> bool:
    """A glob (``model.layers.*.self_attn``) or a regex (``.*layers\\.(28|29)\\..*``)."""
    if fnmatch.fnmatchcase(module, pattern):
        return True
    try:
        return re.fullmatch(pattern, module) is not None
    except re.error:
        return False


# ----------------------------------------------------------------------------- sites
@dataclass
class Site:
    """An attention site: what the op call needs, and the node it replaces."""

    form: str
    out: fx.Node  # the node whose value the op call replaces
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: MaskInfo
    mask_node: object = None  # the SDPA attn_mask argument (kept when the site stays exact)
    dropout_p: object = 0.0
    is_causal: bool = False
    scale: object = None
    enable_gqa: bool = False
    module: str = ""
    unsqueeze_batch: bool = False  # 3-D [B*H, N, D] attention: lift to 4-D for the op
    exact_reason: tuple[str, str] | None = None  # (code, words): a form the op cannot take
    k_transposed: bool = False  # ``k`` holds k^T [.., D, Nk]: transpose it back
    scale_factors: tuple = ()  # hand-written: (scalar or SymFloat node, +1 multiply / -1 divide)


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node, ``model.layers.0.self_attn`` style."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".") or node.name


def _meta(node):
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - undecidable: not known equal
        return False


def concrete_scalar(x):
    """A SymFloat/SymInt node whose value a guard already fixed (SDPA guards its ``scale``):
    its Python value, so that AOTAutograd need not specialize it and restart the trace."""
    if not isinstance(x, fx.Node):
        return x
    value = x.meta.get("example_value")
    if not isinstance(value, torch.SymFloat | torch.SymInt):
        return x
    try:
        fixed = value.node.shape_env.replace(value.node.expr)
    except Exception:  # noqa: BLE001 - not a plain symbol: keep the node
        return x
    if getattr(fixed, "is_number", False) and value.node.hint is not None:
        return type(value.node.hint)(value.node.hint)
    return x


def _sdpa_args(node: fx.Node) -> dict:
    """SDPA's arguments by name, whether passed by position or keyword."""
    args = dict(_SDPA_DEFAULTS)
    for name, value in zip(_SDPA_ARG_NAMES, node.args, strict=False):
        args[name] = value
    for name, value in node.kwargs.items():
        args[{"q": "query", "k": "key", "v": "value"}.get(name, name)] = value
    return args


def sdpa_site(node: fx.Node) -> Site:
    a = _sdpa_args(node)
    q, k, v = a["query"], a["key"], a["value"]
    mq, mk = _meta(q), _meta(k)
    mask_node = a["attn_mask"]
    if mq is not None and mk is not None and mq.dim() >= 2:
        mask = classify_mask(mask_node, mq.shape[-2], mk.shape[-2])
    else:
        mask = MaskInfo("arbitrary", "no shape metadata") if mask_node is not None else None
        mask = mask or MaskInfo("none", "no mask")
    return Site(
        form="sdpa",
        out=node,
        q=q,
        k=k,
        v=v,
        mask=mask,
        mask_node=mask_node,
        dropout_p=concrete_scalar(a["dropout_p"]),
        is_causal=a["is_causal"],
        scale=concrete_scalar(a["scale"]),
        enable_gqa=a["enable_gqa"],
        module=module_path(node),
    )


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every attention site of the graph, in graph order."""
    from hyperpass.patterns import match_handwritten

    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            sites.append(sdpa_site(node))
        else:
            site = match_handwritten(node)
            if site is not None:
                site.module = module_path(site.out)
                sites.append(site)
    return sites


# ----------------------------------------------------------------------------- GQA
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
    out = _meta(node)
    if out is None or out.dim() != 4:
        return None
    if _is_call(node, "repeat_interleave"):
        base = node.args[0]
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        mb = _meta(base)
        if isinstance(reps, int) and dim in (1, -3) and mb is not None and mb.dim() == 4:
            return base, reps
        return None
    if not (_is_call(node, "reshape") or _is_call(node, "view") or _is_call(node, "flatten")):
        return None
    expanded = node.args[0]
    if not (_is_call(expanded, "expand") and isinstance(expanded, fx.Node)):
        return None
    unsq = expanded.args[0]
    me, mu = _meta(expanded), _meta(unsq)
    if me is None or mu is None or me.dim() != 5 or mu.dim() != 5 or mu.shape[2] != 1:
        return None
    if _is_call(unsq, "unsqueeze") and unsq.args[1:2] in ((2,), (-3,)):
        base = unsq.args[0]
    elif _is_call(unsq, "getitem") and _is_none_at_2(unsq.args[1]):
        base = unsq.args[0]
    else:
        return None
    mb = _meta(base)
    if mb is None or mb.dim() != 4 or not isinstance(me.shape[2], int):
        return None
    n_rep = me.shape[2]
    dims_ok = all(_same(mb.shape[i], me.shape[j]) for i, j in ((0, 0), (1, 1), (2, 3), (3, 4)))
    out_ok = _same(out.shape[0], mb.shape[0]) and _same(out.shape[1], mb.shape[1] * n_rep)
    out_ok = out_ok and _same(out.shape[2], mb.shape[2]) and _same(out.shape[3], mb.shape[3])
    return (base, n_rep) if dims_ok and out_ok else None


def _is_none_at_2(index) -> bool:
    if not isinstance(index, tuple):
        return False
    full = slice(None, None, None)
    return index[:3] == (full, full, None) and all(i == full for i in index[3:])


def _is_call(node, name: str) -> bool:
    """A call_method ``name`` or a call_function of ``torch.name`` / ``operator.name``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target == name
    if node.op == "call_function":
        return node.target in (getattr(torch, name, None), getattr(operator, name, None)) or (
            getattr(node.target, "__name__", None) == name
            and getattr(node.target, "__module__", "") in ("torch", "_operator", "operator")
        )
    return False


# ----------------------------------------------------------------------------- decision
def _shape(meta) -> tuple:
    return (
        tuple(s if isinstance(s, int) else str(s) for s in meta.shape) if meta is not None else ()
    )


def decide(site: Site, cfg: HyperConfig, selected: bool) -> tuple[str, str]:
    """``(code, reason)`` why the site stays exact, or ``("", reason)`` when it is rewritten."""
    if not selected:
        return "not_selected", "module path not selected (layers / last_n_layers)"
    if site.exact_reason is not None:
        return site.exact_reason
    if site.mask.kind not in ("none", "causal"):
        return f"mask:{site.mask.kind}", site.mask.reason
    if not (isinstance(site.dropout_p, float | int) and site.dropout_p == 0):
        return "dropout", f"dropout_p={site.dropout_p} (the op serves dropout exactly only)"
    mq, mk, mv = _meta(site.q), _meta(site.k), _meta(site.v)
    if mq is None or mk is None or mv is None:
        return "no_meta", "no shape metadata on q/k/v"
    ndim = 3 if site.unsqueeze_batch else 4
    if not (mq.dim() == mk.dim() == mv.dim() == ndim):
        return "not_4d", f"q/k/v are not {ndim}-D"
    if not (mq.dtype == mk.dtype == mv.dtype):
        return "dtype", f"mixed dtypes q {mq.dtype}, k {mk.dtype}, v {mv.dtype}"
    nq, nk = mq.shape[-2], mk.shape[-1] if site.k_transposed else mk.shape[-2]
    is_causal = site.is_causal or site.mask.kind == "causal"
    if isinstance(nq, int) and isinstance(nk, int):
        if min(nq, nk) < cfg.min_len:
            return "short", f"static length {min(nq, nk)} < min_len={cfg.min_len}"
        if is_causal and nq != nk:
            return "decode", f"causal with Nq={nq} != Nk={nk} (decode or chunked prefill)"
    if isinstance(nq, int) and nq < cfg.min_len:
        return "short", f"static query length {nq} < min_len={cfg.min_len}"
    dynamic = not (isinstance(nq, int) and isinstance(nk, int))
    return "", "symbolic length: the op decides at run time" if dynamic else "long enough"


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
        One :class:`~hyperpass.report.SiteReport` per attention site, in graph order.
    """
    del example_inputs
    options = options or RewriteOptions()
    sites = find_sites(gm)
    keep = _last_n(sites, options.last_n_layers)
    reports = []
    changed = False
    replaced: dict = {}  # a rewritten site's old output -> its new one (sites can chain)
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
            q_shape=_shape(_meta(site.q)),
            k_shape=_shape(_meta(k)),
            v_shape=_shape(_meta(v)),
            mask=site.mask.kind,
            is_causal=bool(site.is_causal or site.mask.kind == "causal"),
            gqa=gqa,
            decision="exact" if code else "rewritten",
            code=code or "rewritten",
            reason=reason,
            params=cfg.as_dict(),
            node=site.out.name,
        )
        reports.append(report)
        if not code and not dry_run:
            replaced[site.out] = _replace(gm, site, k, v, gqa, report.is_causal, cfg)
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    if not dry_run:
        COUNTERS.record(reports)
    log_reports(reports, f"graph {next(_GRAPH_ORDINAL)}{' (dry run)' if dry_run else ''}")
    return reports


_GRAPH_ORDINAL = itertools.count(1)  # names graphs in the log


def _layer_index(module: str) -> int:
    numbers = re.findall(r"\.(\d+)(?:\.|$)", module)
    return int(numbers[-1]) if numbers else -1


def _last_n(sites: list[Site], n: int | None) -> set[int]:
    if n is None:
        return set(range(len(sites)))
    order = sorted(range(len(sites)), key=lambda i: (_layer_index(sites[i].module), i))
    return set(order[len(order) - n :]) if n > 0 else set()


def _native_gqa(site: Site):
    """k, v with repeated KV heads unwrapped, and whether the op needs enable_gqa."""
    gqa = bool(site.enable_gqa)
    rk, rv = unwrap_repeat_kv(site.k), unwrap_repeat_kv(site.v)
    if rk is not None and rv is not None and rk[1] == rv[1] and not site.unsqueeze_batch:
        return rk[0], rv[0], True
    return site.k, site.v, gqa


def _replace(gm, site: Site, k, v, gqa: bool, is_causal: bool, cfg: HyperConfig) -> fx.Node:
    graph = gm.graph
    with graph.inserting_before(site.out):
        q = site.q
        if site.k_transposed:
            k = _emit(graph, "call_method", "transpose", (k, -2, -1))
        if site.unsqueeze_batch:
            q, k, v = (_emit(graph, "call_method", "unsqueeze", (t, 0)) for t in (q, k, v))
        scale = _scale_value(graph, site)
        args = (q, k, v, None, 0.0, is_causal, scale, gqa, *cfg.as_dict().values())
        new = _emit(graph, "call_function", hyper_attention_op, args)
        out = _emit(graph, "call_method", "squeeze", (new, 0)) if site.unsqueeze_batch else new
    for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
        if key in site.out.meta:
            new.meta.setdefault(key, site.out.meta[key])
    site.out.replace_all_uses_with(out)
    graph.erase_node(site.out)
    return out


def _scale_value(graph, site: Site):
    """The op's ``scale``: SDPA's own, or the product of a hand-written site's factors."""
    if site.form == "sdpa":
        return site.scale
    value = 1.0
    for factor, power in site.scale_factors:
        if isinstance(factor, fx.Node) or isinstance(value, fx.Node):
            fn = operator.mul if power > 0 else operator.truediv
            value = _emit(graph, "call_function", fn, (value, factor))
        else:
            value = value * factor if power > 0 else value / factor
    return value if isinstance(value, fx.Node) else float(value)


def _emit(graph: fx.Graph, op: str, target, args) -> fx.Node:
    """Add a node and fill its ``example_value`` from the inputs' fake values."""
    node = graph.create_node(op, target, args)
    values = [a.meta.get("example_value") if isinstance(a, fx.Node) else a for a in args]
    mode = next((x.fake_mode for x in values if hasattr(x, "fake_mode")), None)
    if mode is None:
        return node
    try:
        with mode:
            if op == "call_method":
                node.meta["example_value"] = getattr(values[0], target)(*values[1:])
            else:
                node.meta["example_value"] = target(*values)
    except Exception as err:  # noqa: BLE001 - metadata only; AOTAutograd re-traces anyway
        log.debug("hyperpass: no example_value for %s (%s)", node, err)
    return node
