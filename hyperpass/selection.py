"""Which attention sites to approximate: the one meaning of ``layers`` and ``last_n_layers``.

- ``layers``: glob (``model.layers.*.self_attn``) or regex (``.*layers\\.(28|29)\\..*``)
  patterns, full match, over module paths as ``model.named_modules()`` spells them;
- ``last_n_layers``: the last N layers of the model's layer stack, N >= 1 (as the
  HyperAttention paper patched only the final layers).

The compiler backend, :func:`hyperpass.patch`, ``hyperpass run`` and (by layer index,
``layer_indices``) :func:`hyperpass.register_hf` all validate and match through this module.
Imports the standard library only.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence


def path_matches(path: str, pattern: str) -> bool:
    """A glob or a regex pattern matching the whole module path."""
    if fnmatch.fnmatchcase(path, pattern):
        return True
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:
        return False


def check_layers(layers: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``layers`` as a tuple of patterns (None: every module).

    Raises:
        TypeError: not a str or a sequence of str.
    """
    if layers is None:
        return None
    patterns = (layers,) if isinstance(layers, str) else tuple(layers)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"layers must be a glob/regex pattern or a list of them, got {layers!r}")
    return patterns


def check_last_n_layers(last_n_layers: int | None) -> int | None:
    """``last_n_layers`` validated (None: every layer).

    Raises:
        ValueError: not an int >= 1.
    """
    if last_n_layers is None:
        return None
    if isinstance(last_n_layers, bool) or not isinstance(last_n_layers, int) or last_n_layers < 1:
        raise ValueError(f"last_n_layers must be an int >= 1 or None, got {last_n_layers!r}")
    return last_n_layers


def check_exclusive(layers, last_n_layers) -> None:
    """Raises ValueError when both selectors are given."""
    if layers is not None and last_n_layers is not None:
        raise ValueError(
            f"give layers= or last_n_layers=, not both (got layers={layers!r}, "
            f"last_n_layers={last_n_layers!r})"
        )


def layer_index(path: str) -> int:
    """The layer index of a module path: its last number (``model.layers.3.self_attn`` -> 3),
    -1 when it has none."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(numbers[-1]) if numbers else -1
