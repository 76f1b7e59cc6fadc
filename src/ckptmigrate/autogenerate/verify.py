"""Run a freshly generated revision symbolically before trusting it."""

from __future__ import annotations

from ..errors import CkptMigrateError
from ..plan.discards import Discard, find_discards
from ..plan.state import PlanState
from ..runtime.migration import MigrationStep, run_step
from ..schema import Schema
from ..script.directory import Script, load_script
from . import Generated


def verify_generated(script: Script, generated: Generated) -> list[Discard]:
    """Its upgrade must turn the head schema into the model's, its downgrade back.

    Returns the trained values its upgrade throws away, read from the plan.
    """
    fresh = load_script(script.path)
    state = PlanState.from_schema(generated.head.specs())
    run_step(MigrationStep(fresh, True), state, symbolic=True)
    discards = find_discards(generated.head.specs(), state)
    if not Schema.from_specs(state.schema()).same_layout(generated.target):
        raise CkptMigrateError(
            f"the generated revision {script.path} does not reproduce the model's schema",
            hint="this is a bug in autogenerate; please report it (nothing was written)",
        )
    run_step(MigrationStep(fresh, False), state, symbolic=True)
    if not Schema.from_specs(state.schema()).same_layout(generated.head):
        raise CkptMigrateError(
            f"the generated downgrade of {script.path} does not restore the head schema",
            hint="this is a bug in autogenerate; please report it (nothing was written)",
        )
    return discards
