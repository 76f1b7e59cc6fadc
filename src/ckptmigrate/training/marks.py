"""The plan node ``op.reset_optimizer_state`` leaves behind.

It lives in the plan (not beside it) so that it follows its tensor through
later renames, splits and concatenations like any other transform. For the
tensor itself it is the identity; only the optimizer-state pass reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..plan.nodes import Node, TensorSpec


@dataclass(eq=False)
class ResetOptimizerState(Node):
    """The wrapped tensor unchanged; its optimizer state starts afresh (none, or zeros)."""

    inputs: tuple[Node, ...]
    spec: TensorSpec | None

    def compute(self, args: Sequence[Any]) -> Any:
        return args[0]

    def describe(self) -> str:
        return "reset_optimizer_state"
