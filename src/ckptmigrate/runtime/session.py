"""The migration session: one checkpoint's trip along the lineage.

``upgrade``, ``downgrade`` and ``stamp`` all go the same way: check the output
path (before anything is read or locked), lock the file that will be
replaced, open the checkpoint lazily, place it on the lineage (checking the
claim), plan the steps, run them on the plan, carry the training state along,
check the result against the schema at the target, and write it atomically.
Each of those is one method here; formats, the plan and the training pass do
the work behind them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import CkptMigrateError, CommandError, MultipleHeads, RevisionError
from ..formats.storage import location, same_location
from ..paths import display_path
from ..script.directory import ScriptDirectory
from ..script.revision import format_ids
from .options import CheckpointOptions, MigrationOptions
from .placement import Placement, place, stamped_heads
from .route import refuse_wrong_way, steps_to

if TYPE_CHECKING:
    # Imported when a checkpoint has been opened: path errors answer before torch loads.
    from ..formats.checkpoint import Checkpoint
    from ..formats.stamp import Stamp
    from ..formats.storage import CkptPath
    from ..plan.state import PlanState
    from .migration import MigrationStep
    from .report import MigrationResult, StampResult

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def opened(
    config: Config,
    checkpoint: PathLike,
    options: CheckpointOptions,
    *,
    keep_wrapper_prefix: bool | None = None,
) -> Iterator[Checkpoint]:
    """The checkpoint read lazily and focused on the lineage's keys, with its notes.

    ``keep_wrapper_prefix`` is None for commands that write nothing.
    """
    from ..formats import read_checkpoint

    if options.trust_pickle:
        config.log(
            "Warning: --trust-pickle: loading the checkpoint can run arbitrary code from the file"
        )
        # the pickle may name the project's own classes, importable as the model is
        config.prepend_sys_path()
    ckpt = read_checkpoint(
        checkpoint,
        trust_pickle=options.trust_pickle,
        state_dict_key=options.state_dict_key or config.get("state_dict_key"),
    )
    try:
        for note in ckpt.notes(keep_wrapper_prefix=keep_wrapper_prefix):
            config.log(f"Note: {note}")
        if keep_wrapper_prefix and not ckpt.wrapper_prefix:
            config.log(
                f"Note: --keep-wrapper-prefix: {display_path(checkpoint)} has no wrapper "
                "prefix; its keys are written as they are"
            )
        yield ckpt.focus(options.key_prefix or config.get("key_prefix"))
    finally:
        ckpt.close()


@dataclass(frozen=True)
class Peeked:
    """A checkpoint's stamp as a look at the file found it, without opening it."""

    path: CkptPath
    stamp: Stamp


def peeked(config: Config, checkpoint: PathLike, options: CheckpointOptions) -> Peeked | None:
    """The stamp of the lineage's keys, read without torch; None when opening the file must tell.

    Says what :func:`opened` says about how the file was read, so the two
    answers look alike.
    """
    if options.trust_pickle:
        return None
    from ..formats import ReadOptions, peek_checkpoint

    key = options.state_dict_key or config.get("state_dict_key")
    header = peek_checkpoint(checkpoint, ReadOptions(False, key))
    if header is None:
        return None
    try:
        stamp = header.stamp(options.key_prefix or config.get("key_prefix"))
    except CkptMigrateError:
        return None  # a damaged or newer stamp: opening the file says so
    if stamp is None:
        return None
    for note in header.notes():
        config.log(f"Note: {note}")
    return Peeked(header.path, stamp)


