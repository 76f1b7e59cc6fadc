"""Migrating a state dict that is already in memory.

Used when a versioned model loads an old state dict and by
``upgrade_state_dict``. The same plan machinery as for files: unchanged
tensors are passed through as the very same objects, and the caller's tensors
are never written to.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CkptMigrateError
from ..plan.nodes import TensorSpec
from ..plan.state import Evaluator, PlanState
from ..script.directory import ScriptDirectory
from ..script.revision import RevisionMap
from .migration import MigrationStep, downgrade_steps, run_steps, upgrade_steps


@dataclass
class Outcome:
    """A migrated state dict and how it got there."""

    state_dict: OrderedDict[str, Any]
    metadata: dict[str, dict[str, Any]]
    from_revisions: tuple[str, ...]
    to_revisions: tuple[str, ...]
    steps: list[MigrationStep] = field(default_factory=list)


def direction(rmap: RevisionMap, current: Sequence[str], target: str) -> str:
    """ "none", "upgrade" or "downgrade" to get from ``current`` to exactly ``target``."""
    if tuple(current) == (target,) or (target == "base" and not current):
        return "none"
    if target == "base":
        return "downgrade"
    goal = rmap.revision(target)
    below_goal = {r.revision for r in rmap.ancestors([goal])}
    if all(c in below_goal for c in current):
        return "upgrade"
    have = [rmap.revision(c) for c in current]
    below_current = {r.revision for r in rmap.ancestors(have)}
    if target in below_current:
        return "downgrade"
    return "unrelated"


def specs_of(sd: Mapping[str, Any]) -> dict[str, TensorSpec | None]:
    return {k: TensorSpec.of(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}


def migrate_state_dict(
    script_dir: ScriptDirectory,
    sd: Mapping[str, Any],
    metadata: Mapping[str, Mapping[str, Any]],
    current: Sequence[str],
    target: str,
    *,
    log: Callable[[str], None] | None = None,
) -> Outcome:
    """Bring ``sd`` (at ``current``) to exactly revision ``target``, up or down."""
    rmap = script_dir.revision_map
    way = direction(rmap, current, target)
    if way == "unrelated":
        raise CkptMigrateError(
            f"the state dict is at {', '.join(current) or 'base'}, which is on another branch "
            f"than {target}",
            hint="neither is an ancestor of the other; migrate it explicitly with "
            "'ckptmigrate upgrade/downgrade'",
        )
    if way == "none":
        return Outcome(
            OrderedDict(sd),
            {k: dict(v) for k, v in metadata.items()},
            tuple(current),
            tuple(current),
        )
    steps = (
        upgrade_steps(script_dir, current, target)
        if way == "upgrade"
        else downgrade_steps(script_dir, current, target)
    )
    state = PlanState.from_schema(specs_of(sd), metadata)
    heads = run_steps(steps, state, current, rmap, log=log)
    evaluate = Evaluator(state.entries, sd.__getitem__)
    out: OrderedDict[str, Any] = OrderedDict((k, evaluate(k)) for k in state.entries)
    return Outcome(out, state.metadata, tuple(current), heads, steps)
