"""File I/O every format shares: fresh output files, kernel copies, raw tensor bytes, fsync.

Kept in one place so that each format writes the same way (and a test can
inject a full disk or a failing copy for all of them at once). Importing it
does not import torch: tensors are only touched through their data pointers.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from .storage import write_payload

if TYPE_CHECKING:
    import torch

    from .storage import Output


def open_for_writing(path: Output) -> BinaryIO:
    """Open a new file's output to write from its start: a local file, or an upload.

    A local file is opened without O_TRUNC when empty: ext4 starts writeback
    of the whole file when a file opened with O_TRUNC is closed (its
    protection for replace-via-truncate); our temporary files are fresh and
    empty, and the caller decides about fsync itself.
    """
    if not isinstance(path, Path):
        return cast(BinaryIO, path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    if os.fstat(fd).st_size:
        os.ftruncate(fd, 0)
    return os.fdopen(fd, "wb")


def copy_range(src_fd: int, dst_fd: int, offset: int, size: int) -> None:
    """Copy bytes between files in the kernel where the platform allows.

    ``copy_file_range`` moves an untouched tensor's bytes without them ever
    entering this process; elsewhere it falls back to reading in 16 MiB chunks.
    """
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while done < size:
        n = 0
        if copy is not None:
            try:
                n = copy(src_fd, dst_fd, size - done, offset + done)
            except OSError:
                copy = None
                continue
        else:
            data = os.pread(src_fd, min(size - done, 1 << 24), offset + done)
            n = os.write(dst_fd, data) if data else 0
        if n <= 0:
            raise OSError(f"short copy: {done} of {size} bytes")
        done += n


def _view(address: int, nbytes: int) -> memoryview:
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes without numpy or a copy (keep the tensor alive meanwhile)."""
    return _view(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def storage_bytes(storage: torch.UntypedStorage) -> memoryview:
    """A CPU storage's bytes without a copy (keep the storage alive meanwhile)."""
    return _view(storage.data_ptr(), int(storage.nbytes()))


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as a file stores it: detached, on the CPU, contiguous (copied only if needed)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


def write_tensor(fh: BinaryIO, tensor: torch.Tensor) -> None:
    """Append a tensor's raw bytes to ``fh``."""
    t = plain_tensor(tensor)
    if t.numel():
        write_payload(fh, tensor_bytes(t))


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk (before an atomic switch makes it the checkpoint)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries, so that a rename in it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
