"""The Python API for checkpoint files: the command line's checkpoint commands as functions.

``location`` is the migrations folder, or the ini/pyproject file naming it;
when omitted the configuration is found as on the command line. The keyword
options are the command line's flags (see
:class:`~ckptmigrate.runtime.options.MigrationOptions`), so nothing the CLI can
do is out of reach from Python. Results are returned, not printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import command
from .config import Config
from .runtime.options import CheckpointKwargs, MigrationKwargs, PathLike

if TYPE_CHECKING:
    from typing import Unpack

    from .runtime.report import MigrationResult

__all__ = ["current", "downgrade", "stamp", "upgrade"]


def _config(location: PathLike | None, quiet: bool, **streams: Any) -> Config:
    if location is None:
        return Config.discover(quiet=quiet, echo=False, **streams)
    return Config.from_location(location, quiet=quiet, echo=False, **streams)


def upgrade(
    checkpoint: PathLike,
    target: str = "head",
    *,
    location: PathLike | None = None,
    quiet: bool = True,
    **options: Unpack[MigrationKwargs],
) -> MigrationResult:
    """Upgrade a checkpoint to ``target``, in place unless ``output=``.

    ``options``: ``output``, ``from_revision``, ``dry_run``, ``force``,
    ``keep_wrapper_prefix``, ``verify``, ``jobs``, ``durable``,
    ``trust_pickle``, ``state_dict_key``, ``key_prefix``.
    """
    return command.upgrade(_config(location, quiet), checkpoint, target, **options)


def downgrade(
    checkpoint: PathLike,
    target: str,
    *,
    location: PathLike | None = None,
    quiet: bool = True,
    **options: Unpack[MigrationKwargs],
) -> MigrationResult:
    """Downgrade a checkpoint to ``target``, in place unless ``output=`` (options as upgrade's)."""
    return command.downgrade(_config(location, quiet), checkpoint, target, **options)


def stamp(
    checkpoint: PathLike,
    revision: str | Sequence[str],
    *,
    location: PathLike | None = None,
    purge: bool = False,
    quiet: bool = True,
    **options: Unpack[MigrationKwargs],
) -> tuple[str, ...]:
    """Record ``revision`` (or several) without migrating; checked against the file's schema.

    ``options``: ``output``, ``force``, ``keep_wrapper_prefix``, ``verify``,
    ``durable``, ``trust_pickle``, ``state_dict_key``, ``key_prefix``.
    """
    revisions = [revision] if isinstance(revision, str) else list(revision)
    return command.stamp(_config(location, quiet), checkpoint, revisions, purge=purge, **options)


def current(
    checkpoint: PathLike,
    *,
    location: PathLike | None = None,
    **options: Unpack[CheckpointKwargs],
) -> tuple[str, ...]:
    """The revision id(s) recorded in (or identified for) a checkpoint."""
    return command.current(_config(location, True), checkpoint, **options)
