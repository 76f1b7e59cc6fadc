"""A checkpoint migrated on its way into a live model, and its optimizer state into optimizers.

The command line migrates files; training code loads a checkpoint into a
model that is already built (``ckptmigrate.load``, Lightning's
``on_load_checkpoint``, the Hugging Face Trainer's resume). Both go the same
way: every versioned module's entries are brought to its class's revision,
parents before children as ``load_state_dict`` does, the plans are joined
into one for the whole state dict, and the training pass the command line
uses carries the optimizer state along it. The facts about the new order are
the live model's (and, where they are built already, the live optimizers'),
so a parameter a migration adds gets exactly the place the model gives it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CkptMigrateError
from ..formats.checkpoint import Checkpoint
from ..formats.container import replace_at
from ..formats.stamp import write_stamp
from ..plan.nodes import Node, Source
from ..plan.state import Evaluator, PlanState
from ..runtime.memory import after, in_memory, planned
from ..runtime.migration import MigrationStep
from ..training.optimizer import OptimizerStateError
from .lineage import Lineage, log
from .versioning import LineageRecord, lineage_of, migration_failed, note, own_schema, start_of


@dataclass
class Migrated:
    """A state dict at every class's revision, and the training container carried along."""

    state_dict: OrderedDict[str, Any]  # with ``_metadata`` (the stamps)
    container: Any = None  # the container holding it, optimizer state migrated (None: none)
    records: list[LineageRecord] = field(default_factory=list)


def lineages_in(model: torch.nn.Module) -> list[tuple[Lineage, torch.nn.Module, str]]:
    """Every versioned module of ``model`` with its prefix, parents before children."""
    out = []
    for name, module in model.named_modules():
        lineage = lineage_of(type(module))
        if lineage is not None:
            out.append((lineage, module, name + "." if name else ""))
    return out


def optimizer_groups(
    model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], prefix: str = ""
) -> list[list[list[str]]]:
    """Each optimizer's parameters per param group, as keys of ``model``'s state dict."""
    names = {id(p): prefix + n for n, p in model.named_parameters()}
    out = []
    for opt in optimizers:
        groups = []
        for group in opt.param_groups:
            keys = []
            for p in group["params"]:
                if id(p) not in names:
                    raise OptimizerStateError(
                        f"the optimizer holds a parameter of shape {list(p.shape)} that is not "
                        f"a parameter of the {type(model).__name__} the checkpoint is loaded into",
                        hint="build the optimizer from that model's parameters",
                    )
                keys.append(names[id(p)])
            groups.append(keys)
        out.append(groups)
    return out


def migrate_checkpoint(
    model: torch.nn.Module,
    sd: Mapping[str, Any],
    metadata: Mapping[str, Mapping[str, Any]],
    name: str,
    *,
    container: Any = None,
    state_path: tuple[str, ...] = (),
    optimizers: Sequence[Sequence[Sequence[str]]] | None = None,
    extra: Sequence[tuple[Lineage, torch.nn.Module, str]] = (),
    wrapper_prefix: str = "",
) -> Migrated:
    """Bring ``sd`` to the revision of every versioned module of ``model`` (and ``extra``).

    ``container`` is the training checkpoint ``sd`` sits in (at ``state_path``):
    its optimizer state follows the migration, numbered in ``model``'s order
    and, with ``optimizers`` (file keys per group, per optimizer), laid out as
    those optimizers hold their parameters. The input is not modified.
    """
    current: OrderedDict[str, Any] = OrderedDict(sd)
    meta = {k: dict(v) for k, v in metadata.items()}
    plan: dict[str, Node] = {k: Source(k, s) for k, s in in_memory(sd, {}, name).schema.items()}
    steps: list[MigrationStep] = []
    records: list[LineageRecord] = []
    used: list[tuple[Lineage, tuple[str, ...], str]] = []
    for lineage, module, prefix in [*extra, *lineages_in(model)]:
        keys = list(current)
        start = start_of(lineage, module, current, meta, prefix)
        if list(current) != keys:  # a wrapper prefix was stripped: a rename, for the plan
            plan = _renamed(plan, keys, list(current))
        if start is None:
            continue
        ckpt = in_memory(current, meta, name).focus(prefix)
        try:
            state, done = planned(
                lineage.script_dir, ckpt, start.current, start.target, log=log.info
            )
        except CkptMigrateError as exc:
            raise migration_failed(start, exc) from exc
        full = ckpt.file_state(state)
        evaluate = Evaluator(full.entries, current.__getitem__)
        current = OrderedDict((k, evaluate(k)) for k in full.entries)
        meta = {k: dict(v) for k, v in full.metadata.items()}
        write_stamp(meta.setdefault(prefix[:-1], {}), (start.target,))
        plan = after(full.entries, plan)
        steps.extend(done)
        used.append((lineage, start.current, start.target))
        record = LineageRecord(
            prefix,
            type(module).__qualname__,
            start.current,
            start.target,
            [str(s) for s in done],
            identified=not start.stamped,
        )
        note(record)
        records.append(record)
    current._metadata = meta  # type: ignore[attr-defined]
    out = Migrated(current, None, records)
    if container is None:
        return out
    out.container = replace_at(container, state_path, current)
    if used:
        original = in_memory(
            sd,
            metadata,
            name,
            container=container,
            state_path=state_path,
            wrapper_prefix=wrapper_prefix,
        )
        migrated = _carry_training_state(
            model, original, PlanState(plan, meta), steps, used, optimizers
        )
        if migrated is not None:
            out.container = replace_at(migrated, state_path, current)
    return out


def _renamed(plan: dict[str, Node], before: list[str], now: list[str]) -> dict[str, Node]:
    """The plan after keys were moved (popped, then appended in the same order)."""
    gone = [k for k in before if k not in set(now)]
    came = [k for k in now if k not in set(before)]
    moved = dict(zip(came, gone))
    return {k: plan[moved.get(k, k)] for k in now}


def _carry_training_state(
    model: torch.nn.Module,
    before: Checkpoint,
    plan: PlanState,
    steps: list[MigrationStep],
    used: list[tuple[Lineage, tuple[str, ...], str]],
    optimizers: Sequence[Sequence[Sequence[str]]] | None,
) -> Any:
    """The container with its optimizer state carried along the whole plan (None: none).

    The first lineage's configuration says what to do with optimizer state
    (``optimizer_state = migrate | keep | drop``), as it does for the command line.
    """
    from ..training import migrate_training_state
    from ..training.layout import ties_by_identity
    from ..training.sides import Facts, ModelInfo

    lineage, from_revisions, target = used[0]
    live = ModelInfo(
        f"the {type(model).__name__} being loaded", own_schema(model), ties_by_identity(model)
    )
    return migrate_training_state(
        lineage.config,
        lineage.script_dir,
        before,
        plan,
        from_revisions,
        (target,),
        steps,
        facts=Facts(live, optimizers),
    )
