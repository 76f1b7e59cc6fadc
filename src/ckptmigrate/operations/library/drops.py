"""Drops: entries leave the state dict (no tensor data is read).

A drop throws trained values away, so ``check`` reports every one in an
``upgrade()`` unless the script says ``intended=True``; the dropped nodes are
kept aside in the plan for that comparison.
"""

from __future__ import annotations

from ..checks import OpContext
from ..registry import Operation, register


@register
class DropKey(Operation):
    """Remove one entry.

    Dropping a tensor of the input throws its trained values away; ``check``
    reports that unless ``intended=True`` says it is meant.
    """

    name = "drop_key"
    touches_data = False

    def record(self, ctx: OpContext, key: str, *, intended: bool = False) -> None:
        call = ctx.call(self, key, intended=intended)
        mark = ctx.intended(call, intended)
        node = ctx.need(call, key, tensor=False)
        del ctx.state.entries[key]
        if mark:
            ctx.state.intended.append(node)
        ctx.done(self, call, removed=[key])


@register
class DropPrefix(Operation):
    """Remove every entry whose key starts with ``prefix`` (``intended`` as for drop_key)."""

    name = "drop_prefix"
    touches_data = False

    def record(self, ctx: OpContext, prefix: str, *, intended: bool = False) -> None:
        call = ctx.call(self, prefix, intended=intended)
        mark = ctx.intended(call, intended)
        if not isinstance(prefix, str) or not prefix:
            raise ctx.fail(call, "a prefix is a non-empty string")
        gone = ctx.state.keys(prefix)
        if not gone:
            raise ctx.fail(call, f"no key starts with {prefix!r}", near=prefix)
        for key in gone:
            if mark:
                ctx.state.intended.append(ctx.state.entries[key])
            del ctx.state.entries[key]
        ctx.state.rename_metadata(lambda p: None if p.startswith(prefix) else p)
        ctx.done(self, call, removed=gone)
