"""One optimizer's state dict after the migration: its groups and every carried state.

The param groups keep their settings and get the new parameters, numbered in
the new model's order (or named, for an optimizer keyed by parameter name);
each new parameter's state is carried along its plan from the old parameters
it is made of (:class:`.optimizer.StateCarrier`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..plan.nodes import Node
from .layout import Layout
from .optimizer import Carried, StateCarrier, unshare
from .pairing import OptimizerPlan


@dataclass
class Rebuilt:
    """The new state dict, and how each parameter's state came about (for the report)."""

    value: dict[str, Any]
    members: list[list[str]]  # new parameters (file keys) per param group
    pid_of: dict[str, int | str]  # new parameter -> its id in the new state dict
    carried: dict[str, Carried]


def rebuild(
    j: int,
    plan: OptimizerPlan,
    old: Layout,
    new: Layout,
    entries: Mapping[str, Node],
    membership: Mapping[str, tuple[int, int] | None],
    *,
    meta: bool,
    revisions: Mapping[str, Sequence[str]],
    members: Sequence[Sequence[str]] | None = None,
) -> Rebuilt:
    """Optimizer ``j``'s new state dict; ``meta`` carries shapes only (a dry run).

    ``members`` are its parameters per group in order when a live optimizer
    says so; otherwise they follow ``membership`` in the new layout's order.
    """
    opt = plan.found
    if members is None:
        chosen: list[list[str]] = [[] for _ in opt.groups]
        for key in new.params:
            m = membership.get(key)
            if m is not None and m[0] == j:
                chosen[m[1]].append(key)
    else:
        chosen = [list(keys) for keys in members]
    groups, pid_of = _new_groups(plan, chosen)
    carrier = StateCarrier(
        _old_state(plan, old),
        meta=meta,
        label=opt.label,
        display=lambda k: k,
        certain=plan.names is not None,
        revisions=revisions,
    )
    new_state: dict[Any, dict[str, Any]] = {}
    carried: dict[str, Carried] = {}
    for keys in chosen:
        for key in keys:
            c = carrier.carry(key, entries[key])
            carried[key] = c
            if c.state is not None:
                new_state[pid_of[key]] = c.state
    value = dict(opt.value)
    value["state"] = new_state if meta else unshare(new_state)
    value["param_groups"] = groups
    return Rebuilt(value, chosen, pid_of, carried)


def _new_groups(
    plan: OptimizerPlan, members: Sequence[Sequence[str]]
) -> tuple[list[dict[str, Any]], dict[str, int | str]]:
    """The param groups with their new members, and each new parameter's id."""
    groups: list[dict[str, Any]] = []
    pid_of: dict[str, int | str] = {}
    next_id = 0
    for group, keys in zip(plan.found.groups, members):
        ids: list[int | str] = []
        for key in keys:
            pid: int | str = plan.wrapper + key if plan.string_ids else next_id
            next_id += 1
            ids.append(pid)
            pid_of[key] = pid
        copy = dict(group)
        copy["params"] = ids
        if "param_names" in group:
            copy["param_names"] = [plan.wrapper + k for k in keys]
        groups.append(copy)
    return groups, pid_of


def _old_state(plan: OptimizerPlan, old: Layout) -> Callable[[str], Mapping[str, Any] | None]:
    """``state_of(file key)``: this optimizer's state for an old parameter, or None."""
    old_state = plan.found.state

    def state_of(key: str) -> Mapping[str, Any] | None:
        rep = old.rep(key)
        slot = plan.slots.get(rep)
        if slot is None or not old.is_param(rep):
            return None
        entry = old_state.get(slot.pid)
        return entry if isinstance(entry, Mapping) else None

    return state_of
