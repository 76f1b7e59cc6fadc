"""Run revision scripts, one step at a time, against a plan.

Each step's ``upgrade()``/``downgrade()`` runs with the ``op`` namespace bound
to the plan, under a private RNG seeded from the revision id (so modules a
script builds come out the same every time and the caller's RNG is left
alone), and, for symbolic runs, with ``torch.device("meta")`` as the default
device so building even a huge module allocates nothing.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import torch

from ..errors import CkptMigrateError, ScriptError
from ..operations.checks import OpContext, OpRecord
from ..operations.context import activate
from ..paths import display_path
from ..plan.nodes import seed_for
from ..plan.rng import seeded_global_rng
from ..plan.state import PlanState
from ..script.directory import ReplacedStep, Script, ScriptDirectory
from ..script.revision import RevisionMap


@dataclass
class MigrationStep:
    """One revision applied in one direction."""

    script: Script
    is_upgrade: bool
    records: list[OpRecord] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "upgrade" if self.is_upgrade else "downgrade"

    @property
    def from_ids(self) -> tuple[str, ...]:
        return self.script.down_revisions if self.is_upgrade else (self.script.revision,)

    @property
    def to_ids(self) -> tuple[str, ...]:
        return (self.script.revision,) if self.is_upgrade else self.script.down_revisions

    def __str__(self) -> str:
        text = f"{self.name} {', '.join(self.from_ids)} -> {', '.join(self.to_ids)}"
        return f"{text}, {self.script.doc}" if self.script.doc else text


def upgrade_steps(
    script_dir: ScriptDirectory, current: Sequence[str], target: str
) -> list[MigrationStep]:
    revs = script_dir.revision_map.upgrade_path(current, target)
    return _squashed([MigrationStep(r, True) for r in revs])  # type: ignore[arg-type]


def downgrade_steps(
    script_dir: ScriptDirectory, current: Sequence[str], target: str
) -> list[MigrationStep]:
    revs = script_dir.revision_map.downgrade_path(current, target)
    return _squashed([MigrationStep(r, False) for r in revs])  # type: ignore[arg-type]


def _squashed(steps: list[MigrationStep]) -> list[MigrationStep]:
    """Every run of steps through a whole squashed range as that squash's one step.

    Checkpoints move on the replaced revisions (so one stamped inside a squash
    finds its way); crossing all of them is what the squash's own simplified
    ``upgrade()``/``downgrade()`` does in one go.
    """
    out: list[MigrationStep] = []
    i = 0
    while i < len(steps):
        script = steps[i].script
        if isinstance(script, ReplacedStep):
            squash, up = script.squash, steps[i].is_upgrade
            names = squash.replaces if up else squash.replaces[::-1]
            run = [s.script for s in steps[i : i + len(names)]]
            if (
                all(
                    isinstance(r, ReplacedStep) and r.squash is squash and r.replaced == name
                    for r, name in zip(run, names)
                )
                and len(run) == len(names)
                and all(s.is_upgrade == up for s in steps[i : i + len(run)])
            ):
                out.append(MigrationStep(squash, up))
                i += len(names)
                continue
        out.append(steps[i])
        i += 1
    return out


def _script_line(tb: TracebackType | None, path: str) -> int | None:
    line = None
    for frame, lineno in traceback.walk_tb(tb):
        if frame.f_code.co_filename == path:
            line = lineno
    return line


def run_step(step: MigrationStep, state: PlanState, *, symbolic: bool) -> None:
    """Run one script function against ``state`` (which it rewrites)."""
    script = step.script
    ops = OpContext(
        state,
        revision=script.seed_revision,
        direction=step.name,
        path=script.path,
        records=step.records,
    )
    device = torch.device("meta") if symbolic else contextlib.nullcontext()
    try:
        with seeded_global_rng(seed_for(script.seed_revision, step.name)):
            fn = script.migration_fn(step.name)  # imported once, under the lock, off meta
            with activate(ops), device:
                fn()
    except CkptMigrateError:
        raise
    except Exception as exc:
        line = _script_line(exc.__traceback__, str(script.path))
        where = display_path(script.path) + (f", line {line}" if line else "")
        raise ScriptError(
            f"revision {script.revision} ({where}): {step.name}() raised "
            f"{type(exc).__name__}: {exc}",
            hint="fix the revision script; nothing was written",
            traceback_helps=True,
        ) from exc


def run_steps(
    steps: Sequence[MigrationStep],
    state: PlanState,
    heads: Sequence[str],
    rmap: RevisionMap,
    *,
    symbolic: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[str, ...]:
    """Run ``steps`` in order; returns the heads to record afterwards."""
    current = tuple(heads)
    for step in steps:
        if log is not None:
            log(f"Running {step}")
        run_step(step, state, symbolic=symbolic)
        current = heads_after(rmap, current, step)
    return current


def heads_after(rmap: RevisionMap, heads: tuple[str, ...], step: MigrationStep) -> tuple[str, ...]:
    """The revisions a checkpoint at ``heads`` is at once ``step`` has run."""
    if step.is_upgrade:
        return rmap.heads_after_upgrade(heads, step.script)
    return rmap.heads_after_downgrade(heads, step.script)
