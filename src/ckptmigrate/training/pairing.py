"""Which optimizer entry belongs to which old parameter, and where new parameters go.

PyTorch pairs an optimizer's state with parameters by position alone. An
optimizer saved with ``param_names`` (PyTorch >= 2.6) names its parameters,
so it is paired by name and may cover only some of them; otherwise its
entries are paired in order with the checkpoint's parameters, and that
pairing is checked (as many parameters as entries, state shaped like its
parameter) before anything is carried, because a wrong pairing would hand
Adam's moments to the wrong tensor without any error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan.nodes import Node, TensorSpec
from .layout import Layout, resolve_guesses, sources
from .optimizer import PER_PARAMETER_STATE, SCALAR_STATE, FoundOptimizer, OptimizerStateError
from .policy import ESCAPE


@dataclass
class Slot:
    """One entry of an optimizer: which optimizer, group and id, for which old parameter."""

    opt: int
    group: int
    pid: int | str


@dataclass
class OptimizerPlan:
    """One optimizer found in the container, with what pairs its entries to parameters."""

    found: FoundOptimizer
    names: list[tuple[int, int | str, str]] | None  # (group, id, file key) from param_names
    wrapper: str = ""  # the prefix its names carry (e.g. "module.")
    string_ids: bool = False
    slots: dict[str, Slot] = field(default_factory=dict)  # old parameter (rep) -> slot


def optimizer_plan(opt: FoundOptimizer, specs: Mapping[str, Any], wrapper: str) -> OptimizerPlan:
    """Read ``param_names`` (or parameter names used as ids) into file keys."""
    groups = opt.groups
    ids = opt.ids()
    string_ids = bool(ids) and all(isinstance(pid, str) for _g, pid in ids)
    has_names = all(
        isinstance(g.get("param_names"), (list, tuple))
        and len(g["param_names"]) == len(g["params"])
        for g in groups
    )
    if not (string_ids or has_names):
        return OptimizerPlan(opt, None)
    names: list[tuple[int, int | str, str]] = []
    used_wrapper = ""
    for g, group in enumerate(groups):
        labels = group["params"] if string_ids else group["param_names"]
        for pid, name in zip(group["params"], labels):
            key = str(name)
            if key not in specs and wrapper and key.startswith(wrapper):
                key, used_wrapper = key[len(wrapper) :], wrapper
            if key not in specs:
                raise OptimizerStateError(
                    f"the optimizer state at {opt.label} names the parameter {name!r}, which "
                    "is not in the checkpoint's state dict",
                    hint="was the optimizer saved with another model than these weights? Choose "
                    "the weights with --state-dict-key",
                )
            names.append((g, pid, key))
    return OptimizerPlan(opt, names, used_wrapper, string_ids)


def check_pairing(
    plans: Sequence[OptimizerPlan], old: Layout, *, section: str, count_hint: str = ""
) -> None:
    """Entries paired by position: as many parameters as entries, and shapes that fit.

    ``section`` is the configuration section a fix goes into; ``count_hint``
    explains a count that disagrees (Lightning numbers the whole module).
    """
    positional = [p for p in plans if p.names is None]
    if not positional:
        return
    count = sum(len(p.found.ids()) for p in positional)

    def lines_up(params: list[str]) -> bool:
        return _misaligned(positional, params, old.specs) is None

    why = resolve_guesses(old, count, lines_up)
    if why is not None:
        raise _count_error(positional, old, count, why, section, count_hint)
    problem = _misaligned(positional, old.params, old.specs)
    if problem is not None:
        raise _alignment_error(problem)


def _count_error(
    plans: Sequence[OptimizerPlan],
    old: Layout,
    count: int,
    why: str,
    section: str,
    count_hint: str,
) -> OptimizerStateError:
    params = old.params
    guessed = old.guessed_params()
    where = ", ".join(p.found.label for p in plans)
    detail = ""
    if guessed:
        shown = ", ".join(guessed[:6]) + (", ..." if len(guessed) > 6 else "")
        detail = f" ({len(guessed)} of them taken for parameters by guess: {shown})"
    return OptimizerStateError(
        f"the optimizer state at {where} holds {count} parameter"
        f"{'s' if count != 1 else ''}, but the checkpoint's state dict has {len(params)} "
        f"tensors that look like parameters{detail}, so its entries cannot be paired with "
        f"parameters ({why})" + count_hint,
        hint=f"set `model = package.module:build_model` in [{section}] so that parameters and "
        "buffers are known (or record the base schema from the model: ckptmigrate schema "
        "--record); an optimizer over only some of the parameters must be saved with "
        "param_names (build it from model.named_parameters()); " + ESCAPE,
    )


def _misaligned(
    plans: Sequence[OptimizerPlan], params: Sequence[str], specs: Mapping[str, TensorSpec | None]
) -> str | None:
    """Why pairing the optimizers' entries with ``params`` in order is wrong (None if fine).

    Entries paired by position must hold per-parameter state shaped like their
    parameter; a misfit means the parameters are not the ones (or not in the
    order) the optimizer had.
    """
    offset = 0
    for plan in plans:
        ids = plan.found.ids()
        state = plan.found.state
        for n, ((_g, pid), key) in enumerate(zip(ids, params[offset:]), start=offset):
            entry = state.get(pid)
            spec = specs.get(key)
            if not isinstance(entry, Mapping) or spec is None:
                continue
            for name, value in entry.items():
                if not isinstance(value, torch.Tensor) or str(name) in SCALAR_STATE:
                    continue
                if tuple(value.shape) == spec.shape:
                    continue
                if value.dim() > 0 or str(name) in PER_PARAMETER_STATE:
                    return (
                        f"the optimizer state at {plan.found.label}, entry {pid!r}, holds "
                        f"{name!r} of shape {list(value.shape)}, but parameter #{n} in "
                        f"state-dict order, {key}, is {list(spec.shape)}"
                    )
        offset += len(ids)
    return None


def _alignment_error(problem: str) -> OptimizerStateError:
    return OptimizerStateError(
        f"the optimizer state does not line up with the checkpoint's parameters: {problem}",
        hint="ckptmigrate pairs optimizer entries with the parameters in the state dict's "
        "order, as model.parameters() yields them; an optimizer whose param groups reorder "
        "them or leave some out must be saved with param_names (build it from "
        "model.named_parameters()); otherwise check which tensors are parameters (set "
        "`model = ...` in the configuration); " + ESCAPE,
    )


def pair(plans: Sequence[OptimizerPlan], old: Layout) -> dict[str, Slot]:
    """Fill every plan's slots (old parameter -> entry); the first optimizer holding one owns it."""
    offset = 0
    params = old.params
    for j, plan in enumerate(plans):
        if plan.names is not None:
            for g, pid, key in plan.names:
                plan.slots.setdefault(old.rep(key), Slot(j, g, pid))
        else:
            ids = plan.found.ids()
            for (g, pid), key in zip(ids, params[offset : offset + len(ids)]):
                plan.slots[key] = Slot(j, g, pid)
            offset += len(ids)
    owner: dict[str, Slot] = {}
    for plan in plans:
        for key, slot in plan.slots.items():
            owner.setdefault(key, slot)
    return owner


