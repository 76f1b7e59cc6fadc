"""Training state: marks in the plan that only the optimizer-state pass reads."""

from __future__ import annotations

from ...plan.nodes import ResetOptimizerState
from ..checks import OpContext
from ..registry import OpCall, Operation, SpecOf, register


@register
class ResetOptimizerStateOp(Operation):
    """Start ``key``'s optimizer state afresh when a training checkpoint is migrated.

    The tensor is unchanged. Its momentum/moments are dropped (zeros for its
    part of a later concat), e.g. after ``map_tensor``, whose function says
    nothing about them.
    """

    name = "reset_optimizer_state"

    def record(self, ctx: OpContext, key: str) -> None:
        call = ctx.call(self, key)
        node = ctx.need(call, key)
        # a mark in the plan, so it follows the tensor through later ops
        ctx.state.entries[key] = ResetOptimizerState((node,), node.spec)
        ctx.done(self, call, [key])

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall]:
        return []  # the weights are unchanged; a downgrade has no state to restore
