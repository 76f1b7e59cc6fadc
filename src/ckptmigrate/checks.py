"""What ``ckptmigrate check`` verifies, one function per question.

Each function prints what it found (OK lines and tables on stdout) and returns
the problems as one-line sentences; ``command.check`` joins them into the
:class:`~ckptmigrate.errors.CheckFailed` that makes CI fail.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import Config
from .model import ConfiguredModel
from .paths import display_path
from .runtime.symbolic import RevisionAudit, schema_at
from .schema import Schema, compare, format_table
from .script.directory import ScriptDirectory
from .script.revision import format_ids

#: How to fix a revision that loses trained values (also used by ``revision``).
KEEP_OR_MARK = (
    "edit the revision to keep them (rename_*, split, concat, resize), or pass intended=True "
    "to each drop_key, drop_prefix or shrinking resize that is meant"
)


def model_matches_head(
    config: Config, script_dir: ScriptDirectory, base: Schema, model: ConfiguredModel
) -> list[str]:
    """The configured model's schema is the schema at the heads."""
    heads = script_dir.revision_map.heads
    head_schema = schema_at(script_dir, base, heads)
    diff = compare(head_schema, model.schema)
    if diff.empty:
        config.print_stdout(f"OK: {model.spec} matches the schema at {format_ids(heads) or 'base'}")
        return []
    config.print_stdout(f"The model ({model.spec}) differs from the schema at {format_ids(heads)}:")
    for line in format_table(diff, head_schema, model.schema, "head schema", "model"):
        config.print_stdout("  " + line)
    return [
        f"the model no longer matches the head schema ({diff.summary()}); write the "
        'migration with: ckptmigrate revision --autogenerate -m "..."'
    ]


def versioned_classes_at_head(config: Config, script_dir: ScriptDirectory) -> list[str]:
    """Versioned model classes whose revision is unknown or not the head."""
    from .integration.check import versioned_class_problems

    return versioned_class_problems(config, script_dir)


def round_trips(config: Config, audits: Sequence[RevisionAudit], n_revisions: int) -> list[str]:
    """Every revision's downgrade() gives back the schema its upgrade() started from."""
    bad = [a for a in audits if a.round_trip is not None]
    for item in bad:
        config.print_stdout(
            f"Round trip broken in {item.script.revision} "
            f"({display_path(item.script.path)}): {item.round_trip}"
        )
    if bad:
        return [
            f"{len(bad)} revision(s) whose downgrade() does not undo upgrade(): "
            + ", ".join(i.script.revision for i in bad)
        ]
    if n_revisions == 0:
        config.print_stdout("OK: no revisions yet, so no round trip to check")
    else:
        where = "the 1 revision" if n_revisions == 1 else f"all {n_revisions} revisions"
        config.print_stdout(f"OK: downgrade() undoes upgrade() in {where}")
    return []


def no_silent_discards(config: Config, audits: Sequence[RevisionAudit]) -> list[str]:
    """No upgrade() loses trained values without saying it means to (``intended=True``)."""
    from .plan.discards import summary

    lossy = []
    meant = []
    for audit in audits:
        accidents = [d for d in audit.discards if not d.intended]
        if accidents:
            lossy.append(audit.script.revision)
            config.print_stdout(
                f"Discards trained values in {audit.script.revision} "
                f"({display_path(audit.script.path)}): " + ", ".join(map(str, accidents))
            )
        if audit.discards and not accidents:
            meant.append(f"{audit.script.revision} discards {summary(audit.discards)}")
    if lossy:
        noun = "revision discards" if len(lossy) == 1 else "revisions discard"
        return [
            f"{len(lossy)} {noun} trained values without intended=True: {', '.join(lossy)}; "
            + KEEP_OR_MARK
        ]
    suffix = " unless marked intended" if meant else ""
    if audits:
        config.print_stdout(f"OK: no upgrade() discards trained values{suffix}")
    for line in meant:
        config.print_stdout(f"  {line}, marked intended")
    return []
