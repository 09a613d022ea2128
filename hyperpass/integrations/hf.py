"""Hugging Face transformers: an attention implementation named ``"hyperpass"``.

:func:`register_hf` adds an attention function to transformers' ``AttentionInterface`` and the
matching mask function to ``AttentionMaskInterface`` (without one, transformers builds no mask at
all for an unknown implementation and padding would be dropped). Then
``from_pretrained(..., attn_implementation="hyperpass")`` and
``model.set_attn_implementation("hyperpass")`` work for any model that supports the interface.

Masks: the mask function is transformers' SDPA one, with two changes. It returns no mask for a
plain causal layer (no padding, or all-ones padding in eager mode; also while tracing), so the
layer reaches the op with ``attn_mask=None, is_causal=True``. For a padded batch of prompts (2-D
padding, causal, no cache before the queries) it returns the padding as a ``[B, 1, 1, N]`` key
mask, which the attention function passes the op with ``is_causal=True`` (causal AND padding;
``method="select"`` approximates it, other methods and exact calls get the whole mask). Sliding
windows shorter than the sequence and custom masks are materialized and computed by exact SDPA,
as ``"sdpa"`` would. Decode steps (one query over a long cache) are exact.

Imports transformers when :func:`register_hf` runs, never at ``import hyperpass``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch

from hyperpass import config as _config
from hyperpass.config import HyperConfig
from hyperpass.integrations.patching import RoutingReport, note_call
from hyperpass.op import causal_and, hyper_attention_op, op_args
from hyperpass.op.eligibility import skip_reason_words
from hyperpass.selection import check_exclusive, check_last_n_layers

log = logging.getLogger("hyperpass")

# name -> report of the attention function registered under that name
_REPORTS: dict[str, RoutingReport] = {}


def _select_layer(module, layers: frozenset[int] | None, last_n_layers: int | None) -> bool:
    idx = getattr(module, "layer_idx", None)
    if layers is None and last_n_layers is None:
        return True
    if idx is None:
        return False
    if layers is not None:
        return idx in layers
    n_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    return n_layers is not None and idx >= n_layers - last_n_layers


def _make_attention(config: HyperConfig, report: RoutingReport, layers, last_n_layers):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def hyperpass_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ):
        """transformers' attention signature: q [B, H, Nq, D], k/v [B, Hkv, Nk, D] in,
        ([B, Nq, H, Dv], None) out."""
        site = f"layer {getattr(module, 'layer_idx', type(module).__name__)}"
        exact_reason = None
        key_mask = attention_mask if _is_key_mask(attention_mask, query, key) else None
        if attention_mask is not None and key_mask is None:
            exact_reason = "attention mask (window or custom pattern)"
        elif dropout > 0.0:
            exact_reason = "dropout"
        elif kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
            exact_reason = "position bias or softcap"
        elif kwargs.get("cache") is not None:
            exact_reason = "paged cache"
        elif not _select_layer(module, layers, last_n_layers):
            exact_reason = "layer not selected"
        if exact_reason is not None and key_mask is not None:
            attention_mask = causal_and(key_mask, query.shape[2], query.shape[2])
        if exact_reason is not None:
            note_call(report, site, lambda: exact_reason, exact_reason)
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
            )

        q_len = query.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = q_len > 1 and causal  # one query attends to the whole cache: not causal
        causal = causal or key_mask is not None
        if causal and key.shape[2] > q_len:
            # Prefill into an empty static cache: the keys past the queries are empty slots.
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        gqa = query.shape[1] != key.shape[1]
        if torch.compiler.is_compiling():
            note_call(report, site, lambda: None)
        else:  # eager: an exact call skips the op's dispatch
            reason = skip_reason_words(query, key, value, key_mask, 0.0, causal, gqa, config)
            note_call(report, site, lambda: reason)
            if reason is not None:
                mask = None if key_mask is None else causal_and(key_mask, q_len, q_len)
                return sdpa_attention_forward(
                    module, query, key, value, mask, dropout, scaling, causal and mask is None,
                    **kwargs,
                )  # fmt: skip
        out = hyper_attention_op(*op_args(
            query, key, value, attn_mask=key_mask, is_causal=causal, scale=scaling,
            enable_gqa=gqa, config=config,
        ))  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    return hyperpass_attention_forward


def _is_key_mask(mask, query, key) -> bool:
    """The [B, 1, 1, Nk] boolean key mask :func:`_make_mask` returns for a padded causal batch
    (HF's own masks are [B, 1, Nq, Nk]): it stands for causal AND padding."""
    return (
        isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
        and mask.shape[1] == mask.shape[2] == 1 and query.shape[2] > 1
        and mask.shape[3] == key.shape[2] == query.shape[2]
    )  # fmt: skip


def _make_mask(sdpa_mask):
    """transformers' SDPA mask function, that also skips plain causal masks under compile.

    transformers skips the mask (so that SDPA gets ``is_causal``) only when it is not tracing on
    torch < 2.14 (it cannot tell compile from export there). Without a padding mask, whether the
    mask is plain causal depends on shapes alone, which Dynamo guards on: skip it then as well.
    """
    from transformers.masking_utils import causal_mask_function

    signature = inspect.signature(sdpa_mask)

    def hyperpass_mask(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        padding = a.get("attention_mask")
        if padding is not None and not torch.compiler.is_compiling() and bool(padding.all()):
            padding = None  # all ones (eager only: tracing cannot read values)
        local = a.get("local_size")
        unwindowed = local is None or a["kv_length"] < local
        plain_causal = (
            a.get("allow_is_causal_skip", True)
            and padding is None
            and unwindowed
            and (a["q_length"] == 1 or a["q_length"] == a["kv_length"])
        )
        if plain_causal:
            return None
        padded_prefill = (  # causal AND padding of one prompt per row, no cache before it
            padding is not None and padding.dim() == 2 and unwindowed
            # causal: HF's own function, or a window/chunk wider than the keys (HF's own skip
            # assumes the same)
            and (local is not None or a.get("mask_function", causal_mask_function)
                 is causal_mask_function)
            and a["q_length"] == a["kv_length"] == padding.shape[-1] > 1
            and all(isinstance(a.get(o, 0), int) and a.get(o, 0) == 0
                    for o in ("q_offset", "kv_offset"))
        )  # fmt: skip
        if padded_prefill:
            return padding.to(torch.bool)[:, None, None, :]  # a key mask: see _is_key_mask
        return sdpa_mask(*args, **kwargs)

    return hyperpass_mask


def register_hf(
    name: str = "hyperpass",
    min_len: int | None = None,
    *,
    layer_indices: Sequence[int] | None = None,
    last_n_layers: int | None = None,
    layers: None = None,
    **params,
) -> str:
    """Register the attention implementation ``name`` with transformers; returns ``name``.

    Registering the same name again replaces its settings (models pick the function up at their
    next forward). Register other names for other settings (``register_hf("hyperpass-8k",
    min_len=8192)``).

    Args:
        name: the ``attn_implementation`` string.
        min_len: shortest sequence that is approximated; None: the :class:`HyperConfig` default.
        layer_indices: indices (``module.layer_idx``) of the layers to approximate; others
            stay exact.
        last_n_layers: approximate only the last N layers (``config.num_hidden_layers`` - N
            on), N >= 1, as ``last_n_layers`` everywhere (``hyperpass.selection``).
        layers: not taken here (a TypeError says to use ``layer_indices``).
        **params: :class:`HyperConfig` fields.

    Raises:
        ImportError: transformers is not installed.
        ValueError / TypeError: a bad parameter or selector (the message names it).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not isinstance(name, str) or not name or name in ("eager", "sdpa"):
        raise ValueError(f"name must be a new attention implementation name, got {name!r}")
    if layers is not None:
        raise TypeError(
            "register_hf selects layers by index: layer_indices=[...] (transformers' attention "
            "functions see no module path); layers= patterns are for backend() and patch()"
        )
    check_exclusive(layer_indices, last_n_layers)
    last_n_layers = check_last_n_layers(last_n_layers)
    if layer_indices is not None:
        if isinstance(layer_indices, str | bytes) or not all(
            isinstance(i, int) for i in layer_indices
        ):
            raise TypeError(
                f"layer_indices must be a sequence of layer indices, got {layer_indices!r}"
            )
        layer_indices = frozenset(layer_indices)
    fields = {"min_len": min_len} if min_len is not None else {}
    config = _config.DEFAULT.replace(**fields, **params)

    report = _REPORTS.setdefault(name, RoutingReport(f"transformers attn_implementation={name!r}"))
    AttentionInterface.register(name, _make_attention(config, report, layer_indices, last_n_layers))
    AttentionMaskInterface.register(name, _make_mask(sdpa_mask))
    log.debug("registered attn_implementation=%r with %s", name, config)
    return name


def report(name: str = "hyperpass") -> RoutingReport:
    """The routing report of the attention implementation ``name``.

    Raises:
        ValueError: ``name`` was never registered by :func:`register_hf`.
    """
    if name not in _REPORTS:
        raise ValueError(f"attention implementation {name!r} is not registered by register_hf")
    return _REPORTS[name]


def reports() -> list[RoutingReport]:
    return list(_REPORTS.values())
