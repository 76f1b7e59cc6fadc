"""Checkpoints on object storage and other fsspec file systems (``s3://``, ``gs://``, ...).

Imported only when a URL is given; it needs ``fsspec`` and the store's own
package (``s3fs`` for ``s3://``), the ``remote`` extra.

A :class:`RemotePath` behaves like a :class:`~pathlib.Path` for everything
the formats ask of a path (name, parent, ``/``, exists, listing), and adds
what a store does differently:

* reads are ranged (:meth:`RemotePath.blob`), pinned to the version that was
  first read where the store can (S3 ``If-Match`` on the ETag), so a file
  replaced meanwhile is an error, never a mix of two files;
* writes are uploads (:meth:`RemotePath.staged`) that become visible under
  the target's name only when committed. The bytes are sent as they are
  written (multipart on S3), and a sparse local *read-back* file keeps the
  structure (headers, pickle, directory) but none of the tensor data, so the
  written file is checked before it is committed without reading it back
  from the store.

How a store commits atomically, and how a concurrent writer is kept out,
is the :class:`Store`'s business: :mod:`.s3` for S3 (conditional writes, a
lease lock object, stale multipart uploads aborted), :class:`Store` itself
for any other fsspec file system (a temporary object moved into place).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, CkptMigrateError, WriteError
from .storage import REMOTE_EXTRA, Staged

if TYPE_CHECKING:
    from .storage import Blob

TMP_SUFFIX = ".ckptmigrate-tmp"


def remote_path(url: str) -> RemotePath:
    """The location ``url`` names, on the file system fsspec has for its scheme."""
    try:
        import fsspec
    except ImportError:
        raise CheckpointError(
            f"{url} is a URL, and reading or writing URLs needs fsspec",
            hint=REMOTE_EXTRA,
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        scheme = url.split("://", 1)[0]
        named = re.search(r"[Ii]nstall (\w[\w.-]*)", str(exc))
        raise CheckpointError(
            f"{url}: {scheme}:// URLs need a package fsspec uses for them ({exc})",
            hint=f"pip install {named.group(1)}" if named else "install that package",
        ) from None
    except ValueError as exc:
        raise CheckpointError(
            f"{url}: {exc}", hint="check the URL's scheme (s3://, gs://, az://, ...)"
        ) from None
    return RemotePath(store_for(fs), path.rstrip("/"))


def store_for(fs: Any) -> Store:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols or "s3a" in protocols:
        from .s3 import S3Store

        return S3Store(fs)
    return Store(fs)


class _Stat:
    def __init__(self, size: int) -> None:
        self.st_size = size


class RemotePath:
    """A file or folder on a store, with the :class:`~pathlib.Path` methods formats use."""

    def __init__(self, store: Store, path: str) -> None:
        self.store = store
        self.path = path
        self._info: dict[str, Any] | None = None

    # ------------------------------------------------------------------ names

    def __str__(self) -> str:
        return self.store.url(self.path)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RemotePath)
            and other.store.fs is self.store.fs
            and other.path == self.path
        )

    def __hash__(self) -> int:
        return hash(self.path)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.store, posixpath.join(self.path, name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        name = self.name
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        suffix = self.suffix
        return self.name[: -len(suffix)] if suffix else self.name

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.store, posixpath.dirname(self.path) or self.path)

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def resolve(self) -> RemotePath:
        return self

    # ------------------------------------------------------------------ what is there

    def info(self, *, refresh: bool = False) -> dict[str, Any] | None:
        """The store's entry for this path (None when nothing is there)."""
        if self._info is None or refresh:
            self._info = self.store.info(self.path)
        return self._info

    def exists(self) -> bool:
        return self.info() is not None

    def is_dir(self) -> bool:
        info = self.info()
        return info is not None and info.get("type") == "directory"

    def is_file(self) -> bool:
        info = self.info()
        return info is not None and info.get("type") != "directory"

    def stat(self) -> _Stat:
        info = self.info()
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(self))
        return _Stat(int(info.get("size") or 0))

    def iterdir(self) -> Iterator[RemotePath]:
        for entry in self.store.listdir(self.path):
            child = RemotePath(self.store, entry["name"].rstrip("/"))
            child._info = entry
            yield child

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Entries of this folder whose names match ``pattern`` (no ``**``)."""
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def version(self) -> str | None:
        """The store's identifier of the content now there (the ETag), None when absent."""
        info = self.info()
        return self.store.version_of(info) if info is not None else None

    # ------------------------------------------------------------------ reading

    def blob(self) -> Blob:
        info = self.info()
        if info is None or info.get("type") == "directory":
            raise CheckpointError(f"{self}: no such file", hint="check the checkpoint URL")
        return RemoteBlob(self, int(info.get("size") or 0), self.store.version_of(info))

    def read_range(self, start: int, end: int) -> bytes:
        blob = self.blob()
        return blob.read(start, min(end, blob.size))

    def read_bytes(self) -> bytes:
        blob = self.blob()
        return blob.read(0, blob.size)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def staged(self, *, expect: str | None = None) -> Iterator[Staged]:
        """An upload for this path, committed atomically when the block ends without error."""
        from . import readguard

        fd, readback = tempfile.mkstemp(prefix="ckptmigrate-", suffix=".readback")
        upload = self.store.upload(self.path, os.fdopen(fd, "w+b"), expect=expect)
        readguard.own_files.add(Path(readback))
        try:
            yield Staged(upload, Path(readback))
            upload.commit()
        except BaseException:
            upload.abort()
            raise
        finally:
            upload.shadow.close()
            readguard.own_files.discard(Path(readback))
            Path(readback).unlink(missing_ok=True)
            self._info = None

    def replace_with(self, data: bytes, *, expect: str | None = None) -> None:
        """Put ``data`` here in one request (conditional on ``expect`` where the store can)."""
        self.store.put(self.path, data, expect=expect)
        self._info = None

    def write_bytes(self, data: bytes) -> None:
        self.replace_with(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.replace_with(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.store.remove(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._info = None

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Folders exist by themselves on object stores; others get one made."""
        self.store.makedirs(self.path)
        self._info = None


@dataclass
class RemoteBlob:
    """Ranged reads of one object, pinned to the version first seen where the store can."""

    path: RemotePath
    size: int
    version: str | None

    def read(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        if end <= start:
            return b""
        return self.path.store.read(self.path.path, start, end, self.version)

    def close(self) -> None:
        pass


class Upload:
    """A new file's bytes on their way to a store, and the structure kept to check it.

    Formats write to it as to a file: :meth:`write` for structure (headers,
    pickles, directories), :meth:`write_payload` for tensor bytes, which go
    to the store only and leave a hole in the local read-back file.
    """

    def __init__(self, shadow: Any) -> None:
        self.shadow = shadow
        self.offset = 0

    # the file interface formats write through
    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.shadow.write(data)
        return self._send(data)

    def write_payload(self, data: bytes | memoryview) -> None:
        self.shadow.seek(len(data), os.SEEK_CUR)
        self._send(data)

    def _send(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.send(data)
        self.offset += n
        return n

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """The writer is done: the read-back file gets its full length."""
        self.shadow.truncate(self.offset)
        self.shadow.flush()

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # what a store provides
    def send(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class Store:
    """An fsspec file system: what reading and writing checkpoints needs from it.

    Without conditional writes, a new file is written as a temporary object
    beside the target and moved over it (a rename where the file system has
    one; elsewhere fsspec's copy, then delete). Nothing keeps a second writer
    out; :mod:`.s3` does better for S3.
    """

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def url(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def info(self, path: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self.fs.info(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise explain(self.url(path), exc) from exc
        return info

    def version_of(self, info: dict[str, Any]) -> str | None:
        for key in ("ETag", "etag", "generation", "mtime", "created"):
            if info.get(key) is not None:
                return str(info[key])
        return None

    def listdir(self, path: str) -> list[dict[str, Any]]:
        try:
            entries: list[dict[str, Any]] = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise explain(self.url(path), exc) from exc
        return [e for e in entries if e["name"].rstrip("/") != path.rstrip("/")]

    def read(self, path: str, start: int, end: int, version: str | None) -> bytes:
        try:
            data: bytes = self.fs.cat_file(path, start=start, end=end)
        except Exception as exc:
            raise explain(self.url(path), exc) from exc
        return data

    def upload(self, path: str, shadow: Any, *, expect: str | None) -> Upload:
        return _MovedUpload(self, path, shadow)

    def put(self, path: str, data: bytes, *, expect: str | None) -> None:
        with self.upload(path, tempfile.TemporaryFile(), expect=expect) as up:
            up.write(data)
        up.commit()

    def remove(self, path: str) -> None:
        self.fs.rm_file(path)
        self.fs.invalidate_cache(posixpath.dirname(path))

    def makedirs(self, path: str) -> None:
        with contextlib.suppress(FileExistsError):
            self.fs.makedirs(path, exist_ok=True)

    @contextlib.contextmanager
    def locked(
        self, path: str, notify: Callable[[str], None] | None = None, timeout: float = 600.0
    ) -> Iterator[None]:
        """No lock: this store has no conditional write to build one on."""
        yield


class _MovedUpload(Upload):
    """Written as a temporary object beside the target, then moved over it."""

    def __init__(self, store: Store, path: str, shadow: Any) -> None:
        super().__init__(shadow)
        self.store = store
        self.path = path
        folder, name = posixpath.split(path)
        self.tmp = posixpath.join(folder, f".{name}.{os.getpid()}.{id(self):x}{TMP_SUFFIX}")
        try:
            self.file = store.fs.open(self.tmp, "wb")
        except Exception as exc:
            raise explain(store.url(path), exc, "write") from exc

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.file.write(data)

    def commit(self) -> None:
        fs = self.store.fs
        try:
            self.file.close()
            fs.mv(self.tmp, self.path)
        except Exception as exc:
            raise explain(self.store.url(self.path), exc, "write") from exc
        finally:
            fs.invalidate_cache(posixpath.dirname(self.path))

    def abort(self) -> None:
        discard = getattr(self.file, "discard", None)
        with contextlib.suppress(Exception):
            if discard is not None:
                discard()
            self.file.closed = True  # fsspec's buffered files commit on close otherwise
        with contextlib.suppress(Exception):
            self.store.fs.rm_file(self.tmp)


# --------------------------------------------------------------------------- errors


def error_code(exc: BaseException) -> str | None:
    """The store's own error code (``PreconditionFailed``, ``NoSuchBucket``, ...), if any."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            return str(code) if code is not None else None
        seen = seen.__cause__ or seen.__context__
    return None


def explain(where: object, exc: BaseException, doing: str = "read") -> CkptMigrateError:
    """One clear error for a store's failure, saying what to check."""
    code = error_code(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    kind: type[CkptMigrateError] = WriteError if doing == "write" else CheckpointError
    if code == "NoSuchBucket" or "bucket does not exist" in text.lower():
        return kind(f"cannot {doing} {where}: the bucket does not exist", hint="check the URL")
    if isinstance(exc, PermissionError) or code in ("AccessDenied", "InvalidAccessKeyId"):
        return kind(
            f"cannot {doing} {where}: access denied ({text})",
            hint="check the store's credentials and permissions",
        )
    if "credentials" in text.lower():
        return kind(
            f"cannot {doing} {where}: {text}",
            hint="configure the store's credentials (for S3: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)",
        )
    if isinstance(exc, FileNotFoundError):
        return kind(f"{where}: no such file", hint="check the checkpoint URL")
    return kind(
        f"cannot {doing} {where}: {text}",
        hint="check the URL and that the store is reachable",
    )
