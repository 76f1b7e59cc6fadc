"""Carry a training container's optimizer states along a migration.

``command._migrate`` calls :func:`migrate_container` after the revision
scripts have built the plan and before the file is written. The steps:

1. find the optimizer state dicts in the container (``optimizer``,
   Lightning's ``optimizer_states[i]``, ...);
2. list the parameters before and after, in optimizer order
   (:mod:`.layout`), and pair each optimizer entry with its old parameter:
   by ``param_names`` when the optimizer saved them, else by position, checked
   against the optimizer's count and the state tensors' shapes;
3. put every new parameter in its sources' param group (a parameter made only
   of new tensors joins the group of the parameter before it), number them in
   the new model's order, and carry the state (:mod:`.optimizer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config
from ..errors import CkptMigrateError
from ..formats.checkpoint import Checkpoint
from ..plan.nodes import Node, Source, TensorSpec
from ..plan.state import PlanState
from ..runtime.migration import MigrationStep
from ..schema import Schema
from ..script.directory import ScriptDirectory
from . import lightning
from .layout import (
    Layout,
    fill_kinds,
    kinds_backward,
    kinds_forward,
    resolve_guesses,
    sources,
    ties_by_identity,
    ties_by_storage,
)
from .optimizer import (
    PER_PARAMETER_STATE,
    SCALAR_STATE,
    Carried,
    FoundOptimizer,
    OptimizerStateError,
    StateCarrier,
    find_optimizers,
    remove_path,
    replace_path,
    unshare,
)


@dataclass
class ModelInfo:
    """The configured model's schema (lineage keys) and its tied parameters."""

    spec: str
    schema: Schema
    alias: dict[str, str]

    def matches(self, specs: Mapping[str, TensorSpec | None]) -> bool:
        return set(specs) == set(self.schema) and all(
            self.schema[k].spec == spec for k, spec in specs.items()
        )


@dataclass
class Slot:
    """One entry of an optimizer: which optimizer, group and id, for which old parameter."""

    opt: int
    group: int
    pid: int | str


@dataclass
class OptimizerPlan:
    found: FoundOptimizer
    names: list[tuple[int, int | str, str]] | None  # (group, id, file key) from param_names
    wrapper: str = ""  # the prefix its names carry (e.g. "module.")
    string_ids: bool = False
    slots: dict[str, Slot] = field(default_factory=dict)  # old parameter (rep) -> slot


def migrate_container(
    config: Config,
    script_dir: ScriptDirectory,
    ckpt: Checkpoint,
    state: PlanState,
    from_revisions: tuple[str, ...],
    to_revisions: tuple[str, ...],
    steps: Sequence[MigrationStep],
    *,
    dry_run: bool = False,
) -> Any | None:
    """The container with its optimizer state carried along ``state``'s plan.

    Returns None when the container holds nothing to migrate (and always for
    a dry run, which prints what would happen to the optimizer state instead).
    """
    if ckpt.training is None:
        return None
    container = ckpt.training.container
    found = find_optimizers(container, ckpt.training.state_path)
    if not found:
        return None
    policy = _policy(config)
    if policy != "migrate":
        return _keep_or_drop(config, container, found, policy, dry_run=dry_run)
    prefix = ckpt.key_prefix
    file_specs = ckpt.file_schema if prefix and ckpt.file_schema is not None else ckpt.schema
    model = _model_info(config)
    model_old = model if model is not None and model.matches(ckpt.schema) else None
    # The old parameters' order is the model's when it describes the checkpoint, else
    # the file's (a state dict saved from a model has the model's order).
    old_order = list(model_old.schema) if model_old is not None else list(ckpt.schema)
    old_specs = {k: file_specs[k] for k in file_order(list(file_specs), prefix, old_order)}
    model_new = model if model is not None and model.matches(state.schema()) else None
    order = list(model_new.schema) if model_new is not None else None
    new_entries = new_file_entries(ckpt, state, order)

    plans = [_optimizer_plan(opt, old_specs, ckpt.wrapper_prefix) for opt in found]

    old = _old_layout(
        ckpt, state, script_dir, from_revisions, old_specs, plans, model_old, model_new
    )
    _check_pairing(config, ckpt, plans, old)
    new = _new_layout(new_entries, old, model_new, prefix)
    owner = _pair(plans, old)
    membership = _membership(new, new_entries, old, owner)
    added = [k for k in new.params if not _param_sources(new_entries[k], old)]
    if added and model_new is None and not dry_run:
        config.log(
            "Note: no configured model matches the migrated state dict, so the optimizer's "
            "parameter order is taken from its key order (new keys last); set `model = ...` "
            "so that it follows the model"
        )
    map_revisions = [
        s.script.revision for s in steps if any(r.call.startswith("map_tensor(") for r in s.records)
    ]

    out = container
    for j, plan in enumerate(plans):
        new_value, lines = _rebuild(
            j, plan, old, new, new_entries, membership, dry_run=dry_run, map_revisions=map_revisions
        )
        if dry_run:
            for line in lines:
                config.print_stdout(line)
        else:
            config.log(lines[0])
        out = replace_path(out, plan.found.path, new_value)
    return None if dry_run else out


