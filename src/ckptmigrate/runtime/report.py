"""What a migration run tells the user: the dry-run plan, progress, and the result line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from ..paths import display_path
from ..progress import Progress
from ..script.revision import format_ids

if TYPE_CHECKING:
    from ..formats.checkpoint import Checkpoint
    from ..plan.state import PlanState
    from .migration import MigrationStep


@dataclass
class MigrationResult:
    """What an upgrade/downgrade did (or would do, for a dry run)."""

    checkpoint: Path
    output: Path | None
    from_revisions: tuple[str, ...]
    to_revisions: tuple[str, ...]
    steps: list[MigrationStep] = field(default_factory=list)
    dry_run: bool = False
    identified: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.steps)


@dataclass
class StampResult:
    """What ``stamp`` found and recorded."""

    checkpoint: Path
    #: the stamp the file had (None: none)
    from_revisions: tuple[str, ...] | None
    to_revisions: tuple[str, ...]
    #: False when the file had that stamp already and was left alone
    written: bool = False


def _ids(ids: Sequence[str]) -> str:
    return format_ids(ids) or "base"


def _steps(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''}"


def print_plan(
    config: Config, where: str, result: MigrationResult, n_in: int, state: PlanState
) -> None:
    """``--dry-run``: every step, its ops and the shapes they produce."""
    p = config.print_stdout
    p(
        f"Plan for {where}: {_ids(result.from_revisions)} -> {_ids(result.to_revisions)}, "
        f"{_steps(len(result.steps))} (dry run: nothing is written)"
    )
    for step in result.steps:
        p(f"{step}")
        for rec in step.records:
            p(f"    {rec.call}")
            for key, spec in rec.results:
                p(f"        {key}: {spec if spec is not None else 'object'}")
            for key in rec.removed:
                p(f"        {key}: removed")
        if not step.records:
            p("    (no operations)")
    p(f"Result: {len(state)} entries (was {n_in}), at {_ids(result.to_revisions)}")


def done_line(result: MigrationResult, where: str, out: Path, upgrade: bool) -> str:
    verb = "Upgraded" if upgrade else "Downgraded"
    text = (
        f"{verb} {where}: {_ids(result.from_revisions)} -> {_ids(result.to_revisions)} "
        f"({_steps(len(result.steps))})"
    )
    if result.output is not None:
        text += f", written to {display_path(out)}"
    return text


def progress_bar(config: Config, ckpt: Checkpoint, state: PlanState) -> Progress | None:
    """A bar over the bytes to write, on a terminal only (and never with -q)."""
    full = ckpt.file_state(state)
    specs = [n.spec for n in full.entries.values() if n.spec is not None]
    return Progress.maybe(
        config.stderr, config.quiet, sum(s.nbytes for s in specs), len(specs), "Writing"
    )
