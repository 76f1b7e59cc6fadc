"""Reading a file that another program truncates, without dying of SIGBUS.

Inputs are memory-mapped, so a program that truncates one while it is read
would make the next touch of a vanished page kill the process with SIGBUS:
no message, nothing cleaned. Instead, each mapped input is held under a read
lease (Linux ``F_SETLEASE``). A program opening the file to write, or
truncating it, then waits in the kernel while this process gets ``SIGIO``;
the handler stops the command with a :class:`CheckpointError` (unwinding like
Ctrl-C: nothing is written), and only once the input is closed does the
lease go and the other program go on. The kernel waits at most
``/proc/sys/fs/lease-break-time`` seconds (45 by default) for that.

A file already open for writing elsewhere is refused (it is being written
now). Where no lease can be taken (another user's file without
``CAP_LEASE``, a network file system, not the main thread, not Linux), reads
go on unguarded, as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import CheckpointError

_held: dict[int, Path] = {}
_previous: list[Any] = []  # the SIGIO handler before ours, while ours is installed


def hold(path: Path) -> Callable[[], None]:
    """Lease ``path`` for reading; the function returned gives it back."""
    fcntl = _fcntl()
    if fcntl is None or threading.current_thread() is not threading.main_thread():
        return _nothing
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return _nothing  # the reader says what is wrong with the path
    try:
        _install()
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        os.close(fd)
        _uninstall()
        if exc.errno == errno.EAGAIN:
            raise CheckpointError(
                f"{path} is open for writing in another process",
                hint="run the command once that process has finished writing it; "
                "the input is unchanged",
            ) from None
        return _nothing
    _held[fd] = path

    def release() -> None:
        if _held.pop(fd, None) is None:
            return
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        _uninstall()

    return release


def _nothing() -> None:
    return None


def _fcntl() -> Any:
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    return fcntl if hasattr(fcntl, "F_SETLEASE") else None


def _install() -> None:
    if not _previous:
        _previous.append(signal.signal(signal.SIGIO, _broken))


def _uninstall() -> None:
    if not _held and _previous:
        signal.signal(signal.SIGIO, _previous.pop())


def _broken(_signum: int, _frame: FrameType | None) -> None:
    fcntl = _fcntl()
    breaking = [p for fd, p in _held.items() if _lease(fcntl, fd) != fcntl.F_RDLCK]
    names = ", ".join(str(p) for p in breaking or _held.values()) or "an input"
    raise CheckpointError(
        f"{names} is being changed by another program while it is read",
        hint="nothing was written; run the command again once that program has finished",
    )


def _lease(fcntl: Any, fd: int) -> int:
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GETLEASE))
    except OSError:
        return -1
