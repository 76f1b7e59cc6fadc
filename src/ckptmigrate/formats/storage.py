"""Where checkpoint files live: local paths, or any fsspec URL (``s3://``, ``gs://``, ...).

Every format reads and writes through this module, so a format works on
object storage exactly as it does on a local disk:

* :func:`location` turns what a user typed into a :class:`~pathlib.Path` or,
  for a URL, a :class:`~.remote.RemotePath` with the same path methods
  (``name``, ``parent``, ``/``, ``exists``, ``is_dir``, ``iterdir``, ...).
  ``file://`` URLs are local paths.
* :func:`open_blob` gives random access to a file's bytes: ``pread`` locally,
  one ranged GET per read on a store, so opening a checkpoint reads its
  directory and header, never the whole object.
* :func:`staged_output` is where a format writes a new file: a temporary file
  beside the target that replaces it in one ``rename``, or on a store an
  upload that becomes visible only when it is committed, so the name always
  holds the old file or the new one.
* :func:`replace_small` writes a small file (an index) atomically, refusing
  to overwrite a version other than the one that was read.

Local paths keep their fast paths (memory maps, ``copy_file_range``, fsync,
rename); nothing here imports torch, and fsspec is imported only when a URL
is given (the ``remote`` extra).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from typing import TypeAlias

    from .checkpoint import Checkpoint
    from .remote import RemotePath, Upload

    CkptPath: TypeAlias = Path | RemotePath
    #: Where a format writes a new file's bytes: a fresh local file, or an upload.
    Output: TypeAlias = Path | Upload

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://")
REMOTE_EXTRA = "pip install 'ckptmigrate[remote]'"


def is_url(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` is a URL (``s3://...``) rather than a local path."""
    return isinstance(text, str) and _URL.match(text) is not None


def is_remote(path: object) -> bool:
    """Whether ``path`` lives on a store reached through fsspec (not the local disk)."""
    return not isinstance(path, (str, os.PathLike))


def location(path: str | os.PathLike[str] | CkptPath) -> CkptPath:
    """A local :class:`Path`, or a :class:`RemotePath` for a URL (``file://`` is local)."""
    if isinstance(path, Path) or not isinstance(path, (str, os.PathLike)):
        return path  # a Path or a RemotePath already
    text = os.fspath(path)
    match = _URL.match(text)
    if match is None:
        return Path(text)
    if match.group("scheme").lower() == "file":
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(text).path))
    from .remote import remote_path

    return remote_path(text)


def local_only(path: CkptPath, what: str) -> Path:
    """``path`` as a local path, for layouts read and switched with local calls only."""
    if not isinstance(path, Path):
        from ..errors import CheckpointError

        raise CheckpointError(
            f"{path}: {what} on remote storage are not supported yet",
            hint="copy the folder to a local disk, migrate it there, and upload it",
        )
    return path


def same_location(a: CkptPath, b: CkptPath) -> bool:
    """Whether two locations name the same file (or folder)."""
    try:
        return a.resolve() == b.resolve()
    except OSError:  # pragma: no cover - resolve on a broken path
        return False


# --------------------------------------------------------------------------- reading


class Blob(Protocol):
    """Random access to one file's bytes."""

    @property
    def size(self) -> int: ...

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (fewer only at the end of the file)."""

    def close(self) -> None: ...


@dataclass
class LocalBlob:
    """A local file read with ``pread`` (no shared file position, so threads may share it)."""

    fd: int
    size: int

    def read(self, start: int, end: int) -> bytes:
        return os.pread(self.fd, max(0, end - start), start)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_blob(path: CkptPath) -> Blob:
    """The file's bytes, read by ranges: ``pread`` locally, ranged GETs on a store."""
    if isinstance(path, Path):
        fd = os.open(path, os.O_RDONLY)
        return LocalBlob(fd, os.fstat(fd).st_size)
    return path.blob()


class BlobFile(io.RawIOBase):
    """A seekable, read-only file object over a :class:`Blob` (for :mod:`zipfile`).

    The last ``tail`` bytes are fetched once when first needed, so a zip's end
    records and directory cost one request rather than one per small read.
    """

    def __init__(self, blob: Blob, *, tail: int = 1 << 16) -> None:
        super().__init__()
        self.blob = blob
        self.pos = 0
        self._tail_start = max(0, blob.size - tail)
        self._tail: bytes | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.blob.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        end = min(self.pos + len(buffer), self.blob.size)
        if end <= self.pos:
            return 0
        if self.pos >= self._tail_start:
            if self._tail is None:
                self._tail = self.blob.read(self._tail_start, self.blob.size)
            data = self._tail[self.pos - self._tail_start : end - self._tail_start]
        else:
            data = self.blob.read(self.pos, end)
        n = len(data)
        memoryview(buffer)[:n] = data
        self.pos += n
        return n


def read_head(path: CkptPath, n: int) -> bytes:
    """The first ``n`` bytes of a file (``b""`` when it is empty)."""
    if isinstance(path, Path):
        with open(path, "rb") as fh:
            return fh.read(n)
    return path.read_range(0, n)


# --------------------------------------------------------------------------- writing


class PayloadSink(Protocol):
    """An output that can take bulk bytes (tensor data) apart from structure (headers)."""

    def write_payload(self, data: bytes | memoryview) -> None: ...


def write_payload(fh: BinaryIO, data: bytes | memoryview) -> None:
    """Append tensor bytes: the parts of a file a read-back check never looks at.

    An upload keeps only the structure (headers, pickles, directories) for the
    check it runs before it commits; a local file takes them like any bytes.
    """
    payload = getattr(fh, "write_payload", None)
    if payload is not None:
        payload(data)
    else:
        fh.write(data)


@dataclass
class Staged:
    """A new file being written: ``output`` takes its bytes, ``readable`` reads them back."""

    output: Output
    readable: Path


@contextlib.contextmanager
def staged_output(
    target: CkptPath, *, durable: bool = True, expect: str | None = None
) -> Iterator[Staged]:
    """Where to write a new file for ``target``; on success it becomes ``target`` atomically.

    Locally a hidden temporary file beside the target, renamed over it; on a
    store an upload committed under the target's name. Either way a failure
    (or a kill) leaves ``target`` as it was. ``expect`` is the version of
    ``target`` that was read (see :func:`version`): a store that supports
    conditional writes then refuses to replace any other version.
    """
    if isinstance(target, Path):
        from .atomic import atomic_output

        with atomic_output(target, durable=durable) as tmp:
            yield Staged(tmp, tmp)
        return
    with target.staged(expect=expect) as staged:
        yield staged


def version(path: CkptPath) -> str | None:
    """An identifier of the file's current content (a store's ETag); None when it is absent.

    Locally there is none to compare (a local writer holds the lock instead).
    """
    if isinstance(path, Path):
        return None
    return path.version()


def target_version(target: CkptPath, source: Checkpoint) -> str | None:
    """The version of ``target`` a write may replace: in place, the one that was read."""
    if isinstance(target, Path):
        return None
    if isinstance(source.path, type(target)) and same_location(source.path, target):
        return source.version
    return version(target)


def replace_small(target: CkptPath, data: bytes, *, durable: bool, expect: str | None) -> None:
    """Write a small file (an index) in one atomic step, conditionally on a store."""
    if isinstance(target, Path):
        from .atomic import atomic_output

        with atomic_output(target, durable=durable) as tmp:
            tmp.write_bytes(data)
        return
    target.replace_with(data, expect=expect)