class MigrationSession:
    """Runs ``upgrade``/``downgrade``/``stamp`` on one checkpoint with one set of options.

    A batch shares one ``script_dir`` between its sessions, and passes
    ``between_tensors``: called as each tensor is written, it raises to
    abandon the write before the switch (Ctrl-C), leaving the input as it was.
    """

    def __init__(
        self,
        config: Config,
        options: MigrationOptions,
        *,
        script_dir: ScriptDirectory | None = None,
        between_tensors: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.options = options
        if script_dir is not None:
            self.script_dir = script_dir
        self._between_tensors = between_tensors

    @functools.cached_property
    def script_dir(self) -> ScriptDirectory:
        return ScriptDirectory.from_config(self.config)

    # ------------------------------------------------------------------ commands

    def migrate(self, checkpoint: PathLike, target: str, *, upgrade: bool) -> MigrationResult:
        """Bring ``checkpoint`` to ``target`` (up or down), written in place unless ``output``."""
        self._check_output_path(checkpoint)
        with self._locked(checkpoint), self._opened_to_write(checkpoint) as (ckpt, out):
            return self._migrate(checkpoint, ckpt, out, target, upgrade)

    def stamp(
        self,
        checkpoint: PathLike,
        revisions: Sequence[str],
        *,
        purge: bool,
        skip_same: bool = False,
    ) -> StampResult:
        """Record ``revisions`` without migrating (checked against the file's schema).

        ``skip_same``: a file stamped with exactly these revisions already is
        left alone (a batch skips what is at its target).
        """
        from .report import StampResult

        if self.options.from_revision is not None or self.options.dry_run:
            raise CommandError(
                "stamp takes no from_revision or dry_run option",
                hint="stamp records the revisions it is given; see 'ckptmigrate stamp --help'",
            )
        self._check_output_path(checkpoint)
        with self._locked(checkpoint), self._opened_to_write(checkpoint) as (ckpt, out):
            before = () if purge else (stamped_heads(self.script_dir, ckpt) or ())
            stamped = ckpt.stamp.revisions if ckpt.stamp is not None else None
            after = self._heads_after_stamp(before, revisions)
            result = StampResult(location(checkpoint), stamped, after)
            if skip_same and stamped == after and self.options.output is None:
                self.config.log(
                    f"Nothing to stamp: {display_path(checkpoint)} is stamped at "
                    f"{format_ids(after) or 'base'}"
                )
                return result
            if after and ckpt.adapter is not None:
                from ..adapters import run

                run.check_stamp(self, ckpt, after, display_path(checkpoint))
            elif after:
                from ..claims import STAMP, check_start

                check_start(
                    self.config,
                    self.script_dir,
                    ckpt,
                    after,
                    claimed_by=STAMP,
                    force=self.options.force,
                )
            self.write(out, ckpt, ckpt.initial_state(), after or None)
            where = display_path(out)
            self.config.log(
                f"Stamped {where} at {format_ids(after)}"
                if after
                else f"Removed the ckptmigrate stamp from {where}"
            )
            result.written = True
            return result

    # ------------------------------------------------------------------ the run

    def _migrate(
        self, checkpoint: PathLike, ckpt: Checkpoint, out: CkptPath, target: str, upgrade: bool
    ) -> MigrationResult:
        from .report import done_line, progress_bar

        if ckpt.adapter is not None:  # a PEFT adapter follows its base model's lineage
            from ..adapters import run
            from ..formats.peft import local_only

            return run.migrate(self, checkpoint, ckpt, local_only(out), target, upgrade)
        opts, config = self.options, self.config
        where = display_path(checkpoint)
        placement = place(config, self.script_dir, ckpt, opts.from_revision)
        current = placement.revisions
        steps = steps_to(self.script_dir, current, target, upgrade, where)
        self._check_claim(ckpt, placement, bool(steps) or self._copies(checkpoint, out, steps))
        result = self.result(checkpoint, current, steps, placement.identified)
        if not steps:
            self.nothing_to_do(checkpoint, ckpt, out, current, target, upgrade)
            return result
        state, container = self._planned(ckpt, result, where)
        if opts.dry_run:
            return result
        bar = progress_bar(config, ckpt, state)
        self.write(out, ckpt, state, result.to_revisions, container=container, progress=bar)
        if bar is not None:
            bar.finish()
        config.log(done_line(result, where, out, upgrade))
        return result

    def plan(self, ckpt: Checkpoint, target: str) -> tuple[MigrationResult, PlanState, Any]:
        """The migration of an opened checkpoint to exactly ``target``, up or down; nothing written.

        For a caller that reads the result its own way (a multi-rank job loading
        a DCP checkpoint): the result, the plan of the state dict, and the
        training container to write (None: unchanged).
        """
        from .memory import direction
        from .report import MigrationResult

        where = display_path(ckpt.path)
        placement = place(self.config, self.script_dir, ckpt, self.options.from_revision)
        current = placement.revisions
        rmap = self.script_dir.revision_map
        goal = rmap.get_revision(target)
        up = goal is not None and direction(rmap, current, goal.revision) != "downgrade"
        steps = steps_to(self.script_dir, current, target, up, where)
        self._check_claim(ckpt, placement, bool(steps))
        result = MigrationResult(
            location(ckpt.path), None, current, current, steps, False, placement.identified
        )
        if not steps:
            return result, ckpt.initial_state(), None
        state, container = self._planned(ckpt, result, where)
        return result, state, container

    def _planned(
        self, ckpt: Checkpoint, result: MigrationResult, where: str
    ) -> tuple[PlanState, Any]:
        """Run ``result``'s steps on the plan, check it, carry the training state along."""
        from .report import print_plan

        state = ckpt.initial_state()
        result.to_revisions = self._run_steps(result.steps, state, result.from_revisions)
        self._check_result(state, result, where)
        if self.options.dry_run:
            print_plan(self.config, where, result, len(ckpt.schema), state)
        return state, self._training_state(ckpt, state, result)

    def result(
        self,
        checkpoint: PathLike,
        current: tuple[str, ...],
        steps: list[MigrationStep],
        identified: bool,
    ) -> MigrationResult:
        """What a run from ``current`` along ``steps`` is about to do (its target set later)."""
        from .report import MigrationResult

        opts = self.options
        output = location(opts.output) if opts.output else None
        return MigrationResult(
            location(checkpoint), output, current, current, steps, opts.dry_run, identified
        )

    def _copies(self, checkpoint: PathLike, out: CkptPath, steps: list[MigrationStep]) -> bool:
        """Whether a checkpoint already at the target is still written (where -o asks for it)."""
        opts = self.options
        copy = not steps and opts.output is not None and not opts.dry_run
        return copy and not _same_file(out, checkpoint)

    def nothing_to_do(
        self,
        checkpoint: PathLike,
        ckpt: Checkpoint,
        out: CkptPath,
        current: tuple[str, ...],
        target: str,
        upgrade: bool,
    ) -> None:
        """The checkpoint is at ``target``: say so (a copy still goes where -o says)."""
        where = display_path(checkpoint)
        refuse_wrong_way(self.script_dir, current, target, upgrade, where)
        copy = self._copies(checkpoint, out, [])
        if copy:
            self.write(out, ckpt, ckpt.initial_state(), current)
        written = f"; written to {display_path(out)}" if copy else ""
        direction = "upgrade" if upgrade else "downgrade"
        self.config.log(
            f"Nothing to {direction}: {where} is at {format_ids(current) or 'base'}{written}"
        )

    def _run_steps(
        self, steps: list[MigrationStep], state: PlanState, current: tuple[str, ...]
    ) -> tuple[str, ...]:
        from .migration import run_steps

        dry = self.options.dry_run
        rmap = self.script_dir.revision_map
        heads = run_steps(
            steps, state, current, rmap, symbolic=dry, log=None if dry else self.config.log
        )
        if not dry:
            self._follow_model_order(state)
        return heads

    def _check_claim(self, ckpt: Checkpoint, placement: Placement, writes: bool) -> None:
        """``--from`` always, and a stamp when it is about to be trusted for a write."""
        from ..claims import FROM, STAMPED, check_start

        if placement.claimed or (not placement.identified and writes):
            check_start(
                self.config,
                self.script_dir,
                ckpt,
                placement.revisions,
                claimed_by=FROM if placement.claimed else STAMPED,
                force=self.options.force,
            )

    def _check_result(self, state: PlanState, result: MigrationResult, where: str) -> None:
        from ..claims import check_result

        check_result(
            self.config,
            self.script_dir,
            state,
            result.to_revisions,
            where=where,
            start=result.from_revisions,
            force=self.options.force,
        )

    def _training_state(self, ckpt: Checkpoint, state: PlanState, result: MigrationResult) -> Any:
        """The training container with its optimizer state carried along (None: nothing to do)."""
        if ckpt.training is None:
            return None
        from ..training import migrate_training_state

        return migrate_training_state(
            self.config,
            self.script_dir,
            ckpt,
            state,
            result.from_revisions,
            result.to_revisions,
            result.steps,
            dry_run=self.options.dry_run,
        )

    def _follow_model_order(self, state: PlanState) -> None:
        """Write the keys in the configured model's order when they are exactly its keys.

        Migrations append what they add; putting the result in ``model.state_dict()``
        order keeps the file tidy and keeps file order equal to parameter order,
        which is what an optimizer's state is keyed by.
        """
        if not self.config.get("model"):
            return
        from ..model import configured_model

        try:
            schema = configured_model(self.config).schema
        except CkptMigrateError as exc:
            self.config.log(f"Note: keeping the migration's key order ({exc.message})")
            return
        if set(schema) == set(state.entries) and list(schema) != list(state.entries):
            state.entries = {k: state.entries[k] for k in schema}

    def _heads_after_stamp(
        self, before: tuple[str, ...], revisions: Sequence[str]
    ) -> tuple[str, ...]:
        try:
            return self.script_dir.revision_map.heads_after_stamp(
                before, list(revisions) or ["base"]
            )
        except MultipleHeads as exc:
            raise CommandError(
                exc.message, hint="name the revision(s) to stamp, or use 'heads'"
            ) from exc
        except RevisionError:
            raise

    # ------------------------------------------------------------------ files

    def _check_output_path(self, checkpoint: PathLike) -> None:
        """An ``-o`` path no file can be written at is refused before anything is read or locked."""
        from ..formats import check_output_path

        check_output_path(checkpoint, self.options.output)

    @contextlib.contextmanager
    def _locked(self, checkpoint: PathLike) -> Iterator[None]:
        """Hold the lock on the file about to be rewritten, from before it is read."""
        if self.options.dry_run:
            yield
            return
        from ..formats import locked_for_writing

        with locked_for_writing(self.options.output or checkpoint, notify=self.config.log):
            yield

    @contextlib.contextmanager
    def _opened_to_write(self, checkpoint: PathLike) -> Iterator[tuple[Checkpoint, CkptPath]]:
        """The checkpoint and where it goes, refused before any work if it cannot go there."""
        from ..formats import WriteOptions, check_output

        opts = self.options
        keep = opts.keep_wrapper_prefix
        with opened(self.config, checkpoint, opts.reading(), keep_wrapper_prefix=keep) as ckpt:
            out = location(opts.output if opts.output else checkpoint)
            check_output(out, ckpt, WriteOptions(keep_wrapper_prefix=keep))
            yield ckpt, out

    def write(
        self,
        out: CkptPath,
        ckpt: Checkpoint,
        state: PlanState,
        revisions: tuple[str, ...] | None,
        *,
        container: Any = None,
        progress: Any = None,
    ) -> None:
        from ..formats import WriteOptions, write_checkpoint

        opts = self.options
        if self._between_tensors is not None:
            progress = _checking(self._between_tensors, progress)
        options = WriteOptions(
            verify=opts.verify,
            jobs=opts.jobs,
            durable=self._durable(),
            keep_wrapper_prefix=opts.keep_wrapper_prefix,
            progress=progress,
            container=container,
        )
        write_checkpoint(out, ckpt, state, revisions, options)

    def _durable(self) -> bool:
        """fsync before the switch? By default only when the file rewritten is the only copy.

        In place, a power cut after an unsynced switch could lose the checkpoint;
        with ``-o`` the input is still there to run the command again from.
        """
        if self.options.durable is not None:
            return self.options.durable
        setting = (self.config.get("fsync") or "auto").lower()
        if setting in ("true", "yes", "1", "on"):
            return True
        if setting in ("false", "no", "0", "off"):
            return False
        return self.options.output is None


def _same_file(a: CkptPath, b: PathLike) -> bool:
    return same_location(a, location(b))


def _checking(stop: Callable[[], None], bar: Callable[[int], None] | None) -> Callable[[int], None]:
    """A progress callback that first lets a batch abandon the write (before its switch)."""

    def progress(nbytes: int) -> None:
        stop()
        if bar is not None:
            bar(nbytes)

    return progress
