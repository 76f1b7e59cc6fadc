"""The command line: parse arguments, call ``command.*``, print.

Every :class:`CkptMigrateError` becomes one ``Error: ...`` line on stderr and
exit status 1 (usage errors exit 2); ``--traceback`` adds the Python trace.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from . import arguments, command
from ._version import __version__
from .config import DEFAULT_SECTION, Config
from .errors import CkptMigrateError, CommandError, LineageWarning
from .runtime.heap import end_process, imports_frozen

if TYPE_CHECKING:
    from .runtime.fleet_report import FleetReport

_TRACE_HINT = "(--traceback shows the full trace)"


class _Command(click.Command):
    """A command that also takes ``-q``/``--quiet`` and ``--traceback`` after its name.

    People type ``upgrade CKPT -q``. Those two flags mean the same here as
    before the command; ``-c``/``-n`` after the command are explained instead
    (they choose the configuration, so they belong in front).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(
            [
                click.Option(
                    ["-q", "--quiet", "late_quiet"],
                    is_flag=True,
                    expose_value=False,
                    callback=_set_flag("quiet"),
                    help="Only print results; no progress or notes (also before the command).",
                ),
                click.Option(
                    ["--traceback", "late_traceback"],
                    is_flag=True,
                    expose_value=False,
                    callback=_set_flag("traceback"),
                    help="Show the Python traceback on error (also before the command).",
                ),
                *(
                    click.Option(
                        [flag, f"misplaced_{i}"],
                        expose_value=False,
                        hidden=True,
                        callback=_misplaced,
                    )
                    for i, flag in enumerate(("-c", "--config", "-n", "--name"))
                ),
            ]
        )


