"""One function per command, each taking a :class:`Config` first.

These are the public, scriptable form of the command line (``cli.py`` only
parses arguments and calls them). Graph commands never import torch; the
checkpoint commands import it when they run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from .config import DEFAULT_INI, Config
from .errors import (
    CkptMigrateError,
    CommandError,
    ConfigError,
    MultipleHeads,
    RangeNotAncestorError,
    RevisionError,
    StampError,
)
from .paths import display_path
from .script import display
from .script.directory import TEMPLATE_NAME, Script, ScriptDirectory
from .script.revision import format_ids

if TYPE_CHECKING:
    from typing import Unpack

    from .formats.checkpoint import Checkpoint
    from .runtime.migration import MigrationStep
    from .runtime.symbolic import RevisionAudit
    from .schema import Schema


# --------------------------------------------------------------------------- init


def init(config: Config, directory: str | os.PathLike[str]) -> Path:
    """Create a migrations folder and an ``alembic_style.ini`` pointing at it."""
    from . import templates

    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CommandError(
            f"directory {directory} already exists and is not empty",
            hint="choose another directory, or remove it first",
        )
    (target / "versions").mkdir(parents=True, exist_ok=True)
    config.print_stdout(f"Creating directory {display_path(target.resolve())} ... done")
    (target / TEMPLATE_NAME).write_text(templates.read(TEMPLATE_NAME), encoding="utf-8")
    (target / "README").write_text(
        "Checkpoint migrations managed by ckptmigrate.\n\n"
        "versions/ holds one revision script per change of the model's state dict;\n"
        f"{TEMPLATE_NAME} is the template new revisions are written from.\n",
        encoding="utf-8",
    )
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
        text = templates.read("alembic_style.ini.tmpl").replace("${script_location}", location)
        ini.write_text(text, encoding="utf-8")
        config.print_stdout(f"Generating {display_path(ini)} ... done")
    config.print_stdout(
        "Next: set 'model = ...' in the ini file if you want 'check' and autogenerate, "
        'then run: ckptmigrate revision -m "initial"'
    )
    return target


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
    first = not len(script_dir.revision_map)
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
    discards = []
    if generated is not None and generated.ops:
        from .autogenerate.verify import verify_generated

        try:
            discards = verify_generated(script, generated)
        except Exception:
            script.path.unlink()
            raise
    config.print_stdout(f"Generating {display_path(script.path)} ... done")
    if first and generated is None:
        from .schema import base_schema_path

        if not base_schema_path(script_dir.dir).exists():
            config.log(
                "Note: no base schema is recorded yet (check, diff, autogenerate and "
                f"identifying unstamped checkpoints need it); {_record_base_hint(config)}"
            )
    if generated is not None and generated.ops:
        reviews = sum(1 for line in generated.upgrades if "# review:" in line)
        if reviews:
            lines = "line" if reviews == 1 else "lines"
            config.log(f"Review the {reviews} {lines} marked '# review:' before committing it")
    if discards:
        # a warning, shown even with -q: the user must decide about these values
        print(
            "Warning: this revision discards trained values: "
            + ", ".join(map(str, discards))
            + f"; {KEEP_OR_MARK} ('ckptmigrate check' fails until then)",
            file=config.stderr,
        )
    return script


def merge(
    config: Config,
    revisions: Sequence[str],
    message: str | None = None,
    *,
    branch_label: str | Sequence[str] | None = None,
    rev_id: str | None = None,
) -> Script:
    """Write a revision whose parents are ``revisions`` (e.g. ``heads``)."""
    script_dir = ScriptDirectory.from_config(config)
    parents = [r for r in script_dir.get_revisions(tuple(revisions)) if r is not None]
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
        branch_labels=branch_label,
    )
    config.print_stdout(f"Generating {display_path(script.path)} ... done")
    return script


def heads(
    config: Config, *, verbose: bool = False, resolve_dependencies: bool = False
) -> list[Script]:
    script_dir = ScriptDirectory.from_config(config)
    rmap = script_dir.revision_map
    ids = rmap.real_heads if resolve_dependencies else rmap.heads
    scripts = [script_dir.script(i) for i in ids]
    for s in scripts:
        config.print_stdout(
            display.cmd_format(s, verbose, include_branches=True, tree_indicators=False)
        )
    return scripts


def branches(config: Config, *, verbose: bool = False) -> list[Script]:
    script_dir = ScriptDirectory.from_config(config)
    points = [s for s in script_dir.walk_revisions() if s.is_branch_point]
    for s in points:
        config.print_stdout(display.cmd_format(s, verbose, include_branches=True))
        pad = " " * len(s.revision)
        for child in sorted(s.nextrev):
            line = display.head_only(
                script_dir.script(child), include_branches=True, include_doc=verbose
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
) -> list[Script]:
    """All revisions, newest first; ``rev_range`` is ``[start]:[end]``."""
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
    try:
        scripts = script_dir.walk_revisions(base, head)
    except RangeNotAncestorError as exc:
        raise CommandError(
            f"requested range {base}:{head} does not refer to ancestor/descendant "
            "revisions along the same branch",
            hint="check the range with 'ckptmigrate history'",
        ) from exc
    if graph:
        for line in display.graph_lines(scripts):
            config.print_stdout(line)
        return scripts
    for s in scripts:
        config.print_stdout(
            display.cmd_format(
                s, verbose, include_branches=True, include_doc=True, include_parents=True
            )
        )
    return scripts


def show(config: Config, rev: str) -> list[Script]:
    script_dir = ScriptDirectory.from_config(config)
    if rev == "current":
        raise CommandError(
            "'show current' needs a checkpoint", hint="use 'ckptmigrate current CKPT -v'"
        )
    scripts = [s for s in script_dir.get_revisions(rev) if s is not None]
    if not scripts:
        raise CommandError(f"{rev!r} names no revision", hint="'base' has nothing to show")
    for s in scripts:
        config.print_stdout(display.log_entry(s))
    return scripts


# --------------------------------------------------------------------------- checkpoints


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


def _open(
    config: Config,
    checkpoint: str | os.PathLike[str],
    trust_pickle: bool,
    state_dict_key: str | None,
    key_prefix: str | None = None,
    *,
    keep_wrapper_prefix: bool | None = None,
) -> Checkpoint:
    """Read the checkpoint, with notes; ``keep_wrapper_prefix`` is None when nothing is written."""
    from .formats import read_checkpoint

    if trust_pickle:
        config.log(
            "Warning: --trust-pickle: loading the checkpoint can run arbitrary code from the file"
        )
        # the pickle may name the project's own classes, importable as the model is
        config.prepend_sys_path()
    ckpt = read_checkpoint(
        checkpoint,
        trust_pickle=trust_pickle,
        state_dict_key=state_dict_key or config.get("state_dict_key"),
    )
    for note in ckpt.notes(keep_wrapper_prefix=keep_wrapper_prefix):
        config.log(f"Note: {note}")
    if keep_wrapper_prefix and not ckpt.wrapper_prefix:
        config.log(
            f"Note: --keep-wrapper-prefix: {display_path(checkpoint)} has no wrapper prefix; "
            "its keys are written as they are"
        )
    return ckpt.focus(key_prefix or config.get("key_prefix"))


def _open_to_write(
    config: Config,
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    trust_pickle: bool,
    state_dict_key: str | None,
    key_prefix: str | None,
    keep_wrapper_prefix: bool,
) -> tuple[Checkpoint, Path]:
    """The checkpoint and where it goes, refused before any work if it cannot go there."""
    from .formats import WriteOptions, check_output

    ckpt = _open(
        config,
        checkpoint,
        trust_pickle,
        state_dict_key,
        key_prefix,
        keep_wrapper_prefix=keep_wrapper_prefix,
    )
    out = Path(output) if output else Path(checkpoint)
    try:
        check_output(out, ckpt, WriteOptions(keep_wrapper_prefix=keep_wrapper_prefix))
    except BaseException:
        ckpt.close()
        raise
    return ckpt, out


def _check_output_path(
    checkpoint: str | os.PathLike[str], output: str | os.PathLike[str] | None
) -> None:
    """An ``-o`` path no file can be written at is refused before anything is read or locked."""
    from .formats import check_output_path

    check_output_path(checkpoint, output)


def _resolve_ids(script_dir: ScriptDirectory, symbols: str) -> tuple[str, ...]:
    if symbols.strip() == "base":
        return ()
    parts = tuple(p.strip() for p in symbols.split(",") if p.strip())
    return tuple(r.revision for r in script_dir.get_revisions(parts) if r is not None)


def _stamped_heads(script_dir: ScriptDirectory, ckpt: Checkpoint) -> tuple[str, ...] | None:
    """The checkpoint's recorded revisions, checked against the lineage."""
    if ckpt.stamp is None:
        return None
    rmap = script_dir.revision_map
    unknown = [r for r in ckpt.stamp.revisions if r not in rmap]
    if unknown:
        raise StampError(
            f"{display_path(ckpt.path)} is stamped at revision {', '.join(unknown)}, "
            f"which is not in {display_path(script_dir.versions)}",
            hint="is it from another lineage (-n NAME)? Otherwise pass --from REV, or "
            "re-stamp it with 'ckptmigrate stamp --purge CKPT REV'",
        )
    return ckpt.stamp.revisions


