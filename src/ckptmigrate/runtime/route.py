"""The steps from where a checkpoint is to where it was asked to go.

Targets follow Alembic's grammar (``head``, ``-1``, ``<rev>+2``, ...). A target
that lies the other way is refused with the command that goes there: Alembic
quietly does nothing for ``upgrade <older>``, but a checkpoint left short of
what was asked for is better reported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import CommandError, RangeNotAncestorError, RevisionError
from ..script.directory import ScriptDirectory
from ..script.revision import format_ids

if TYPE_CHECKING:
    from .migration import MigrationStep

#: A relative target that walks the other way: "-1" for upgrade, "+1" for downgrade.
_OTHER_WAY = {True: re.compile(r"-\d+"), False: re.compile(r"\+\d+")}


def _name(upgrade: bool) -> str:
    return "upgrade" if upgrade else "downgrade"


def other_way_hint(upgrade: bool, where: str, target: str) -> str:
    other = _name(not upgrade)
    return f"to go {'back' if upgrade else 'forward'}, run 'ckptmigrate {other} {where} {target}'"


def has_steps(
    script_dir: ScriptDirectory, current: Sequence[str], target: str, *, upgrade: bool
) -> bool:
    """Whether going ``upgrade`` (or down) from ``current`` to ``target`` has steps to run."""
    from .migration import downgrade_steps, upgrade_steps

    try:
        return bool((upgrade_steps if upgrade else downgrade_steps)(script_dir, current, target))
    except RevisionError:
        return False


def steps_to(
    script_dir: ScriptDirectory,
    current: Sequence[str],
    target: str,
    upgrade: bool,
    where: str,
) -> list[MigrationStep]:
    """The steps from ``current`` to ``target``; going the wrong way points to the other command."""
    from .migration import downgrade_steps, upgrade_steps

    direction = _name(upgrade)
    try:
        return (upgrade_steps if upgrade else downgrade_steps)(script_dir, current, target)
    except RangeNotAncestorError as exc:
        if has_steps(script_dir, current, target, upgrade=not upgrade):
            hint = other_way_hint(upgrade, where, target)
        else:
            hint = (
                "see 'ckptmigrate history' for what lies "
                + ("above" if upgrade else "below")
                + " the checkpoint's revision"
            )
        raise CommandError(
            f"{target} is not a valid {direction} target from {format_ids(current) or 'base'}",
            hint=hint,
        ) from exc
    except RevisionError as exc:
        if not _OTHER_WAY[upgrade].fullmatch(target):
            raise
        raise CommandError(
            exc.message,
            hint=f"{direction} takes {'+N' if upgrade else '-N'}; "
            + other_way_hint(upgrade, where, target),
        ) from exc


def refuse_wrong_way(
    script_dir: ScriptDirectory, current: Sequence[str], target: str, upgrade: bool, where: str
) -> None:
    """Nothing to do because the target lies the other way: refuse, and name the fix."""
    if not has_steps(script_dir, current, target, upgrade=not upgrade):
        return
    raise CommandError(
        f"{where} is at {format_ids(current) or 'base'}, which is "
        f"{'past' if upgrade else 'before'} {target}; {_name(upgrade)} only goes "
        f"{'forward' if upgrade else 'back'}",
        hint=other_way_hint(upgrade, where, target),
    )
