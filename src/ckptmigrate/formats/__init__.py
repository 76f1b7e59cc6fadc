"""Checkpoint formats: open any checkpoint lazily as a :class:`Checkpoint`, write one atomically.

Every read and write goes through the registry (:mod:`.base`): the format
that recognises a path opens it, and the format an output path calls for
writes it. Callers ask a checkpoint what it holds, never which format it is.

Importing this package does not import torch: paths are recognised from
their names and first bytes (:mod:`.probe`) before any reader that needs
torch is loaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .atomic import check_target
from .base import (
    FileFormat,
    Format,
    Peekable,
    ReadOptions,
    WriteOptions,
    formats,
    output_format,
    recognise,
    register,
    unregister,
)
from .checkpoint import Checkpoint, Header, TrainingContainer
from .stamp import write_stamp
from .storage import location

if TYPE_CHECKING:
    from typing import TypeAlias

    from ..plan.state import PlanState
    from .storage import CkptPath

    PathLike: TypeAlias = str | os.PathLike[str] | CkptPath

__all__ = [
    "Checkpoint",
    "FileFormat",
    "Format",
    "Header",
    "ReadOptions",
    "TrainingContainer",
    "WriteOptions",
    "check_output",
    "check_output_path",
    "formats",
    "location",
    "lock_path",
    "open_checkpoint",
    "peek_checkpoint",
    "read_checkpoint",
    "recognised",
    "recover",
    "register",
    "unregister",
    "write_checkpoint",
]

_DEFAULT_WRITE = WriteOptions()


def open_checkpoint(path: PathLike, options: ReadOptions | None = None) -> Checkpoint:
    """Open a checkpoint of any registered format without reading tensor data."""
    p = location(path)
    return recognise(p).open(p, options or ReadOptions())


def peek_checkpoint(path: PathLike, options: ReadOptions | None = None) -> Header | None:
    """What a checkpoint records about itself, read without torch where its format can.

    None when only opening it can tell (its format has no ``peek``, or the
    file needs more than a look: it has no stamp, or something is unusual);
    a path that is no checkpoint at all raises, as :func:`open_checkpoint` does.
    """
    p = location(path)
    fmt = recognise(p)
    return fmt.peek(p, options or ReadOptions()) if isinstance(fmt, Peekable) else None


def read_checkpoint(
    path: PathLike,
    *,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
) -> Checkpoint:
    """:func:`open_checkpoint` with the options spelled out."""
    return open_checkpoint(path, ReadOptions(trust_pickle, state_dict_key))


def _format_for(target: CkptPath, source: Checkpoint) -> Format:
    return output_format(target, source.format) or source.format


def check_output(
    target: PathLike, source: Checkpoint, options: WriteOptions = _DEFAULT_WRITE
) -> None:
    """Refuse an output ``source`` cannot be written to, before any work is done on it."""
    out = location(target)
    fmt = _format_for(out, source)
    if fmt.holds_only_tensors and source.training is not None:
        others = ", ".join(map(repr, source.training.others()))
        raise CheckpointError(
            f"{out}: a {fmt.name} file holds only tensors, but {source.path} is a training "
            f"checkpoint with other entries ({others})",
            hint=f"write a {_suffix_of(lambda f: not f.holds_only_tensors)} output, "
            "or save the state dict alone first",
        )
    if options.keep_wrapper_prefix and source.wrapper_prefix and not fmt.keeps_wrapper_prefix:
        able = [f for f in formats() if f.keeps_wrapper_prefix]
        raise CheckpointError(
            f"{out}: --keep-wrapper-prefix puts {source.wrapper_prefix!r} back only into "
            f"{' and '.join(f.name + ' files' for f in able)}, not into {fmt.name} output",
            hint=f"write a {_suffix_of(lambda f: f.keeps_wrapper_prefix)} output, "
            "or leave out --keep-wrapper-prefix",
        )


def _suffix_of(able: Callable[[Format], bool]) -> str:
    """The output suffix of the first format that can do what a hint asks for."""
    return next(f.suffixes[0] for f in formats() if able(f) and f.suffixes)


def write_checkpoint(
    target: PathLike,
    source: Checkpoint,
    state: PlanState,
    revisions: tuple[str, ...] | None,
    options: WriteOptions = _DEFAULT_WRITE,
) -> None:
    """Write ``state`` (evaluated against ``source``) to ``target`` atomically.

    ``state`` holds the lineage's entries (relative to ``source.key_prefix``);
    the rest of the file is carried through (``options.container``, when
    given, replaces the training container the state dict is put back into).
    ``revisions`` is the stamp to record: ``()`` means at base, None removes it.
    """
    out = location(target)
    check_output(out, source, options)
    full = source.file_state(state)
    metadata = {k: dict(v) for k, v in full.metadata.items()}
    write_stamp(metadata.setdefault(source.key_prefix[:-1], {}), revisions)
    _format_for(out, source).write(out, source, full, metadata, options)


def recognised(path: PathLike) -> Format | None:
    """The format that owns ``path``, or None (no checkpoint there, or no such path)."""
    try:
        return recognise(location(path))
    except CheckpointError:
        return None


def lock_path(path: PathLike) -> CkptPath:
    """The file a writer of ``path`` locks (a sharded folder's index; a file itself)."""
    p = location(path)
    fmt = recognised(p)
    return fmt.lock_path(p) if fmt is not None else p


def recover(path: PathLike) -> list[str]:
    """Clear what killed writers of ``path`` left; call it holding the writer's lock."""
    p = location(path)
    fmt = recognised(p)
    finish = getattr(fmt, "recover", None)
    return list(finish(p)) if finish is not None else []


@contextlib.contextmanager
def locked_for_writing(
    path: PathLike, notify: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Be ``path``'s one writer, with what killed writers left beside it cleared first."""
    from .lock import locked

    target = lock_path(path)
    with locked(target, notify=notify):
        if target.exists():
            recover(target)
        yield


def check_output_path(checkpoint: PathLike, output: PathLike | None) -> None:
    """Refuse an ``-o`` path nothing can be written at, before anything is read or locked."""
    if output is None:
        return
    out = location(output)
    fmt = output_format(
        out, recognised(location(checkpoint))
    )  # unreadable input: its read says why
    if fmt is not None:
        fmt.check_target(out)
    else:
        check_target(out)
