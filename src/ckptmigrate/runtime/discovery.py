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

A URL (``s3://bucket/runs/``) is searched the same way through the storage
layer's listings (:func:`~ckptmigrate.formats.storage.location`), so a tree
of checkpoints on a store is a fleet like a local one; local paths keep
``os.walk``.

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
from typing import TYPE_CHECKING

from ..errors import CheckpointError, CkptMigrateError
from ..formats import formats, location, recognised
from ..formats.base import FileFormat
from ..formats.storage import is_url

if TYPE_CHECKING:
    from ..formats.remote import RemotePath

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
    if is_url(path):
        local = _local(path)
        if local is not None:
            return is_search(local)
        folder = _remote(path)
        return folder is not None and folder.is_dir() and recognised(folder) is None
    return os.path.isdir(path) and recognised(path) is None


def is_one_checkpoint(paths: Sequence[str]) -> bool:
    """One PATH naming one checkpoint (not a directory to search, nor a glob to expand)."""
    if len(paths) != 1:
        return False
    path = paths[0]
    if is_url(path):
        return not _GLOB & set(path) and not is_search(path)
    if not os.path.lexists(path):
        return not _GLOB & set(path)
    return not is_search(path)


def find_checkpoints(paths: Sequence[str], patterns: Sequence[str] = ()) -> Search:
    """Every checkpoint under ``paths``, in the order given, directories sorted by name."""
    search = Search()
    seen: set[str] = set()
    suffixes = checkpoint_suffixes()

    def add(found: Found) -> None:
        key = found.path
        if found.problem is None:
            key = key.rstrip("/") if is_url(key) else os.path.realpath(key)
        if key not in seen:
            seen.add(key)
            search.found.append(found)

    for path in paths:
        for item in _expand(path):
            if item.problem is None and is_search(item.path):
                hits = sorted(_walk_any(item.path, patterns, suffixes), key=lambda f: f.path)
                if not any(f.problem is None for f in hits):
                    search.empty.append(item.path)
                for hit in hits:
                    add(hit)
            else:
                add(item)
    return search


def _expand(path: str) -> list[Found]:
    """A PATH as named; a glob the shell did not expand (quoted) matched here."""
    if is_url(path):
        return _expand_remote(path)
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


def _walk_any(root: str, patterns: Sequence[str], suffixes: Sequence[str]) -> Iterator[Found]:
    """The search below a local directory, a ``file://`` URL's (named by the URL), or a store's."""
    if not is_url(root):
        yield from _walk(root, patterns, suffixes)
        return
    local = _local(root)
    if local is None:
        yield from _walk_remote(root, patterns, suffixes)
        return
    for found in _walk(local, patterns, suffixes):
        below = found.path[len(local) :] if found.path.startswith(local) else found.path
        yield Found(root.rstrip("/") + below, found.problem)


def _local(url: str) -> str | None:
    """The local path a ``file://`` URL names (None for any other URL)."""
    if not url.lower().startswith("file://"):
        return None
    return str(location(url))  # a Path: storage reads file:// URLs as local paths


def _remote(url: str) -> RemotePath | None:
    """The store location a URL names (None for ``file://``, a local path, or no fsspec:
    opening it then says why)."""
    try:
        where = location(url)
    except CheckpointError:
        return None
    return None if isinstance(where, os.PathLike) else where


def _expand_remote(url: str) -> list[Found]:
    """A URL as named, or its glob matched one path component at a time (no ``**``)."""
    root = _remote(url)
    if root is None or not _GLOB & set(url):
        return [Found(_owning_remote(url))]
    if root.exists():
        return [Found(_owning_remote(url))]
    scheme, rest = url.split("://", 1)
    parts = rest.rstrip("/").split("/")
    fixed = next(i for i, part in enumerate(parts) if _GLOB & set(part))
    base = f"{scheme}://{'/'.join(parts[:fixed])}"
    matches = [(base, _remote(base))]
    for part in parts[fixed:]:
        step: list[tuple[str, RemotePath | None]] = []
        for text, where in matches:
            if where is None or not where.is_dir():
                continue
            if _GLOB & set(part):  # as the shell: a wildcard matches no leading dot
                hidden = part.startswith(".")
                children = [c for c in where.glob(part) if hidden or not c.name.startswith(".")]
            else:
                children = [where / part]
            step += [(f"{text}/{child.name}", child) for child in children if child.exists()]
        matches = step
    if not matches:
        return [Found(url, f"no file matches {url}")]
    return [Found(_owning_remote(text)) for text, _ in sorted(matches)]


def _owning_remote(url: str) -> str:
    """:func:`_owning_folder` for a URL."""
    where = _remote(url)
    if where is None or not where.is_file():
        return url
    fmt = recognised(where.parent)
    if fmt is not None and not isinstance(fmt, FileFormat):
        return url.rstrip("/").rsplit("/", 1)[0]
    return url


def _walk_remote(root: str, patterns: Sequence[str], suffixes: Sequence[str]) -> Iterator[Found]:
    """:func:`_walk` on a store: its listings, folder by folder, named below the URL given."""
    top = _remote(root)
    if top is None:  # pragma: no cover - is_search said it was a folder on a store
        return
    pending: list[tuple[str, RemotePath]] = [("", top)]
    while pending:
        below, folder = pending.pop()
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except CkptMigrateError as exc:  # a listing refused: that folder's row says why
            yield Found(_join(root, below), f"cannot search {_join(root, below)}: {exc}")
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            rel = _join(below, name)
            path = _join(root, rel)
            if entry.is_dir():
                if recognised(entry) is not None:
                    if _wanted(rel, name, patterns, default=True):
                        yield Found(path)
                else:
                    pending.append((rel, entry))
            else:
                default = os.path.splitext(name)[1].lower() in suffixes
                if _wanted(rel, name, patterns, default=default):
                    yield Found(path)


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
                if _wanted(os.path.relpath(path, root), name, patterns, default=True):
                    yield Found(path)
            elif not os.path.islink(path):
                descend.append(name)
        dirs[:] = descend
        for name in files:
            if name.startswith("."):
                continue
            path = _join(folder, name)
            default = os.path.splitext(name)[1].lower() in suffixes
            if _wanted(os.path.relpath(path, root), name, patterns, default=default):
                yield Found(path)
    yield from problems


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if folder else name


def _wanted(below: str, name: str, patterns: Sequence[str], *, default: bool) -> bool:
    """``--pattern``: a glob on the name, or on the path below the PATH when it has a ``/``."""
    if not patterns:
        return default
    return any(
        fnmatch.fnmatchcase(below if "/" in pattern else name, pattern) for pattern in patterns
    )
