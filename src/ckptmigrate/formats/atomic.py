"""Write-then-rename, so a checkpoint is always the old file or the new one."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import WriteError

TMP_SUFFIX = ".ckptmigrate-tmp"


def _explain(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if exc.errno == errno.EFBIG:
        return "the file size limit was reached"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return exc.strerror or str(exc)


def fsync_dir(path: Path) -> None:
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


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    On any failure the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise WriteError(
            f"cannot write {target}: it is a directory",
            hint="give a file path with -o, or move the directory away",
        )
    if not parent.is_dir():
        raise WriteError(
            f"cannot write {target}: folder {parent} does not exist",
            hint="create it first or choose another -o path",
        )
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise WriteError(
            f"cannot write in {parent}: {_explain(exc)}",
            hint="choose a writable folder with -o; the input is unchanged",
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            mode = target.stat().st_mode & 0o7777 if target.exists() else None
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, target)
        except OSError as exc:
            raise WriteError(
                f"cannot write {target}: {_explain(exc)}",
                hint="free space or fix permissions; the input is unchanged",
            ) from exc
        fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_error(target: Path, exc: BaseException) -> WriteError:
    """Turn a failure while writing the temporary file into a WriteError."""
    if isinstance(exc, OSError):
        reason = _explain(exc)
    else:
        text = str(exc).strip().splitlines()
        reason = text[0] if text else type(exc).__name__
        low = str(exc).lower()
        if "no space" in low:
            reason = "the disk is full"
        elif "file too large" in low:
            reason = "the file size limit was reached"
    return WriteError(
        f"cannot write {target}: {reason}",
        hint="free space or choose another place with -o; the input is unchanged",
    )