def param_sources(node: Node, old: Layout) -> list[str]:
    """The old parameters (tie representatives) a new entry is made of."""
    out: list[str] = []
    for key in sources(node):
        rep = old.rep(key)
        if old.is_param(rep) and rep not in out:
            out.append(rep)
    return out


def membership(
    new: Layout, entries: Mapping[str, Node], old: Layout, owner: Mapping[str, Slot]
) -> dict[str, tuple[int, int] | None]:
    """(optimizer, group) of every new parameter, None when no optimizer holds it.

    A parameter made of old parameters goes where the first of them was; one
    made only of new tensors goes where the parameter before it went (after
    it, for the first), as a layer added inside a part of the model belongs
    with that part.
    """
    out: dict[str, tuple[int, int] | None] = {}
    pending: list[str] = []
    last: tuple[int, int] | None = None
    seen_any = False
    for key in new.params:
        srcs = param_sources(entries[key], old)
        if not srcs:
            if seen_any:
                out[key] = last
            else:
                pending.append(key)
            continue
        slot = next((owner[s] for s in srcs if s in owner), None)
        last = (slot.opt, slot.group) if slot is not None else None
        out[key] = last
        if not seen_any:
            for waiting in pending:
                out[waiting] = last
            pending = []
            seen_any = True
    for waiting in pending:  # no parameter came from the old ones at all
        out[waiting] = (0, 0) if owner else None
    return out
