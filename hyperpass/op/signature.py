"""The one signature of ``torch.ops.hyperpass.hyper_attention``, generated from ``HyperConfig``.

SDPA's arguments (``q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa``), then every
:class:`~hyperpass.config.HyperConfig` field in declaration order. The schema strings, the
binder of the op's Python kernels, the argument tuples built by the compiler pass, patching,
Hugging Face and TensorRT, and the exporters' by-name view all come from :data:`PARAMETERS`.
Imports torch only for the type of ``inspect`` annotations; never the op itself.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hyperpass.config import DEFAULT, HyperConfig, field_names


@dataclass(frozen=True)
class Parameter:
    """One non-tensor argument of the op: its name, schema type and default."""

    name: str
    schema_type: str  # torch schema type: "Tensor?", "float", "bool", "float?", "int", "str"
    default: object
    python_type: object  # annotation for ``inspect`` (exporters bind by it)


_SDPA = (
    Parameter("attn_mask", "Tensor?", None, inspect.Parameter.empty),
    Parameter("dropout_p", "float", 0.0, float),
    Parameter("is_causal", "bool", False, bool),
    Parameter("scale", "float?", None, float | None),
    Parameter("enable_gqa", "bool", False, bool),
)
_SCHEMA_TYPES = {int: "int", float: "float", str: "str"}
_CONFIG = tuple(
    Parameter(name, _SCHEMA_TYPES[type(value)], value, type(value))
    for name, value in DEFAULT.as_dict().items()
)
PARAMETERS: tuple[Parameter, ...] = _SDPA + _CONFIG
"""Every argument after the tensors, in schema order."""
SDPA_NAMES = tuple(p.name for p in _SDPA)
N_SDPA_ARGS = 3 + len(_SDPA)  # q, k, v and SDPA's own arguments: the config starts here


def _literal(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _schema_arguments(tensors: Sequence[str]) -> str:
    parts = [f"Tensor {t}" for t in tensors]
    parts += [f"{p.schema_type} {p.name}={_literal(p.default)}" for p in PARAMETERS]
    return ", ".join(parts)


FORWARD_SCHEMA = f"({_schema_arguments(('q', 'k', 'v'))}) -> Tensor"
BACKWARD_SCHEMA = f"({_schema_arguments(('grad_out', 'q', 'k', 'v'))}) -> (Tensor, Tensor, Tensor)"
PLAN = ("part_num", "part_idx", "full_num", "full_idx")  # select's lists, kept for the backward
PLANNED_FORWARD_SCHEMA = (
    f"({_schema_arguments(('q', 'k', 'v'))}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
PLANNED_BACKWARD_TENSORS = ("grad_out", "q", "k", "v", *PLAN)
PLANNED_BACKWARD_SCHEMA = (
    f"({_schema_arguments(PLANNED_BACKWARD_TENSORS)}) -> (Tensor, Tensor, Tensor)"
)


def op_args(
    q, k, v, *, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    config: HyperConfig = DEFAULT,
) -> tuple:  # fmt: skip
    """The positional arguments of one op call (what every caller passes the op)."""
    return (q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, *config.as_dict().values())


def config_of(values: Sequence) -> HyperConfig:
    """The :class:`HyperConfig` of the config part of an op call's positional arguments."""
    return _config_of(tuple(values))


@functools.lru_cache(maxsize=256)
def _config_of(values: tuple) -> HyperConfig:
    return HyperConfig(*values)  # validated once per distinct values


# ----------------------------------------------------------------------------- the kernels' binder
_MISSING = object()


def positional(*tensor_names: str):
    """Decorate a Python kernel of the op to receive every argument positionally.

    The dispatcher omits trailing arguments equal to their schema defaults when it calls a
    Python kernel, so kernels take ``*args, **kwargs``; this fills the defaults in schema order.
    (By hand, not ``inspect.Signature.bind``: that took half of the op's host time per call.)
    """
    names = (*tensor_names, *(p.name for p in PARAMETERS))
    position = {name: i for i, name in enumerate(names)}
    required = len(tensor_names)
    fill = tuple(p.default for p in PARAMETERS)

    def decorate(kernel):
        @functools.wraps(kernel)
        def with_defaults(*args, **kwargs):
            if len(args) > len(names):
                raise TypeError(f"{kernel.__name__}: {len(args)} arguments, at most {len(names)}")
            given = [*args, *[_MISSING] * (required - len(args))]
            values = [*given, *fill[len(given) - required :]]
            for name, value in kwargs.items():
                if name not in position or position[name] < len(args):
                    raise TypeError(f"{kernel.__name__}: unexpected or repeated argument {name!r}")
                values[position[name]] = value
            missing = [n for n, value in zip(names, values, strict=True) if value is _MISSING]
            if missing:
                raise TypeError(f"{kernel.__name__}: missing argument(s) {missing}")
            return kernel(*values)

        return with_defaults

    return decorate


# ----------------------------------------------------------------------------- by name
def _python_signature() -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    tensors = [inspect.Parameter(n, kind) for n in ("q", "k", "v")]
    rest = [
        inspect.Parameter(p.name, kind, default=p.default, annotation=p.python_type)
        for p in PARAMETERS
    ]
    return inspect.Signature(tensors + rest)


PYTHON_SIGNATURE = _python_signature()
"""The op's signature as a Python signature (the ONNX exporter reads inputs and attributes)."""


def arguments(args: Sequence, kwargs: Mapping | None = None) -> dict:
    """All arguments of one op call by name, defaults filled in."""
    bound = PYTHON_SIGNATURE.bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    return dict(bound.arguments)


def config_from_arguments(named: Mapping) -> HyperConfig:
    """The :class:`HyperConfig` of a by-name argument dict (from :func:`arguments`)."""
    return HyperConfig(**{name: named[name] for name in field_names()})
