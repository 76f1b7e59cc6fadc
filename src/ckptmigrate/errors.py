"""One exception family for everything a user can get wrong.

The command line turns any :class:`CkptMigrateError` into a single
``Error: <what> <how to fix>`` line and exit status 1, so every message here is
written for a person: what is wrong, then what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class CkptMigrateError(Exception):
    """Base of every error ckptmigrate raises on purpose."""

    def __init__(
        self, message: str, *, hint: str | None = None, traceback_helps: bool = False
    ) -> None:
        self.message = message
        self.hint = hint
        # The Python traceback says more (an exception inside a revision script):
        # the command line then offers --traceback, unless it was given.
        self.traceback_helps = traceback_helps
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            hint = " ".join(self.hint.split())
            text = f"{text.rstrip('.')}; {hint}" if text else hint
        return text


class ConfigError(CkptMigrateError):
    """The configuration file is missing, unreadable or incomplete."""


class CommandError(CkptMigrateError):
    """A command was asked for something it cannot do."""


class RevisionError(CkptMigrateError):
    """Problems with the revision graph or a revision identifier."""


class ResolutionError(RevisionError):
    """A revision identifier does not name exactly one revision."""

    def __init__(self, message: str, argument: str, *, hint: str | None = None) -> None:
        self.argument = argument
        super().__init__(message, hint=hint)


class MultipleHeads(RevisionError):
    """A single head was asked for but the graph (or a branch) has several."""

    def __init__(self, heads: Sequence[str], argument: str) -> None:
        self.heads = tuple(heads)
        self.argument = argument
        super().__init__(
            f"multiple heads are present for '{argument}': {', '.join(self.heads)}",
            hint=(
                "name one of them, use '<branch>@head' to narrow to a branch, "
                "'heads' for all heads, or join them with 'ckptmigrate merge heads -m ...'"
            ),
        )


class RangeNotAncestorError(RevisionError):
    """Two revisions were used as a range but are not on one line of history."""

    def __init__(self, lower: str | None, upper: str | None, message: str | None = None) -> None:
        self.lower = lower
        self.upper = upper
        super().__init__(
            message
            or f"revision {lower or 'base'} is not an ancestor of revision {upper or 'base'}"
        )


class CycleDetected(RevisionError):
    """``down_revision`` (or ``depends_on``) links form a loop."""

    kind = "cycle"

    def __init__(self, revisions: Iterable[str]) -> None:
        self.revisions = tuple(revisions)
        super().__init__(
            f"{self.kind} detected in revisions ({', '.join(self.revisions)})",
            hint="fix the down_revision/depends_on values of these revision files",
        )


class DependencyCycleDetected(CycleDetected):
    kind = "dependency cycle"


class ScriptError(CkptMigrateError):
    """A revision script is broken: bad syntax, missing variables, or it raised."""


class OperationError(CkptMigrateError):
    """An ``op`` call's precondition failed while a revision ran."""

    def __init__(
        self,
        message: str,
        *,
        revision: str | None = None,
        location: str | None = None,
        nearest: Sequence[str] = (),
        hint: str | None = None,
    ) -> None:
        self.revision = revision
        self.location = location
        self.nearest = tuple(nearest)
        where = ""
        if revision:
            where = f"revision {revision}"
            if location:
                where += f" ({location})"
            where += ": "
        text = where + message
        if self.nearest:
            text += "; nearest existing keys: " + ", ".join(self.nearest)
        super().__init__(text, hint=hint)


class CheckpointError(CkptMigrateError):
    """A checkpoint file cannot be read, is damaged, or is not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle needs globals outside PyTorch's weights-only allow-list."""


class StampError(CheckpointError):
    """The revision recorded in a checkpoint is missing, unknown or too new."""


class ClaimError(StampError):
    """A checkpoint's keys, shapes or dtypes contradict the revision claimed for it.

    The claim is ``--from``, the revision given to ``stamp``, or the stamp the
    file carries; ``--force`` overrides.
    """


class WriteError(CkptMigrateError):
    """Writing the output failed; the input is untouched."""


class Interrupted(CkptMigrateError):
    """Ctrl-C stopped a batch before this checkpoint was switched: it is as it was."""


class LoadError(CkptMigrateError, RuntimeError):
    """A state dict does not fit the model even after migration.

    Also a RuntimeError, like PyTorch's own load_state_dict failures, so
    existing ``except RuntimeError`` handlers keep working.
    """


class LineageWarning(UserWarning):
    """A versioned class's lineage cannot name its revision (two heads, no folder, ...).

    A warning, not an error: saving goes on (unstamped), so a training job is
    never stopped at its checkpoint by the state of its migrations folder.
    """


class CheckFailed(CommandError):
    """``check`` found problems (already printed); the CI gate fails."""
