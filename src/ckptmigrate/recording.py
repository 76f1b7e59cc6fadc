"""The lineage's base schema: reading it, and recording it from a model or a checkpoint.

Everything that knows a revision's schema (``check``, ``diff``, autogenerate,
identification, checked claims) starts from the schema at base, before the
first revision. It can be recorded from anything whose revision is known: a
checkpoint (its stamp or ``--from``) or the configured model (at the head, at
a versioned class's pinned revision, or ``--from``). The downgrades then run
symbolically back to base, and the result is checked to upgrade back again.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config import Config
from .errors import CkptMigrateError, CommandError, StampError
from .paths import display_path
from .runtime.options import CheckpointOptions
from .script.directory import ScriptDirectory
from .script.revision import format_ids

if TYPE_CHECKING:  # torch-backed; imported where needed, so path errors come first
    from .model import ConfiguredModel
    from .schema import Schema


def record_base_hint(config: Config) -> str:
    """How to record a missing base schema, with what this configuration allows."""
    if config.get("model"):
        return "record it from the configured model with 'ckptmigrate schema --record'"
    where = display_path(config.file) if config.file else "the configuration"
    return (
        "record it from a checkpoint at a known revision with "
        f"'ckptmigrate schema --record CKPT --from REV', or set 'model = ...' in {where} "
        "and run 'ckptmigrate schema --record'"
    )


def note_if_unrecorded(config: Config, script_dir: ScriptDirectory) -> None:
    """A new lineage's first revision: say what the base schema is for and how to record it."""
    from .schema import base_schema_path

    if not base_schema_path(script_dir.dir).exists():
        config.log(
            "Note: no base schema is recorded yet (check, diff, autogenerate and "
            f"identifying unstamped checkpoints need it); {record_base_hint(config)}"
        )


def base_schema(config: Config, script_dir: ScriptDirectory) -> Schema:
    """The recorded base schema; an error saying how to record it when there is none."""
    from .runtime.symbolic import load_base_schema

    return load_base_schema(script_dir, hint=record_base_hint(config))


def base_from_checkpoint(
    config: Config,
    script_dir: ScriptDirectory,
    checkpoint: str | os.PathLike[str],
    from_revision: str | None,
    options: CheckpointOptions,
) -> tuple[Schema, str]:
    """(the base schema, where it came from) implied by a checkpoint at a known revision."""
    from .runtime.placement import place
    from .runtime.session import opened

    where = display_path(checkpoint)
    with opened(config, checkpoint, options) as ckpt:
        from .schema import Schema, read_base_schema

        if ckpt.adapter is not None:
            raise CommandError(
                f"{where} is a PEFT adapter, which holds only part of its base model",
                hint="record the base schema from the model (or a checkpoint of it) instead",
            )

        unknown = ckpt.stamp is None and read_base_schema(script_dir.dir) is None
        if from_revision is None and unknown:
            tips = format_ids(script_dir.revision_map.heads) or "none yet"
            raise StampError(
                f"{where} has no ckptmigrate stamp, so the revision it was saved at is unknown",
                hint=f"say which with 'ckptmigrate schema --record {where} --from REV' "
                f"(the lineage's head: {tips}; all revisions: 'ckptmigrate history')",
            )
        from .runtime.symbolic import base_of

        heads = place(config, script_dir, ckpt, from_revision).revisions
        base = base_of(script_dir, Schema.from_specs(ckpt.schema), heads)
    return base, f"{where} at {format_ids(heads) or 'base'}"


def base_from_model(
    config: Config, script_dir: ScriptDirectory, from_revision: str | None
) -> tuple[Schema, str]:
    """The base schema the configured model implies, checked to lead back to the model."""
    from .model import configured_model_or_none

    model = configured_model_or_none(config)
    if model is None:
        raise CommandError(
            "no model configured to record the base schema from",
            hint="add 'model = ...' to the ini file, or record it from a checkpoint at a "
            "known revision: 'ckptmigrate schema --record CKPT --from REV'",
        )
    if not len(script_dir.revision_map) and from_revision is None:
        return model.schema, model.spec
    heads, why = _model_revision(script_dir, model, from_revision)
    at = f"{format_ids(heads) or 'base'} ({why})"
    config.log(
        f"Deriving the base schema from the model {model.spec}, taken to be at {at}: "
        "running the downgrades symbolically"
    )
    base = _derive(script_dir, model, heads, at)
    return base, f"the model {model.spec} at {format_ids(heads) or 'base'}"


def _derive(
    script_dir: ScriptDirectory, model: ConfiguredModel, heads: tuple[str, ...], at: str
) -> Schema:
    from .runtime.symbolic import audit_revisions, base_of, schema_at
    from .schema import compare

    try:
        base = base_of(script_dir, model.schema, heads)
    except CkptMigrateError as exc:
        raise CommandError(
            f"cannot derive the base schema from the model ({model.spec}, taken to be at {at}): "
            f"{exc.one_line()}",
            hint="if the model is at an older revision, say which with "
            "'ckptmigrate schema --record --from REV'; otherwise fix that downgrade(), or "
            "record from a checkpoint: 'ckptmigrate schema --record CKPT --from REV'",
        ) from exc
    back = schema_at(script_dir, base, heads)
    if not back.same_layout(model.schema):
        broken = [a for a in audit_revisions(script_dir, base) if a.round_trip is not None]
        culprits = "; ".join(f"{a.script.revision}: {a.round_trip}" for a in broken)
        raise CommandError(
            f"the base schema derived from the model ({model.spec}, at {at}) does not upgrade "
            f"back to it ({compare(back, model.schema).summary()})"
            + (f": downgrade() does not undo upgrade() in {culprits}" if culprits else ""),
            hint="fix those revisions' downgrade(), or record from a checkpoint: "
            "'ckptmigrate schema --record CKPT --from REV'",
        )
    return base


def _model_revision(
    script_dir: ScriptDirectory, model: ConfiguredModel, from_revision: str | None
) -> tuple[tuple[str, ...], str]:
    """(the revisions the configured model is at, why we think so)."""
    from .runtime.placement import resolve_ids

    if from_revision is not None:
        return resolve_ids(script_dir, from_revision), "--from"
    pinned = _pinned_revision(script_dir, model)
    if pinned is not None:
        return pinned
    heads = script_dir.revision_map.heads
    if len(heads) > 1:
        raise CommandError(
            f"the lineage has several heads ({format_ids(heads)}), so the revision the model "
            "is at is unknown",
            hint="say which with 'ckptmigrate schema --record --from REV' (a head, or 'heads' "
            "when the model has every branch's changes)",
        )
    return heads, "the head"


def _pinned_revision(
    script_dir: ScriptDirectory, model: ConfiguredModel
) -> tuple[tuple[str, ...], str] | None:
    """A versioned model class of this lineage pinned to a revision: that revision."""
    from .integration.versioning import lineage_of

    lineage = lineage_of(type(model.module))
    if lineage is None or lineage.pinned is None:
        return None
    try:
        same = lineage.script_dir.dir.resolve() == script_dir.dir.resolve()
        revision = lineage.revision
    except CkptMigrateError:
        return None
    if not same:
        return None
    return (revision,), f"the revision {type(model.module).__qualname__} is pinned to"
