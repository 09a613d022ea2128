"""``hyperpass.backend``, the torch.compile backend: rewrite attention, then compile.

    model = torch.compile(model, backend=hyperpass.backend())   # approximate where it pays
    model = torch.compile(model, backend=hyperpass.backend(min_len=8192, window=1024))
    model = torch.compile(model, backend="hyperpass")   # the defaults
    model = torch.compile(model, backend="hyperpass", mode="reduce-overhead")  # CUDA graphs

The rewrite runs on the Dynamo graph before AOTAutograd, so the op's own autograd is used (in
training graphs select's sites keep their block lists for the backward,
``hyperpass.compiler.training``); the rewritten graph goes to Inductor (default), ``aot_eager``
or ``eager``. ``torch.compile``'s ``mode`` and ``options`` reach Inductor as they would with
``backend="inductor"``. Nothing global is changed: no Inductor config, no custom pass left
installed.

The name ``"hyperpass"`` is found through the ``torch_dynamo_backends`` entry point of an
installed hyperpass; this module also registers it when that entry point is missing (a plain
checkout on ``sys.path``). Must not import the kernels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from torch import fx

from hyperpass.compiler.rewrite import RewriteOptions, rewrite_graph
from hyperpass.compiler.training import is_training_graph, keep_plans
from hyperpass.config import HyperConfig, field_names
from hyperpass.selection import check_exclusive, check_last_n_layers, check_layers

log = logging.getLogger("hyperpass")

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
BACKEND_NAME = "hyperpass"


def make_options(
    min_len: int = 0,
    *,
    layers: str | list[str] | tuple[str, ...] | None = None,
    last_n_layers: int | None = None,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    **params,
) -> RewriteOptions:
    """Validate the backend's options into a :class:`~hyperpass.compiler.rewrite.RewriteOptions`.

    Raises:
        TypeError: an unknown parameter name, or an option of the wrong type.
        ValueError: a parameter or option out of range (the message names it).
    """
    config = HyperConfig().replace(min_len=min_len, **params)
    check_exclusive(layers, last_n_layers)
    layers = check_layers(layers)
    last_n_layers = check_last_n_layers(last_n_layers)
    pairs = []
    for pattern, changes in (overrides or {}).items():
        if not isinstance(pattern, str) or not isinstance(changes, Mapping):
            raise TypeError(
                f"overrides must map str patterns to dicts of parameters, got {pattern!r}: "
                f"{changes!r}"
            )
        unknown = set(changes) - set(field_names())
        if unknown:
            raise TypeError(
                f"overrides[{pattern!r}] has unknown parameter(s) {sorted(unknown)}; "
                f"known: {list(field_names())}"
            )
        config.replace(**changes)  # validates the values now, not at the first site
        pairs.append((pattern, tuple(changes.items())))
    return RewriteOptions(config, layers, last_n_layers, tuple(pairs))


def backend(
    min_len: int = 0,
    *graph_call,
    inner: str | Callable = "inductor",
    layers: str | list[str] | None = None,
    last_n_layers: int | None = None,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    **params,
) -> Callable:
    """A ``torch.compile`` backend that rewrites attention into ``hyper_attention``.

    Args:
        min_len: sequences shorter than this stay exact; 0 (default): from the length where
            the method was measured faster than SDPA on the device, and never on a CPU
            (``hyperpass.op.cost_model``). Static lengths below it are left untouched at
            compile time; symbolic lengths are decided by the op at run time.
        inner: the compiler of the rewritten graph: ``"inductor"``, ``"aot_eager"``,
            ``"eager"``, or a backend callable.
        layers: module-path patterns (glob or regex, full match, e.g.
            ``"model.layers.*.self_attn"``) of the sites to rewrite; None: all
            (``hyperpass.selection``).
        last_n_layers: rewrite only the sites of the last N layers (N >= 1), as the
            HyperAttention paper patched only the final layers; None: all.
        overrides: ``{pattern: {parameter: value}}``: per-site HyperConfig fields.
        **params: HyperConfig fields (``block_size``, ``sample_size``, ``window``...).

    Returns:
        ``compile_fn(gm, example_inputs) -> callable``, with ``compile_fn.options`` and
        ``compile_fn.reports`` (the :class:`~hyperpass.compiler.report.SiteReport` of every site
        of every graph it compiled: what the compiled model did).

    Passed uncalled (``torch.compile(model, backend=hyperpass.backend)``), it is the default
    backend: Dynamo then calls it with ``(gm, example_inputs)``.

    Raises:
        TypeError: an unknown parameter or inner compiler type.
        ValueError: a value out of range, or an unknown inner compiler name.
    """
    if isinstance(min_len, fx.GraphModule):  # passed uncalled: Dynamo calls it with (gm, inputs)
        mode, options = params.pop("mode", None), params.pop("options", None)
        return hyperpass_backend(min_len, *graph_call, mode=mode, options=options)
    if graph_call:
        raise TypeError(
            f"backend() takes min_len as its only positional argument, got {len(graph_call)} "
            f"more ({graph_call!r}): pass HyperConfig fields by name (block_size=128)"
        )
    rewrite = make_options(
        min_len, layers=layers, last_n_layers=last_n_layers, overrides=overrides, **params
    )
    if isinstance(inner, str) and inner not in INNER_COMPILERS:
        raise ValueError(f"inner must be one of {INNER_COMPILERS} or a callable, got {inner!r}")
    if not isinstance(inner, str) and not callable(inner):
        raise TypeError(f"inner must be a str or a callable, got {type(inner).__name__}")

    reports: list = []

    def hyperpass_compile(gm, example_inputs, mode=None, options=None):
        patches = inductor_patches(inner, mode, options)  # bad arguments fail before the rewrite
        reports.extend(rewrite_graph(gm, example_inputs, rewrite))
        if is_training_graph(gm, example_inputs):
            keep_plans(gm)
        return _inner_compile(inner, gm, example_inputs, patches)

    hyperpass_compile.options = rewrite  # also how explain() finds a compiled model's settings
    hyperpass_compile.inner = inner
    hyperpass_compile.reports = reports  # every site of every graph this backend compiled
    return hyperpass_compile


def inductor_patches(inner, mode: str | None, options: Mapping | None) -> dict | None:
    """Inductor config patches of ``torch.compile(..., mode=, options=)``, as Inductor's own
    wrapper makes them (``mode="reduce-overhead"``: CUDA graphs); None: none given.

    Raises:
        ValueError: ``mode`` or ``options`` given with an inner compiler other than Inductor.
    """
    if mode in (None, "default") and not options:
        return None
    if inner != "inductor":
        raise ValueError(
            f"torch.compile mode={mode!r} / options={options!r} configure Inductor, but this "
            f"backend's inner compiler is {inner!r}: use inner='inductor' or drop them"
        )
    from torch._inductor import list_mode_options

    # an unknown mode: torch's RuntimeError names the modes
    patches = dict(list_mode_options(mode)) if mode not in (None, "default") else {}
    patches.update(options or {})
    return patches


def _inner_compile(inner, gm, example_inputs, patches: dict | None = None):
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches)


def hyperpass_backend(gm, example_inputs, mode=None, options=None):
    """The default backend (``torch.compile(model, backend="hyperpass")``): every attention
    site with the default :class:`~hyperpass.config.HyperConfig`, then Inductor."""
    return _DEFAULT(gm, example_inputs, mode=mode, options=options)


_DEFAULT = backend()


def _register_name() -> None:
    """Register ``"hyperpass"`` unless the installed entry point already provides it.

    Registering both would make Dynamo's lookup fail with "duplicate name": it loads the entry
    point (importing this module) and then registers what it loaded.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if any(ep.name == BACKEND_NAME for ep in entry_points(group="torch_dynamo_backends")):
        return
    if BACKEND_NAME not in registry._COMPILER_FNS:
        registry.register_backend(hyperpass_backend, name=BACKEND_NAME)


_register_name()