# --------------------------------------------------------------------- inputs

#: The way out when the state cannot be carried, for the end of hints.
ESCAPE = (
    "to upgrade the weights anyway, set optimizer_state = drop (remove the optimizer state) "
    "or keep (carry it unchanged) in the configuration"
)
#: ``optimizer_state`` in the configuration: what to do with optimizer state.
POLICIES = ("migrate", "keep", "drop")


def _policy(config: Config) -> str:
    value = (config.get("optimizer_state") or "migrate").strip().lower()
    if value not in POLICIES:
        from ..errors import ConfigError

        raise ConfigError(
            f"optimizer_state = {value} in [{config.section}] is not one of {', '.join(POLICIES)}",
            hint="use migrate (the default: the state follows its parameters), keep (carry it "
            "unchanged) or drop (remove it from the checkpoint)",
        )
    return value


def _keep_or_drop(
    config: Config,
    container: Any,
    found: Sequence[FoundOptimizer],
    policy: str,
    *,
    dry_run: bool,
) -> Any | None:
    """``optimizer_state = keep``: carried unchanged; ``drop``: removed from the container."""
    say = config.print_stdout if dry_run else config.log
    where = ", ".join(f.label for f in found)
    if policy == "keep":
        say(f"Optimizer state at {where}: kept unchanged (optimizer_state = keep)")
        return None
    say(f"Optimizer state at {where}: removed (optimizer_state = drop)")
    out = container
    for f in sorted(found, key=lambda f: f.path, reverse=True):
        out = remove_path(out, f.path)
    return None if dry_run else out


def _model_info(config: Config) -> ModelInfo | None:
    if not config.get("model"):
        return None
    from ..model import configured_model

    try:
        found = configured_model(config)
        schema, model, spec = found.schema, found.module, found.spec
    except CkptMigrateError as exc:
        config.log(f"Note: not using the configured model for the optimizer state: {exc}")
        return None
    import torch

    alias = ties_by_identity(model) if isinstance(model, torch.nn.Module) else {}
    return ModelInfo(spec, schema, alias)


def _base_kinds(
    script_dir: ScriptDirectory,
    heads: Sequence[str],
    specs: Mapping[str, TensorSpec | None],
) -> dict[str, str]:
    """Kinds the base schema knows, pushed through the migrations up to ``heads``."""
    from ..runtime.symbolic import state_at
    from ..schema import read_base_schema

    try:
        base = read_base_schema(script_dir.dir)
        if base is None or not any(e.kind in ("param", "buffer") for e in base.values()):
            return {}
        at = state_at(script_dir, base, heads)
    except CkptMigrateError:
        return {}
    out: dict[str, str] = {}
    for key, node in at.entries.items():
        if key not in specs or specs[key] != node.spec:
            continue
        kinds = {base[s].kind for s in sources(node) if s in base}
        if len(kinds) == 1 and kinds <= {"param", "buffer"}:
            out[key] = kinds.pop()
    return out


def file_order(file_keys: Sequence[str], prefix: str, lineage: Sequence[str]) -> list[str]:
    """File keys with the lineage's block (keys under ``prefix``) in the order ``lineage``.

    Keys outside the prefix keep their places; the block goes where its first
    key was, as a submodule's keys sit together in its parent's state dict.
    """
    out: list[str] = []
    placed = False
    for key in file_keys:
        if key.startswith(prefix):
            if not placed:
                out.extend(prefix + k for k in lineage)
                placed = True
        else:
            out.append(key)
    if not placed:
        out.extend(prefix + k for k in lineage)
    return out


def new_file_entries(
    ckpt: Checkpoint, state: PlanState, order: list[str] | None
) -> dict[str, Node]:
    """The migrated file's entries by file key, the lineage's in ``order`` (else the plan's)."""
    p = ckpt.key_prefix
    lineage = order if order is not None else list(state.entries)
    file_keys = list(ckpt.file_schema) if p and ckpt.file_schema is not None else []
    out: dict[str, Node] = {}
    for key in file_order(file_keys, p, lineage):
        if p and not key.startswith(p):
            assert ckpt.file_schema is not None
            out[key] = Source(key, ckpt.file_schema[key])
        else:
            out[key] = state.entries[key[len(p) :]]
    return out


