"""The op layer: ``torch.ops.hyperpass.hyper_attention``, its one signature and its one
eligibility rule. Importing it registers the op; it never imports Triton or the compiler.

- :mod:`~hyperpass.op.signature`: the op's arguments, generated from ``HyperConfig``;
- :mod:`~hyperpass.op.eligibility`: which calls stay exact, and why;
- :mod:`~hyperpass.op.registration`: the custom ops (fake, autograd, dispatch) and
  :func:`hyper_attention`, the drop-in for ``F.scaled_dot_product_attention``;
- :mod:`~hyperpass.op.planned`: the op of compiled training graphs, which keeps select's block
  lists for its backward.
"""

from hyperpass.op.eligibility import Reason, skip_reason
from hyperpass.op.planned import hyper_attention_with_plan_op, keeps_plan
from hyperpass.op.registration import (
    causal_and,
    hyper_attention,
    hyper_attention_backward,
    hyper_attention_op,
)
from hyperpass.op.signature import BACKWARD_SCHEMA, FORWARD_SCHEMA, op_args

__all__ = [
    "BACKWARD_SCHEMA",
    "FORWARD_SCHEMA",
    "Reason",
    "causal_and",
    "hyper_attention",
    "hyper_attention_backward",
    "hyper_attention_op",
    "hyper_attention_with_plan_op",
    "keeps_plan",
    "op_args",
    "skip_reason",
]