def starting_heads(
    config: Config,
    script_dir: ScriptDirectory,
    ckpt: Checkpoint,
    from_revision: str | None,
) -> tuple[tuple[str, ...], bool]:
    """(the revisions the checkpoint is at, whether found by schema)."""
    if from_revision is not None:
        heads = _resolve_ids(script_dir, from_revision)
        if ckpt.stamp is not None and set(ckpt.stamp.revisions) != set(heads):
            config.log(
                f"Note: ignoring the stamp {','.join(ckpt.stamp.revisions) or 'base'} "
                f"(--from {from_revision})"
            )
        return heads, False
    stamped = _stamped_heads(script_dir, ckpt)
    if stamped is not None:
        return stamped, False
    from .identify import identify_or_fail

    return identify_or_fail(config, script_dir, ckpt), True


@contextlib.contextmanager
def _writing(
    config: Config,
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    dry_run: bool,
) -> Iterator[None]:
    """Hold the lock on the file about to be rewritten, from before it is read."""
    if dry_run:
        yield
        return
    from .formats import lock_path
    from .formats.lock import locked

    with locked(lock_path(output or checkpoint), notify=config.log):
        yield


def _migrate(
    config: Config,
    checkpoint: str | os.PathLike[str],
    target: str,
    *,
    upgrade: bool,
    output: str | os.PathLike[str] | None,
    from_revision: str | None,
    dry_run: bool,
    trust_pickle: bool,
    state_dict_key: str | None,
    key_prefix: str | None = None,
    verify: bool = True,
    jobs: int = 1,
    durable: bool | None = None,
    force: bool = False,
    keep_wrapper_prefix: bool = False,
) -> MigrationResult:
    from .formats import WriteOptions, write_checkpoint

    script_dir = ScriptDirectory.from_config(config)
    rmap = script_dir.revision_map
    ckpt, out = _open_to_write(
        config, checkpoint, output, trust_pickle, state_dict_key, key_prefix, keep_wrapper_prefix
    )
    try:
        from .claims import FROM, STAMPED, check_result, check_start
        from .runtime.migration import run_steps

        where = display_path(checkpoint)
        current, identified = starting_heads(config, script_dir, ckpt, from_revision)
        steps = _steps(script_dir, current, target, upgrade, where)
        # A copy at the target is still written where -o asks for one.
        copy = not steps and output is not None and not dry_run and not _same_file(out, checkpoint)
        if from_revision is not None or (not identified and (steps or copy)):
            claimed_by = FROM if from_revision is not None else STAMPED
            check_start(config, script_dir, ckpt, current, claimed_by=claimed_by, force=force)
        result = MigrationResult(
            Path(checkpoint),
            Path(output) if output else None,
            current,
            current,
            steps,
            dry_run,
            identified,
        )
        options = WriteOptions(
            verify=verify,
            jobs=jobs,
            durable=_durable(config, durable, output),
            keep_wrapper_prefix=keep_wrapper_prefix,
        )
        if not steps:
            direction = "upgrade" if upgrade else "downgrade"
            _refuse_wrong_way(script_dir, current, target, upgrade, where)
            at = format_ids(current) or "base"
            if copy:
                write_checkpoint(out, ckpt, ckpt.initial_state(), current, options)
            written = f"; written to {display_path(out)}" if copy else ""
            config.log(f"Nothing to {direction}: {where} is at {at}{written}")
            return result
        state = ckpt.initial_state()
        new_heads = run_steps(
            steps, state, current, rmap, symbolic=dry_run, log=None if dry_run else config.log
        )
        result.to_revisions = new_heads
        if not dry_run:
            _follow_model_order(config, ckpt, state)
        check_result(config, script_dir, state, new_heads, where=where, start=current, force=force)
        if dry_run:
            _print_plan(config, where, result, len(ckpt.schema), state)
        container = None
        if ckpt.training is not None:
            from .training import migrate_training_state

            container = migrate_training_state(
                config, script_dir, ckpt, state, current, new_heads, steps, dry_run=dry_run
            )
        if dry_run:
            return result
        bar = _progress(config, ckpt, state, "Writing")
        options = dataclasses.replace(options, container=container, progress=bar)
        write_checkpoint(out, ckpt, state, new_heads, options)
        if bar is not None:
            bar.finish()
        config.log(
            f"{'Upgraded' if upgrade else 'Downgraded'} {where}: "
            f"{format_ids(current) or 'base'} -> {format_ids(new_heads) or 'base'} "
            f"({len(steps)} step{'s' if len(steps) != 1 else ''})"
            + (f", written to {display_path(out)}" if output else "")
        )
        return result
    finally:
        ckpt.close()