def _set_flag(name: str) -> Callable[[click.Context, click.Parameter, bool], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.find_root().obj[name] = True

    return callback


def _misplaced(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        flag = param.opts[0]
        raise click.UsageError(
            f"{flag} is a global option: put it before the command, "
            f"e.g. ckptmigrate {flag} {value} {ctx.info_name} ...",
            ctx,
        )


class _Group(click.Group):
    """Turns our errors into ``Error:`` lines instead of tracebacks."""

    command_class = _Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                # Building the model for check/diff/autogenerate: the commands report
                # lineage problems in their own words, not as Python warnings.
                warnings.simplefilter("ignore", LineageWarning)
                return super().invoke(ctx)
        except CkptMigrateError as exc:
            _fail(ctx, exc.one_line(), exc, exc.traceback_helps)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; the checkpoint was not changed", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `... | head` stopped reading: not worth a message
            _stdout_to_devnull()
            ctx.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # a bug: still one line, trace on request
            ask = "please report it" if _traced(ctx) else "run with --traceback and report it"
            _fail(ctx, f"internal error: {type(exc).__name__}: {exc} ({ask})", exc)


def _stdout_to_devnull() -> None:
    """Whatever is still buffered for a closed pipe goes nowhere, also at exit."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (captured output): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _traced(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("traceback"))


def _fail(
    ctx: click.Context, message: str, exc: BaseException, traceback_helps: bool = False
) -> None:
    if _traced(ctx):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    elif traceback_helps:
        message = f"{message} {_TRACE_HINT}"
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    ctx.exit(1)


def _no_collection_at_exit() -> None:
    """For a command that only reads the revision graph: no cycle search when Python exits.

    What such a command makes lives until the end of the process, and after a long
    history it is tens of thousands of objects, none of them garbage: the final
    collection's pass over them would be a twentieth of the command's time.
    """
    atexit.unregister(gc.freeze)  # once, however many commands one process runs
    atexit.register(gc.freeze)


def _config(ctx: click.Context, must_exist: bool = True) -> Config:
    obj = ctx.find_root().obj
    return Config.discover(obj["config"], obj["name"], must_exist=must_exist, quiet=obj["quiet"])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="PATH",
    help="Configuration file (default: $CKPTMIGRATE_CONFIG, ./alembic_style.ini, "
    "or [tool.ckptmigrate] in ./pyproject.toml).",
)
@click.option(
    "-n",
    "--name",
    default=DEFAULT_SECTION,
    show_default=True,
    help="Section of the configuration file: one per lineage.",
)
@click.option("--traceback", is_flag=True, help="Show the Python traceback on error.")
@click.option("-q", "--quiet", is_flag=True, help="Only print results; no progress or notes.")
@click.version_option(__version__, "--version", prog_name="ckptmigrate")
@click.pass_context
def cli(
    ctx: click.Context, config_path: str | None, name: str, traceback: bool, quiet: bool
) -> None:
    """Alembic-style schema migrations for PyTorch checkpoints.

    Every change to a model's state dict gets a revision script; any old
    checkpoint is upgraded step by step and then loads with strict=True.
    """
    ctx.obj = {"config": config_path, "name": name, "traceback": traceback, "quiet": quiet}


# ----------------------------------------------------------------------------- graph


@cli.command(short_help="Create a migrations folder and alembic_style.ini.")
@click.argument("directory")
@click.option(
    "-t",
    "--template",
    default="pytorch",
    show_default=True,
    help="The kind of project (see 'ckptmigrate list_templates').",
)
@click.pass_context
def init(ctx: click.Context, directory: str, template: str) -> None:
    """Create a migrations DIRECTORY and an alembic_style.ini pointing at it."""
    command.init(_config(ctx, must_exist=False), directory, template=template)


@cli.command(name="list_templates", short_help="List the templates 'init --template' takes.")
@click.pass_context
def list_templates(ctx: click.Context) -> None:
    """List the project templates 'init --template NAME' sets up."""
    command.list_templates(_config(ctx, must_exist=False))


@cli.command(short_help="Write a new revision file.")
@click.option("-m", "--message", help='What changed, e.g. "add fc3".')
@click.option(
    "--autogenerate",
    is_flag=True,
    help="Write the ops by comparing the model with the head schema.",
)
@click.option("--head", default="head", show_default=True, help="Revision to build on.")
@click.option(
    "--splice", is_flag=True, help="Allow --head to be a non-head revision (starts a branch)."
)
@click.option("--branch-label", multiple=True, help="Label for a new branch (letters, digits, _).")
@click.option("--rev-id", help="Use this revision id (letters, digits, _) instead of a random one.")
@click.option("--depends-on", multiple=True, help="Revision(s) this one depends on.")
@click.option(
    "--allow-empty",
    is_flag=True,
    help="With --autogenerate, write a revision even if nothing changed.",
)
@click.pass_context
def revision(
    ctx: click.Context,
    message: str | None,
    autogenerate: bool,
    head: str,
    splice: bool,
    branch_label: Sequence[str],
    rev_id: str | None,
    depends_on: Sequence[str],
    allow_empty: bool,
) -> None:
    """Write a new revision file."""
    command.revision(
        _config(ctx),
        message,
        autogenerate=autogenerate,
        head=head,
        splice=splice,
        branch_label=tuple(branch_label) or None,
        rev_id=rev_id,
        depends_on=tuple(depends_on) or None,
        allow_empty=allow_empty,
    )


@cli.command(short_help="Join several heads with a merge revision.")
@click.argument("revisions", nargs=-1, required=True)
@click.option("-m", "--message", help="Message of the merge revision.")
@click.option("--branch-label", multiple=True, help="Label for the merged branch.")
@click.option("--rev-id", help="Use this revision id (letters, digits, _) instead of a random one.")
@click.option("--splice", is_flag=True, help="Allow revisions that are not heads.")
@click.pass_context
def merge(
    ctx: click.Context,
    revisions: Sequence[str],
    message: str | None,
    branch_label: Sequence[str],
    rev_id: str | None,
    splice: bool,
) -> None:
    """Join several REVISIONS (e.g. heads) with a merge revision."""
    command.merge(
        _config(ctx),
        revisions,
        message,
        branch_label=tuple(branch_label) or None,
        rev_id=rev_id,
        splice=splice,
    )


@cli.command(short_help="Open a revision file in $EDITOR.")
@click.argument("rev", default="head")
@click.pass_context
def edit(ctx: click.Context, rev: str) -> None:
    """Open the file of revision REV (default: head) in $EDITOR."""
    command.edit(_config(ctx), rev)


@cli.command(short_help="Replace a linear run of revisions by one, proved equal.")
@click.argument("rev_range", metavar="FIRST:LAST")
@click.option("-m", "--message", help="Message of the squashed revision.")
@click.option("--keep", is_flag=True, help="Keep the replaced revision files.")
@click.option("--dry-run", is_flag=True, help="Print the combined ops; write nothing.")
@click.option("--rev-id", help="Use this revision id (letters, digits, _) instead of a random one.")
@click.pass_context
def squash(
    ctx: click.Context,
    rev_range: str,
    message: str | None,
    keep: bool,
    dry_run: bool,
    rev_id: str | None,
) -> None:
    """Replace the revisions FIRST..LAST (one line of history) by one revision.

    Its ops are the range's, simplified, and proved to compute the same
    schema and the same tensors bit for bit; checkpoints stamped with any
    replaced revision still upgrade and downgrade. FIRST may be base, LAST
    head.
    """
    command.squash(_config(ctx), rev_range, message, keep=keep, dry_run=dry_run, rev_id=rev_id)


@cli.command(short_help="Show the current head revisions.")
@click.option(
    "-v", "--verbose", is_flag=True, help="Show each head in full: parents, file, message."
)
@click.option("--resolve-dependencies", is_flag=True, help="Treat depends_on like down_revision.")
@click.pass_context
def heads(ctx: click.Context, verbose: bool, resolve_dependencies: bool) -> None:
    """Show the current head revisions."""
    _no_collection_at_exit()
    command.heads(_config(ctx), verbose=verbose, resolve_dependencies=resolve_dependencies)


@cli.command(short_help="Show branch points.")
@click.option(
    "-v", "--verbose", is_flag=True, help="Show each branch point in full: parents, file, message."
)
@click.pass_context
def branches(ctx: click.Context, verbose: bool) -> None:
    """Show branch points."""
    _no_collection_at_exit()
    command.branches(_config(ctx), verbose=verbose)


@cli.command(short_help="List revisions, newest first.")
@click.option("-r", "--rev-range", metavar="[START]:[END]", help="Only this range.")
@click.option(
    "-v", "--verbose", is_flag=True, help="Show each revision in full: parents, file, message."
)
@click.option("--graph", is_flag=True, help="Draw the revision graph, like git log --graph.")
@click.option(
    "-i",
    "--indicate-current",
    metavar="CKPT",
    help="Mark the revision(s) the checkpoint CKPT is at with (current).",
)
@click.pass_context
def history(
    ctx: click.Context,
    rev_range: str | None,
    verbose: bool,
    graph: bool,
    indicate_current: str | None,
) -> None:
    """List revisions, newest first."""
    _no_collection_at_exit()
    command.history(
        _config(ctx), rev_range, verbose=verbose, graph=graph, indicate_current=indicate_current
    )


@cli.command(short_help="Show the revision(s) REV stands for.")
@click.argument("rev")
@click.pass_context
def show(ctx: click.Context, rev: str) -> None:
    """Show the revision(s) REV stands for."""
    command.show(_config(ctx), rev)


# ----------------------------------------------------------------------------- checkpoints

_RELATIVE_OK = {"ignore_unknown_options": True}  # so "-1" reaches TARGET as Alembic allows


def _checkpoint_options(fn: Any) -> Any:
    fn = click.option(
        "--trust-pickle",
        is_flag=True,
        help="Load arbitrary pickles (can run code from the file!). Off by default.",
    )(fn)
    fn = click.option(
        "--state-dict-key",
        metavar="KEY",
        help="Where the state dict sits in a training checkpoint (default: detected).",
    )(fn)
    fn = click.option(
        "--key-prefix",
        metavar="PREFIX",
        help="The lineage's keys sit under PREFIX (e.g. 'model.' in a Lightning checkpoint).",
    )(fn)
    return fn


def _migration_options(fn: Any) -> Any:
    fn = click.option(
        "-o", "--output", metavar="OUT", help="Write here and leave the input untouched."
    )(fn)
    fn = click.option(
        "--from", "from_revision", metavar="REV", help="Treat the checkpoint as being at REV."
    )(fn)
    fn = click.option(
        "--dry-run", is_flag=True, help="Print the plan (steps, ops, shapes); write nothing."
    )(fn)
    fn = click.option(
        "--no-verify", is_flag=True, help="Skip checking the written file against the plan."
    )(fn)
    fn = click.option(
        "--fsync/--no-fsync",
        "fsync",
        default=None,
        help="fsync the new file before the atomic switch (default: yes in place, no with "
        "-o). --no-fsync is faster, but a power cut just after can lose the checkpoint.",
    )(fn)
    fn = _writing_options(fn)
    fn = click.option(
        "-j",
        "--jobs",
        type=click.IntRange(1, 256),
        default=1,
        show_default=True,
        help="Writers at once: N checkpoints in parallel; with fewer checkpoints than N, "
        "each gets a share of the N for its shards (sharded checkpoints).",
    )(fn)
    return _fleet_options(_checkpoint_options(fn))


def _fleet_options(fn: Any) -> Any:
    """How many PATHs become checkpoints, and how the report is printed."""
    fn = click.option(
        "--pattern",
        multiple=True,
        metavar="GLOB",
        help="In directories, look only at files and folders whose name matches GLOB "
        "(or whose path below the directory does, when GLOB has a /). Repeatable.",
    )(fn)
    fn = click.option(
        "--format",
        "report_format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="The report for several checkpoints: a table, or JSON on stdout (also for one).",
    )(fn)
    return fn


def _writing_options(fn: Any) -> Any:
    """What upgrade, downgrade and stamp share about the file they write."""
    fn = click.option(
        "--force",
        is_flag=True,
        help="Go ahead even where the file's keys, shapes or dtypes contradict the revision "
        "it is said to be at (--from, its stamp, the revision stamped).",
    )(fn)
    fn = click.option(
        "--keep-wrapper-prefix",
        is_flag=True,
        help="Write keys back behind the input's 'module.'/'_orig_mod.' prefix, so the "
        "DataParallel/DDP or torch.compile model that saved it loads the result.",
    )(fn)
    return fn


_TARGETS = (
    "TARGET is a revision id or a unique prefix of one (4+ characters), head, heads "
    "(every head), base, LABEL@head (a branch's head) or LABEL@REV, or relative: +N or -N "
    "(N steps from the checkpoint's revision; 'downgrade CKPT -1' as in Alembic), REV+N or "
    "REV-N (N steps from REV)."
)
_PATHS = (
    "Each PATH is a checkpoint file, a checkpoint folder (e.g. a sharded one), or a "
    "directory searched for checkpoints (see --pattern); with several, each is done and a "
    "table (or --format json) reports them. The last argument is the {what} unless it is an "
    "existing path or has a character no revision has (a / or a suffix, as in a.pt); "
    "--to says it outright."
)


def _split(
    ctx: click.Context,
    config: Config,
    args: Sequence[str],
    given: Sequence[str],
    most: int | None,
) -> tuple[list[str], list[str]]:
    """(paths, revisions) from the arguments, as :mod:`ckptmigrate.arguments` says."""
    if given:
        return list(args), list(given)
    namer = arguments.revision_namer(config)
    return arguments.split_revisions(ctx, args, most=most, names_revision=namer)


def _one_checkpoint(paths: Sequence[str], report_format: str) -> bool:
    """The command as it always was: one checkpoint named, its own lines, no table."""
    from .runtime.discovery import is_one_checkpoint

    return report_format == "text" and is_one_checkpoint(paths)


def _finish(ctx: click.Context, report: FleetReport) -> None:
    """Exit 130 after Ctrl-C, 1 when a checkpoint failed (the report says which)."""
    if report.interrupted:
        click.echo(
            "Error: interrupted by Ctrl-C; every checkpoint is as it was or finished, none "
            "half-written; run the command again to do the rest",
            err=True,
        )
        ctx.exit(130)
    failed = report.failed
    if failed:
        names = ", ".join(o.path for o in failed[:3]) + (" ..." if len(failed) > 3 else "")
        raise CommandError(
            f"{len(failed)} of {len(report.checkpoints)} checkpoints failed ({names})",
            hint="the report says why; the other checkpoints went ahead",
        )


def _migration_command(name: str, target_default: str | None, summary: str, doc: str) -> None:
    """``upgrade`` and ``downgrade``: one shape, one direction each."""
    run, run_all = (
        (command.upgrade, command.upgrade_all)
        if name == "upgrade"
        else (command.downgrade, command.downgrade_all)
    )

    @click.pass_context
    def cmd(
        ctx: click.Context,
        /,
        checkpoint: str,
        more: Sequence[str],
        target: str | None,
        pattern: Sequence[str],
        report_format: str,
        no_verify: bool,
        fsync: bool | None,
        **options: Any,
    ) -> None:
        args = (checkpoint, *more)
        arguments.check_options(ctx, args)
        config = _config(ctx)
        paths, given = _split(ctx, config, args, [target] if target else [], 1)
        if not given and target_default is None:
            raise click.UsageError("Missing argument 'TARGET'.", ctx)
        goal = given[0] if given else target_default or "head"
        kwargs = {"verify": not no_verify, "durable": fsync, **options}
        if _one_checkpoint(paths, report_format):
            run(config, paths[0], goal, **kwargs)
            return
        report = run_all(
            config, paths, goal, pattern=pattern, report_format=report_format, **kwargs
        )
        _finish(ctx, report)

    cmd.__doc__ = f"{doc}\n\n{_TARGETS}\n\n{_PATHS.format(what='TARGET')}"
    cmd = _migration_options(cmd)
    cmd = click.option(
        "--to", "target", metavar="TARGET", help="The TARGET; then every argument is a PATH."
    )(cmd)
    tail = "[TARGET]" if target_default else "TARGET"
    cmd = click.argument("more", nargs=-1, metavar=f"[PATH]... {tail}")(cmd)
    cmd = click.argument("checkpoint", metavar="PATH")(cmd)
    cli.command(name=name, short_help=summary, context_settings=_RELATIVE_OK)(cmd)


_migration_command(
    "upgrade",
    "head",
    "Upgrade CHECKPOINT to TARGET (default: head).",
    "Upgrade the checkpoint(s) at PATH to TARGET (default: head), in place unless -o.",
)
_migration_command(
    "downgrade",
    None,
    "Downgrade CHECKPOINT to TARGET (e.g. -1, base).",
    "Downgrade the checkpoint(s) at PATH to TARGET (e.g. -1, base, a revision), in place "
    "unless -o.",
)


@cli.command(short_help="Print the revision(s) CHECKPOINT is at.")
@click.argument("checkpoint", metavar="PATH")
@click.argument("more", nargs=-1, metavar="[PATH]...")
@click.option(
    "-v", "--verbose", is_flag=True, help="Show each revision in full: parents, file, message."
)
@_fleet_options
@_checkpoint_options
@click.pass_context
def current(
    ctx: click.Context,
    /,
    checkpoint: str,
    more: Sequence[str],
    verbose: bool,
    pattern: Sequence[str],
    report_format: str,
    **options: Any,
) -> None:
    """Print the revision(s) the checkpoint at PATH is at.

    With several PATHs, or a directory (searched for checkpoints, see
    --pattern), a table says for each checkpoint its revision and how many
    steps it is behind the head.
    """
    paths = [checkpoint, *more]
    arguments.check_options(ctx, paths)
    if _one_checkpoint(paths, report_format):
        command.current(_config(ctx), paths[0], verbose=verbose, **options)
        return
    report = command.current_all(
        _config(ctx),
        paths,
        pattern=pattern,
        report_format=report_format,
        verbose=verbose,
        **options,
    )
    _finish(ctx, report)


@cli.command(short_help="Record a revision in CHECKPOINT without migrating.")
@click.argument("checkpoint", metavar="PATH")
@click.argument("more", nargs=-1, metavar="[PATH]... REV...")
@click.option(
    "--to",
    "revisions",
    multiple=True,
    metavar="REV",
    help="A revision to record (repeatable); then every argument is a PATH.",
)
@click.option("--purge", is_flag=True, help="Ignore (replace) whatever stamp the file has.")
@click.option("-o", "--output", metavar="OUT", help="Write here and leave the input untouched.")
@_writing_options
@_fleet_options
@_checkpoint_options
@click.pass_context
def stamp(
    ctx: click.Context,
    /,
    checkpoint: str,
    more: Sequence[str],
    revisions: Sequence[str],
    purge: bool,
    pattern: Sequence[str],
    report_format: str,
    **options: Any,
) -> None:
    """Record REV (or several) in the checkpoint at PATH without migrating ('base' unstamps).

    The file must have the schema of those revisions (where the lineage's base
    schema tells); --force records them anyway.

    With several PATHs, or a directory, every checkpoint found is stamped (one
    stamped so already is left alone) and a table reports them. The REVs are
    the trailing arguments that are not existing paths and have no / or
    suffix; --to REV says them outright.
    """
    args = (checkpoint, *more)
    arguments.check_options(ctx, args)
    config = _config(ctx)
    paths, revs = _split(ctx, config, args, revisions, None)
    if not revs:
        raise click.UsageError("Missing argument 'REVISIONS...'.", ctx)
    if _one_checkpoint(paths, report_format):
        command.stamp(config, paths[0], revs, purge=purge, **options)
        return
    report = command.stamp_all(
        config,
        paths,
        revs,
        purge=purge,
        pattern=pattern,
        report_format=report_format,
        **options,
    )
    _finish(ctx, report)


# ----------------------------------------------------------------------------- schemas


@cli.command(short_help="Exit 1 if the model no longer matches (a CI gate).")
@click.option(
    "--no-roundtrip", is_flag=True, help="Skip checking that each downgrade undoes its upgrade."
)
@click.pass_context
def check(ctx: click.Context, no_roundtrip: bool) -> None:
    """Exit 1 if the model no longer matches the head schema (a CI gate).

    Also exit 1 if a downgrade does not undo its upgrade, or if an upgrade
    discards trained values without intended=True.
    """
    command.check(_config(ctx), roundtrip=not no_roundtrip)


@cli.command(short_help="Show how CHECKPOINT differs from the model.")
@click.argument("checkpoint")
@click.option(
    "--rev", "revision", metavar="REV", help="Compare with the schema at REV instead of the model."
)
@click.option("--exit-code", is_flag=True, help="Exit 1 when there are differences.")
@_checkpoint_options
@click.pass_context
def diff(
    ctx: click.Context,
    checkpoint: str,
    revision: str | None,
    exit_code: bool,
    state_dict_key: str | None,
    trust_pickle: bool,
    key_prefix: str | None,
) -> None:
    """Show how CHECKPOINT differs from the model: missing, unexpected, mismatched keys."""
    same = command.diff(
        _config(ctx),
        checkpoint,
        revision=revision,
        trust_pickle=trust_pickle,
        state_dict_key=state_dict_key,
        key_prefix=key_prefix,
    )
    if exit_code and not same:
        ctx.exit(1)


@cli.command(name="schema", short_help="Print a revision's schema, or record the base one.")
@click.argument("revision", required=False)
@click.option(
    "--record",
    "record_from",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[CKPT]",
    help="Record the base schema from the model, or from CKPT (a checkpoint at a known "
    "revision), running the downgrades symbolically back to base.",
)
@click.option(
    "--from",
    "from_revision",
    metavar="REV",
    help="With --record: the checkpoint (or the model) is at REV (default: its stamp; the "
    "model's head or pinned revision).",
)
@_checkpoint_options
@click.pass_context
def schema_cmd(
    ctx: click.Context,
    revision: str | None,
    record_from: str | None,
    from_revision: str | None,
    state_dict_key: str | None,
    trust_pickle: bool,
    key_prefix: str | None,
) -> None:
    """Print the schema at REVISION (default: heads), or --record the base schema."""
    command.schema(
        _config(ctx),
        revision,
        record=record_from is not None,
        checkpoint=record_from or None,
        from_revision=from_revision,
        trust_pickle=trust_pickle,
        state_dict_key=state_dict_key,
        key_prefix=key_prefix,
    )


class _SubGroup(click.Group):
    command_class = _Command


@cli.group(cls=_SubGroup, short_help="Golden checkpoints kept with the migrations.")
def fixture() -> None:
    """Golden checkpoints: small synthetic checkpoints the pytest plugin upgrades in CI."""


@fixture.command(name="record", short_help="Write a golden checkpoint at the head.")
@click.option(
    "-o",
    "--output",
    metavar="PATH",
    help="Where to write it (default: <script_location>/fixtures/<head>.pt; .safetensors too).",
)
@click.option("--seed", type=int, default=None, help="Seed of its tensors (default: 0).")
@click.pass_context
def fixture_record(ctx: click.Context, output: str | None, seed: int | None) -> None:
    """Write a small golden checkpoint at the head: tensors from the schema, fixed seed."""
    command.fixture_record(_config(ctx), output, seed=seed)


def main(argv: Sequence[str] | None = None) -> None:
    with imports_frozen():
        cli.main(args=list(argv) if argv is not None else None, prog_name="ckptmigrate")


def run() -> None:
    """The ``ckptmigrate`` executable: :func:`main`, then the process ends at once."""
    try:
        main()
    except SystemExit as exc:
        end_process(exc.code)
    end_process(0)
