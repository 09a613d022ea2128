"""The one place for HyperAttention's parameters: their defaults, their ranges, their meaning.

Everything else (the op's schema, the compiler pass, the ONNX attributes, the TensorRT plugin
fields) is derived from :class:`HyperConfig`. Imports nothing but the standard library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("hyper", "local", "dilated", "longformer", "select")
CAUSAL_ALGOS = ("recursive", "flat")


def _param(default, low, high, doc, choices=None):
    return field(
        default=default, metadata={"low": low, "high": high, "doc": doc, "choices": choices}
    )


@dataclass(frozen=True)
class HyperConfig:
    """Parameters of the approximation. A bad value raises ``ValueError`` naming it.

    Attributes are documented in their ``metadata["doc"]``; ``docs/algorithm.md`` explains the
    trade-offs. The defaults are the configuration measured best in ``docs/quality.md``:
    ``method="select"`` (window 512, 16 sinks, 16 selected blocks of 64 keys per 16 queries, no
    samples). The paper's algorithm is ``method="hyper"`` (for the published configuration also
    ``sample_size=256, window=0, sinks=0``: see ``PAPER``).
    """

    min_len: int = _param(
        4096, 1, 2**31 - 1, "shortest sequence that is approximated; shorter is exact"
    )
    block_size: int = _param(256, 16, 65536, "keys per sortLSH block (exact part), multiple of 16")
    sample_size: int = _param(0, 0, 65536, "uniformly sampled keys per query block (0: none)")
    lsh_num_projs: int = _param(7, 1, 16, "random hyperplanes of sortLSH (2^r buckets)")
    min_seq_len: int = _param(
        4096, 16, 2**31 - 1, "causal recursion stops at exact blocks this long"
    )
    seed: int = _param(0, 0, 2**31 - 1, "seed of the hyperplanes and the samples")
    method: str = _param(
        "select", None, None, "which exact set: sortLSH, selected blocks, a pattern", METHODS
    )
    window: int = _param(512, 0, 2**31 - 1, "keys within this distance are exact (0: none)")
    dilation: int = _param(1, 1, 65536, "pattern keys are every dilation-th within the window")
    sinks: int = _param(16, 0, 65536, "the first sinks keys are exact for every query")
    select_topk: int = _param(16, 1, 4096, "method='select': key blocks picked per query block")
    select_block: int = _param(64, 16, 4096, "method='select': keys per selectable block")
    query_block: int = _param(16, 16, 4096, "method='select': queries sharing one selection")
    causal_algo: str = _param(
        "recursive",
        None,
        None,
        "causal masks: the paper's recursion or one flat pass",
        CAUSAL_ALGOS,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16, got {self.block_size}")
        if self.method in ("local", "dilated", "longformer") and self.window == 0:
            raise ValueError(f"method={self.method!r} needs window > 0, got window=0")
        if self.method == "longformer" and self.sinks == 0:
            raise ValueError("method='longformer' needs sinks > 0 (the global tokens), got sinks=0")
        if self.method == "select":
            if self.select_block % 16 or self.query_block % 16:
                raise ValueError(
                    "select_block and query_block must be multiples of 16, got "
                    f"{self.select_block} and {self.query_block}"
                )
            if self.select_block % self.query_block:
                raise ValueError(
                    f"query_block ({self.query_block}) must divide select_block "
                    f"({self.select_block})"
                )
            if self.window < self.query_block:
                raise ValueError(
                    f"method='select' needs window >= query_block ({self.query_block}), "
                    f"got window={self.window}"
                )
        if self.method == "dilated" and self.dilation < 2:
            raise ValueError(f"method='dilated' needs dilation >= 2, got dilation={self.dilation}")

    @property
    def uses_lsh(self) -> bool:
        return self.method == "hyper"

    def causal_recursion(self, is_causal: bool) -> bool:
        """Whether a call runs the paper's causal recursion (Algorithm 4): a causal call with
        sortLSH and ``causal_algo="recursive"``."""
        return is_causal and self.uses_lsh and self.causal_algo == "recursive"

    @property
    def uses_samples(self) -> bool:
        return self.method in ("hyper", "select") and self.sample_size > 0

    def replace(self, **changes) -> HyperConfig:
        unknown = set(changes) - set(field_names())
        if unknown:
            raise TypeError(
                f"unknown HyperAttention parameter(s) {sorted(unknown)}; "
                f"known: {list(field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(f: dataclasses.Field, value) -> None:
    meta = f.metadata
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{f.name} must be an int in [{meta['low']}, {meta['high']}], got {value!r}"
        )
    if not meta["low"] <= value <= meta["high"]:
        raise ValueError(f"{f.name} must be in [{meta['low']}, {meta['high']}], got {value}")


def field_names() -> tuple[str, ...]:
    """The parameter names in schema order."""
    return tuple(f.name for f in dataclasses.fields(HyperConfig))


def field_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in dataclasses.fields(HyperConfig)}


DEFAULT = HyperConfig()
# the published HyperAttention configuration (the paper's speed setting; issue 4's benchmark)
PAPER = HyperConfig(method="hyper", sample_size=256, window=0, sinks=0)
