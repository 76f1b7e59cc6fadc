"""Checkpoint formats: open any checkpoint lazily as a :class:`Checkpoint`, write one atomically.

Every read and write goes through the registry (:mod:`.base`): the format
that recognises a path opens it, and the format an output path calls for
writes it. Callers ask a checkpoint what it holds, never which format it is.

Importing this package does not import torch: paths are recognised from
their names and first bytes (:mod:`.probe`) before any reader that needs
torch is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .atomic import check_target
from .base import (
    FileFormat,
    Format,
    ReadOptions,
    WriteOptions,
    formats,
    output_format,
    recognise,
    register,
    unregister,
)
from .checkpoint import Checkpoint, TrainingContainer
from .stamp import write_stamp

if TYPE_CHECKING:
    from ..plan.state import PlanState

__all__ = [
    "Checkpoint",
    "FileFormat",
    "Format",
    "ReadOptions",
    "TrainingContainer",
    "WriteOptions",
    "check_output",
    "check_output_path",
    "formats",
    "lock_path",
    "open_checkpoint",
    "read_checkpoint",
    "recognised",
    "recover",
    "register",
    "unregister",
    "write_checkpoint",
]

_DEFAULT_WRITE = WriteOptions()


def open_checkpoint(path: str | os.PathLike[str], options: ReadOptions | None = None) -> Checkpoint:
    """Open a checkpoint of any registered format without reading tensor data."""
    p = Path(path)
    return recognise(p).open(p, options or ReadOptions())


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
) -> Checkpoint:
    """:func:`open_checkpoint` with the options spelled out."""
    return open_checkpoint(path, ReadOptions(trust_pickle, state_dict_key))


def _format_for(target: Path, source: Checkpoint) -> Format:
    return output_format(target, source.format) or source.format


def check_output(
    target: str | os.PathLike[str], source: Checkpoint, options: WriteOptions = _DEFAULT_WRITE
) -> None:
    """Refuse an output ``source`` cannot be written to, before any work is done on it."""
    out = Path(target)
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
    target: str | os.PathLike[str],
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
    out = Path(target)
    check_output(out, source, options)
    full = source.file_state(state)
    metadata = {k: dict(v) for k, v in full.metadata.items()}
    write_stamp(metadata.setdefault(source.key_prefix[:-1], {}), revisions)
    _format_for(out, source).write(out, source, full, metadata, options)


def recognised(path: str | os.PathLike[str]) -> Format | None:
    """The format that owns ``path``, or None (no checkpoint there, or no such path)."""
    try:
        return recognise(Path(path))
    except CheckpointError:
        return None


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The file a writer of ``path`` locks (a sharded folder's index; a file itself)."""
    p = Path(path)
    fmt = recognised(p)
    return fmt.lock_path(p) if fmt is not None else p


def recover(path: str | os.PathLike[str]) -> list[str]:
    """Clear what killed writers of ``path`` left; call it holding the writer's lock."""
    p = Path(path)
    fmt = recognised(p)
    finish = getattr(fmt, "recover", None)
    return list(finish(p)) if finish is not None else []


def check_output_path(
    checkpoint: str | os.PathLike[str], output: str | os.PathLike[str] | None
) -> None:
    """Refuse an ``-o`` path nothing can be written at, before anything is read or locked."""
    if output is None:
        return
    out = Path(output)
    fmt = output_format(out, recognised(Path(checkpoint)))  # unreadable input: its read says why
    if fmt is not None:
        fmt.check_target(out)
    else:
        check_target(out)
