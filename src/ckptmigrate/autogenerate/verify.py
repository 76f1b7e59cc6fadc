"""Run a freshly generated revision symbolically before trusting it."""

from __future__ import annotations

from ..config import Config
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


def verify_or_remove(script: Script, generated: Generated) -> list[Discard]:
    """:func:`verify_generated`, removing the file it wrote when the check fails."""
    try:
        return verify_generated(script, generated)
    except Exception:
        script.path.unlink()
        raise


def report_generated(config: Config, generated: Generated, discards: list[Discard]) -> None:
    """What the user must look at before committing the generated revision."""
    reviews = sum(1 for line in generated.upgrades if "# review:" in line)
    if reviews:
        lines = "line" if reviews == 1 else "lines"
        config.log(f"Review the {reviews} {lines} marked '# review:' before committing it")
    if discards:
        from ..checks import KEEP_OR_MARK

        # a warning, shown even with -q: the user must decide about these values
        print(
            "Warning: this revision discards trained values: "
            + ", ".join(map(str, discards))
            + f"; {KEEP_OR_MARK} ('ckptmigrate check' fails until then)",
            file=config.stderr,
        )
