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
from ..plan.nodes import Node, Source, TensorSpec
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


@dataclass
class Plan:
    """How a whole state dict gets to every class's revision: per output key, its node."""

    entries: dict[str, Node]  # over the input's keys
    metadata: dict[str, dict[str, Any]]  # stamped at the targets
    records: list[LineageRecord] = field(default_factory=list)
    steps: list[MigrationStep] = field(default_factory=list)
    #: (lineage, from, to) of each lineage migrated, in order
    used: list[tuple[Lineage, tuple[str, ...], str]] = field(default_factory=list)


def plan_checkpoint(
    model: torch.nn.Module,
    specs: Mapping[str, TensorSpec | None],
    metadata: Mapping[str, Mapping[str, Any]],
    name: str,
    *,
    extra: Sequence[tuple[Lineage, torch.nn.Module, str]] = (),
) -> Plan:
    """The plan for a state dict of ``specs`` (no tensor data is read).

    Each versioned module of ``model`` (and each of ``extra``) is placed on its
    lineage by the state its entries are in after the lineages before it,
    which is followed on shapes alone.
    """
    shadow = _shadow(specs)
    meta = {k: dict(v) for k, v in metadata.items()}
    plan = Plan({k: Source(k, s) for k, s in specs.items()}, meta)
    for lineage, module, prefix in [*extra, *lineages_in(model)]:
        keys = list(shadow)
        start = start_of(lineage, module, shadow, plan.metadata, prefix)
        if list(shadow) != keys:  # a wrapper prefix was stripped: a rename, for the plan
            plan.entries = _renamed(plan.entries, keys, list(shadow))
        if start is None:
            continue
        ckpt = in_memory(shadow, plan.metadata, name).focus(prefix)
        try:
            state, done = planned(
                lineage.script_dir, ckpt, start.current, start.target, log=log.info
            )
        except CkptMigrateError as exc:
            raise migration_failed(start, exc) from exc
        full = ckpt.file_state(state)
        shadow = _shadow(full.schema())
        plan.metadata = {k: dict(v) for k, v in full.metadata.items()}
        write_stamp(plan.metadata.setdefault(prefix[:-1], {}), (start.target,))
        plan.entries = after(full.entries, plan.entries)
        plan.steps.extend(done)
        plan.used.append((lineage, start.current, start.target))
        record = LineageRecord(
            prefix,
            type(module).__qualname__,
            start.current,
            start.target,
            [str(s) for s in done],
            identified=not start.stamped,
        )
        note(record)
        plan.records.append(record)
    return plan


def _shadow(specs: Mapping[str, TensorSpec | None]) -> dict[str, Any]:
    """A state dict of meta tensors with these shapes: what placing a lineage looks at."""
    return {
        k: torch.empty(s.shape, dtype=s.dtype, device="meta") if s is not None else None
        for k, s in specs.items()
    }


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
    keeps_order: bool = True,
) -> Migrated:
    """Bring ``sd`` to the revision of every versioned module of ``model`` (and ``extra``).

    ``container`` is the training checkpoint ``sd`` sits in (at ``state_path``):
    its optimizer state follows the migration, numbered in ``model``'s order
    and, with ``optimizers`` (file keys per group, per optimizer), laid out as
    those optimizers hold their parameters. The input is not modified; tensors
    a migration leaves alone are passed through as the same objects.
    """
    original = in_memory(
        sd,
        metadata,
        name,
        container=container,
        state_path=state_path,
        wrapper_prefix=wrapper_prefix,
        keeps_order=keeps_order,
    )
    plan = plan_checkpoint(model, original.schema, metadata, name, extra=extra)
    if not plan.used:
        same: OrderedDict[str, Any] = OrderedDict(sd)
        same._metadata = {k: dict(v) for k, v in metadata.items()}  # type: ignore[attr-defined]
        return Migrated(same, container)
    evaluate = Evaluator(plan.entries, sd.__getitem__)
    current = OrderedDict((k, evaluate(k)) for k in plan.entries)
    current._metadata = plan.metadata  # type: ignore[attr-defined]
    out = Migrated(current, None, plan.records)
    if container is None:
        return out
    carried = _carry_training_state(model, original, plan, optimizers)
    out.container = replace_at(carried if carried is not None else container, state_path, current)
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
    plan: Plan,
    optimizers: Sequence[Sequence[Sequence[str]]] | None,
) -> Any:
    """The container with its optimizer state carried along the whole plan (None: none).

    The first lineage's configuration says what to do with optimizer state
    (``optimizer_state = migrate | keep | drop``), as it does for the command line.
    """
    from ..training import migrate_training_state
    from ..training.layout import ties_by_identity
    from ..training.sides import Facts, ModelInfo

    lineage, from_revisions, target = plan.used[0]
    live = ModelInfo(
        f"the {type(model).__name__} being loaded", own_schema(model), ties_by_identity(model)
    )
    return migrate_training_state(
        lineage.config,
        lineage.script_dir,
        before,
        PlanState(plan.entries, plan.metadata),
        from_revisions,
        (target,),
        plan.steps,
        facts=Facts(live, optimizers),
    )
