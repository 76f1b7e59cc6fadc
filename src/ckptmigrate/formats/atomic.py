"""Write-then-rename, so a checkpoint is always the old file or the new one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WriteError
from .fileio import fsync_dir, fsync_file

if TYPE_CHECKING:
    from .storage import CkptPath

TMP_SUFFIX = ".ckptmigrate-tmp"


def _explain(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if exc.errno == errno.EFBIG:
        return "the file size limit was reached"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def _host() -> str:
    """This machine's name as it goes into temporary files' names (no dots)."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]
    return name or "localhost"


def temp_prefix(target: Path) -> str:
    """How temporary names beside ``target`` start: which process, on which host, made them."""
    return f".{target.name}.{os.getpid()}@{_host()}."


def temp_path(target: Path) -> Path:
    """A fresh hidden name beside ``target`` (see :func:`temp_prefix`)."""
    fd, name = tempfile.mkstemp(prefix=temp_prefix(target), suffix=TMP_SUFFIX, dir=target.parent)
    os.close(fd)
    return Path(name)


def clean_stale(target: Path, notify: Callable[[str], None] | None = None) -> list[Path]:
    """Remove temporary files (or folders) of ``target`` left by processes that no longer run.

    Only this host's processes can be asked whether they run: a file another
    host's process made (a folder shared over the network) is kept, and
    ``notify`` hears of it.
    """
    removed: list[Path] = []
    prefix = f".{target.name}."
    try:
        with os.scandir(target.parent if str(target.parent) else ".") as entries:
            candidates = [
                target.parent / e.name
                for e in entries
                if e.name.startswith(prefix) and e.name.endswith(TMP_SUFFIX)
            ]
    except OSError:
        return removed
    for path in candidates:
        maker = path.name[len(prefix) :].split(".", 1)[0]
        pid_text, _, host = maker.partition("@")
        if not pid_text.isdigit():
            continue
        if host and host != _host():
            if notify is not None:
                notify(
                    f"Note: {path} was left by a ckptmigrate run on host {host} (pid "
                    f"{pid_text}), which this machine cannot check; kept it: remove it once "
                    "no run there writes the checkpoint"
                )
            continue
        if int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():  # a killed writer's folder
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2, looked up once (None where there is none)."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names atomically (Linux renameat2); False where unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err))


def _switch(tmp: Path, target: Path, durable: bool) -> None:
    """Put ``tmp`` under ``target``'s name in one step.

    Without fsync, swapping the two names (then deleting the old file under the
    temporary name) avoids ext4 flushing the new data inside a rename that
    overwrites; with fsync the data is on disk already and a plain replace is
    as fast.
    """
    if not durable and target.exists() and _exchange(tmp, target):
        remove(tmp)  # the old file, now under the temporary name
        return
    os.replace(tmp, target)


#: Where old files go to be deleted off the writer's path (see below); None: at once.
_removals: queue.Queue[Path | None] | None = None


#: Per thread: the old files of the checkpoint under way, deleted when it is done.
_held = threading.local()


def remove(path: Path) -> None:
    """Delete an old file a switch left under a temporary name (in the background, if asked)."""
    held: list[Path] | None = getattr(_held, "paths", None)
    if held is not None:
        held.append(path)
        return
    pending = _removals
    if pending is not None:
        pending.put(path)  # bounded: waits when the deletions fall behind
        return
    with contextlib.suppress(OSError):
        path.unlink()


@contextlib.contextmanager
def removals_in_background() -> Iterator[None]:
    """Within: old files are deleted by a thread while the next checkpoint is written.

    Deleting a file can wait on the disk (a file system mounted with online
    discard trims every freed block before ``unlink`` returns: a few
    milliseconds for 4 MB on a virtual disk), time a batch can spend on its
    next checkpoint. A few deletions at most are pending; leaving waits for them
    all. An old file whose process is killed before its deletion stays as a
    hidden temporary file, which the next write of its checkpoint removes.
    """
    global _removals
    if _removals is not None:  # nested: the outer one deletes
        yield
        return
    pending: queue.Queue[Path | None] = queue.Queue(maxsize=2)
    worker = threading.Thread(target=_delete, args=(pending,), name="ckptmigrate-rm", daemon=True)
    worker.start()
    _removals = pending
    try:
        yield
    finally:
        _removals = None
        pending.put(None)
        worker.join()


