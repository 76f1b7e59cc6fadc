"""Carry a training container's optimizer states along a migration.

``upgrade`` and ``downgrade`` call :func:`migrate_container` after the revision
scripts have built the plan and before the file is written. The steps:

1. find the optimizer state dicts in the container (``optimizer``,
   Lightning's ``optimizer_states[i]``, ...) and apply the configured
   :mod:`.policy`;
2. list the parameters before and after, in optimizer order (:mod:`.sides`,
   :mod:`.layout`), and pair each optimizer entry with its old parameter
   (:mod:`.pairing`): by ``param_names`` when the optimizer saved them, else
   by position, checked against the optimizer's count and the state tensors'
   shapes;
3. put every new parameter in its sources' param group, number them in the
   new model's order, carry the state (:mod:`.rebuild`) and say what happened
   (:mod:`.report`).

The new order comes from the model (``model =``, or the live model a loader
migrates into) or from the live optimizers built for it. Without them, only
parameters that are each one old parameter (renamed, reshaped, cast) have a
known place, the old one's; a parameter that is new, or made of several old
ones or of part of one, could sit anywhere in the model's order, so the
migration stops rather than guess (:func:`.pairing.unplaced`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import Config
from ..formats.checkpoint import Checkpoint
from ..plan.state import PlanState
from ..runtime.migration import MigrationStep
from ..script.directory import ScriptDirectory
from . import keyed, lightning
from .optimizer import OptimizerStateError, find_optimizers, replace_path
from .pairing import (
    OptimizerPlan,
    check_pairing,
    live_membership,
    membership,
    optimizer_plan,
    pair,
    unplaced_error,
)
from .policy import ESCAPE, keep_or_drop, policy
from .rebuild import rebuild
from .report import report
from .sides import (
    Facts,
    keeps_order,
    model_info,
    new_file_entries,
    new_layout,
    old_file_specs,
    old_layout,
)


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
    facts: Facts | None = None,
) -> Any | None:
    """The container with its optimizer state carried along ``state``'s plan.

    Returns None when the container holds nothing to migrate (and always for
    a dry run, which prints what would happen to the optimizer state instead).
    ``facts`` default to the configured model.
    """
    if ckpt.training is None:
        return None
    # A run computes with the state tensors; a file read by ranges fetches them first.
    container = ckpt.training.container if dry_run else ckpt.training.materialised()
    lazy = ckpt.training.lazy  # values are plan nodes: the pass runs on their stand-ins
    view, table = keyed.stand_ins(container) if lazy else (container, {})
    found = find_optimizers(view, ckpt.training.state_path)
    if not found:
        return None
    chosen = policy(config)
    if chosen != "migrate":
        return keep_or_drop(config, container, found, chosen, dry_run=dry_run)
    if facts is None:
        facts = Facts(model_info(config))
    model = facts.model
    model_old = model if model is not None and model.matches(ckpt.schema) else None
    model_new = model if model is not None and model.matches(state.schema()) else None
    old_specs = old_file_specs(ckpt, model_old, state, model_new)
    order = [k for k in model_new.schema if k in state.entries] if model_new else None
    entries = new_file_entries(ckpt, state, order)  # a tied second key is absent in safetensors
    plans = [optimizer_plan(opt, old_specs, ckpt.wrapper_prefix) for opt in found]
    if model_old is None and model_new is None and not keeps_order(ckpt):
        _refuse_unknown_order(ckpt, plans, config.section)
    named = [key for p in plans if p.names for _g, _pid, key in p.names]
    old = old_layout(
        ckpt, state, script_dir, from_revisions, old_specs, named, model_old, model_new
    )
    hint = lightning.count_hint(container, ckpt.key_prefix)
    check_pairing(plans, old, section=config.section, count_hint=hint)
    new = new_layout(entries, old, model_new, ckpt.key_prefix)
    owner = pair(plans, old)
    members: list[list[list[str]]] | None = None
    if facts.optimizers is not None:
        groups, members = live_membership(plans, new, facts.optimizers)
    else:
        if model_new is None:
            unplaced_error(plans, old, new, entries, section=config.section)
        groups = membership(new, entries, old, owner)
    revisions = _revisions_by_op(steps)
    say = config.print_stdout if dry_run else config.log
    out = container
    for j, plan in enumerate(plans):
        rebuilt = rebuild(
            j,
            plan,
            old,
            new,
            entries,
            groups,
            meta=dry_run or lazy,
            revisions=revisions,
            members=members[j] if members is not None else None,
        )
        lines = report(plan, old, entries, rebuilt)
        for line in lines if dry_run else lines[:1]:  # a run logs the summary alone
            say(line)
        value = rebuilt.value
        if lazy and not dry_run:
            value = keyed.planned(plan, old, entries, rebuilt, table, revisions)
        out = replace_path(out, plan.found.path, value)
    return None if dry_run else out


def _refuse_unknown_order(ckpt: Checkpoint, plans: Sequence[OptimizerPlan], section: str) -> None:
    """An optimizer numbered by position, and weights whose file does not keep that order."""
    if all(p.names for p in plans):
        return  # saved with param_names: matched by name
    raise OptimizerStateError(
        f"{ckpt.path}: the weights file lists its keys sorted, not in the order the optimizer "
        "numbered its parameters, and no model says that order",
        hint=f"set 'model = package.module:build_model' in [{section}] (the model as it is "
        f"after the migration), or {ESCAPE}",
    )


def _revisions_by_op(steps: Sequence[MigrationStep]) -> dict[str, list[str]]:
    """Op name -> the revisions whose step called it, each once, in step order."""
    out: dict[str, list[str]] = {}
    for step in steps:
        for record in step.records:
            revs = out.setdefault(record.name, [])
            if step.script.revision not in revs:
                revs.append(step.script.revision)
    return out
