"""A cache of parsed revision headers that cannot go stale.

Listing a long history re-reads and re-parses every revision file; the header
variables of 10,000 files take over a second to parse, on every command. This
cache keeps each file's parsed header under the file's name together with its
size, ``mtime_ns``, ``ctime_ns`` and inode number. An entry is used only when
all of them still match, so an edited, replaced, renamed or restored file is
parsed again; ``ctime`` changes whenever a file's contents do and cannot be set
back by tools that preserve modification times (``cp -p``, ``rsync -a``,
``tar``).

A file changed twice within the file system's timestamp resolution could keep
its size and times, so, as git does for its index, an entry whose times are
not at least :data:`RACY_NS` older than the cache file itself is not trusted.

Beside the headers lies the graph built from them (:class:`GraphCache`), kept
for exactly one version of the folder: the names and keys of all its files.

Each cache is one file of JSON in ``<script_location>/.ckptmigrate-cache/``
(ignored by git through the ``.gitignore`` written beside it), replaced
atomically, so concurrent processes each read a complete file; a damaged or
foreign file is ignored and rebuilt. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__

CACHE_DIR = ".ckptmigrate-cache"
_FILE = "headers.json"
_GRAPH_FILE = "graph.json"
_FORMAT = 1
#: Entries whose file changed less than this before the cache was written are re-read.
RACY_NS = 2_000_000_000
_GITIGNORE = "# Created by ckptmigrate: a cache of parsed revision headers.\n*\n"
_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by ckptmigrate.\n"
)

#: (size, mtime_ns, ctime_ns, inode): what identifies one version of a file.
FileKey = tuple[int, int, int, int]


@dataclass(frozen=True)
class Header:
    """What a revision file's header says, read without running it."""

    values: dict[str, Any]  # revision, down_revision, branch_labels, depends_on, replaces
    doc: str


class HeaderCache:
    """The parsed headers of one migrations folder, keyed by file name and version."""

    def __init__(self, script_location: Path) -> None:
        self.folder = script_location / CACHE_DIR
        self.path = self.folder / _FILE
        self._stored: dict[str, Any] = {}  # name -> [size, mtime_ns, ctime_ns, inode, values, doc]
        self._trusted_before = 0
        self._refresh = False  # some entries were too new to trust: write again to age them
        self._hits: set[str] = set()

    def load(self) -> None:
        """Read the cache; anything unreadable counts as empty (entries are checked on use)."""
        try:
            with open(self.path, "rb") as fh:
                written = os.fstat(fh.fileno()).st_mtime_ns
                data = json.loads(fh.read())
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                return
            entries = data["entries"]
            if not isinstance(entries, dict):
                return
        except (OSError, ValueError, KeyError):
            return
        self._stored = entries
        self._trusted_before = written - RACY_NS

    def get(self, name: str, key: FileKey) -> Header | None:
        """The header stored for this version of ``name``, or None (then parse the file)."""
        hit = self._stored.get(name)
        try:
            size, mtime, ctime, ino, values, doc = hit  # type: ignore[misc]
        except (TypeError, ValueError):  # absent, or not an entry this code wrote
            return None
        if (size, mtime, ctime, ino) != key or not isinstance(values, dict):
            return None
        if not isinstance(doc, str):
            return None
        if max(mtime, ctime) >= self._trusted_before:
            self._refresh = True
            return None
        self._hits.add(name)
        return Header(values, doc)

    def save(self, entries: Mapping[str, tuple[FileKey, Header]]) -> None:
        """Replace the cache with ``entries`` if they differ; failing to write is no error."""
        unchanged = self._hits.issuperset(entries) and len(entries) == len(self._stored)
        if unchanged and not self._refresh:
            return
        raw = {name: [*key, header.values, header.doc] for name, (key, header) in entries.items()}
        if not _write(self.folder, _FILE, {"format": _FORMAT, "entries": raw}):
            return
        self._stored = raw
        self._hits = set(raw)
        self._refresh = False


#: The versions folder as one flat list, ``[name, *FileKey, name, *FileKey, ...]`` in name
#: order: what it is made of, compared with a stored one in one step.
Fingerprint = list[Any]


def file_keys(files: Fingerprint) -> Iterator[tuple[str, FileKey]]:
    """Each file of a :data:`Fingerprint` with its key."""
    return zip(files[0::5], zip(files[1::5], files[2::5], files[3::5], files[4::5]))


class GraphCache:
    """The revision graph built from one version of the versions folder.

    It is used only while the folder's :data:`Fingerprint` is the one it was
    built from and no file is too new to trust (:data:`RACY_NS`, as for
    headers): then no file was added, removed, renamed or edited, and the graph,
    checked when it was built, needs neither building nor checking again. A
    broken graph is never stored, so its errors come from reading the files,
    every time. What a graph is, is the caller's (``RevisionMap.snapshot``); it
    is kept only for the ckptmigrate version that wrote it.

    The file is three JSON lines: the fingerprint, a small summary (what
    ``heads`` shows) and the whole graph, which is parsed only when asked for.
    """

    def __init__(self, script_location: Path) -> None:
        self.folder = script_location / CACHE_DIR
        self.path = self.folder / _GRAPH_FILE

    def load(self, files: Fingerprint) -> StoredGraph | None:
        """The graph stored for exactly these files, or None (then build it)."""
        try:
            with open(self.path, "rb") as fh:
                written = os.fstat(fh.fileno()).st_mtime_ns
                key, summary, graph = fh.read().split(b"\n", 2)
            stored = json.loads(key)
            if stored != {"format": _FORMAT, "version": __version__, "files": files}:
                return None
            times = files[2::5] + files[3::5]  # every file's mtime_ns and ctime_ns
            if times and max(times) >= written - RACY_NS:
                return None
            found = json.loads(summary)
        except (OSError, ValueError):  # no cache, a damaged one
            return None
        return StoredGraph(found, graph) if isinstance(found, dict) else None

    def save(self, files: Fingerprint, summary: dict[str, Any], graph: dict[str, Any]) -> None:
        """Keep ``graph`` and its ``summary`` for these files; failing to write is no error."""
        key = {"format": _FORMAT, "version": __version__, "files": files}
        _write(self.folder, _GRAPH_FILE, key, summary, graph)


class StoredGraph:
    """A stored graph that matched: its summary at once, the graph when asked for."""

    def __init__(self, summary: dict[str, Any], graph: bytes) -> None:
        self.summary = summary
        self._graph = graph

    def graph(self) -> dict[str, Any] | None:
        """The whole graph, or None when what is stored is no JSON object."""
        try:
            found = json.loads(self._graph)
        except ValueError:
            return None
        return found if isinstance(found, dict) else None


def _write(folder: Path, name: str, *documents: dict[str, Any]) -> bool:
    """Replace ``folder/name`` at once with ``documents``, one JSON line each; False when
    it cannot be written."""
    tmp = folder / f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        _prepare_folder(folder)
        with open(tmp, "w", encoding="utf-8") as fh:
            # compact JSON has no line breaks: escaped inside strings, none between tokens
            fh.write("\n".join(json.dumps(doc, separators=(",", ":")) for doc in documents))
        os.replace(tmp, folder / name)
    except OSError:  # a read-only folder, a full disk: the cache is only a cache
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def _prepare_folder(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    for name, text in ((".gitignore", _GITIGNORE), ("CACHEDIR.TAG", _CACHEDIR_TAG)):
        marker = folder / name
        if not marker.exists():
            marker.write_text(text, encoding="utf-8")
