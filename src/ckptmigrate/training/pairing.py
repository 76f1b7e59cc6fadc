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

from collections import Counter
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
    order: list[str] | None = None  # positional: old parameters in the entries' order


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

    Each positional optimizer's entries are paired with its share of the
    parameters in state-dict order (the order ``model.parameters()`` yields
    them); an optimizer whose param groups each take the parameters in that
    order but not one group after the other (the Hugging Face Trainer's
    weights with decay, then biases and norms without) is paired by the one
    split of the parameters into its groups that every entry's state fits.
    ``section`` is the configuration section a fix goes into; ``count_hint``
    explains a count that disagrees (Lightning numbers the whole module).
    """
    positional = [p for p in plans if p.names is None]
    if not positional:
        return
    count = sum(len(p.found.ids()) for p in positional)

    def lines_up(params: list[str]) -> bool:
        return isinstance(_align(positional, params, old.specs), list)

    why = resolve_guesses(old, count, lines_up)
    if why is not None:
        raise _count_error(positional, old, count, why, section, count_hint)
    aligned = _align(positional, old.params, old.specs)
    if isinstance(aligned, str):
        raise _alignment_error(aligned)
    for plan, order in zip(positional, aligned):
        plan.order = order


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


def _wrong_shape(entry: Any, spec: TensorSpec | None) -> tuple[str, torch.Tensor] | None:
    """A per-parameter state tensor of an optimizer entry not shaped like ``spec``'s tensor."""
    if not isinstance(entry, Mapping) or spec is None:
        return None
    for name, value in entry.items():
        if not isinstance(value, torch.Tensor) or str(name) in SCALAR_STATE:
            continue
        if tuple(value.shape) == spec.shape:
            continue
        if value.dim() > 0 or str(name) in PER_PARAMETER_STATE:
            return str(name), value
    return None


def _fits(entry: Any, spec: TensorSpec | None) -> bool:
    return _wrong_shape(entry, spec) is None


def _misfit(plan: OptimizerPlan, params: Sequence[str], specs: Mapping[str, Any], at: int) -> str:
    """Why pairing the entries one group after the other with ``params`` is wrong ("" if fine)."""
    state = plan.found.state
    for n, ((_g, pid), key) in enumerate(zip(plan.found.ids(), params), start=at):
        spec = specs.get(key)
        wrong = _wrong_shape(state.get(pid), spec)
        if wrong is None:
            continue
        assert spec is not None
        name, value = wrong
        return (
            f"the optimizer state at {plan.found.label}, entry {pid!r}, holds {name!r} of "
            f"shape {list(value.shape)}, but parameter #{n} in state-dict order, {key}, is "
            f"{list(spec.shape)}"
        )
    return ""


#: Beyond this many partial pairings, splitting parameters into groups is not tried.
MAX_SPLITS = 200_000


def _split_into_groups(
    plan: OptimizerPlan, params: Sequence[str], specs: Mapping[str, Any]
) -> list[str] | str:
    """The parameters in the optimizer's entry order, from the one split into its groups that fits.

    Each group takes its parameters in state-dict order; which group a
    parameter is in is found from the shapes of the state its entry holds.
    Returns why not when no split fits, or more than one does.
    """
    groups = [list(g["params"]) for g in plan.found.groups]
    sizes = tuple(len(g) for g in groups)
    state = plan.found.state
    start = (0,) * len(groups)
    # layer i: partial split -> (number of ways, capped at 2; previous split; group taken)
    layer: dict[tuple[int, ...], tuple[int, tuple[int, ...] | None, int]] = {start: (1, None, -1)}
    history = []
    for key in params:
        spec = specs.get(key)
        nxt: dict[tuple[int, ...], tuple[int, tuple[int, ...] | None, int]] = {}
        for taken, (ways, _prev, _g) in layer.items():
            for g, k in enumerate(taken):
                if k == sizes[g] or not _fits(state.get(groups[g][k]), spec):
                    continue
                after = (*taken[:g], k + 1, *taken[g + 1 :])
                have = nxt.get(after)
                nxt[after] = (min(2, ways + (have[0] if have else 0)), taken, g)
        if len(nxt) > MAX_SPLITS:
            return "too many ways to split the parameters into its param groups to check them"
        history.append(nxt)
        layer = nxt
    final = layer.get(sizes)
    if final is None:
        return "no split of the parameters into its param groups fits the state's shapes"
    if final[0] > 1:
        return (
            "several splits of the parameters into its param groups fit the state's shapes "
            "equally well"
        )
    chosen: list[int] = []
    at: tuple[int, ...] = sizes
    for nxt in reversed(history):
        _ways, prev, g = nxt[at]
        chosen.append(g)
        assert prev is not None
        at = prev
    chosen.reverse()
    slots: list[list[str]] = [[] for _ in groups]
    for key, g in zip(params, chosen):
        slots[g].append(key)
    return [key for members in slots for key in members]


