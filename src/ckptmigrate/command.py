"""One function per command, each taking a :class:`Config` first.

These are the public, scriptable form of the command line (``cli.py`` only
parses arguments and calls them). Graph commands never import torch; the
checkpoint commands import it when they run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DEFAULT_INI, Config
from .errors import CheckFailed, CommandError, ConfigError, RangeNotAncestorError
from .paths import display_path
from .runtime.options import (
    CheckpointKwargs,
    CheckpointOptions,
    MigrationKwargs,
    MigrationOptions,
    PathLike,
    make_options,
)
from .script import display
from .script.directory import TEMPLATE_NAME, Script, ScriptDirectory
from .script.revision import format_ids

if TYPE_CHECKING:
    from typing import Unpack

    from .runtime.fleet import Fleet
    from .runtime.fleet_report import FleetReport
    from .runtime.report import MigrationResult
    from .schema import Schema
    from .squash import Squashed

__all__ = [
    "CheckFailed",
    "branches",
    "check",
    "current",
    "current_all",
    "diff",
    "downgrade",
    "downgrade_all",
    "edit",
    "fixture_record",
    "heads",
    "history",
    "init",
    "list_templates",
    "merge",
    "revision",
    "schema",
    "show",
    "squash",
    "stamp",
    "stamp_all",
    "upgrade",
    "upgrade_all",
]


# --------------------------------------------------------------------------- init


def init(config: Config, directory: str | os.PathLike[str], *, template: str | None = None) -> Path:
    """Create a migrations folder and an ``alembic_style.ini`` pointing at it.

    ``template`` is the kind of project (see :func:`list_templates`).
    """
    from . import templates

    template = template or templates.DEFAULT_TEMPLATE
    if template not in templates.names():
        raise CommandError(
            f"no template named {template!r}",
            hint=f"choose one of {', '.join(templates.names())} (see 'ckptmigrate list_templates')",
        )
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CommandError(
            f"directory {directory} already exists and is not empty",
            hint="choose another directory, or remove it first",
        )
    (target / "versions").mkdir(parents=True, exist_ok=True)
    config.print_stdout(f"Creating directory {display_path(target.resolve())} ... done")
    (target / TEMPLATE_NAME).write_text(templates.read(TEMPLATE_NAME), encoding="utf-8")
    (target / "README").write_text(templates.read(f"{template}/README"), encoding="utf-8")
    config.print_stdout(f"Generating {display_path(target / TEMPLATE_NAME)} ... done")
    ini = config.file or (Path.cwd() / DEFAULT_INI)
    if ini.exists():
        config.print_stdout(
            f"{display_path(ini)} already exists; not overwritten "
            f"(set script_location in it to {display_path(target.resolve())})"
        )
    else:
        rel = os.path.relpath(target.resolve(), ini.parent.resolve())
        location = (
            "%(here)s/" + Path(rel).as_posix()
            if not rel.startswith("..")
            else str(target.resolve())
        )
        ini.write_text(templates.ini_text(template, location), encoding="utf-8")
        config.print_stdout(f"Generating {display_path(ini)} ... done")
    config.print_stdout(
        "Next: set 'model = ...' in the ini file if you want 'check' and autogenerate, "
        'then run: ckptmigrate revision -m "initial"'
    )
    return target


def list_templates(config: Config) -> list[str]:
    """The kinds of project ``init --template`` sets up, as Alembic lists its own."""
    from . import templates

    names = templates.names()
    config.print_stdout("Available templates:\n")
    for name in names:
        config.print_stdout(f"{name} - {templates.description(name)}")
    config.print_stdout(
        "\nTemplates are used via the 'init' command, e.g.:\n\n"
        "  ckptmigrate init --template lightning ./migrations"
    )
    return names


# --------------------------------------------------------------------------- revisions


def revision(
    config: Config,
    message: str | None = None,
    *,
    autogenerate: bool = False,
    head: str = "head",
    splice: bool = False,
    branch_label: str | Sequence[str] | None = None,
    rev_id: str | None = None,
    depends_on: str | Sequence[str] | None = None,
    allow_empty: bool = False,
) -> Script | None:
    """Write a new revision file on top of ``head``.

    With ``autogenerate`` the ops come from comparing the configured model with
    the head schema; when they already match nothing is written (unless
    ``allow_empty``).
    """
    script_dir = ScriptDirectory.from_config(config)
    generated = None
    if autogenerate:
        from .autogenerate import autogenerate_ops

        generated = autogenerate_ops(config, script_dir, head)
        if generated is None:
            config.print_stdout(
                "No changes detected: the model matches the head schema; nothing written"
            )
            if not allow_empty:
                return None
    first = not len(script_dir.compact_map)
    script = script_dir.generate_revision(
        rev_id,
        message,
        head=head,
        splice=splice,
        branch_labels=branch_label,
        depends_on=depends_on,
        upgrades=generated.upgrades if generated else None,
        downgrades=generated.downgrades if generated else None,
        imports=generated.imports if generated else (),
    )
    done = f"Generating {display_path(script.path)} ... done"
    if generated is None or not generated.ops:
        config.print_stdout(done)
        if first and generated is None:
            from .recording import note_if_unrecorded

            note_if_unrecorded(config, script_dir)
        return script
    from .autogenerate.verify import report_generated, verify_or_remove

    discards = verify_or_remove(script, generated)
    config.print_stdout(done)
    report_generated(config, generated, discards)
    return script


def merge(
    config: Config,
    revisions: Sequence[str],
    message: str | None = None,
    *,
    branch_label: str | Sequence[str] | None = None,
    rev_id: str | None = None,
    splice: bool = False,
) -> Script:
    """Write a revision whose parents are ``revisions`` (e.g. ``heads``).

    ``splice`` allows parents that are not heads, as in Alembic.
    """
    script_dir = ScriptDirectory.from_config(config)
    parents = [r for r in script_dir.get_revisions(tuple(revisions), compact=True) if r is not None]
    if len({p.revision for p in parents}) < 2:
        raise CommandError(
            f"merge needs at least two revisions; {', '.join(revisions)} "
            f"gave {format_ids(p.revision for p in parents) or 'none'}",
            hint="name two or more heads, or 'heads' (see 'ckptmigrate heads')",
        )
    script = script_dir.generate_revision(
        rev_id,
        message,
        head=tuple(p.revision for p in parents),
        splice=splice,
        branch_labels=branch_label,
    )
    config.print_stdout(f"Generating {display_path(script.path)} ... done")
    return script


def edit(config: Config, rev: str = "head") -> Path:
    """Open the revision file of ``rev`` in ``$EDITOR`` (or ``$VISUAL``), as Alembic does."""
    import shlex
    import subprocess

    script_dir = ScriptDirectory.from_config(config)
    found = [s for s in script_dir.get_revisions(rev, compact=True) if s is not None]
    if len(found) != 1:
        raise CommandError(
            f"{rev!r} names {len(found) or 'no'} revisions"
            + (f" ({format_ids(s.revision for s in found)})" if found else ""),
            hint="name one revision (see 'ckptmigrate heads' and 'ckptmigrate history')",
        )
    path = found[0].path
    editor = os.environ.get("EDITOR") or os.environ.get("VISUAL")
    if not editor:
        raise CommandError(
            f"no editor to open {display_path(path)} with",
            hint="set $EDITOR (e.g. export EDITOR=vim), or open the file yourself",
        )
    try:
        done = subprocess.run([*shlex.split(editor), str(path)])
    except OSError as exc:
        raise CommandError(
            f"cannot run the editor {editor!r}: {exc.strerror}", hint="fix $EDITOR"
        ) from exc
    if done.returncode != 0:
        raise CommandError(
            f"the editor {editor!r} exited with status {done.returncode}",
            hint=f"the file is {display_path(path)}",
        )
    script_dir.forget()
    return path


def squash(
    config: Config,
    rev_range: str,
    message: str | None = None,
    *,
    keep: bool = False,
    dry_run: bool = False,
    rev_id: str | None = None,
) -> Squashed:
    """Write one revision for the linear run ``rev_range`` (``A:B``), proved equal to it.

    Checkpoints stamped with any replaced revision still migrate; the replaced
    files are removed unless ``keep``. ``dry_run`` prints the combined ops.
    """
    from .squash import describe
    from .squash import squash as run

    done = run(config, rev_range, message, keep=keep, dry_run=dry_run, rev_id=rev_id)
    for line in describe(done):
        config.log(line)
    if done.script is None:
        for name, body in (("upgrade", done.upgrade), ("downgrade", done.downgrade)):
            if name == "downgrade":
                config.print_stdout()
            config.print_stdout(f"def {name}() -> None:")
            for line in body or ["pass"]:
                config.print_stdout(f"    {line}")
        config.log("Dry run: nothing was written")
        return done
    config.print_stdout(f"Generating {display_path(done.script.path)} ... done")
    if done.removed:
        names = ", ".join(p.name for p in done.removed[:3]) + (
            " ..." if len(done.removed) > 3 else ""
        )
        config.log(f"Removed {len(done.removed)} replaced revision files ({names})")
    elif not dry_run:
        config.log("Kept the replaced revision files (--keep); the squash stands for them")
    return done


def heads(
    config: Config, *, verbose: bool = False, resolve_dependencies: bool = False
) -> list[Script]:
    scripts = ScriptDirectory.from_config(config).heads(real=resolve_dependencies)
    for s in scripts:
        config.print_stdout(
            display.cmd_format(s, verbose, include_branches=True, tree_indicators=False)
        )
    return scripts


def branches(config: Config, *, verbose: bool = False) -> list[Script]:
    script_dir = ScriptDirectory.from_config(config)
    points = [s for s in script_dir.walk_revisions(compact=True) if s.is_branch_point]
    for s in points:
        config.print_stdout(display.cmd_format(s, verbose, include_branches=True))
        pad = " " * len(s.revision)
        for child in sorted(s.nextrev):
            line = display.head_only(
                script_dir.script(child, compact=True), include_branches=True, include_doc=verbose
            )
            config.print_stdout(f"{pad} -> {line}")
        config.print_stdout()
    return points


def history(
    config: Config,
    rev_range: str | None = None,
    *,
    verbose: bool = False,
    graph: bool = False,
    indicate_current: PathLike | None = None,
) -> list[Script]:
    """All revisions, newest first; ``rev_range`` is ``[start]:[end]``.

    ``indicate_current`` is a checkpoint whose revision(s) are marked ``(current)``.
    """
    script_dir = ScriptDirectory.from_config(config)
    base, head = "base", "heads"
    if rev_range is not None:
        if ":" not in rev_range:
            raise CommandError(
                f"history range {rev_range!r} needs a colon",
                hint="write [start]:[end], [start]: or :[end], e.g. -r 1a0c:head",
            )
        lo, hi = (part.strip() for part in rev_range.split(":", 1))
        base, head = lo or "base", hi or "heads"
    marks = _current_marks(config, script_dir, indicate_current) if indicate_current else {}
    try:
        scripts = script_dir.walk_revisions(base, head, compact=True)
    except RangeNotAncestorError as exc:
        raise CommandError(
            f"requested range {base}:{head} does not refer to ancestor/descendant "
            "revisions along the same branch",
            hint="check the range with 'ckptmigrate history'",
        ) from exc
    if graph:
        lines = display.graph_lines(scripts, marks)
    else:
        lines = [
            display.cmd_format(
                s,
                verbose,
                include_branches=True,
                include_doc=True,
                include_parents=True,
                current=marks.get(s.revision, False),
            )
            for s in scripts
        ]
    if lines:  # one write: a long history prints thousands of lines
        config.print_stdout("\n".join(lines))
    return scripts


def _current_marks(
    config: Config, script_dir: ScriptDirectory, checkpoint: PathLike
) -> dict[str, str | bool]:
    """The revision files a checkpoint is at: True, or where inside a squash it stands."""
    from .runtime.placement import place
    from .runtime.session import opened

    with opened(config, checkpoint, CheckpointOptions()) as ckpt:
        at = place(config, script_dir, ckpt, None).revisions
    rmap = script_dir.compact_map
    marks: dict[str, str | bool] = {}
    for rid in at:
        squash = rmap.squashed_into(rid) if rid not in rmap else None
        if squash is None:
            marks[rid] = True
        else:
            marks[squash.revision] = f"at {rid}, which it replaced"
    if not at:
        config.log(f"Note: {display_path(checkpoint)} is at base")
    return marks


def show(config: Config, rev: str) -> list[Script]:
    script_dir = ScriptDirectory.from_config(config)
    if rev == "current":
        raise CommandError(
            "'show current' needs a checkpoint", hint="use 'ckptmigrate current CKPT -v'"
        )
    scripts = [s for s in script_dir.get_revisions(rev, compact=True) if s is not None]
    if not scripts:
        raise CommandError(f"{rev!r} names no revision", hint="'base' has nothing to show")
    for s in scripts:
        config.print_stdout(display.log_entry(s))
    return scripts


# --------------------------------------------------------------------------- checkpoints


def upgrade(
    config: Config,
    checkpoint: PathLike,
    target: str = "head",
    **options: Unpack[MigrationKwargs],
) -> MigrationResult:
    """Upgrade a checkpoint to ``target`` (in place unless ``output``)."""
    from .runtime.session import MigrationSession

    opts: MigrationOptions = make_options(MigrationOptions, dict(options))
    return MigrationSession(config, opts).migrate(checkpoint, target, upgrade=True)


def downgrade(
    config: Config,
    checkpoint: PathLike,
    target: str,
    **options: Unpack[MigrationKwargs],
) -> MigrationResult:
    """Downgrade a checkpoint to ``target`` (in place unless ``output``)."""
    from .runtime.session import MigrationSession

    opts: MigrationOptions = make_options(MigrationOptions, dict(options))
    return MigrationSession(config, opts).migrate(checkpoint, target, upgrade=False)


def stamp(
    config: Config,
    checkpoint: PathLike,
    revisions: Sequence[str],
    *,
    purge: bool = False,
    **options: Unpack[MigrationKwargs],
) -> tuple[str, ...]:
    """Record ``revisions`` in the checkpoint without running migrations.

    The file's schema must be the schema at those revisions (where a base
    schema says what that is); ``force`` records them anyway.
    """
    from .runtime.session import MigrationSession

    opts: MigrationOptions = make_options(MigrationOptions, dict(options))
    return MigrationSession(config, opts).stamp(checkpoint, revisions, purge=purge).to_revisions


def current(
    config: Config,
    checkpoint: PathLike,
    *,
    verbose: bool = False,
    **options: Unpack[CheckpointKwargs],
) -> tuple[str, ...]:
    """Print the revision(s) a checkpoint is at; returns them.

    A stamped file is answered from a look at its stamp, without torch; an
    unstamped one is opened and identified by its schema.
    """
    from .runtime.placement import stamped_heads
    from .runtime.session import opened, peeked

    script_dir = ScriptDirectory.from_config(config)
    opts: CheckpointOptions = make_options(CheckpointOptions, dict(options))
    found = peeked(config, checkpoint, opts)
    if found is not None:
        stamped = stamped_heads(script_dir, found)
    else:
        with opened(config, checkpoint, opts) as ckpt:
            stamped = stamped_heads(script_dir, ckpt)
            if stamped is None and ckpt.adapter is not None:
                from .adapters import run

                return run.current(config, script_dir, ckpt)
            if stamped is None:
                from .identify import identify_current

                return identify_current(config, script_dir, ckpt, verbose=verbose)
    assert stamped is not None
    for rev in script_dir.revision_map.all_current(stamped):
        config.print_stdout(display.cmd_format(script_dir.script(rev.revision), verbose))
    if not stamped:
        config.log(f"Note: {display_path(checkpoint)} is at base (stamped with no revision)")
    return stamped


# --------------------------------------------------------------------------- fleets


def upgrade_all(
    config: Config,
    paths: Sequence[str],
    target: str = "head",
    *,
    pattern: Sequence[str] = (),
    report_format: str = "text",
    **options: Unpack[MigrationKwargs],
) -> FleetReport:
    """Upgrade every checkpoint under ``paths``; print and return the report."""
    fleet = _fleet(config, make_options(MigrationOptions, dict(options)), pattern, report_format)
    return _reported(config, fleet.migrate(paths, target, upgrade=True), report_format)


def downgrade_all(
    config: Config,
    paths: Sequence[str],
    target: str,
    *,
    pattern: Sequence[str] = (),
    report_format: str = "text",
    **options: Unpack[MigrationKwargs],
) -> FleetReport:
    """Downgrade every checkpoint under ``paths``; print and return the report."""
    fleet = _fleet(config, make_options(MigrationOptions, dict(options)), pattern, report_format)
    return _reported(config, fleet.migrate(paths, target, upgrade=False), report_format)


def stamp_all(
    config: Config,
    paths: Sequence[str],
    revisions: Sequence[str],
    *,
    purge: bool = False,
    pattern: Sequence[str] = (),
    report_format: str = "text",
    **options: Unpack[MigrationKwargs],
) -> FleetReport:
    """Stamp every checkpoint under ``paths`` (those stamped so already are left alone)."""
    fleet = _fleet(config, make_options(MigrationOptions, dict(options)), pattern, report_format)
    return _reported(config, fleet.stamp(paths, revisions, purge=purge), report_format)


def current_all(
    config: Config,
    paths: Sequence[str],
    *,
    pattern: Sequence[str] = (),
    report_format: str = "text",
    verbose: bool = False,
    **options: Unpack[CheckpointKwargs],
) -> FleetReport:
    """Where every checkpoint under ``paths`` is, and how many steps behind the heads.

    ``verbose`` prints each one's revisions in full before the table.
    """
    fleet = _fleet(config, make_options(CheckpointOptions, dict(options)), pattern, report_format)
    return _reported(config, fleet.current(paths, verbose=verbose), report_format)


def _fleet(
    config: Config, opts: CheckpointOptions, pattern: Sequence[str], report_format: str
) -> Fleet:
    """A fleet run whose checkpoints' own output shows only under the text report."""
    from .runtime.fleet import Fleet

    return Fleet(config, opts, pattern=pattern, show_printed=report_format == "text")