@contextlib.contextmanager
def removals_after() -> Iterator[None]:
    """Within: the old files switched out are deleted only when the block ends.

    A checkpoint's input is memory-mapped until its migration lets go of it,
    and a deleted file's blocks are freed by whoever drops the last reference
    to it: deleted before that, the writer's own ``munmap`` would pay for the
    freeing (with online discard, some milliseconds per 4 MB), not the
    background thread.
    """
    if getattr(_held, "paths", None) is not None:  # nested: the outer block deletes
        yield
        return
    _held.paths = []
    try:
        yield
    finally:
        paths, _held.paths = _held.paths, None
        for path in paths:
            remove(path)


def _delete(pending: queue.Queue[Path | None]) -> None:
    while (path := pending.get()) is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def check_target(target: CkptPath) -> None:
    """A file can be written at ``target``: it is no directory and its folder exists.

    Checked before any work is done, and again when the file is written. On
    an object store folders need not exist.
    """
    if not isinstance(target, Path):
        if target.is_dir():
            raise WriteError(
                f"cannot write {target}: it is a folder",
                hint="give a file URL with -o, or move the folder away",
            )
        return
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


@contextlib.contextmanager
def atomic_output(target: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    On any failure the temporary file is removed and ``target`` is untouched;
    a process killed meanwhile leaves only a hidden temporary file, which the
    next write of the same target removes. ``durable`` fsyncs the data before
    the switch (and the folder after), so even a power cut leaves the old file
    or the complete new one; without it the switch is still atomic for every
    process, but the new bytes may only be in the page cache when it happens.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    check_target(target)
    clean_stale(target)
    try:
        tmp = temp_path(target)
    except OSError as exc:
        raise WriteError(
            f"cannot write in {parent}: {_explain(exc)}",
            hint="choose a writable folder with -o; the input is unchanged",
        ) from exc
    try:
        yield tmp
        try:
            mode = target.stat().st_mode & 0o7777 if target.exists() else None
            if durable:
                fsync_file(tmp)
            if mode is not None:
                os.chmod(tmp, mode)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            if target.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(target))
            _switch(tmp, target, durable)
        except OSError as exc:
            raise WriteError(
                f"cannot write {target}: {_explain(exc)}",
                hint="free space or fix permissions; the input is unchanged",
            ) from exc
        if durable:
            try:
                fsync_dir(parent)
            except OSError as exc:
                raise WriteError(
                    f"wrote {target}, but could not sync its folder: {_explain(exc)}",
                    hint="the new file is in place; check the disk before trusting it "
                    "to survive a power cut",
                ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_error(target: CkptPath, exc: BaseException) -> WriteError:
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


@contextlib.contextmanager
def atomic_folder(target: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a new hidden folder beside ``target``; on success it replaces ``target`` whole.

    For checkpoints that are folders of files which belong together (weights
    and the optimizer state that follows them): readers see the old folder or
    the new one, never a mix. Replacing an existing folder swaps the two names
    in one step (Linux ``renameat2``), then removes the old folder; elsewhere
    the old folder is moved aside first.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if target.exists() and not target.is_dir():
        raise WriteError(
            f"cannot write the folder {target}: it is a file",
            hint="give a folder path with -o, or move the file away",
        )
    clean_stale(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=TMP_SUFFIX, dir=parent))
    except OSError as exc:
        raise WriteError(
            f"cannot write in {parent}: {_explain(exc)}",
            hint="choose a writable folder with -o; the input is unchanged",
        ) from exc
    try:
        yield tmp
        if durable:
            fsync_dir(tmp)
        try:
            if not target.exists():
                os.rename(tmp, target)
            else:
                if not _exchange(tmp, target):
                    aside = tmp.with_name(tmp.name + ".old")
                    os.rename(target, aside)
                    os.rename(tmp, target)
                    tmp = aside
                shutil.rmtree(tmp, ignore_errors=True)  # the old folder, under the hidden name
        except OSError as exc:
            raise WriteError(
                f"cannot write {target}: {_explain(exc)}",
                hint="free space or fix permissions; the input is unchanged",
            ) from exc
        if durable:
            fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
