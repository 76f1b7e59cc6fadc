"""Training checkpoints: optimizer state that follows the parameters it belongs to.

PyTorch keys an optimizer's state by the parameter's *position* in the
optimizer, not by name, so a migration that renames, adds, drops or reshapes
parameters must rebuild that state or training resumes with scrambled
moments. This package finds the optimizer states in a training container
(``{"optimizer": ...}``, Lightning's ``optimizer_states``), works out which
state-dict entries are parameters and in which order (:mod:`.layout`), and
carries every parameter's state along the same plan as its weights
(:mod:`.optimizer`).

Importing it is cheap (the op module needs :class:`ResetOptimizerState`);
the work is imported when a container is migrated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .marks import ResetOptimizerState

if TYPE_CHECKING:
    from ..config import Config
    from ..formats.checkpoint import Checkpoint
    from ..plan.state import PlanState
    from ..runtime.migration import MigrationStep
    from ..script.directory import ScriptDirectory

__all__ = ["ResetOptimizerState", "migrate_training_state"]


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

    Returns None when the container holds nothing to migrate (and always for
    a dry run, which prints what would happen to the optimizer state instead).
    """
    from .migrate import migrate_container

    return migrate_container(
        config, script_dir, ckpt, state, from_revisions, to_revisions, steps, dry_run=dry_run
    )