def _reported(config: Config, report: FleetReport, report_format: str) -> FleetReport:
    if report_format == "json":
        config.print_stdout(report.json_text())
    else:
        for line in report.table():
            config.print_stdout(line)
    config.stdout.flush()  # a closed pipe is noticed here, not at exit
    return report


# --------------------------------------------------------------------------- golden checkpoints


def fixture_record(
    config: Config, output: PathLike | None = None, *, seed: int | None = None
) -> Path:
    """Write a small golden checkpoint at the head into ``<script_location>/fixtures/``.

    Its tensors come from the schema and a fixed seed; the pytest plugin upgrades
    every such file to the head and loads it strictly.
    """
    from .golden import record
    from .sample import DEFAULT_SEED

    return record(config, output, seed=DEFAULT_SEED if seed is None else seed)


# --------------------------------------------------------------------------- schemas


def check(config: Config, *, roundtrip: bool = True) -> bool:
    """CI gate: the model matches the head schema, every downgrade inverts its upgrade,
    and no upgrade discards trained values unless the revision marks that intended.

    Prints what is wrong and raises :class:`CheckFailed` (exit 1) on failure.
    """
    from . import checks
    from .model import configured_model_or_none
    from .recording import base_schema
    from .runtime.symbolic import audit_revisions

    script_dir = ScriptDirectory.from_config(config)
    base = base_schema(config, script_dir)
    problems: list[str] = []
    model = configured_model_or_none(config)
    if model is None:
        config.log("Note: no `model = ...` configured; only checking round trips")
    else:
        problems += checks.model_matches_head(config, script_dir, base, model)
        problems += checks.versioned_classes_at_head(config, script_dir)
    audits = audit_revisions(script_dir, base, round_trips=roundtrip)
    if roundtrip:
        problems += checks.round_trips(config, audits, len(script_dir.revision_map))
    problems += checks.no_silent_discards(config, audits)
    if problems:
        raise CheckFailed("; ".join(problems))
    return True


