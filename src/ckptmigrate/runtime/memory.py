"""Migrating a state dict that is already in memory.

Used when a versioned model loads an old state dict and by
``upgrade_state_dict``. The same plan machinery as for files: unchanged
tensors are passed through as the very same objects, and the caller's tensors
are never written to.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import CkptMigrateError
from ..formats.base import FileFormat, ReadOptions, WriteOptions
from ..formats.checkpoint import Checkpoint, TrainingContainer
from ..formats.stamp import read_stamp
from ..plan.nodes import Node, Source, TensorSpec
from ..plan.state import Evaluator, PlanState
from ..script.directory import ScriptDirectory

if TYPE_CHECKING:
    from ..formats.storage import CkptPath, Output
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


def _unrelated(current: Sequence[str], target: str) -> CkptMigrateError:
    return CkptMigrateError(
        f"the state dict is at {', '.join(current) or 'base'}, which is on another branch "
        f"than {target}",
        hint="neither is an ancestor of the other; migrate it explicitly with "
        "'ckptmigrate upgrade/downgrade'",
    )


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
        raise _unrelated(current, target)
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


# --------------------------------------------------------------------- whole checkpoints


class InMemoryFormat(FileFormat):
    """The format of a checkpoint that is already in memory: never recognised, never written."""

    name: ClassVar[str] = "in-memory checkpoint"

    def recognise(self, path: CkptPath, head: bytes) -> bool:
        return False

    def open(self, path: CkptPath, options: ReadOptions) -> Checkpoint:
        raise CkptMigrateError(f"{path}: an in-memory checkpoint cannot be opened")

    def write_file(
        self,
        path: Output,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        raise CkptMigrateError(f"{path}: an in-memory checkpoint is not written")


class UnorderedInMemoryFormat(InMemoryFormat):
    """Read from a file that lists its keys sorted, not in the model's order (safetensors)."""

    keeps_parameter_order: ClassVar[bool] = False


IN_MEMORY = InMemoryFormat()
UNORDERED_IN_MEMORY = UnorderedInMemoryFormat()


def in_memory(
    sd: Mapping[str, Any],
    metadata: Mapping[str, Mapping[str, Any]],
    name: str,
    *,
    container: Any = None,
    state_path: tuple[str, ...] = (),
    wrapper_prefix: str = "",
    keeps_order: bool = True,
) -> Checkpoint:
    """A state dict (and the training container it sits in) seen as a checkpoint.

    ``keeps_order``: whether ``sd`` lists its keys in the model's order, which
    an optimizer state is numbered in.
    """
    meta = {k: dict(v) for k, v in metadata.items()}
    training = TrainingContainer(container, state_path) if container is not None else None
    return Checkpoint(
        path=Path(name),
        format=IN_MEMORY if keeps_order else UNORDERED_IN_MEMORY,
        schema=specs_of(sd),
        metadata=meta,
        stamp=read_stamp(meta.get(""), name),
        reader=sd.__getitem__,
        training=training,
        wrapper_prefix=wrapper_prefix,
    )


def planned(
    script_dir: ScriptDirectory,
    ckpt: Checkpoint,
    current: Sequence[str],
    target: str,
    *,
    log: Callable[[str], None] | None = None,
) -> tuple[PlanState, list[MigrationStep]]:
    """The plan that brings a (focused) checkpoint from ``current`` to ``target``, and its steps."""
    rmap = script_dir.revision_map
    way = direction(rmap, current, target)
    if way == "unrelated":
        raise _unrelated(current, target)
    state = ckpt.initial_state()
    if way == "none":
        return state, []
    steps = (
        upgrade_steps(script_dir, current, target)
        if way == "upgrade"
        else downgrade_steps(script_dir, current, target)
    )
    run_steps(steps, state, current, rmap, log=log)
    return state, steps


def after(second: Mapping[str, Node], first: Mapping[str, Node]) -> dict[str, Node]:
    """``second``'s plan with its sources replaced by ``first``'s outputs: the two in one."""
    memo: dict[int, Node] = {}

    def rebuilt(node: Node) -> Node:
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, Source):
            out = first[node.key]
        elif not node.inputs:
            out = node
        else:
            out = dataclasses.replace(node, inputs=tuple(rebuilt(i) for i in node.inputs))  # type: ignore[type-var]
        memo[id(node)] = out
        return out

    return {key: rebuilt(node) for key, node in second.items()}
