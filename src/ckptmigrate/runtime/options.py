"""The options of the checkpoint commands, as one frozen object.

The command line, ``ckptmigrate.command`` and the Python API (``ckptmigrate.upgrade``
...) build the same :class:`MigrationOptions` once and hand it down whole, so
every option the CLI has reaches the run without being threaded through
layers of keyword arguments, and the API cannot fall behind the CLI.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, TypedDict

from ..errors import CommandError

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class CheckpointOptions:
    """How a checkpoint is read (every checkpoint command)."""

    #: allow arbitrary pickles: runs code from the file, only for files you trust
    trust_pickle: bool = False
    #: where the weights sit in a training container (default: found by itself)
    state_dict_key: str | None = None
    #: the lineage's keys sit under this prefix (e.g. ``model.`` in a Lightning file)
    key_prefix: str | None = None


@dataclass(frozen=True)
class MigrationOptions(CheckpointOptions):
    """How a checkpoint is rewritten (``upgrade``, ``downgrade`` and ``stamp``)."""

    #: write here and leave the input untouched (default: rewrite it in place)
    output: PathLike | None = None
    #: treat the checkpoint as being at this revision (checked against its schema)
    from_revision: str | None = None
    #: print the plan and write nothing
    dry_run: bool = False
    #: go ahead where the file's schema contradicts the revision it is said to be at
    force: bool = False
    #: write the keys back behind the input's ``module.``/``_orig_mod.`` prefix
    keep_wrapper_prefix: bool = False
    #: check the written file against the plan before it replaces anything
    verify: bool = True
    #: writers at once: checkpoints in parallel in a batch; the rest, or all of them
    #: for one checkpoint, write a sharded checkpoint's shards in parallel
    jobs: int = 1
    #: fsync before the switch; None: only when rewriting in place (the only copy)
    durable: bool | None = None

    def reading(self) -> CheckpointOptions:
        return CheckpointOptions(self.trust_pickle, self.state_dict_key, self.key_prefix)


class CheckpointKwargs(TypedDict, total=False):
    """:class:`CheckpointOptions` as keyword arguments (for type checkers)."""

    trust_pickle: bool
    state_dict_key: str | None
    key_prefix: str | None


class MigrationKwargs(CheckpointKwargs, total=False):
    """:class:`MigrationOptions` as keyword arguments (for type checkers)."""

    output: PathLike | None
    from_revision: str | None
    dry_run: bool
    force: bool
    keep_wrapper_prefix: bool
    verify: bool
    jobs: int
    durable: bool | None


def make_options(kind: type[CheckpointOptions], given: dict[str, Any]) -> Any:
    """``kind(**given)``, with a misspelt option reported as one, not as a TypeError."""
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise CommandError(
            f"unknown option{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
            hint=f"the options are: {', '.join(sorted(names))}",
        )
    return kind(**given)
