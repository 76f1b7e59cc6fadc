"""Where a checkpoint stands on the lineage: its stamp, ``--from``, or its schema.

Every checkpoint command starts here. The answer is checked, never assumed:
a stamp must name revisions this lineage knows, ``--from`` is resolved like
any target, and an unstamped file is identified by matching its schema
against every revision's (see :mod:`ckptmigrate.identify`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..config import Config
from ..errors import StampError
from ..paths import display_path
from ..script.directory import ScriptDirectory
from ..script.revision import format_ids
from .route import has_steps

if TYPE_CHECKING:
    from ..formats.checkpoint import Checkpoint
    from ..formats.stamp import Stamp
    from ..schema import Schema


@dataclass(frozen=True)
class Placement:
    """The revisions a checkpoint is at, and how that was found out."""

    revisions: tuple[str, ...]
    identified: bool = False  # by its schema (it has no stamp)
    claimed: bool = False  # by --from


def resolve_ids(script_dir: ScriptDirectory, symbols: str) -> tuple[str, ...]:
    """Revision ids for ``symbols`` (comma-separated targets; ``base`` is none)."""
    if symbols.strip() == "base":
        return ()
    parts = tuple(p.strip() for p in symbols.split(",") if p.strip())
    return tuple(r.revision for r in script_dir.get_revisions(parts) if r is not None)


class Stamped(Protocol):
    """A checkpoint, or what a look at one found: where it is, and its stamp."""

    @property
    def path(self) -> object: ...

    @property
    def stamp(self) -> Stamp | None: ...


def stamped_heads(script_dir: ScriptDirectory, ckpt: Stamped) -> tuple[str, ...] | None:
    """The checkpoint's recorded revisions, checked against the lineage (None: no stamp)."""
    if ckpt.stamp is None:
        return None
    rmap = script_dir.revision_map
    unknown = [r for r in ckpt.stamp.revisions if not rmap.knows(r)]
    if unknown:
        raise StampError(
            f"{display_path(ckpt.path)} is stamped at revision {', '.join(unknown)}, "
            f"which is not in {display_path(script_dir.versions)}",
            hint="is it from another lineage (-n NAME)? Otherwise pass --from REV, or "
            "re-stamp it with 'ckptmigrate stamp --purge CKPT REV'",
        )
    return rmap.canonical(ckpt.stamp.revisions)  # a squashed revision's id: the squash


def place(
    config: Config,
    script_dir: ScriptDirectory,
    ckpt: Checkpoint,
    from_revision: str | None,
) -> Placement:
    """Where ``ckpt`` is: ``--from`` when given, else its stamp, else its schema."""
    if from_revision is not None:
        heads = resolve_ids(script_dir, from_revision)
        if ckpt.stamp is not None and set(ckpt.stamp.revisions) != set(heads):
            config.log(
                f"Note: ignoring the stamp {','.join(ckpt.stamp.revisions) or 'base'} "
                f"(--from {from_revision})"
            )
        return Placement(heads, claimed=True)
    stamped = stamped_heads(script_dir, ckpt)
    if stamped is not None:
        return Placement(stamped)
    from ..identify import identify_or_fail

    return Placement(identify_or_fail(config, script_dir, ckpt), identified=True)


def standing(
    script_dir: ScriptDirectory,
    ckpt: Checkpoint,
    where: str,
    revision: str | None,
    model: Schema | None,
    flags: str,
) -> str:
    """Which revision the file is at, and which command brings it to ``revision`` (or head).

    ``diff`` ends with this line, so a user who sees the differences also sees
    that (and how) ``upgrade`` makes them go away.
    """
    from ..schema import base_schema_path

    rmap = script_dir.revision_map
    recorded = base_schema_path(script_dir.dir).exists()
    found = _where_it_is(script_dir, ckpt, where, recorded)
    if isinstance(found, str):
        return found
    at, how = found
    text = f"{where} is at {format_ids(at) or 'base'} ({how})"
    goal = revision if revision is not None else ("heads" if len(rmap.heads) > 1 else "head")
    goal_ids = resolve_ids(script_dir, goal)
    there = set(goal_ids) == set(at)
    if there:
        text += ", the head" if revision is None and len(goal_ids) == 1 else ""
    elif has_steps(script_dir, at, goal, upgrade=True):
        command = f"ckptmigrate upgrade {where}" + (f" {revision}" if revision else "")
        named = format_ids(goal_ids)
        text += f"; '{command}{flags}' brings it to " + (
            f"{goal} ({named})" if revision is None else named
        )
    elif has_steps(script_dir, at, goal, upgrade=False):
        named = format_ids(goal_ids) or "base"
        text += f"; 'ckptmigrate downgrade {where} {goal}{flags}' brings it to {named}"
    else:
        return text
    if model is not None and recorded:
        text += _model_note(script_dir, goal, goal_ids, model, there)
    return text


def _where_it_is(
    script_dir: ScriptDirectory, ckpt: Checkpoint, where: str, recorded: bool
) -> tuple[tuple[str, ...], str] | str:
    """(revisions, how they are known), or the sentence saying why they are not."""
    from ..identify import unique_match

    if ckpt.stamp is not None:
        rmap = script_dir.revision_map
        unknown = [r for r in ckpt.stamp.revisions if not rmap.knows(r)]
        if unknown:
            return f"{where} is stamped at {', '.join(unknown)}, which this lineage does not know"
        return rmap.canonical(ckpt.stamp.revisions), "stamped"
    found = unique_match(script_dir, ckpt)
    if found is None:
        if not recorded:
            return f"{where} has no stamp (and no base schema is recorded to identify it by)"
        return f"{where} is at no known revision: it has no stamp and its schema matches none"
    at = (found.script.revision,) if found.script is not None else ()
    return at, found.fit.how


def _model_note(
    script_dir: ScriptDirectory,
    goal: str,
    goal_ids: tuple[str, ...],
    model: Schema,
    there: bool,
) -> str:
    from ..schema import compare
    from .symbolic import load_base_schema, schema_at

    if compare(schema_at(script_dir, load_base_schema(script_dir), goal_ids), model).empty:
        return "" if there else ", which matches the model"
    return (
        f"; the model differs from the schema at {goal}: write the migration with "
        "'ckptmigrate revision --autogenerate -m \"...\"'"
    )
