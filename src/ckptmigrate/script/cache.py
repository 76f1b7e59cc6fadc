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

The cache is one JSON file in ``<script_location>/.ckptmigrate-cache/``
(ignored by git through the ``.gitignore`` written beside it), replaced
atomically, so concurrent processes each read a complete file; a damaged or
foreign file is ignored and rebuilt. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_DIR = ".ckptmigrate-cache"
_FILE = "headers.json"
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


def file_key(st: os.stat_result) -> FileKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


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
        payload = {"format": _FORMAT, "entries": raw}
        tmp = self.folder / f".{_FILE}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            self._prepare_folder()
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError:  # a read-only folder, a full disk: the cache is only a cache
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self._stored = raw
        self._hits = set(raw)
        self._refresh = False

    def _prepare_folder(self) -> None:
        self.folder.mkdir(exist_ok=True)
        for name, text in ((".gitignore", _GITIGNORE), ("CACHEDIR.TAG", _CACHEDIR_TAG)):
            marker = self.folder / name
            if not marker.exists():
                marker.write_text(text, encoding="utf-8")
