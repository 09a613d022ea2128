"""Patch an unmodified model so its attention runs through ``torch.ops.hyperpass.hyper_attention``.

Two modes, both undone by :func:`unpatch`:

- ``"eager"``: while a chosen module's ``forward`` runs, a thread-local ``TorchFunctionMode``
  routes every ``F.scaled_dot_product_attention`` call (however the model imported it) to the op.
  It works in eager mode and under the user's own ``torch.compile`` (Dynamo traces the mode: the
  op lands in the graph with no graph break). Calls with a mask or dropout keep exact SDPA.
- ``"compile"``: the chosen modules' ``forward`` is wrapped in
  ``torch.compile(backend=hyperpass.backend(...))``, whose pass also rewrites hand-written
  matmul-softmax-matmul attention.

Module choice: the whole model, the last N layers of its layer stack (as in the paper), or
module-path glob patterns. A :class:`RoutingReport` counts what each site did. The patch lives in a
registry beside the model, never in its state: after ``unpatch`` the module's ``__dict__``, hooks
and state dict are the ones it had. Must not import the kernels or the compiler pass at import.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from hyperpass import config as _config
from hyperpass.config import HyperConfig
from hyperpass.op import hyper_attention_op, op_args
from hyperpass.op.eligibility import skip_reason_words
from hyperpass.selection import check_exclusive, check_last_n_layers, check_layers, path_matches

log = logging.getLogger("hyperpass")

MODES = ("eager", "compile")
_SDPA = F.scaled_dot_product_attention


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class SiteStats:
    """What one site (a patched module, or one HF attention layer) did.

    Attributes:
        calls: eager SDPA calls seen.
        approximated: eager calls the op approximated.
        exact: eager calls kept exact, by reason.
        traced: times a ``torch.compile`` graph captured an SDPA call here.
        traced_exact: of those, the ones kept exact whatever the length, by reason (a mask or
            dropout, known while tracing); the others are decided by the op at run time.
    """

    calls: int = 0
    approximated: int = 0
    exact: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    traced: int = 0
    traced_exact: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class RoutingReport:
    """Per-site counters of routed attention calls, safe to update from several threads."""

    _ids = itertools.count()

    def __init__(self, name: str):
        self.name = name
        self.sites: dict[str, SiteStats] = {}
        self._lock = threading.Lock()
        # a str: Dynamo may turn an int read at a changing value into a symbolic one
        self.key = f"report-{next(RoutingReport._ids)}"
        _REPORTS[self.key] = self

    def record(self, site: str, reason: str | None) -> None:
        with self._lock:
            stats = self.sites.setdefault(site, SiteStats())
            stats.calls += 1
            if reason is None:
                stats.approximated += 1
            else:
                stats.exact[reason] += 1

    def record_traced(self, site: str, reason: str | None) -> None:
        with self._lock:
            stats = self.sites.setdefault(site, SiteStats())
            stats.traced += 1
            if reason is not None:
                stats.traced_exact[reason] += 1

    def reset(self) -> None:
        with self._lock:
            self.sites.clear()

    def totals(self) -> SiteStats:
        total = SiteStats()
        for s in self.sites.values():
            total.calls += s.calls
            total.approximated += s.approximated
            total.exact.update(s.exact)
            total.traced += s.traced
            total.traced_exact.update(s.traced_exact)
        return total

    def format(self) -> str:
        """A few human-readable lines: one per site, then the exact-call reasons."""
        if not self.sites:
            return f"{self.name}: no attention call seen"
        lines = [f"{self.name}:"]
        for site, s in self.sites.items():
            parts = []
            if s.calls or not s.traced:
                parts.append(f"{s.calls} eager calls: {s.approximated} approximated")
                parts.append(f"{sum(s.exact.values())} exact")
            if s.traced:
                n_exact = sum(s.traced_exact.values())
                parts.append(
                    f"traced {s.traced}x by torch.compile: {s.traced - n_exact} routed to the op "
                    f"(it decides at run time), {n_exact} exact"
                )
            lines.append(f"  {site}: " + ", ".join(parts))
        totals = self.totals()
        for reason, n in (totals.exact + totals.traced_exact).most_common():
            lines.append(f"  exact x{n}: {reason}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RoutingReport({self.name!r}, {len(self.sites)} sites)"


# Reports by key: Dynamo's compile-time callback can only read constants (the key) from the frame.
_REPORTS: weakref.WeakValueDictionary[str, RoutingReport] = weakref.WeakValueDictionary()


def _record_traced_at_compile_time(ctx) -> None:
    report = _REPORTS.get(ctx.get_local("report_key").as_python_constant())
    if report is not None:
        report.record_traced(
            ctx.get_local("site").as_python_constant(),
            ctx.get_local("static_reason").as_python_constant(),
        )


def note_call(
    report: RoutingReport,
    site: str,
    reason_fn: Callable[[], str | None],
    static_reason: str | None = None,
) -> None:
    """Record one routed call: eagerly with its decision, or once per trace under Dynamo.

    ``reason_fn`` is called only in eager mode: under Dynamo the op decides at run time and
    reading shapes here would install guards. ``static_reason``: why the call is exact whatever
    the shapes (a mask, dropout), recorded with the trace; None if the op decides.
    """
    if torch.compiler.is_compiling():
        from torch._dynamo.comptime import comptime

        report_key = report.key  # noqa: F841 (read by the compile-time callback)
        comptime(_record_traced_at_compile_time)
    else:
        report.record(site, reason_fn())


# ----------------------------------------------------------------------------- routing
def route_sdpa(
    config: HyperConfig,
    report: RoutingReport,
    site: str,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    """One ``F.scaled_dot_product_attention`` call (its argument names), through the op where it
    can be approximated: query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D] -> [B, Hq, Nq, Dv].

    A mask or dropout keeps the original SDPA: its result and its autograd are then exactly the
    un-patched model's (the op's backward would redraw a dropout mask).
    """
    if attn_mask is not None or dropout_p > 0.0:
        reason = "attention mask" if attn_mask is not None else "dropout"
        note_call(report, site, lambda: reason, reason)
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
    note_call(
        report,
        site,
        lambda: skip_reason_words(query, key, value, None, 0.0, is_causal, enable_gqa, config),
    )
    return hyper_attention_op(
        *op_args(
            query,
            key,
            value,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
            config=config,
        )
    )


class _SDPARouter(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to the op; every other function runs as is.

    Torch function modes are thread-local, so another thread's SDPA calls are never routed.
    """

    def __init__(self, config: HyperConfig, report: RoutingReport, site: str):
        super().__init__()
        self.config = config
        self.report = report
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return route_sdpa(self.config, self.report, self.site, *args, **kwargs)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- selection
def _layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated layers: its largest ``nn.ModuleList`` (first one on ties)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None or len(best[1]) == 0:
        raise ValueError(
            f"last_n_layers needs a layer stack (an nn.ModuleList) in the model; "
            f"{type(model).__name__} has none: select modules with layers=<pattern> instead"
        )
    return best