def _same_file(a: Path, b: str | os.PathLike[str]) -> bool:
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:  # pragma: no cover - resolve on a broken path
        return False


#: A relative target that walks the other way: "-1" for upgrade, "+1" for downgrade.
_OTHER_WAY = {True: re.compile(r"-\d+"), False: re.compile(r"\+\d+")}


def _steps(
    script_dir: ScriptDirectory, current: tuple[str, ...], target: str, upgrade: bool, where: str
) -> list[MigrationStep]:
    """The steps from ``current`` to ``target``; going the wrong way points to the other command."""
    from .runtime.migration import downgrade_steps, upgrade_steps

    direction = "upgrade" if upgrade else "downgrade"
    try:
        return (
            upgrade_steps(script_dir, current, target)
            if upgrade
            else downgrade_steps(script_dir, current, target)
        )
    except RangeNotAncestorError as exc:
        if _has_steps(script_dir, current, target, upgrade=not upgrade):
            hint = _other_way_hint(upgrade, where, target)
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
            + _other_way_hint(upgrade, where, target),
        ) from exc


def _other_way_hint(upgrade: bool, where: str, target: str) -> str:
    other = "downgrade" if upgrade else "upgrade"
    return f"to go {'back' if upgrade else 'forward'}, run 'ckptmigrate {other} {where} {target}'"


