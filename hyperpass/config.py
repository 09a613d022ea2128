"""The one place for HyperAttention's parameters: their defaults, their ranges, their meaning.

Everything else (the op's schema, the compiler pass, the ONNX attributes, the TensorRT plugin
fields) is derived from :class:`HyperConfig`. Imports nothing but the standard library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("hyper", "local", "dilated", "longformer", "select")
CAUSAL_ALGOS = ("recursive", "flat")
SELECT_SCORES = ("rows", "bound")


def _param(default, low, high, doc, choices=None):
    return field(
        default=default, metadata={"low": low, "high": high, "doc": doc, "choices": choices}
    )


@dataclass(frozen=True)
class HyperConfig:
    """Parameters of the approximation. A bad value raises ``ValueError`` naming it.

    Attributes are documented in their ``metadata["doc"]``; ``docs/algorithm.md`` explains the
    trade-offs. The defaults are the configuration measured best in ``docs/quality.md``:
    ``method="select"``, exact key blocks chosen per query tile by the exact scores of a few of
    its rows, plus a window and sink tokens. The paper's algorithm is ``method="hyper"`` (for
    the published configuration also ``sample_size=256, window=0, sinks=0``: see ``PAPER``).
    """

    min_len: int = _param(
        0, 0, 2**31 - 1,
        "shortest sequence that is approximated; shorter is exact (0: where the method is "
        "measured faster than exact attention on the device; never on a CPU)",
    )  # fmt: skip
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
    select_topk: int = _param(
        8, 1, 65536, "method='select': key blocks selected per query tile (at most, adaptive)"
    )
    select_block: int = _param(128, 16, 4096, "method='select': keys per key block")
    query_block: int = _param(128, 16, 4096, "method='select': queries per tile (one selection)")
    select_score: str = _param(
        "rows", None, None,
        "method='select': how key blocks are ranked: 'rows': by the exact scores of "
        "select_rows rows of the tile; 'bound': by a score bound from row-group means",
        SELECT_SCORES,
    )  # fmt: skip
    select_rows: int = _param(
        8, 1, 4096, "method='select', select_score='rows': rows per tile scored exactly"
    )
    query_groups: int = _param(
        8, 1, 4096,
        "method='select', select_score='bound': mean-pooled row groups per tile whose bounds "
        "rank blocks",
    )  # fmt: skip
    select_mass: float = _param(
        0.0, 0.0, 1.0,
        "method='select': 0: select_topk blocks; else the fewest whose estimated attention "
        "mass, with the window's and sinks', reaches this share (select_min..select_topk)",
    )  # fmt: skip
    select_min: int = _param(0, 0, 65536, "method='select': fewest blocks selected (adaptive)")
    select_last: int = _param(
        32, 0, 65536,
        "method='select', causal: fewest blocks the last query tile selects (a prompt's end, "
        "whose rows predict the first generated tokens; 0: as every tile)",
    )  # fmt: skip
    select_coarse: int = _param(
        1, 1, 1024,
        "method='select', select_score='rows': query tiles per coarse tile. A coarse tile ranks "
        "the blocks before its tiles' local spans by select_rows rows spread over it and keeps "
        "select_candidates x select_topk of them; its tiles rank only those and the blocks "
        "between, each by its own rows (a causal call's last coarse tile ranks every block). "
        "1: every tile ranks every block",
    )  # fmt: skip
    select_candidates: int = _param(
        4, 1, 4096,
        "method='select', select_coarse > 1: blocks a coarse tile keeps per block a tile "
        "selects (select_candidates x select_topk candidates)",
    )  # fmt: skip
    causal_algo: str = _param(
        "recursive",
        None,
        None,
        "causal masks: the paper's recursion or one flat pass",
        CAUSAL_ALGOS,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(f.default) is float and type(value) is int:
                object.__setattr__(self, f.name, float(value))  # select_mass=1 means 1.0
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
            if self.query_block % self.select_rows:
                raise ValueError(
                    f"select_rows ({self.select_rows}) must divide query_block ({self.query_block})"
                )
            if self.query_block % self.query_groups:
                raise ValueError(
                    f"query_groups ({self.query_groups}) must divide query_block "
                    f"({self.query_block})"
                )
            if self.window < self.query_block:
                raise ValueError(
                    f"method='select' needs window >= query_block ({self.query_block}), "
                    f"got window={self.window}"
                )
            if self.sample_size:
                raise ValueError(
                    f"sample_size applies to method='hyper'; method='select' takes none, got "
                    f"sample_size={self.sample_size}"
                )
            if self.select_min > self.select_topk:
                raise ValueError(
                    f"select_min ({self.select_min}) must not exceed select_topk "
                    f"({self.select_topk})"
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
        return self.method == "hyper" and self.sample_size > 0

    @property
    def block_sparse(self) -> bool:
        """The method is exact attention over key blocks (select and the patterns), which the
        GPU runs through a block-sparse kernel; ``hyper`` is not."""
        return self.method != "hyper"

    def replace(self, **changes) -> HyperConfig:
        unknown = set(changes) - set(field_names())
        if unknown:
            raise TypeError(
                f"unknown HyperAttention parameter(s) {sorted(unknown)}; "
                f"known: {list(field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        # not dataclasses.asdict: its deepcopy of each field breaks Dynamo's graph on torch 2.11
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check(f: dataclasses.Field, value) -> None:
    meta = f.metadata
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
        return
    kind = type(f.default)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(
            f"{f.name} must be {'a float' if kind is float else 'an int'} in "
            f"[{meta['low']}, {meta['high']}], got {value!r}"
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
