"""Which checkpoints the PATHs of a fleet command stand for.

A PATH is a checkpoint file, a checkpoint folder, or a directory to search.
What counts as a checkpoint folder is the formats registry's answer: a
folder some registered format recognises (a sharded checkpoint's, and any
folder layout registered later) is one checkpoint, never searched as a pile
of shards; a file named inside such a folder stands for the folder. Any
other directory is searched recursively for files with a registered
format's suffix (``--pattern GLOB`` instead), skipping hidden names, which
is also where an interrupted write's temporary files live. A PATH with glob
characters that names nothing is expanded as the shell would, so quoted
globs work too.

Found paths keep the spelling of the PATH they were found under (joined
with ``/``), so messages name them as the user would, and nothing here
needs more of a path than to list, stat and join it. Importing this module
does not import torch.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..formats import formats, recognised
from ..formats.base import FileFormat

_GLOB = frozenset("*?[")


@dataclass(frozen=True)
class Found:
    """One checkpoint to run on; ``problem`` says why it cannot even be tried."""

    path: str
    problem: str | None = None


@dataclass
class Search:
    """The checkpoints the PATHs stand for, in order, each once."""

    found: list[Found] = field(default_factory=list)
    #: Directories searched that held no checkpoint (for a note).
    empty: list[str] = field(default_factory=list)


def checkpoint_suffixes() -> tuple[str, ...]:
    """What a directory search picks up without ``--pattern``: every format's suffixes."""
    return tuple(sorted({s for fmt in formats() for s in fmt.suffixes}))


def is_search(path: str) -> bool:
    """A directory that no format owns: searched for checkpoints, not opened as one."""
    return os.path.isdir(path) and recognised(path) is None


def is_one_checkpoint(paths: Sequence[str]) -> bool:
    """One PATH naming one checkpoint (not a directory to search, nor a glob to expand)."""
    if len(paths) != 1:
        return False
    path = paths[0]
    if not os.path.lexists(path):
        return not _GLOB & set(path)
    return not is_search(path)


def find_checkpoints(paths: Sequence[str], patterns: Sequence[str] = ()) -> Search:
    """Every checkpoint under ``paths``, in the order given, directories sorted by name."""
    search = Search()
    seen: set[str] = set()
    suffixes = checkpoint_suffixes()

    def add(found: Found) -> None:
        key = os.path.realpath(found.path) if found.problem is None else found.path
        if key not in seen:
            seen.add(key)
            search.found.append(found)

    for path in paths:
        for item in _expand(path):
            if item.problem is None and is_search(item.path):
                hits = sorted(_walk(item.path, patterns, suffixes), key=lambda f: f.path)
                if not any(f.problem is None for f in hits):
                    search.empty.append(item.path)
                for hit in hits:
                    add(hit)
            else:
                add(item)
    return search


def _expand(path: str) -> list[Found]:
    """A PATH as named; a glob the shell did not expand (quoted) matched here."""
    if os.path.lexists(path) or not _GLOB & set(path):
        return [Found(_owning_folder(path))]
    matches = sorted(glob.glob(path, recursive=True))
    if not matches:
        return [Found(path, f"no file matches {path}")]
    return [Found(_owning_folder(m)) for m in matches]


def _owning_folder(path: str) -> str:
    """A file inside a checkpoint folder (a shard) stands for the folder."""
    if not os.path.isfile(path):
        return path
    parent = os.path.dirname(path)
    fmt = recognised(parent or ".")
    if fmt is not None and not isinstance(fmt, FileFormat):
        return parent or "."
    return path


def _walk(root: str, patterns: Sequence[str], suffixes: Sequence[str]) -> Iterator[Found]:
    """Checkpoint files and folders below ``root`` (symbolic links to folders not followed)."""
    problems: list[Found] = []

    def unreadable(exc: OSError) -> None:
        where = exc.filename or root
        problems.append(Found(where, f"cannot search {where}: {exc.strerror or exc}"))

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        descend = []
        for name in sorted(dirs):
            if name.startswith("."):
                continue
            path = _join(folder, name)
            if recognised(path) is not None:
                if _wanted(root, path, name, patterns, default=True):
                    yield Found(path)
            elif not os.path.islink(path):
                descend.append(name)
        dirs[:] = descend
        for name in files:
            if name.startswith("."):
                continue
            path = _join(folder, name)
            default = os.path.splitext(name)[1].lower() in suffixes
            if _wanted(root, path, name, patterns, default=default):
                yield Found(path)
    yield from problems


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if folder else name


def _wanted(root: str, path: str, name: str, patterns: Sequence[str], *, default: bool) -> bool:
    """``--pattern``: a glob on the name, or on the path below the PATH when it has a ``/``."""
    if not patterns:
        return default
    below = os.path.relpath(path, root)
    return any(
        fnmatch.fnmatchcase(below if "/" in pattern else name, pattern) for pattern in patterns
    )
