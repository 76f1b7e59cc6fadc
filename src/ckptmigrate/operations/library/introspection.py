"""Introspection: what the state dict looks like at this point of the migration.

A script loops over layers with these instead of hard-coding their number;
they change nothing and record nothing.
"""

from __future__ import annotations

import torch

from ..checks import OpContext
from ..registry import Operation, register


@register
class Keys(Operation):
    """Current keys (starting with ``prefix``), in order."""

    name = "keys"
    touches_data = False

    def record(self, ctx: OpContext, prefix: str = "") -> list[str]:
        return ctx.state.keys(prefix)


@register
class Shape(Operation):
    """The shape a key has at this point of the migration."""

    name = "shape"
    touches_data = False

    def record(self, ctx: OpContext, key: str) -> torch.Size:
        return torch.Size(ctx.spec(ctx.call(self, key), key).shape)


@register
class Dtype(Operation):
    """The dtype a key has at this point of the migration."""

    name = "dtype"
    touches_data = False

    def record(self, ctx: OpContext, key: str) -> torch.dtype:
        return ctx.spec(ctx.call(self, key), key).dtype
