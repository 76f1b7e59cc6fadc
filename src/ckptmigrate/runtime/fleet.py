"""One command over many checkpoints: one process, one torch import, ``-j`` at a time.

The PATHs become checkpoints (:mod:`.discovery`); each runs through the
same :class:`~.session.MigrationSession` a single checkpoint does, with one
lineage read for all of them. A checkpoint that fails is reported and the
others go on. What each one logs is kept and printed as one block when it
is done, in the order the checkpoints were found, so parallel runs read
like serial ones; the rows of the report come in that order too.

``-j N`` is the number of writers at once: N checkpoints in parallel (in
forked processes where that is safe, :mod:`.workers`; otherwise in threads,
where copying records in the kernel and checking their checksums still run
outside the GIL), and with fewer checkpoints than N, each gets an equal
share of the N for its shards. Each writer
streams one tensor at a time, so memory stays what one checkpoint needs,
times N.

Ctrl-C stops the batch cleanly: no checkpoint starts after it, and the ones
being written stop at their next tensor, before anything is replaced, so
each checkpoint is the old one or the new one. A second Ctrl-C stops at once
(the write under way still leaves the old file). The report then lists
what finished and what was interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import CkptMigrateError, CommandError, Interrupted
from ..formats.atomic import removals_after, removals_in_background
from ..formats.storage import is_url, location
from ..script.directory import ScriptDirectory
from .discovery import Found, Search, checkpoint_suffixes, find_checkpoints
from .fleet_report import (
    AT_HEAD,
    AT_TARGET,
    BEHIND,
    DOWNGRADED,
    FAILED,
    INTERRUPTED,
    STAMPED,
    UNKNOWN,
    UPGRADED,
    WOULD_DOWNGRADE,
    WOULD_UPGRADE,
    FleetReport,
    Outcome,
)
from .options import CheckpointOptions, MigrationOptions
from .workers import StopFlag, can_fork, run_forked

if TYPE_CHECKING:
    from .session import MigrationSession

Work = Callable[[Config, str, "_Stop"], Outcome]

#: A relative target (``-1``, ``+2``, ``rev-1``): it means something per checkpoint.
_RELATIVE = re.compile(r"[+-]\d+$")


class Fleet:
    """Runs ``upgrade``, ``downgrade``, ``stamp`` or ``current`` over every checkpoint found."""

    def __init__(
        self,
        config: Config,
        options: CheckpointOptions,
        *,
        pattern: Sequence[str] = (),
        show_printed: bool = True,
    ) -> None:
        self.config = config
        self.options = options
        self.pattern = tuple(pattern)
        self.show_printed = show_printed  # False: stdout is the report alone (JSON)
        self.script_dir = ScriptDirectory.from_config(config)

    # ------------------------------------------------------------------ commands

    def migrate(self, paths: Sequence[str], target: str, *, upgrade: bool) -> FleetReport:
        opts = self._migration_options()
        if not _RELATIVE.search(target):
            self.script_dir.get_revisions(target)  # a target no checkpoint can reach: say so once
        search = self._search(paths)
        shard_jobs = max(1, opts.jobs // max(1, min(opts.jobs, len(search.found))))
        each = dataclasses.replace(opts, jobs=shard_jobs)

        def work(config: Config, path: str, stop: _Stop) -> Outcome:
            result = self._session(config, each, stop).migrate(path, target, upgrade=upgrade)
            if not result.steps:
                status = AT_TARGET
            elif result.dry_run:
                status = WOULD_UPGRADE if upgrade else WOULD_DOWNGRADE
            else:
                status = UPGRADED if upgrade else DOWNGRADED
            found_by = "schema" if result.identified else "stamp"
            if opts.from_revision is not None:
                found_by = "--from"
            return Outcome(
                path,
                status,
                result.from_revisions,
                result.to_revisions,
                len(result.steps),
                found_by,
                _size(os.fspath(opts.output or path)),
            )

        name = "upgrade" if upgrade else "downgrade"
        return self._run(name, target, search, work, opts.jobs, dry_run=opts.dry_run)

    def stamp(self, paths: Sequence[str], revisions: Sequence[str], *, purge: bool) -> FleetReport:
        opts = self._migration_options()
        search = self._search(paths)
        each = dataclasses.replace(opts, jobs=1)

        def work(config: Config, path: str, stop: _Stop) -> Outcome:
            session = self._session(config, each, stop)
            result = session.stamp(path, revisions, purge=purge, skip_same=True)
            return Outcome(
                path,
                STAMPED if result.written else AT_TARGET,
                result.from_revisions,
                result.to_revisions,
                0,
                "stamp",
                _size(os.fspath(opts.output or path)),
            )

        return self._run("stamp", ",".join(revisions), search, work, opts.jobs)

    def current(self, paths: Sequence[str], *, verbose: bool = False) -> FleetReport:
        search = self._search(paths)  # a path that is no checkpoint answers before torch loads
        from ..identify import identify_or_fail
        from ..schema import base_schema_path
        from ..script import display
        from .placement import stamped_heads
        from .session import opened

        script_dir, reading = self.script_dir, self.options
        recorded = base_schema_path(script_dir.dir).exists()

        def work(config: Config, path: str, stop: _Stop) -> Outcome:
            with opened(config, path, reading) as ckpt:
                stamped = stamped_heads(script_dir, ckpt)
                if stamped is None and not recorded:
                    return Outcome(
                        path,
                        UNKNOWN,
                        error="no ckptmigrate stamp, and no base schema is recorded to identify "
                        "it by (see 'ckptmigrate schema --record')",
                        bytes=_size(path),
                    )
                if stamped is not None:
                    revisions, found_by = stamped, "stamp"
                elif ckpt.adapter is not None:
                    from ..adapters import run

                    revisions, found_by = run.identified(config, script_dir, ckpt), "schema"
                else:
                    revisions, found_by = identify_or_fail(config, script_dir, ckpt), "schema"
            if verbose:
                config.print_stdout(f"{path}:")
                for rev in revisions:
                    config.print_stdout(display.cmd_format(script_dir.script(rev), True))
            behind = steps_to_heads(script_dir, revisions)
            status = AT_HEAD if behind == 0 else BEHIND
            return Outcome(path, status, revisions, revisions, behind, found_by, _size(path))

        return self._run("current", None, search, work, 1)

    # ------------------------------------------------------------------ the batch

    def _session(self, config: Config, options: MigrationOptions, stop: _Stop) -> MigrationSession:
        """One checkpoint's session: the batch's lineage, stopping between tensors on Ctrl-C."""
        from .session import MigrationSession

        return MigrationSession(
            config, options, script_dir=self.script_dir, between_tensors=stop.check
        )

    def _migration_options(self) -> MigrationOptions:
        assert isinstance(self.options, MigrationOptions)
        return self.options

    def _search(self, paths: Sequence[str]) -> Search:
        search = find_checkpoints(paths, self.pattern)
        looked_for = (
            "files matching " + " or ".join(self.pattern)
            if self.pattern
            else "files named *" + ", *".join(checkpoint_suffixes()) + " or checkpoint folders"
        )
        if not search.found:  # every PATH was a directory, and none held a checkpoint
            names = ", ".join(search.empty)
            what = (
                "is a directory with no checkpoint in it"
                if len(search.empty) == 1
                else "are directories with no checkpoint in them"
            )
            raise CommandError(
                f"{names} {what}",
                hint=f"looked for {looked_for}; pass --pattern GLOB to look for others",
            )
        for folder in search.empty:
            self.config.log(f"Note: no checkpoints in {folder} (looked for {looked_for})")
        output = getattr(self.options, "output", None)
        if output is not None and len(search.found) > 1:
            raise CommandError(
                f"-o {output} names one output, but {len(search.found)} checkpoints were found",
                hint="leave out -o to rewrite each checkpoint in place, or name one checkpoint",
            )
        return search

    def _run(
        self,
        command: str,
        target: str | None,
        search: Search,
        work: Work,
        jobs: int,
        *,
        dry_run: bool = False,
    ) -> FleetReport:
        started = time.monotonic()
        _ = self.script_dir.revision_map  # read once, before any thread needs it
        if command != "current":  # (current may answer from stamps alone)
            self._warm_up()
        stop = _Stop()
        emitter = _Emitter(self.config, self.show_printed)
        with stop.on_sigint():
            if jobs <= 1 or len(search.found) == 1:
                with removals_in_background():
                    outcomes = self._serial(search.found, work, stop, emitter)
            else:
                outcomes = self._parallel(search.found, work, stop, emitter, jobs)
        if stop.requested:
            done = sum(o.status != INTERRUPTED for o in outcomes)
            self.config.log(
                f"Stopped by Ctrl-C after {done} of {len(outcomes)} checkpoints; "
                "the others are unchanged"
            )
        return FleetReport(
            command,
            target,
            tuple(self.script_dir.revision_map.heads),
            outcomes,
            dry_run=dry_run,
            interrupted=stop.requested,
            seconds=time.monotonic() - started,
        )

    def _warm_up(self) -> None:
        """What every checkpoint needs, made once before the first one's clock starts.

        Otherwise the first row's time would include importing torch and the
        modules a run loads on first use (the ops, the formats, the runtime).
        """
        import torch  # noqa: F401

        from .. import claims, identify, op  # noqa: F401
        from ..formats import atomic, formats, lock, verify  # noqa: F401
        from ..model import configured_model
        from ..plan import state  # noqa: F401
        from . import migration, report, session, symbolic  # noqa: F401

        formats()
        _ = op.__all__  # every op's function, built once

        if self.config.get("model"):  # built once, before any thread needs it
            with contextlib.suppress(CkptMigrateError):  # each checkpoint says why it can't
                configured_model(self.config)

    def _serial(
        self, found: Sequence[Found], work: Work, stop: _Stop, emitter: _Emitter
    ) -> list[Outcome]:
        outcomes = []
        for i, item in enumerate(found):
            outcome = self._one(item, work, stop)
            outcomes.append(outcome)
            emitter.done(i, outcome)
        return outcomes

    def _parallel(
        self, found: Sequence[Found], work: Work, stop: _Stop, emitter: _Emitter, jobs: int
    ) -> list[Outcome]:
        if can_fork([item.path for item in found]):
            return self._forked(found, work, stop, emitter, jobs)
        results: dict[int, Outcome] = {}
        threads = ThreadPoolExecutor(max_workers=min(jobs, len(found)))
        with removals_in_background(), threads as pool:
            futures: dict[Future[Outcome], int] = {
                pool.submit(self._one, item, work, stop): i for i, item in enumerate(found)
            }
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        i = futures[future]
                        results[i] = future.result()
                        emitter.done(i, results[i])
            except BaseException:  # a second Ctrl-C: wait only for the writes under way
                stop.request()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return [results[i] for i in range(len(found))]

    def _forked(
        self, found: Sequence[Found], work: Work, stop: _Stop, emitter: _Emitter, jobs: int
    ) -> list[Outcome]:
        stop.share()
        results = run_forked(
            len(found),
            jobs,
            lambda i: self._one(found[i], work, stop),
            stopped=lambda: stop.requested,
            done=emitter.done,
            died=lambda i, how, finished: self._died(
                found[i].path, how, [found[j].path for j in finished]
            ),
        )
        for i in range(len(found)):
            if i not in results:  # never started (Ctrl-C): its row says so
                results[i] = self._one(found[i], work, stop)
                emitter.done(i, results[i])
        return [results[i] for i in range(len(found))]

    def _died(self, path: str, how: str, finished: Sequence[str]) -> Outcome:
        """The row of a checkpoint whose worker process died, and what that worker left cleared.

        That is its temporary file, and the old files of the checkpoints it had
        just finished, which it may not have deleted yet.
        """
        from ..formats import locked_for_writing

        for left in (path, *finished):
            with contextlib.suppress(CkptMigrateError, OSError), locked_for_writing(left):
                pass
        return Outcome(
            path,
            FAILED,
            error=f"the worker process running it {how}; the checkpoint is whole, "
            "the old one or the new one",
            hint=f"'ckptmigrate current {path}' says which; run the command on it alone to see "
            "why it died",
            bytes=_size(path),
        )

    def _one(self, item: Found, work: Work, stop: _Stop) -> Outcome:
        """Run one checkpoint with its own output streams; every failure becomes its row."""
        if item.problem is not None:
            return Outcome(item.path, FAILED, error=item.problem)
        out, err = io.StringIO(), io.StringIO()
        config = self.config.redirected(out, err)
        started = time.monotonic()
        try:
            stop.check()
            with removals_after():  # once its input is closed: see removals_after
                outcome = work(config, item.path, stop)
        except Interrupted as exc:
            outcome = Outcome(item.path, INTERRUPTED, error=exc.message, hint=exc.hint)
        except CkptMigrateError as exc:
            outcome = Outcome(
                item.path,
                FAILED,
                error=_one_line(exc.message),
                hint=exc.hint,
                bytes=_size(item.path),
            )
        except Exception as exc:  # a bug: this row says so, the others go on
            outcome = Outcome(
                item.path,
                FAILED,
                error=f"internal error: {type(exc).__name__}: {exc} (run the command on this "
                "checkpoint alone with --traceback, and report it)",
            )
        outcome.seconds = time.monotonic() - started
        outcome.log, outcome.printed = err.getvalue(), out.getvalue()
        return outcome


def steps_to_heads(script_dir: ScriptDirectory, revisions: Sequence[str]) -> int:
    """How far behind a checkpoint is: the steps ``upgrade`` runs to the heads above it."""
    rmap = script_dir.revision_map
    above = {r.revision for r in rmap.descendants(rmap.revision(r) for r in revisions)}
    heads = [h for h in rmap.heads if h in above] if revisions else list(rmap.heads)
    steps = {r.revision for head in heads for r in rmap.upgrade_path(revisions, head)}
    return len(steps)


class _Stop:
    """Ctrl-C during a batch, as a flag the workers look at between tensors."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._shared: StopFlag | None = None

    def share(self) -> None:
        """Make the flag visible to worker processes forked from now on."""
        self._shared = StopFlag()
        if self._event.is_set():
            self._shared.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set() or (self._shared is not None and self._shared.is_set())

    def request(self) -> None:
        self._event.set()
        if self._shared is not None:
            self._shared.set()

    def check(self) -> None:
        if self.requested:
            raise Interrupted(
                "stopped by Ctrl-C before it was replaced; it is unchanged",
                hint="run the command again to finish the batch",
            )

    @contextlib.contextmanager
    def on_sigint(self) -> Iterator[None]:
        """The first Ctrl-C sets the flag; a second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.request()

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class _Emitter:
    """Prints each checkpoint's lines once it and every one found before it are done."""

    def __init__(self, config: Config, show_printed: bool) -> None:
        self.config = config
        self.show_printed = show_printed and config.echo
        self.waiting: dict[int, Outcome] = {}
        self.next = 0

    def done(self, index: int, outcome: Outcome) -> None:
        self.waiting[index] = outcome
        while self.next in self.waiting:
            self._print(self.waiting.pop(self.next))
            self.next += 1

    def _print(self, outcome: Outcome) -> None:
        if outcome.printed and self.show_printed:
            self.config.stdout.write(outcome.printed)
            self.config.stdout.flush()
        if outcome.log and not self.config.quiet:
            self.config.stderr.write(outcome.log)
        if outcome.status == FAILED:
            self.config.log(f"Failed {outcome.path}: {outcome.problem}")
        self.config.stderr.flush()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _size(path: str) -> int | None:
    """Bytes on disk (or on the store): the file's, or every file's in a checkpoint folder."""
    if is_url(path):
        return _stored_size(path)
    try:
        if os.path.isdir(path):
            return sum(
                os.path.getsize(os.path.join(folder, name))
                for folder, _, names in os.walk(path)
                for name in names
            )
        return os.path.getsize(path)
    except OSError:
        return None


def _stored_size(url: str) -> int | None:
    """:func:`_size` for a URL, from the store's listings."""
    try:
        where = location(url)
        if where.is_file():
            return where.stat().st_size
        total, pending = 0, [where]
        while pending:
            for entry in pending.pop().iterdir():
                if entry.is_dir():
                    pending.append(entry)
                else:
                    total += entry.stat().st_size
        return total
    except (OSError, CkptMigrateError):
        return None