def _old_layout(
    ckpt: Checkpoint,
    state: PlanState,
    script_dir: ScriptDirectory,
    from_revisions: Sequence[str],
    specs: dict[str, TensorSpec | None],
    plans: Sequence[OptimizerPlan],
    model_old: ModelInfo | None,
    model_new: ModelInfo | None,
) -> Layout:
    """The checkpoint's entries with kinds from every source of facts (see :mod:`.layout`)."""
    prefix = ckpt.key_prefix
    known: dict[str, str] = {key: "param" for p in plans if p.names for _g, _pid, key in p.names}
    if model_old is not None:
        for key, entry in model_old.schema.items():
            known.setdefault(prefix + key, entry.kind)
    for key, kind in _base_kinds(script_dir, from_revisions, ckpt.schema).items():
        known.setdefault(prefix + key, kind)
    if model_new is not None:
        new_model_kinds = {k: e.kind for k, e in model_new.schema.items()}
        for key, kind in kinds_backward(state.entries, new_model_kinds).items():
            known.setdefault(key, kind)
    old = Layout(specs)
    fill_kinds(old, known)
    old.alias = ties_by_storage([k for k, s in specs.items() if s is not None], ckpt.read)
    if model_old is not None:
        old.alias.update({prefix + a: prefix + b for a, b in model_old.alias.items()})
    return old


def _check_pairing(
    config: Config, ckpt: Checkpoint, plans: Sequence[OptimizerPlan], old: Layout
) -> None:
    """Entries paired by position: as many parameters as entries, and shapes that fit."""
    positional = [p for p in plans if p.names is None]
    if not positional:
        return
    count = sum(len(p.found.ids()) for p in positional)

    def lines_up(params: list[str]) -> bool:
        return _misaligned(positional, params, old.specs) is None

    why = resolve_guesses(old, count, lines_up)
    if why is not None:
        raise _count_error(config, ckpt, positional, old, count, why)
    problem = _misaligned(positional, old.params, old.specs)
    if problem is not None:
        raise _alignment_error(problem)


def _new_layout(
    entries: dict[str, Node], old: Layout, model_new: ModelInfo | None, prefix: str
) -> Layout:
    """The migrated entries' kinds: the model's, else carried from their sources."""
    new = Layout({k: n.spec for k, n in entries.items()})
    known = (
        {prefix + k: e.kind for k, e in model_new.schema.items()} if model_new is not None else {}
    )
    forward = kinds_forward(entries, old, known)
    fill_kinds(new, {k: kind for k, (kind, _sure) in forward.items()})
    new.guessed |= {k for k, (_kind, sure) in forward.items() if not sure}
    new.alias = _new_ties(entries, old, model_new, prefix)
    return new


def _pair(plans: Sequence[OptimizerPlan], old: Layout) -> dict[str, Slot]:
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


def _optimizer_plan(opt: FoundOptimizer, specs: Mapping[str, Any], wrapper: str) -> OptimizerPlan:
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


