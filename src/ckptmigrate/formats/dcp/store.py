"""Reading a DCP checkpoint's data: chunk blobs at byte ranges of its data files.

Each chunk of a tensor is a ``torch.save`` of that chunk, stored at
``_StorageInfo(relative_path, offset, length)``; a bytes entry is a
``torch.save`` of the object. A blob carries no key, so nothing but
``.metadata`` says what it is. This module reads a whole tensor (every
chunk, placed at its offsets) or one object, only when asked: opening a
checkpoint, renaming and dropping read none of it.

Blobs are read through a window over the file (``os.pread``; on a store, one
ranged read of the blob's bytes), loaded with
``weights_only=True`` (``--trust-pickle`` for objects outside that list), and
checked against what ``.metadata`` says they hold.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import CheckpointError
from ...plan.spec import TensorSpec
from ..storage import Blob, open_blob
from ..unpickle import refusal

if TYPE_CHECKING:
    from ..storage import CkptPath


class _Window(io.RawIOBase):
    """``length`` bytes of an open file from ``offset``, as a seekable read-only stream."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:n]], self._start + self._pos + done)
            if got <= 0:
                break
            done += got
        self._pos += done
        return done


class ChunkStore:
    """The data files of one checkpoint folder, opened on first use, read by byte range."""

    def __init__(
        self,
        folder: CkptPath,
        *,
        trust_pickle: bool = False,
        metadata_file: CkptPath | None = None,
    ) -> None:
        self.folder = folder
        self.trust_pickle = trust_pickle
        # objects stored after the pickle are read from the .metadata the entries came from
        self.metadata_file = metadata_file
        self._fds: dict[str, int] = {}
        self._blobs: dict[str, Blob] = {}
        self._lock = threading.Lock()

    def _path(self, name: str) -> CkptPath:
        if name == ".metadata" and self.metadata_file is not None:
            return self.metadata_file
        return self.folder / name

    def _blob(self, name: str) -> Blob | None:
        """The file on a store, read by ranges (None: a local file, read with ``pread``)."""
        path = self._path(name)
        if isinstance(path, Path):
            return None
        with self._lock:
            blob = self._blobs.get(name)
            if blob is None:
                blob = self._blobs[name] = open_blob(path)
            return blob

    def _remote(self, info: Any) -> bytes | None:
        """A blob's bytes read from a store in one ranged read (None: the file is local)."""
        blob = self._blob(info.relative_path)
        if blob is None:
            return None
        if blob.size < info.offset + info.length:
            raise self._short(info)
        return blob.read(info.offset, info.offset + info.length)

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                path = self._path(name)
                assert isinstance(path, Path)  # a store's files are read through _blob
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(
                        f"cannot read {path}: {exc.strerror}",
                        hint="the DCP checkpoint's data files must all be present and readable",
                    ) from exc
                self._fds[name] = fd
            return fd

    def raw(self, info: Any) -> bytes:
        """A blob's bytes as stored (to carry it somewhere else unchanged)."""
        remote = self._remote(info)
        if remote is not None:
            return remote
        fd = self._fd(info.relative_path)
        data = os.pread(fd, info.length, info.offset)
        if len(data) != info.length:
            raise self._short(info)
        return bytes(data)

    def _short(self, info: Any) -> CheckpointError:
        return CheckpointError(
            f"{self.folder / info.relative_path} is shorter than its .metadata says "
            f"(a blob at {info.offset}+{info.length})",
            hint="the file was truncated; restore the checkpoint from a complete copy",
        )

    def _stream(self, info: Any) -> Any:
        remote = self._remote(info)
        stream: Any
        if remote is not None:
            stream = io.BytesIO(remote)
        else:
            fd = self._fd(info.relative_path)
            if os.fstat(fd).st_size < info.offset + info.length:
                raise self._short(info)
            stream = io.BufferedReader(_Window(fd, info.offset, info.length))
        descriptors = getattr(info, "transform_descriptors", None)
        if descriptors:
            stream = self._untransformed(stream, descriptors, info)
        return stream

    def _untransformed(self, stream: Any, descriptors: Any, info: Any) -> Any:
        """A blob written through DCP's stream extensions (e.g. compression), decoded by DCP."""
        from torch.distributed.checkpoint._extension import (
            ExtensionRegistry,
            StreamTransformExtension,
        )

        try:
            for ext in ExtensionRegistry().from_descriptor_list(list(descriptors)):
                if isinstance(ext, StreamTransformExtension):
                    stream = ext.transform_from(stream)
            return io.BytesIO(stream.read())
        except Exception as exc:
            raise CheckpointError(
                f"{self.folder / info.relative_path}: a blob written through the DCP "
                f"extensions {list(descriptors)} cannot be decoded ({exc})",
                hint="install what the extension needs (e.g. zstandard), or re-save the "
                "checkpoint without extensions",
            ) from None

    def load(self, info: Any, what: str) -> Any:
        """The object ``torch.save`` wrote at ``info``."""
        where = f"{self.folder / info.relative_path} ({what})"
        try:
            blob = self._stream(info).read()
            _check_records(blob, where)
            return torch.load(
                io.BytesIO(blob),
                map_location="cpu",
                weights_only=not self.trust_pickle,
            )
        except CheckpointError:
            raise
        except pickle.UnpicklingError as exc:
            unsafe = refusal(exc, where)
            if unsafe is not None:
                raise unsafe from None
            raise _damaged(where, exc) from None
        except Exception as exc:
            raise _damaged(where, exc) from None

    def tensor(self, key: str, entry: Any, storage: Any) -> torch.Tensor:
        """The whole tensor ``key`` (every chunk, each at its place)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        size, dtype = tuple(entry.size), entry.properties.dtype
        chunks = entry.chunks
        whole = len(chunks) == 1 and tuple(chunks[0].sizes) == size
        out = None if whole else torch.empty(size, dtype=dtype)
        for chunk in chunks:
            info = storage[MetadataIndex(key, chunk.offsets)]
            part = self.load(info, f"a chunk of {key}")
            if (
                not isinstance(part, torch.Tensor)
                or tuple(part.shape) != tuple(chunk.sizes)
                or part.dtype != dtype
            ):
                got = (
                    f"a {list(part.shape)} {part.dtype} tensor"
                    if isinstance(part, torch.Tensor)
                    else f"a {type(part).__name__}"
                )
                want = TensorSpec(tuple(chunk.sizes), dtype)
                raise CheckpointError(
                    f"{self.folder / info.relative_path}: the chunk of {key} at "
                    f"{list(chunk.offsets)} holds {got}, not the {want} its .metadata names",
                    hint="the checkpoint is damaged or its .metadata belongs to another save",
                )
            if out is None:
                return part
            out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = part
        assert out is not None
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for blob in self._blobs.values():
                blob.close()
            self._blobs.clear()


def _check_records(blob: bytes, where: str) -> None:
    """Every record of a ``torch.save`` blob against its checksum.

    ``torch.load`` does not check them, so a flipped bit in a chunk would be
    loaded, computed with and written into the new checkpoint as valid data.
    """
    from ..zip64 import BadZip, crc32, read_index

    try:
        records = read_index(blob).records.values()
    except BadZip as exc:
        raise _damaged(where, exc) from None
    view = memoryview(blob)
    for record in records:
        if crc32(view[record.data_offset : record.data_offset + record.size]) != record.crc:
            raise CheckpointError(
                f"{where} is damaged: record {record.name} fails its checksum",
                hint="the data file was corrupted on disk or in transfer; restore the "
                "checkpoint from a good copy",
            )


def _damaged(where: str, exc: BaseException) -> CheckpointError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return CheckpointError(
        f"{where} cannot be read ({type(exc).__name__}: {first})",
        hint="the data file may be truncated or damaged; check it was copied completely",
    )