def select_modules(
    model: nn.Module,
    layers: str | Sequence[str] | None = None,
    last_n_layers: int | None = None,
) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs to patch, outermost only.

    Args:
        model: the model.
        layers: glob or regex pattern(s) over module paths from ``model.named_modules()``
            (``"model.layers.1?"``, ``"*.self_attn"``; ``hyperpass.selection``). None: no filter.
        last_n_layers: patch only the last N entries of the largest ``nn.ModuleList``.

    Raises:
        ValueError: both selectors given, N out of range, or a pattern that matches nothing.
        TypeError: a selector of the wrong type.
    """
    check_exclusive(layers, last_n_layers)
    if check_last_n_layers(last_n_layers) is not None:
        stack_name, stack = _layer_stack(model)
        if not 1 <= last_n_layers <= len(stack):
            raise ValueError(
                f"last_n_layers must be in [1, {len(stack)}] (the layers of "
                f"{stack_name or 'the model'}), got {last_n_layers}"
            )
        prefix = f"{stack_name}." if stack_name else ""
        start = len(stack) - last_n_layers
        return [(f"{prefix}{i}", stack[i]) for i in range(start, len(stack))]
    if layers is None:
        return [("", model)]
    patterns = check_layers(layers)
    named = list(model.named_modules())
    chosen = []
    for pattern in patterns:
        hits = [(n, m) for n, m in named if path_matches(n, pattern)]
        if not hits:
            sample = [n for n, _ in named[1:6]]
            raise ValueError(
                f"layers pattern {pattern!r} matches no module path; paths look like {sample}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    # A module inside another chosen module is already covered by it.
    names = {n for n, _ in chosen}
    return [
        (n, m)
        for n, m in chosen
        if not any(n != o and (o == "" or n.startswith(o + ".")) for o in names)
    ]


# ----------------------------------------------------------------------------- patch / unpatch
@dataclasses.dataclass
class _Target:
    path: str
    module: nn.Module
    saved_forward: object  # the instance attribute ``forward`` it had, or _NO_ATTR
    wrapper: Callable


@dataclasses.dataclass
class _PatchState:
    mode: str
    config: HyperConfig
    targets: list[_Target]
    report: RoutingReport
    backends: list = dataclasses.field(default_factory=list)  # mode="compile": the compile_fns


_NO_ATTR = object()
_PATCHED: weakref.WeakKeyDictionary[nn.Module, _PatchState] = weakref.WeakKeyDictionary()
_WRAPPERS: weakref.WeakSet = weakref.WeakSet()  # forward wrappers this module installed


def _eager_forward(forward, config: HyperConfig, report: RoutingReport, site: str):
    @functools.wraps(forward)  # keeps inspect.signature(model.forward) (HF generate reads it)
    def routed_forward(*args, **kwargs):
        with _SDPARouter(config, report, site):
            return forward(*args, **kwargs)

    return routed_forward


def _compiled_forward(forward, config: HyperConfig, inner, params):
    try:
        from hyperpass.compiler.backend import backend
    except ImportError as err:
        raise RuntimeError(
            f"mode='compile' needs hyperpass.backend, which could not be imported ({err})"
        ) from err
    compile_fn = backend(config.min_len, inner=inner, **params)
    compiled = torch.compile(forward, backend=compile_fn)

    @functools.wraps(forward)
    def compiled_forward(*args, **kwargs):
        return compiled(*args, **kwargs)

    return compiled_forward, compile_fn


def patch(
    model: nn.Module,
    min_len: int | None = None,
    *,
    mode: str = "eager",
    layers: str | Sequence[str] | None = None,
    last_n_layers: int | None = None,
    inner: str | None = None,
    **params,
) -> nn.Module:
    """Route the model's attention to HyperAttention, in place; :func:`unpatch` undoes it.

    Args:
        model: any ``nn.Module`` (not yet wrapped by ``torch.compile``).
        min_len: shortest sequence that is approximated (shorter calls stay exact). None: the
            :class:`HyperConfig` default.
        mode: ``"eager"`` routes ``F.scaled_dot_product_attention`` calls while the chosen modules
            run (eager and under your own ``torch.compile``); ``"compile"`` wraps their forward in
            ``torch.compile(backend=hyperpass.backend(...))``, which also rewrites hand-written
            attention.
        layers: glob pattern(s) over module paths; only those modules are patched.
        last_n_layers: patch only the last N layers of the model's layer stack (its largest
            ``nn.ModuleList``), as in the paper.
        inner: with ``mode="compile"``, the backend that compiles the rewritten graph
            (``"inductor"`` when None, ``"aot_eager"``...).
        **params: :class:`HyperConfig` fields (``block_size=512``, ``sample_size=0``...).

    Returns:
        The same model object, patched.

    Raises:
        ValueError: a bad mode, parameter value or selector (the message names it).
        TypeError: an unknown parameter, or a model already wrapped by ``torch.compile``.
        RuntimeError: the model (or a chosen module) is already patched.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if inner is not None and mode != "compile":
        raise ValueError(f"inner={inner!r} is only used with mode='compile', got mode={mode!r}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "model is already wrapped by torch.compile: patch the module first, then compile it "
            "(hyperpass.patch(model._orig_mod) patches the wrapped module)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model in _PATCHED:
        raise RuntimeError(f"{type(model).__name__} is already patched; call unpatch(model) first")
    fields = {"min_len": min_len} if min_len is not None else {}
    config = _config.DEFAULT.replace(**fields, **params)  # validates every value
    chosen = select_modules(model, layers, last_n_layers)
    for path, mod in chosen:
        if mod.__dict__.get("forward") in _WRAPPERS:
            raise RuntimeError(f"module {path or type(mod).__name__!r} is already patched")

    state = _PatchState(mode, config, [], RoutingReport(type(model).__name__))
    for path, mod in chosen:
        site = path or type(mod).__name__
        if mode == "eager":
            wrapper = _eager_forward(mod.forward, config, state.report, site)
        else:
            wrapper, compile_fn = _compiled_forward(
                mod.forward, config, inner or "inductor", params
            )
            state.backends.append(compile_fn)
        state.targets.append(_Target(path, mod, mod.__dict__.get("forward", _NO_ATTR), wrapper))
    for t in state.targets:
        t.module.__dict__["forward"] = t.wrapper  # plain attribute: no parameter bookkeeping
        _WRAPPERS.add(t.wrapper)
    _PATCHED[model] = state
    log.debug("patched %s (%s): %s", type(model).__name__, mode, [t.path for t in state.targets])
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every chosen module gets back the ``forward`` it had.

    Raises:
        ValueError: the model is not patched.
    """
    state = _PATCHED.pop(model, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by hyperpass.patch")
    for t in state.targets:
        if t.saved_forward is _NO_ATTR:
            t.module.__dict__.pop("forward", None)
        else:
            t.module.__dict__["forward"] = t.saved_forward
    return model


def is_patched(model: nn.Module) -> bool:
    return model in _PATCHED


def _state(model: nn.Module) -> _PatchState:
    state = _PATCHED.get(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by hyperpass.patch")
    return state


def report(model: nn.Module) -> RoutingReport:
    """The routing report of a model patched in ``"eager"`` mode (empty in ``"compile"`` mode:
    see :func:`compiled_sites`).

    Raises:
        ValueError: the model is not patched.
    """
    return _state(model).report


def compiled_sites(model: nn.Module) -> list:
    """Mode ``"compile"``: the backend's :class:`~hyperpass.compiler.report.SiteReport` of every
    attention site in every graph compiled so far (empty in ``"eager"`` mode).

    Raises:
        ValueError: the model is not patched.
    """
    return [site for fn in _state(model).backends for site in getattr(fn, "reports", [])]
