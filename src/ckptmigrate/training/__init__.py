"""Training checkpoints: optimizer state that follows the parameters it belongs to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import Config
from ..formats.checkpoint import Checkpoint
from ..plan.state import PlanState
from ..runtime.migration import MigrationStep
from ..script.directory import ScriptDirectory


def migrate_training_state(
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

    Returns None when the container holds nothing to migrate.
    """
    return None
