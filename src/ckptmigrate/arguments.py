"""How a checkpoint command's arguments split into PATHs and its TARGET.

``upgrade PATH... [TARGET]``, ``downgrade PATH... TARGET`` and
``stamp PATH... REV...`` take the revision(s) last, as Alembic users type
them (``ckptmigrate downgrade runs/ -1``). Which trailing arguments are
revisions, in this order:

1. With ``--to``, every argument is a PATH.
2. The first argument is always a PATH.
3. From the end, an argument is a revision unless it is a path: it exists,
   or it has a character no revision target has (targets are letters,
   digits, ``_``, ``@``, ``+``, ``-`` and ``,``; a path with a ``/`` or a
   suffix never is one). ``upgrade`` and ``downgrade`` take one, ``stamp``
   several.
4. An existing path that is also a revision of this lineage (a file named
   ``head``) is refused as ambiguous, with both ways to say which is meant.

So ``upgrade a.pt b.pt`` upgrades two files to head, ``upgrade a.pt head``
one, and a missing ``c.pt`` is reported as a missing checkpoint, not taken
for a revision. Torch is not imported here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import click

from .config import Config
from .errors import CkptMigrateError

_TARGET = re.compile(r"[A-Za-z0-9_@+,-]+")
_RELATIVE = re.compile(r"-\d+")


def check_options(ctx: click.Context, args: Sequence[str]) -> None:
    """Unknown options reach the arguments (so that ``-1`` can): tell them apart."""
    for arg in args:
        if arg.startswith("-") and not _RELATIVE.fullmatch(arg):
            raise click.NoSuchOption(arg, ctx=ctx)


def split_revisions(
    ctx: click.Context,
    args: Sequence[str],
    *,
    most: int | None,
    names_revision: Callable[[str], bool],
) -> tuple[list[str], list[str]]:
    """(paths, revisions): the trailing revision targets, at most ``most`` of them."""
    end = len(args)
    while end > 1 and (most is None or len(args) - end < most):
        arg = args[end - 1]
        if not _TARGET.fullmatch(arg):
            break
        if os.path.lexists(arg):
            if names_revision(arg):
                raise click.UsageError(
                    f"{arg!r} is both a path and a revision: write ./{arg} for the path, "
                    f"or --to {arg} for the revision",
                    ctx,
                )
            break
        end -= 1
    paths, revisions = list(args[:end]), list(args[end:])
    for path in paths:
        if _RELATIVE.fullmatch(path) and not os.path.lexists(path):
            raise click.UsageError(f"{path} is a relative TARGET: put it after the paths", ctx)
    return paths, revisions


def revision_namer(config: Config) -> Callable[[str], bool]:
    """Whether an argument names a revision of the configured lineage (read when first asked)."""

    def names_revision(arg: str) -> bool:
        from .script.directory import ScriptDirectory

        if arg in ("base", "head", "heads"):
            return True
        try:
            return any(ScriptDirectory.from_config(config).get_revisions(arg))
        except CkptMigrateError:
            return False

    return names_revision