def _count_error(
    config: Config,
    ckpt: Checkpoint,
    plans: Sequence[OptimizerPlan],
    old: Layout,
    count: int,
    why: str,
) -> OptimizerStateError:
    params = old.params
    guessed = old.guessed_params()
    where = ", ".join(p.found.label for p in plans)
    detail = ""
    if guessed:
        shown = ", ".join(guessed[:6]) + (", ..." if len(guessed) > 6 else "")
        detail = f" ({len(guessed)} of them taken for parameters by guess: {shown})"
    section = config.section
    return OptimizerStateError(
        f"the optimizer state at {where} holds {count} parameter"
        f"{'s' if count != 1 else ''}, but the checkpoint's state dict has {len(params)} "
        f"tensors that look like parameters{detail}, so its entries cannot be paired with "
        f"parameters ({why})"
        + lightning.count_hint(ckpt.training.container if ckpt.training else None, ckpt.key_prefix),
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


def _new_ties(
    entries: Mapping[str, Node], old: Layout, model: ModelInfo | None, prefix: str
) -> dict[str, str]:
    """New tied keys: the model's, else entries that are the same tied old tensor."""
    alias: dict[str, str] = {}
    if model is not None:
        alias.update({prefix + a: prefix + b for a, b in model.alias.items()})
    first: dict[str, str] = {}
    for key, node in entries.items():
        if not isinstance(node, Source) or (model is not None and key.startswith(prefix)):
            continue
        rep = old.rep(node.key)
        if rep in first:
            alias.setdefault(key, first[rep])
        else:
            first[rep] = key
    return alias


def _param_sources(node: Node, old: Layout) -> list[str]:
    """The old parameters (tie representatives) a new entry is made of."""
    out: list[str] = []
    for key in sources(node):
        rep = old.rep(key)
        if old.is_param(rep) and rep not in out:
            out.append(rep)
    return out


def _membership(
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
        srcs = _param_sources(entries[key], old)
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


# --------------------------------------------------------------------- rebuild


def _rebuild(
    j: int,
    plan: OptimizerPlan,
    old: Layout,
    new: Layout,
    entries: Mapping[str, Node],
    membership: Mapping[str, tuple[int, int] | None],
    *,
    dry_run: bool,
    map_revisions: Sequence[str],
) -> tuple[dict[str, Any], list[str]]:
    """This optimizer's new state dict, and report lines (the first is the summary)."""
    opt = plan.found
    groups = opt.groups
    members: list[list[str]] = [[] for _ in groups]
    for key in new.params:
        m = membership.get(key)
        if m is not None and m[0] == j:
            members[m[1]].append(key)

    def name_for(key: str) -> str:
        return plan.wrapper + key

    new_groups: list[dict[str, Any]] = []
    pid_of: dict[str, int | str] = {}
    next_id = 0
    for group, keys in zip(groups, members):
        ids: list[int | str] = []
        for key in keys:
            pid: int | str = name_for(key) if plan.string_ids else next_id
            next_id += 1
            ids.append(pid)
            pid_of[key] = pid
        copy = dict(group)
        copy["params"] = ids
        if "param_names" in group:
            copy["param_names"] = [name_for(k) for k in keys]
        new_groups.append(copy)

    old_state = opt.state

    def state_of(key: str) -> Mapping[str, Any] | None:
        rep = old.rep(key)
        slot = plan.slots.get(rep)
        if slot is None or not old.is_param(rep):
            return None
        entry = old_state.get(slot.pid)
        return entry if isinstance(entry, Mapping) else None

    carrier = StateCarrier(
        state_of,
        meta=dry_run,
        label=opt.label,
        display=lambda k: k,
        certain=plan.names is not None,
        map_revisions=map_revisions,
    )
    new_state: dict[Any, dict[str, Any]] = {}
    carried: dict[str, Carried] = {}
    for keys in members:
        for key in keys:
            c = carrier.carry(key, entries[key])
            carried[key] = c
            if c.state is not None:
                new_state[pid_of[key]] = c.state
    new_value = dict(opt.value)
    new_value["state"] = unshare(new_state) if not dry_run else new_state
    new_value["param_groups"] = new_groups
    return new_value, _report(plan, old, entries, members, pid_of, carried)


def _report(
    plan: OptimizerPlan,
    old: Layout,
    entries: Mapping[str, Node],
    members: Sequence[Sequence[str]],
    pid_of: Mapping[str, int | str],
    carried: Mapping[str, Carried],
) -> list[str]:
    opt = plan.found
    n_old = len(plan.slots)
    n_new = sum(len(m) for m in members)
    several = len(members) > 1
    lines: list[str] = []
    used: set[str] = set()
    unchanged = shifted = moved = fresh = reset = dropped = 0
    for g, keys in enumerate(members):
        for key in keys:
            c = carried[key]
            srcs = _param_sources(entries[key], old)
            used.update(srcs)
            where = f"#{pid_of[key]}" + (f", group {g}" if several else "")
            if not srcs:
                fresh += 1
                lines.append(f"    {key}: new parameter, starts with no state ({where})")
                continue
            was = ", ".join(f"#{plan.slots[s].pid}" for s in srcs if s in plan.slots)
            how = f" ({', '.join(c.transforms)})" if c.transforms else ""
            if c.reset and not c.sources:
                reset += 1
                lines.append(f"    {key}: state reset, starts with none ({where})")
            elif srcs == [key] and not c.transforms and not c.reset:
                unchanged += 1
                shifted += str(pid_of[key]) != was.lstrip("#")
            else:
                moved += 1
                extra = ", part reset" if c.reset else ""
                extra += ", none yet" if c.state is None else ""
                what = f"state of {', '.join(srcs)}{how}{extra}"
                lines.append(f"    {key}: {what} ({was or 'none'} -> {where})")
    for key, slot in plan.slots.items():
        if key not in used:
            dropped += 1
            lines.append(f"    {key}: dropped, with its state (#{slot.pid})")
    if unchanged:
        at = f" ({shifted} at a new index)" if shifted else ""
        lines.append(
            f"    {unchanged} other parameter{'s' if unchanged != 1 else ''} keep their state{at}"
        )
    names = ", ".join(opt.state_names()) or "none yet"
    summary_bits = [
        f"{moved} moved" if moved else "",
        f"{fresh} new without state" if fresh else "",
        f"{reset} reset" if reset else "",
        f"{dropped} dropped" if dropped else "",
    ]
    summary = ", ".join(b for b in summary_bits if b) or "unchanged"
    head = (
        f"Optimizer state at {opt.label}: {n_old} -> {n_new} parameters "
        f"in {len(members)} param group{'s' if several else ''} ({summary}; state: {names})"
    )
    return [head, *lines]