def diff(
    config: Config,
    checkpoint: PathLike,
    *,
    revision: str | None = None,
    **options: Unpack[CheckpointKwargs],
) -> bool:
    """Print how a checkpoint's schema differs from the model's (or a revision's).

    Ends with the revision the file is at and the command that brings it to
    the compared schema. Returns True when there is no difference.
    """
    from .runtime.session import opened

    opts: CheckpointOptions = make_options(CheckpointOptions, dict(options))
    with opened(config, checkpoint, opts) as ckpt:
        from .runtime.placement import standing
        from .schema import Schema, compare, format_table

        if ckpt.adapter is not None:
            where = display_path(checkpoint)
            raise CommandError(
                f"{where} is a PEFT adapter: diff compares a model's checkpoint with the model",
                hint=f"'ckptmigrate current {where}' says which revision it is at, and "
                f"'ckptmigrate upgrade {where} --dry-run' what upgrading does to it",
            )

        have = Schema.from_specs(ckpt.schema)
        script_dir, want, want_name, matched = _diff_target(config, revision)
        result = compare(have, want)
        where = display_path(checkpoint)
        if result.empty:
            config.print_stdout(f"{where} matches {matched} ({result.matching} entries)")
        else:
            config.print_stdout(
                f"{where} ({len(have)} entries) vs {want_name} ({len(want)} entries): "
                f"{result.summary()}, {result.matching} matching"
            )
            for line in format_table(result, have, want, "checkpoint", want_name):
                config.print_stdout("  " + line)
        if script_dir is not None:
            model = None if revision else want
            flags = _flags(opts)
            config.print_stdout(standing(script_dir, ckpt, where, revision, model, flags))
        return result.empty


