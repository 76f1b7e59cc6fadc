"""Recorded ``op`` calls, and what each one does to the plan when run again.

A squash works on the calls the replaced revisions made. Running them again
one by one on shapes (``replay``) says exactly which keys each call touched,
which is what the simplifier needs to know that two calls can be joined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..operations.checks import OpContext
from ..operations.registry import OpCall, operation
from ..plan.nodes import TensorSpec
from ..plan.state import PlanState


@dataclass(frozen=True)
class Call:
    """One ``op.<name>(...)`` call and the revision whose random numbers its values use."""

    op: OpCall
    seeds: str

    @property
    def name(self) -> str:
        return self.op.name

    def arguments(self) -> dict[str, Any]:
        """Its arguments by parameter name, defaults filled in."""
        return operation(self.name).arguments(self.op)

    def argument(self, name: str) -> Any:
        return self.arguments()[name]

    def with_arguments(self, **changes: Any) -> Call:
        """The same call with some arguments changed (by parameter name)."""
        sig = operation(self.name).signature
        bound = sig.bind(*self.op.args, **self.op.kwargs)
        bound.apply_defaults()
        values = {**bound.arguments, **changes}
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for p in sig.parameters.values():
            if p.name not in values:
                continue
            if p.kind is p.VAR_KEYWORD:
                kwargs.update(values[p.name])
            elif p.kind is p.KEYWORD_ONLY:
                kwargs[p.name] = values[p.name]
            elif p.kind is p.VAR_POSITIONAL:
                args.extend(values[p.name])
            else:
                args.append(values[p.name])
        return replace(self, op=OpCall(self.name, tuple(args), kwargs))


@dataclass(frozen=True)
class Effect:
    """What one call did: the keys it produced, removed and read, with their specs."""

    results: tuple[str, ...]
    removed: tuple[str, ...]
    read: frozenset[str]
    before: Mapping[str, TensorSpec | None]  # specs, before the call, of what it changed
    after: Mapping[str, TensorSpec | None]  # specs of what it produced

    @property
    def touched(self) -> frozenset[str]:
        return frozenset(self.results) | frozenset(self.removed) | self.read


def replay(
    calls: Sequence[Call],
    start: Mapping[str, TensorSpec | None],
    *,
    direction: str = "upgrade",
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[Effect], PlanState]:
    """Run ``calls`` on shapes from the schema ``start``: each call's effect, and the end state.

    Raises the op's own error when a call no longer applies. What a call did
    comes from its records (the keys it produced and removed) and the inputs of
    the nodes it made (the keys it read), kept up to date incrementally so a
    long list of calls on a big schema stays cheap.
    """
    state = PlanState.from_schema(start, metadata)
    ctx = OpContext(state, revision="squash", direction=direction)
    specs = {k: n.spec for k, n in state.entries.items()}
    node_of = {k: id(n) for k, n in state.entries.items()}
    key_of = {nid: k for k, nid in node_of.items()}
    effects: list[Effect] = []
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        for call in calls:
            ctx.seed_revision = call.seeds
            first = len(ctx.records)
            operation(call.name).record(ctx, *call.op.args, **call.op.kwargs)
            produced = list(dict.fromkeys(k for r in ctx.records[first:] for k, _ in r.results))
            removed = [k for r in ctx.records[first:] for k in r.removed if k not in produced]
            entries = state.entries
            read = {
                key_of[id(inp)]
                for k in produced
                if id(entries[k]) not in key_of  # a node the call made (not one it moved)
                for inp in entries[k].inputs
                if id(inp) in key_of
            }
            before = {k: specs[k] for k in (*produced, *removed) if k in specs}
            for k in (*removed, *produced):
                nid = node_of.pop(k, None)
                if nid is not None and key_of.get(nid) == k:
                    del key_of[nid]
                specs.pop(k, None)
            for k in produced:
                node = entries[k]
                node_of[k] = id(node)
                key_of[id(node)] = k
                specs[k] = node.spec
            after = {k: specs[k] for k in produced}
            effects.append(Effect(tuple(produced), tuple(removed), frozenset(read), before, after))
    return effects, state
