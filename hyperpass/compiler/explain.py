"""``hyperpass.explain``: what the backend does, or would do, at each attention site of a model.

Imports the backend and the pass; nothing imports this module but the package's entry points.
"""

from __future__ import annotations

import logging

import torch

from hyperpass.compiler.backend import make_options
from hyperpass.compiler.report import SiteReport, format_table
from hyperpass.compiler.rewrite import RewriteOptions, rewrite_graph

log = logging.getLogger("hyperpass")

_BACKEND_LINKS = ("_torchdynamo_orig_backend", "compiler_fn")  # how Dynamo wraps a backend


def compiled_backend_options(model) -> RewriteOptions | None:
    """The :class:`RewriteOptions` of the hyperpass backend ``model`` was compiled with
    (``torch.compile(model, backend=hyperpass.backend(...))``), or None."""
    ctx = getattr(model, "dynamo_ctx", None) if isinstance(model, torch.nn.Module) else None
    if ctx is None and isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        ctx = model.__dict__.get("dynamo_ctx")
    obj = getattr(ctx, "callback", None)
    for _ in range(8):
        if obj is None:
            return None
        options = getattr(obj, "options", None)
        if isinstance(options, RewriteOptions):
            return options
        obj = next((getattr(obj, a) for a in _BACKEND_LINKS if hasattr(obj, a)), None)
    return None


def explain(
    model,
    *args,
    min_len: int | None = None,
    model_kwargs: dict | None = None,
    dynamic: bool | None = None,
    print_table: bool = True,
    **options,
) -> list[SiteReport]:
    """Trace ``model(*args, **model_kwargs)`` and say what the backend would do at each site.

    The graphs are compiled with the ``eager`` inner compiler and run un-rewritten (exact
    attention, no gradients), so no approximation runs. Dynamo traces the call once per graph; a
    graph break splits the sites over several graphs. What a compiled model actually did is in
    its backend's ``reports`` (``backend = hyperpass.backend(...)``; ``backend.reports``).

    Args:
        model: an ``nn.Module`` or a function. A model already compiled with a hyperpass
            backend is explained with that backend's settings, unless settings are given here.
        *args: its positional inputs.
        min_len: as in :func:`hyperpass.backend` (None: the compiled backend's, else 0: auto).
        model_kwargs: its keyword inputs.
        dynamic: passed to ``torch.compile``.
        print_table: print the table (:func:`~hyperpass.compiler.report.format_table`).
        **options: the other options of :func:`hyperpass.backend` (``layers``,
            ``last_n_layers``, ``overrides``, HyperConfig fields).

    Returns:
        One :class:`~hyperpass.compiler.report.SiteReport` per attention site, in graph order.
    """
    compiled = compiled_backend_options(model)
    if compiled is not None and min_len is None and not options:
        opts = compiled
    else:
        opts = make_options(min_len=0 if min_len is None else min_len, **options)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    reports: list[SiteReport] = []

    def capture(gm, example_inputs):
        reports.extend(rewrite_graph(gm, example_inputs, opts, dry_run=True))
        return gm.forward

    traced = torch.compile(model, backend=capture, dynamic=dynamic)
    with torch.no_grad():
        traced(*args, **(model_kwargs or {}))
    if print_table:
        print(format_table(reports))  # noqa: T201 - explain's documented job is to print
    return reports