def _diff_target(
    config: Config, revision: str | None
) -> tuple[ScriptDirectory | None, Schema, str, str]:
    """(the lineage if any, the schema to compare with, its name in the table and in prose)."""
    if revision is not None:
        from .recording import base_schema
        from .runtime.placement import resolve_ids
        from .runtime.symbolic import schema_at

        script_dir = ScriptDirectory.from_config(config)
        ids = resolve_ids(script_dir, revision)
        want = schema_at(script_dir, base_schema(config, script_dir), ids)
        name = f"at {format_ids(ids) or 'base'}"
        return script_dir, want, name, f"the schema {name}"
    from .model import configured_model_or_none

    model = configured_model_or_none(config)
    if model is None:
        raise CommandError(
            "diff compares with the configured model, and none is configured",
            hint="add 'model = package.module:build_model' to the ini file, or pass "
            "--rev REV to compare with a revision's schema",
        )
    found: ScriptDirectory | None = None
    with contextlib.suppress(ConfigError):
        found = ScriptDirectory.from_config(config)
    return found, model.schema, "model", "the model schema"


def _flags(options: CheckpointOptions) -> str:
    """The reading options as command-line flags, for commands we suggest."""
    given = (("--key-prefix", options.key_prefix), ("--state-dict-key", options.state_dict_key))
    flags = "".join(f" {flag} {value}" for flag, value in given if value)
    return flags + (" --trust-pickle" if options.trust_pickle else "")