def _has_steps(
    script_dir: ScriptDirectory, current: tuple[str, ...], target: str, *, upgrade: bool
) -> bool:
    """Whether ``upgrade`` (or downgrade) has steps to run from ``current`` to ``target``."""
    from .runtime.migration import downgrade_steps, upgrade_steps

    try:
        return bool((upgrade_steps if upgrade else downgrade_steps)(script_dir, current, target))
    except RevisionError:
        return False


def _refuse_wrong_way(
    script_dir: ScriptDirectory, current: tuple[str, ...], target: str, upgrade: bool, where: str
) -> None:
    """Nothing to upgrade because the target lies behind: refuse, and name the fix.

    (Alembic quietly does nothing here; a checkpoint left short of what was
    asked for is better reported.)
    """
    if not _has_steps(script_dir, current, target, upgrade=not upgrade):
        return
    direction = "upgrade" if upgrade else "downgrade"
    raise CommandError(
        f"{where} is at {format_ids(current) or 'base'}, which is "
        f"{'past' if upgrade else 'before'} {target}; {direction} only goes "
        f"{'forward' if upgrade else 'back'}",
        hint=_other_way_hint(upgrade, where, target),
    )


def _durable(config: Config, durable: bool | None, output: str | os.PathLike[str] | None) -> bool:
    """fsync before the switch? By default only when the file rewritten is the only copy.

    In place, a power cut after an unsynced switch could lose the checkpoint;
    with ``-o`` the input is still there to run the command again from.
    """
    if durable is not None:
        return durable
    setting = (config.get("fsync") or "auto").lower()
    if setting in ("true", "yes", "1", "on"):
        return True
    if setting in ("false", "no", "0", "off"):
        return False
    return output is None


def _follow_model_order(config: Config, ckpt: Checkpoint, state: Any) -> None:
    """Write the keys in the configured model's order when they are exactly its keys.

    Migrations append what they add; putting the result in ``model.state_dict()``
    order keeps the file tidy and keeps file order equal to parameter order,
    which is what an optimizer's state is keyed by.
    """
    if not config.get("model"):
        return
    from .autogenerate import model_schema

    try:
        schema, _model, _spec = model_schema(config)
    except CkptMigrateError as exc:
        config.log(f"Note: keeping the migration's key order ({exc.message})")
        return
    if set(schema) == set(state.entries) and list(schema) != list(state.entries):
        state.entries = {k: state.entries[k] for k in schema}


def _progress(config: Config, ckpt: Checkpoint, state: Any, label: str) -> Any:
    from .progress import Progress

    full = ckpt.file_state(state)
    specs = [n.spec for n in full.entries.values() if n.spec is not None]
    return Progress.maybe(
        config.stderr, config.quiet, sum(s.nbytes for s in specs), len(specs), label
    )