def _align(
    plans: Sequence[OptimizerPlan], params: Sequence[str], specs: Mapping[str, Any]
) -> list[list[str]] | str:
    """Each optimizer's parameters in its entries' order, or why they cannot be paired."""
    out: list[list[str]] = []
    offset = 0
    for plan in plans:
        n = len(plan.found.ids())
        share = list(params[offset : offset + n])
        problem = _misfit(plan, share, specs, offset)
        if problem and len(plan.found.groups) > 1:
            split = _split_into_groups(plan, share, specs)
            if isinstance(split, list):
                share, problem = split, ""
            else:
                problem = f"{problem}, and {split}"
        if problem:
            return problem
        out.append(share)
        offset += n
    return out


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
            order = plan.order if plan.order is not None else params[offset : offset + len(ids)]
            for (g, pid), key in zip(ids, order):
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


def unplaced(
    plans: Sequence[OptimizerPlan], old: Layout, new: Layout, entries: Mapping[str, Node]
) -> list[str]:
    """New parameters whose place in the model's order nothing recorded gives.

    Without the model, the only facts are the old order (the optimizer's own)
    and the plan: a parameter that is exactly one old parameter, in the same
    order relative to the others, keeps that parameter's place; one that is new,
    made of several old parameters or of part of one has no known place.
    Optimizers keyed by parameter name need no order at all.
    """
    if all(p.string_ids for p in plans):
        return []
    rank = {key: n for n, key in enumerate(old.params)}
    feeds: Counter[str] = Counter()
    sources: dict[str, list[str]] = {}
    for key in new.params:
        sources[key] = param_sources(entries[key], old)
        feeds.update(sources[key])
    out: list[str] = []
    last = -1
    for key in new.params:
        srcs = sources[key]
        if len(srcs) != 1 or feeds[srcs[0]] != 1 or rank.get(srcs[0], -1) < last:
            out.append(key)
            continue
        last = rank[srcs[0]]
    return out


def unplaced_error(
    plans: Sequence[OptimizerPlan],
    old: Layout,
    new: Layout,
    entries: Mapping[str, Node],
    *,
    section: str,
) -> None:
    """Refuse to number parameters whose place in the model's order would be a guess."""
    keys = unplaced(plans, old, new, entries)
    if not keys:
        return
    shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    raise OptimizerStateError(
        f"the optimizer's parameter order after the migration is not known: {shown} "
        f"{'is a parameter' if len(keys) == 1 else 'are parameters'} made of no old "
        "parameter, of several, or of part of one, and without the model nothing says where "
        "the model puts them (the optimizer pairs its state with parameters by position)",
        hint=f"set `model = package.module:build_model` in [{section}] so that the new order "
        "follows the model; or, " + ESCAPE,
    )


def live_membership(
    plans: Sequence[OptimizerPlan], new: Layout, optimizers: Sequence[Sequence[Sequence[str]]]
) -> tuple[dict[str, tuple[int, int] | None], list[list[list[str]]]]:
    """(optimizer, group) of every new parameter, and the groups' members, from live optimizers.

    The optimizers built for the migrated model say exactly which parameters
    each group holds, in which order; they must have as many param groups as
    the saved ones.
    """
    if len(optimizers) != len(plans):
        raise OptimizerStateError(
            f"the checkpoint holds {len(plans)} optimizer state(s), but {len(optimizers)} "
            "optimizer(s) were given to restore them into",
            hint="pass one optimizer per optimizer state in the checkpoint, in the same order",
        )
    out: dict[str, tuple[int, int] | None] = dict.fromkeys(new.params)
    members: list[list[list[str]]] = []
    known = set(new.params)
    for j, (plan, groups) in enumerate(zip(plans, optimizers)):
        if len(groups) != len(plan.found.groups):
            raise OptimizerStateError(
                f"the optimizer state at {plan.found.label} has {len(plan.found.groups)} param "
                f"group(s), but the optimizer to restore it into has {len(groups)}",
                hint="build the optimizer with the same param groups as the one that was saved",
            )
        for g, keys in enumerate(groups):
            for key in keys:
                if key not in known:
                    raise OptimizerStateError(
                        f"the optimizer to restore {plan.found.label} into holds {key}, which "
                        "is not a parameter of the migrated checkpoint",
                        hint="build the optimizer from the model the checkpoint is loaded into",
                    )
                out[key] = (j, g)
        members.append([list(keys) for keys in groups])
    return out, members
