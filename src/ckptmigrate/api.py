"""The Python API for files: upgrade, downgrade, stamp and inspect checkpoints.

``location`` is the migrations folder, or the ini/pyproject file naming it;
when omitted the configuration is found as on the command line.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from . import command
from .config import Config

if TYPE_CHECKING:
    from typing import Unpack

    from .command import MigrationOptions, MigrationResult

PathLike = str | os.PathLike[str]


def _config(location: PathLike | None, quiet: bool, **streams: Any) -> Config:
    if location is None:
        return Config.discover(quiet=quiet, **streams)
    return Config.from_location(location, quiet=quiet, **streams)


def upgrade(
    checkpoint: PathLike,
    target: str = "head",
    *,
    location: PathLike | None = None,
    quiet: bool = True,
    **options: Unpack[MigrationOptions],
) -> MigrationResult:
    """Upgrade a checkpoint file to ``target``, in place unless ``output=``.

    ``options`` are the command line's: ``output``, ``from_revision``,
    ``dry_run``, ``state_dict_key``, ``key_prefix``, ``verify``, ``jobs``,
    ``durable``, ``trust_pickle``, ``force``, ``keep_wrapper_prefix``.
    """
    return command.upgrade(_config(location, quiet), checkpoint, target, **options)


def downgrade(
    checkpoint: PathLike,
    target: str,
    *,
    location: PathLike | None = None,
    quiet: bool = True,
    **options: Unpack[MigrationOptions],
) -> MigrationResult:
    """Downgrade a checkpoint file to ``target``, in place unless ``output=``."""
    return command.downgrade(_config(location, quiet), checkpoint, target, **options)


def stamp(
    checkpoint: PathLike,
    revision: str,
    *,
    location: PathLike | None = None,
    output: PathLike | None = None,
    quiet: bool = True,
    force: bool = False,
    keep_wrapper_prefix: bool = False,
) -> tuple[str, ...]:
    """Record ``revision`` in the checkpoint without migrating it.

    Raises :class:`ckptmigrate.errors.ClaimError` when the file's schema is not
    the schema at ``revision``, unless ``force``.
    """
    return command.stamp(
        _config(location, quiet),
        checkpoint,
        [revision],
        output=output,
        force=force,
        keep_wrapper_prefix=keep_wrapper_prefix,
    )


def current(checkpoint: PathLike, *, location: PathLike | None = None) -> tuple[str, ...]:
    """The revision id(s) recorded in (or identified for) a checkpoint."""
    import io

    return command.current(_config(location, True, stdout=io.StringIO()), checkpoint)
