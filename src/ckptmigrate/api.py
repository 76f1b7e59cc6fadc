"""The Python API for checkpoint files: the command line's checkpoint commands as functions.

``location`` is the migrations folder, or the ini/pyproject file naming it;
when omitted the configuration is found as on the command line. The keyword
options are the command line's flags (see
:class:`~ckptmigrate.runtime.options.MigrationOptions`), so nothing the CLI can
do is out of reach from Python. Results are returned, not printed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import command
from .config import Config
from .runtime.options import CheckpointKwargs, MigrationKwargs, PathLike

if TYPE_CHECKING:
    from typing import Unpack

    from .runtime.fleet_report import FleetReport
    from .runtime.report import MigrationResult

__all__ = [
    "current",
    "current_all",
    "downgrade",
    "downgrade_all",
    "stamp",
    "stamp_all",
    "upgrade",
    "upgrade_all",
]


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


# --------------------------------------------------------------------------- many at once
#
# Each PATH is a checkpoint file, a checkpoint folder or a directory searched
# for checkpoints (``pattern``: globs on names, as ``--pattern``). They return
# the report; a checkpoint that fails is a row of it, not an exception. Ctrl-C
# stops the batch cleanly (nothing half-written) and raises KeyboardInterrupt.


def upgrade_all(
    paths: Sequence[PathLike],
    target: str = "head",
    *,
    location: PathLike | None = None,
    pattern: Sequence[str] = (),
    quiet: bool = True,
    **options: Unpack[MigrationKwargs],
) -> FleetReport:
    """Upgrade every checkpoint under ``paths``, ``jobs`` at a time (options as upgrade's)."""
    config = _config(location, quiet)
    return _done(command.upgrade_all(config, _strs(paths), target, pattern=pattern, **options))


def downgrade_all(
    paths: Sequence[PathLike],
    target: str,
    *,
    location: PathLike | None = None,
    pattern: Sequence[str] = (),
    quiet: bool = True,
    **options: Unpack[MigrationKwargs],
) -> FleetReport:
    """Downgrade every checkpoint under ``paths`` (options as upgrade's)."""
    config = _config(location, quiet)
    return _done(command.downgrade_all(config, _strs(paths), target, pattern=pattern, **options))


def stamp_all(
    paths: Sequence[PathLike],
    revision: str | Sequence[str],
    *,
    location: PathLike | None = None,
    purge: bool = False,
    pattern: Sequence[str] = (),
    quiet: bool = True,
    **options: Unpack[MigrationKwargs],
) -> FleetReport:
    """Stamp every checkpoint under ``paths``; those stamped so already are left alone."""
    revisions = [revision] if isinstance(revision, str) else list(revision)
    config = _config(location, quiet)
    report = command.stamp_all(
        config, _strs(paths), revisions, purge=purge, pattern=pattern, **options
    )
    return _done(report)


def current_all(
    paths: Sequence[PathLike],
    *,
    location: PathLike | None = None,
    pattern: Sequence[str] = (),
    **options: Unpack[CheckpointKwargs],
) -> FleetReport:
    """Each checkpoint's revision under ``paths`` and its steps to the heads (``steps``)."""
    config = _config(location, True)
    return _done(command.current_all(config, _strs(paths), pattern=pattern, **options))


def _strs(paths: Sequence[PathLike]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def _done(report: FleetReport) -> FleetReport:
    if report.interrupted:
        raise KeyboardInterrupt
    return report