def _print_plan(
    config: Config, where: str, result: MigrationResult, n_in: int, state: object
) -> None:
    from .plan.state import PlanState

    assert isinstance(state, PlanState)
    p = config.print_stdout
    n = len(result.steps)
    p(
        f"Plan for {where}: {format_ids(result.from_revisions) or 'base'} -> "
        f"{format_ids(result.to_revisions) or 'base'}, {n} step{'s' if n != 1 else ''} "
        "(dry run: nothing is written)"
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
    p(f"Result: {len(state)} entries (was {n_in}), at {format_ids(result.to_revisions) or 'base'}")


class MigrationOptions(TypedDict, total=False):
    """Options shared by ``upgrade`` and ``downgrade`` (the CLI's flags)."""

    output: str | os.PathLike[str] | None  # write here; the input stays untouched
    from_revision: str | None  # treat the checkpoint as being at this revision
    dry_run: bool  # print the plan, write nothing
    trust_pickle: bool  # allow arbitrary pickles (runs code from the file!)
    state_dict_key: str | None  # where the weights sit in a training container
    key_prefix: str | None  # the lineage's keys sit under this prefix
    verify: bool  # check the written file against the plan (default True)
    jobs: int  # shards written in parallel
    durable: bool | None  # fsync before the switch (default: when rewriting in place)
    force: bool  # go ahead when the file's schema contradicts the revision it is said to be at
    keep_wrapper_prefix: bool  # write keys back behind the input's module./_orig_mod.


def upgrade(
    config: Config,
    checkpoint: str | os.PathLike[str],
    target: str = "head",
    **options: Unpack[MigrationOptions],
) -> MigrationResult:
    """Upgrade a checkpoint file to ``target`` (in place unless ``output``)."""
    return _locked_migrate(config, checkpoint, target, True, options)


def downgrade(
    config: Config,
    checkpoint: str | os.PathLike[str],
    target: str,
    **options: Unpack[MigrationOptions],
) -> MigrationResult:
    """Downgrade a checkpoint file to ``target`` (in place unless ``output``)."""
    return _locked_migrate(config, checkpoint, target, False, options)


def _locked_migrate(
    config: Config,
    checkpoint: str | os.PathLike[str],
    target: str,
    upgrade: bool,
    options: MigrationOptions,
) -> MigrationResult:
    output, dry_run = options.get("output"), options.get("dry_run", False)
    _check_output_path(checkpoint, output)
    with _writing(config, checkpoint, output, dry_run):
        return _migrate(
            config,
            checkpoint,
            target,
            upgrade=upgrade,
            output=output,
            from_revision=options.get("from_revision"),
            dry_run=dry_run,
            trust_pickle=options.get("trust_pickle", False),
            state_dict_key=options.get("state_dict_key"),
            key_prefix=options.get("key_prefix"),
            verify=options.get("verify", True),
            jobs=options.get("jobs", 1),
            durable=options.get("durable"),
            force=options.get("force", False),
            keep_wrapper_prefix=options.get("keep_wrapper_prefix", False),
        )


def current(
    config: Config,
    checkpoint: str | os.PathLike[str],
    *,
    verbose: bool = False,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
    key_prefix: str | None = None,
) -> tuple[str, ...]:
    """Print the revision(s) a checkpoint is at; returns them."""
    script_dir = ScriptDirectory.from_config(config)
    ckpt = _open(config, checkpoint, trust_pickle, state_dict_key, key_prefix)
    try:
        stamped = _stamped_heads(script_dir, ckpt)
        if stamped is None:
            from .identify import identify_current

            return identify_current(config, script_dir, ckpt, verbose=verbose)
        for rev in script_dir.revision_map.all_current(stamped):
            config.print_stdout(display.cmd_format(script_dir.script(rev.revision), verbose))
        if not stamped:
            config.log(f"Note: {display_path(checkpoint)} is at base (stamped with no revision)")
        return stamped
    finally:
        ckpt.close()


def stamp(
    config: Config,
    checkpoint: str | os.PathLike[str],
    revisions: Sequence[str],
    *,
    purge: bool = False,
    output: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
    key_prefix: str | None = None,
    force: bool = False,
    keep_wrapper_prefix: bool = False,
) -> tuple[str, ...]:
    """Record ``revisions`` in the checkpoint without running migrations.

    The file's schema must be the schema at those revisions (where a base
    schema says what that is); ``force`` records them anyway.
    """
    _check_output_path(checkpoint, output)
    with _writing(config, checkpoint, output, False):
        from .formats import WriteOptions, write_checkpoint

        script_dir = ScriptDirectory.from_config(config)
        rmap = script_dir.revision_map
        ckpt, out = _open_to_write(
            config,
            checkpoint,
            output,
            trust_pickle,
            state_dict_key,
            key_prefix,
            keep_wrapper_prefix,
        )
        try:
            from .claims import STAMP, check_start

            if purge or ckpt.stamp is None:
                before: tuple[str, ...] = ()
            else:
                stamped = _stamped_heads(script_dir, ckpt)
                before = stamped or ()
            try:
                after = rmap.heads_after_stamp(before, list(revisions) or ["base"])
            except RevisionError as exc:
                if isinstance(exc, MultipleHeads):
                    raise CommandError(
                        f"{exc.message}", hint="name the revision(s) to stamp, or use 'heads'"
                    ) from exc
                raise
            if after:
                check_start(config, script_dir, ckpt, after, claimed_by=STAMP, force=force)
            state = ckpt.initial_state()
            write_checkpoint(
                out,
                ckpt,
                state,
                after or None,
                WriteOptions(keep_wrapper_prefix=keep_wrapper_prefix),
            )
            where = display_path(out)
            if after:
                config.log(f"Stamped {where} at {format_ids(after)}")
            else:
                config.log(f"Removed the ckptmigrate stamp from {where}")
            return after
        finally:
            ckpt.close()


# --------------------------------------------------------------------------- schemas


def _model_or_none(config: Config) -> tuple[Schema, object, str] | None:
    if not config.get("model"):
        return None
    from .autogenerate import model_schema

    return model_schema(config)


def check(config: Config, *, roundtrip: bool = True) -> bool:
    """CI gate: the model matches the head schema, every downgrade inverts its upgrade, and
    no upgrade discards trained values unless the revision marks that intended.

    Prints what is wrong and raises :class:`CheckFailed` (exit 1) on failure.
    """
    from .runtime.symbolic import audit_revisions, schema_at
    from .schema import compare, format_table

    script_dir = ScriptDirectory.from_config(config)
    rmap = script_dir.revision_map
    base = _base_schema(config, script_dir)
    problems: list[str] = []
    found = _model_or_none(config)
    heads = rmap.heads
    if found is None:
        config.log("Note: no `model = ...` configured; only checking round trips")
    else:
        target, _model, spec = found
        head_schema = schema_at(script_dir, base, heads)
        diff = compare(head_schema, target)
        if diff.empty:
            config.print_stdout(f"OK: {spec} matches the schema at {format_ids(heads) or 'base'}")
        else:
            config.print_stdout(
                f"The model ({spec}) differs from the schema at {format_ids(heads)}:"
            )
            for line in format_table(diff, head_schema, target, "head schema", "model"):
                config.print_stdout("  " + line)
            problems.append(
                f"the model no longer matches the head schema ({diff.summary()}); write the "
                'migration with: ckptmigrate revision --autogenerate -m "..."'
            )
        problems.extend(_versioned_class_problems(config, script_dir))
    audits = audit_revisions(script_dir, base, round_trips=roundtrip)
    if roundtrip:
        bad = [a for a in audits if a.round_trip is not None]
        for item in bad:
            config.print_stdout(
                f"Round trip broken in {item.script.revision} "
                f"({display_path(item.script.path)}): {item.round_trip}"
            )
        if bad:
            problems.append(
                f"{len(bad)} revision(s) whose downgrade() does not undo upgrade(): "
                + ", ".join(i.script.revision for i in bad)
            )
        else:
            config.print_stdout(_round_trips_ok(len(rmap)))
    problems.extend(_discard_problems(config, audits))
    if problems:
        raise CheckFailed("; ".join(problems))
    return True


KEEP_OR_MARK = (
    "edit the revision to keep them (rename_*, split, concat, resize), or pass intended=True "
    "to each drop_key, drop_prefix or shrinking resize that is meant"
)


def _round_trips_ok(n: int) -> str:
    if n == 0:
        return "OK: no revisions yet, so no round trip to check"
    where = "the 1 revision" if n == 1 else f"all {n} revisions"
    return f"OK: downgrade() undoes upgrade() in {where}"


def _discard_problems(config: Config, audits: Sequence[RevisionAudit]) -> list[str]:
    """Revisions whose upgrade() loses trained values without saying it means to."""
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


def _versioned_class_problems(config: Config, script_dir: ScriptDirectory) -> list[str]:
    """Versioned model classes whose revision is unknown or not the head."""
    try:
        from .integration.check import versioned_class_problems
    except ImportError:  # pragma: no cover - integration is part of the package
        return []
    return versioned_class_problems(config, script_dir)


class CheckFailed(CommandError):
    """``check`` found differences (already printed)."""


def diff(
    config: Config,
    checkpoint: str | os.PathLike[str],
    *,
    revision: str | None = None,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
    key_prefix: str | None = None,
) -> bool:
    """Print how a checkpoint's schema differs from the model's (or a revision's).

    Ends with the revision the file is at and the command that brings it to
    the compared schema. Returns True when there is no difference.
    """
    ckpt = _open(config, checkpoint, trust_pickle, state_dict_key, key_prefix)
    try:
        from .schema import Schema, compare, format_table

        have = Schema.from_specs(ckpt.schema)
        script_dir: ScriptDirectory | None = None
        if revision is not None:
            from .runtime.symbolic import schema_at

            script_dir = ScriptDirectory.from_config(config)
            ids = _resolve_ids(script_dir, revision)
            want = schema_at(script_dir, _base_schema(config, script_dir), ids)
            want_name = f"at {format_ids(ids) or 'base'}"
            matched = f"the schema {want_name}"
        else:
            found = _model_or_none(config)
            if found is None:
                raise CommandError(
                    "diff compares with the configured model, and none is configured",
                    hint="add 'model = package.module:build_model' to the ini file, or pass "
                    "--rev REV to compare with a revision's schema",
                )
            want, _model, _spec = found
            want_name, matched = "model", "the model schema"
            with contextlib.suppress(ConfigError):
                script_dir = ScriptDirectory.from_config(config)
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
            given = (("--key-prefix", key_prefix), ("--state-dict-key", state_dict_key))
            flags = "".join(f" {flag} {value}" for flag, value in given if value)
            flags += " --trust-pickle" if trust_pickle else ""
            config.print_stdout(
                _standing(script_dir, ckpt, where, revision, None if revision else want, flags)
            )
        return result.empty
    finally:
        ckpt.close()


def _standing(
    script_dir: ScriptDirectory,
    ckpt: Checkpoint,
    where: str,
    revision: str | None,
    model: Schema | None,
    flags: str,
) -> str:
    """Which revision the file is at, and which command brings it to ``revision`` (or head)."""
    from .identify import unique_match
    from .schema import base_schema_path

    rmap = script_dir.revision_map
    recorded = base_schema_path(script_dir.dir).exists()
    if ckpt.stamp is not None:
        unknown = [r for r in ckpt.stamp.revisions if r not in rmap]
        if unknown:
            return f"{where} is stamped at {', '.join(unknown)}, which this lineage does not know"
        at, how = ckpt.stamp.revisions, "stamped"
    else:
        found = unique_match(script_dir, ckpt)
        if found is None:
            if not recorded:
                return f"{where} has no stamp (and no base schema is recorded to identify it by)"
            return f"{where} is at no known revision: it has no stamp and its schema matches none"
        at = (found.script.revision,) if found.script is not None else ()
        how = found.fit.how
    text = f"{where} is at {format_ids(at) or 'base'} ({how})"
    goal = revision if revision is not None else ("heads" if len(rmap.heads) > 1 else "head")
    goal_ids = _resolve_ids(script_dir, goal)
    there = set(goal_ids) == set(at)
    if there:
        text += ", the head" if revision is None and len(goal_ids) == 1 else ""
    elif _has_steps(script_dir, at, goal, upgrade=True):
        command = f"ckptmigrate upgrade {where}" + (f" {revision}" if revision else "")
        named = format_ids(goal_ids)
        text += f"; '{command}{flags}' brings it to " + (
            f"{goal} ({named})" if revision is None else named
        )
    elif _has_steps(script_dir, at, goal, upgrade=False):
        named = format_ids(goal_ids) or "base"
        text += f"; 'ckptmigrate downgrade {where} {goal}{flags}' brings it to {named}"
    else:
        return text
    if model is not None and recorded:
        from .runtime.symbolic import load_base_schema, schema_at
        from .schema import compare

        if compare(schema_at(script_dir, load_base_schema(script_dir), goal_ids), model).empty:
            text += "" if there else ", which matches the model"
        else:
            text += (
                f"; the model differs from the schema at {goal}: write the migration with "
                "'ckptmigrate revision --autogenerate -m \"...\"'"
            )
    return text


def schema(
    config: Config,
    revision: str | None = None,
    *,
    record: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    from_revision: str | None = None,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
    key_prefix: str | None = None,
) -> object:
    """Print the schema at a revision, or record the lineage's base schema.

    Recording runs the downgrades symbolically from where the source is
    (a checkpoint at a known revision, or the configured model, which is at
    the head unless ``from_revision`` says otherwise) back to base.
    """
    script_dir = ScriptDirectory.from_config(config)
    if not record:
        from .runtime.symbolic import schema_at

        ids = (
            _resolve_ids(script_dir, revision)
            if revision is not None
            else script_dir.revision_map.heads
        )
        result = schema_at(script_dir, _base_schema(config, script_dir), ids)
        config.print_stdout(
            result.to_text(f"the state dict at {format_ids(ids) or 'base'}").rstrip()
        )
        return result
    if checkpoint is None:
        base, source = _base_from_model(config, script_dir, from_revision)
    else:
        base, source = _base_from_checkpoint(
            config, script_dir, checkpoint, from_revision, trust_pickle, state_dict_key, key_prefix
        )
    from .schema import write_base_schema

    path = write_base_schema(script_dir.dir, base, source)
    config.print_stdout(f"Recorded the base schema ({len(base)} keys) in {display_path(path)}")
    return base


def _record_base_hint(config: Config) -> str:
    """How to record a missing base schema, with what this configuration allows."""
    if config.get("model"):
        return "record it from the configured model with 'ckptmigrate schema --record'"
    where = display_path(config.file) if config.file else "the configuration"
    return (
        "record it from a checkpoint at a known revision with "
        f"'ckptmigrate schema --record CKPT --from REV', or set 'model = ...' in {where} "
        "and run 'ckptmigrate schema --record'"
    )


def _base_schema(config: Config, script_dir: ScriptDirectory) -> Schema:
    from .runtime.symbolic import load_base_schema

    return load_base_schema(script_dir, hint=_record_base_hint(config))


def _base_from_checkpoint(
    config: Config,
    script_dir: ScriptDirectory,
    checkpoint: str | os.PathLike[str],
    from_revision: str | None,
    trust_pickle: bool,
    state_dict_key: str | None,
    key_prefix: str | None,
) -> tuple[Schema, str]:
    where = display_path(checkpoint)
    ckpt = _open(config, checkpoint, trust_pickle, state_dict_key, key_prefix)
    try:
        from .schema import Schema, read_base_schema

        unknown = ckpt.stamp is None and read_base_schema(script_dir.dir) is None
        if from_revision is None and unknown:
            tips = format_ids(script_dir.revision_map.heads) or "none yet"
            raise StampError(
                f"{where} has no ckptmigrate stamp, so the revision it was saved at is unknown",
                hint=f"say which with 'ckptmigrate schema --record {where} --from REV' "
                f"(the lineage's head: {tips}; all revisions: 'ckptmigrate history')",
            )
        from .runtime.symbolic import base_of

        heads, _identified = starting_heads(config, script_dir, ckpt, from_revision)
        base = base_of(script_dir, Schema.from_specs(ckpt.schema), heads)
    finally:
        ckpt.close()
    return base, f"{where} at {format_ids(heads) or 'base'}"


def _base_from_model(
    config: Config, script_dir: ScriptDirectory, from_revision: str | None
) -> tuple[Schema, str]:
    """The base schema the configured model implies, checked to lead back to the model."""
    from .runtime.symbolic import audit_revisions, base_of, schema_at
    from .schema import compare

    found = _model_or_none(config)
    if found is None:
        raise CommandError(
            "no model configured to record the base schema from",
            hint="add 'model = ...' to the ini file, or record it from a checkpoint at a "
            "known revision: 'ckptmigrate schema --record CKPT --from REV'",
        )
    target, model, spec = found
    if not len(script_dir.revision_map) and from_revision is None:
        return target, spec
    heads, why = _model_revision(script_dir, model, from_revision)
    at = f"{format_ids(heads) or 'base'} ({why})"
    config.log(
        f"Deriving the base schema from the model {spec}, taken to be at {at}: "
        "running the downgrades symbolically"
    )
    try:
        base = base_of(script_dir, target, heads)
    except CkptMigrateError as exc:
        raise CommandError(
            f"cannot derive the base schema from the model ({spec}, taken to be at {at}): "
            f"{exc.one_line()}",
            hint="if the model is at an older revision, say which with "
            "'ckptmigrate schema --record --from REV'; otherwise fix that downgrade(), or "
            "record from a checkpoint: 'ckptmigrate schema --record CKPT --from REV'",
        ) from exc
    back = schema_at(script_dir, base, heads)
    if not back.same_layout(target):
        broken = [a for a in audit_revisions(script_dir, base) if a.round_trip is not None]
        culprits = "; ".join(f"{a.script.revision}: {a.round_trip}" for a in broken)
        raise CommandError(
            f"the base schema derived from the model ({spec}, at {at}) does not upgrade back "
            f"to it ({compare(back, target).summary()})"
            + (f": downgrade() does not undo upgrade() in {culprits}" if culprits else ""),
            hint="fix those revisions' downgrade(), or record from a checkpoint: "
            "'ckptmigrate schema --record CKPT --from REV'",
        )
    return base, f"the model {spec} at {format_ids(heads) or 'base'}"


def _model_revision(
    script_dir: ScriptDirectory, model: object, from_revision: str | None
) -> tuple[tuple[str, ...], str]:
    """(the revisions the configured model is at, why we think so)."""
    if from_revision is not None:
        return _resolve_ids(script_dir, from_revision), "--from"
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
    script_dir: ScriptDirectory, model: object
) -> tuple[tuple[str, ...], str] | None:
    """A versioned model class of this lineage pinned to a revision: that revision."""
    from .integration.versioning import lineage_of

    lineage = lineage_of(type(model))
    if lineage is None or lineage.pinned is None:
        return None
    try:
        same = lineage.script_dir.dir.resolve() == script_dir.dir.resolve()
        revision = lineage.revision
    except CkptMigrateError:
        return None
    if not same:
        return None
    return (revision,), f"the revision {type(model).__qualname__} is pinned to"
