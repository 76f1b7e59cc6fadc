"""One writer per checkpoint at a time.

Two processes upgrading the same file must never both apply a migration or
interleave their writes. Before reading a checkpoint it will rewrite, a
command takes an exclusive ``flock`` on the file itself (no lock files to
clean up: the kernel drops the lock when the process ends, however it ends).
Because the write replaces the file by a new one, a process that waited
re-checks after getting the lock that it still holds the file now under the
name, and otherwise locks the new one, then reads what is there now.

Holding the lock, it also removes the temporary files that killed writers of
this path left (their process is gone), so whatever the next command on the
file does, even nothing, it leaves no stale temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import WriteError
from .atomic import clean_stale

DEFAULT_TIMEOUT = 600.0


@contextlib.contextmanager
def locked(
    path: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    notify: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive lock on the file at ``path`` (nothing to lock if it doesn't exist)."""
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
        except OSError:
            yield  # unreadable: the read that follows gives the real error
            return
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise WriteError(
                            f"{path} is being written by another ckptmigrate process",
                            hint="wait for it to finish and run the command again",
                        ) from None
                    if not told and notify is not None:
                        notify(f"Waiting for another ckptmigrate process writing {path} ...")
                        told = True
                    time.sleep(0.05)
            try:
                held, now = os.fstat(fd), os.stat(path)
                same = (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                clean_stale(Path(path), notify)
                yield
                return
        finally:
            os.close(fd)
        # The file was replaced while we waited: lock the one there now.