def schema(
    config: Config,
    revision: str | None = None,
    *,
    record: bool = False,
    checkpoint: PathLike | None = None,
    from_revision: str | None = None,
    **options: Unpack[CheckpointKwargs],
) -> Schema:
    """Print the schema at a revision, or record the lineage's base schema.

    Recording runs the downgrades symbolically from where the source is
    (a checkpoint at a known revision, or the configured model, which is at
    the head unless ``from_revision`` says otherwise) back to base.
    """
    from . import recording

    script_dir = ScriptDirectory.from_config(config)
    if not record:
        from .runtime.placement import resolve_ids
        from .runtime.symbolic import schema_at

        rmap = script_dir.revision_map
        ids = resolve_ids(script_dir, revision) if revision is not None else rmap.heads
        result = schema_at(script_dir, recording.base_schema(config, script_dir), ids)
        config.print_stdout(
            result.to_text(f"the state dict at {format_ids(ids) or 'base'}").rstrip()
        )
        return result
    if checkpoint is None:
        base, source = recording.base_from_model(config, script_dir, from_revision)
    else:
        opts: CheckpointOptions = make_options(CheckpointOptions, dict(options))
        base, source = recording.base_from_checkpoint(
            config, script_dir, checkpoint, from_revision, opts
        )
    from .schema import write_base_schema

    path = write_base_schema(script_dir.dir, base, source)
    config.print_stdout(f"Recorded the base schema ({len(base)} keys) in {display_path(path)}")
    return base
