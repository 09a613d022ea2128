"""The ``hyperpass`` command: run an unmodified script with its models' attention patched.

``hyperpass run [options] script.py [args...]`` (or ``python -m hyperpass run ...``) runs the
script as ``__main__``. For the duration of the run, ``torch.nn.Module.__call__`` patches every
module that is called outside any other module's call (a "root": the model the script built, or
the module inside a ``torch.compile`` wrapper) with :func:`hyperpass.patch`, the first time it is
called. At exit the routing report goes to stderr, and ``__call__`` is restored.

Options mirror :func:`hyperpass.patch`; every :class:`~hyperpass.config.HyperConfig` field is an
option (``--block-size 512``), generated from the config.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
import threading
import weakref

import torch
from torch import nn

import hyperpass
from hyperpass import config as _config
from hyperpass.integrations import patching

log = logging.getLogger("hyperpass")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperpass", description="Near-linear long-context attention for any PyTorch model."
    )
    parser.add_argument("--version", action="version", version=f"hyperpass {hyperpass.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run a script with the attention of every model it builds patched",
        description="Run SCRIPT as __main__ with every model it calls patched by "
        "hyperpass.patch; print the routing report to stderr at exit.",
    )
    tuning = run.add_argument_group("HyperAttention parameters (default: HyperConfig's)")
    types = _config.field_types()
    for f in _config.HyperConfig.__dataclass_fields__.values():
        meta = f.metadata
        tuning.add_argument(
            _option(f.name),
            dest=f.name,
            type=types[f.name],
            choices=meta["choices"],
            default=None,
            metavar=None if meta["choices"] else "N",
            help=f"{meta['doc']} (default {f.default})",
        )
    where = run.add_argument_group("which modules")
    where.add_argument(
        "--last-n-layers",
        type=int,
        default=None,
        metavar="N",
        help="patch only the last N layers of each model's layer stack (largest nn.ModuleList)",
    )
    where.add_argument(
        "--layers",
        action="append",
        default=None,
        metavar="PATTERN",
        help="patch only modules whose path matches this glob (repeatable), e.g. 'model.layers.*'",
    )
    run.add_argument(
        "--mode",
        choices=patching.MODES,
        default="eager",
        help="eager: route F.scaled_dot_product_attention (default); compile: wrap forward in "
        "torch.compile with the hyperpass backend (also rewrites hand-written attention)",
    )
    run.add_argument(
        "--inner", default=None, help="with --mode compile: the inner backend (default inductor)"
    )
    run.add_argument("script", help="the Python script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


class _RunSession:
    """Patches each root module on its first call while installed."""

    def __init__(self, patch_kwargs: dict):
        self.patch_kwargs = patch_kwargs
        self.reports: list[patching.RoutingReport] = []
        self.compiled_sites: list = []  # mode compile: the backend's SiteReports
        self.patched: list[weakref.ref] = []
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._original_call = None

    def _maybe_patch(self, module: nn.Module) -> None:
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            module = module._orig_mod
        with self._lock:
            if module in self._seen:
                return
            self._seen.add(module)
            if patching.is_patched(module):
                return  # the script patched it itself
            try:
                patching.patch(module, **self.patch_kwargs)
            except ValueError as err:  # no layer stack or no matching path in this module
                log.debug("hyperpass run: %s not patched: %s", type(module).__name__, err)
                return
            self.patched.append(weakref.ref(module))
            self.reports.append(patching.report(module))

    def install(self) -> None:
        original = nn.Module.__call__
        session = self

        def __call__(module, *args, **kwargs):
            if torch.compiler.is_compiling():
                return original(module, *args, **kwargs)
            depth = getattr(session._local, "depth", 0)
            if depth == 0:
                session._maybe_patch(module)
            session._local.depth = depth + 1
            try:
                return original(module, *args, **kwargs)
            finally:
                session._local.depth = depth

        self._original_call = original
        nn.Module.__call__ = __call__

    def uninstall(self) -> None:
        if self._original_call is not None:
            nn.Module.__call__ = self._original_call
            self._original_call = None

    def format_report(self) -> str:
        lines = [f"hyperpass run: {len(self.patched)} model(s) patched ({self.patch_kwargs})"]
        lines += [r.format() for r in self.reports if r.sites]
        hf = sys.modules.get("hyperpass.integrations.hf")
        if hf is not None:
            lines += [r.format() for r in hf.reports() if r.sites]
        if self.patch_kwargs.get("mode") == "compile":
            from hyperpass.compiler.report import format_table

            lines.append(format_table(self.compiled_sites) if self.compiled_sites else "no graph")
        return "\n".join(lines)


def _run(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> int:
    params = {n: getattr(opts, n) for n in _config.field_names() if getattr(opts, n) is not None}
    try:
        _config.DEFAULT.replace(**params)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    if opts.layers is not None and opts.last_n_layers is not None:
        parser.error("give --layers or --last-n-layers, not both")
    if opts.last_n_layers is not None and opts.last_n_layers < 1:
        parser.error(f"--last-n-layers must be >= 1, got {opts.last_n_layers}")
    if opts.inner is not None and opts.mode != "compile":
        parser.error("--inner is only used with --mode compile")
    if not os.path.isfile(opts.script):
        parser.error(f"script {opts.script!r} not found")
    patch_kwargs = dict(params, mode=opts.mode)
    for key in ("layers", "last_n_layers", "inner"):
        if getattr(opts, key) is not None:
            patch_kwargs[key] = getattr(opts, key)

    session = _RunSession(patch_kwargs)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [opts.script, *opts.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(opts.script)))
    session.install()
    code = 0
    try:
        runpy.run_path(opts.script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    finally:
        session.uninstall()
        for ref in session.patched:
            if (model := ref()) is not None and patching.is_patched(model):
                session.compiled_sites += patching.compiled_sites(model)
                patching.unpatch(model)
        sys.argv, sys.path[:] = saved_argv, saved_path
        print(session.format_report(), file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hyperpass`` command; returns the exit status."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.command == "run":
        return _run(parser, opts)
    parser.error(f"unknown command {opts.command!r}")
    return 2
