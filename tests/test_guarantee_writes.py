"""Write errors and verification: a clear Error line, the input untouched, no temporary file.

Real failures where the machine allows them (a file size limit, a checkpoint
swapped for a directory mid-run, an immutable folder, a full or read-only
tmpfs), and injected ``OSError`` s at each call that touches the disk.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import pytest
import torch
from tests.conftest import invoke
from tests.harness.common import (
    REV_A,
    REV_B,
    leftovers,
    stamp_state_dict,
    standard_project,
    write_project,
)

from ckptmigrate.formats import atomic, fileio, safetensors_file, torch_file, torch_save


def _checkpoint(path: Path, n: int = 256) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    sd = OrderedDict((f"w{i}", torch.randn(n, n, generator=gen)) for i in range(4))
    torch.save(stamp_state_dict(sd, REV_A), path)
    return sd


def _assert_refused(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1, err
    assert lines and lines[-1].startswith("Error: "), err
    assert sum(line.startswith("Error:") for line in lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


class _Snapshot:
    """A file's bytes and identity, to prove it was not touched."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        st = path.stat()
        self.ident = (st.st_ino, st.st_size, st.st_mtime_ns)

    def unchanged(self) -> bool:
        st = self.path.stat()
        same = (st.st_ino, st.st_size, st.st_mtime_ns) == self.ident
        return same and self.path.read_bytes() == self.data


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    ini = standard_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.pth"
    _checkpoint(ckpt)
    return ini, ckpt


# --------------------------------------------------------------------------- real limits


def test_file_size_limit_is_a_clear_error(tmp_path: Path) -> None:
    """RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write fails with EFBIG.

    One child process under the limit runs the command line three times (in
    place, to a safetensors file, without fsync), so torch is imported once.
    """
    ini = standard_project(tmp_path)
    ckpt = tmp_path / "model.pth"
    _checkpoint(ckpt, n=512)  # 4 MiB of tensors
    before = _Snapshot(ckpt)
    limit = 1 << 20
    runs = [[], ["-o", "out.safetensors"], ["--no-fsync"]]
    driver = (
        "import sys\n"
        "from ckptmigrate.cli import main\n"
        f"for extra in {runs!r}:\n"
        "    try:\n"
        f"        main(['-c', {str(ini)!r}, 'upgrade', 'model.pth', *extra])\n"
        "    except SystemExit as exc:\n"
        "        print(f'=== exit {exc.code}', file=sys.stderr, flush=True)\n"
    )

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-c", driver],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
        check=False,
    )
    assert proc.returncode == 0, f"killed by signal {-proc.returncode}" + proc.stderr
    chunks = proc.stderr.split("=== exit ")
    assert len(chunks) == len(runs) + 1, proc.stderr
    for extra, err, chunk in zip(runs, chunks[:-1], chunks[1:]):
        code = int(chunk.split("\n", 1)[0])
        where = "out.safetensors" if extra[:1] == ["-o"] else "model.pth"
        _assert_refused(
            code, err, f"cannot write {where}: the file size limit was reached", "unchanged"
        )
    assert before.unchanged()
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "out.safetensors").exists()


def test_checkpoint_replaced_by_a_directory_mid_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between reading and the switch, something puts a directory under the checkpoint's name."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.pth"
    moved = tmp_path / "model.pth.moved"
    swap = (
        "    import os\n\n"
        "    def swap(t):\n"
        "        if t.device.type != 'meta':  # runs while the output is being written\n"
        f"            os.rename({str(ckpt)!r}, {str(moved)!r})\n"
        f"            os.mkdir({str(ckpt)!r})\n"
        "        return t * 2\n\n"
        "    op.map_tensor('w1', swap)"
    )
    ini = write_project(
        tmp_path, [(REV_A, None, "    pass", "    pass"), (REV_B, REV_A, swap, "    pass")]
    )
    _checkpoint(ckpt)
    original = ckpt.read_bytes()
    code, err = invoke("-c", str(ini), "upgrade", str(ckpt))
    _assert_refused(code, err, f"cannot write {ckpt}", "directory", "the input is unchanged")
    assert moved.read_bytes() == original  # the file itself, untouched
    assert ckpt.is_dir() and not any(ckpt.iterdir())  # the directory, untouched
    assert leftovers(tmp_path) == []


def _root_only(why: str) -> NoReturn:
    """Skip a test that needs root powers this run does not have, saying which."""
    __tracebackhide__ = True  # the summary names the caller's line, not this one
    pytest.skip(f"root-only: {why}")


@contextlib.contextmanager
def _immutable(folder: Path) -> Iterator[None]:
    if shutil.which("chattr") is None:
        _root_only("needs chattr (e2fsprogs) to make a folder immutable")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    if done.returncode != 0:
        _root_only("'chattr +i' needs CAP_LINUX_IMMUTABLE and a file system with that flag")
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            _root_only("'chattr +i' was accepted but does not stop writes on this file system")
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=False)


def test_read_only_folder_for_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An immutable folder stops even root, unlike chmod: nothing can be created in it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    ini = standard_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    ckpt = folder / "model.pth"
    _checkpoint(ckpt)
    before = _Snapshot(ckpt)
    with _immutable(folder):
        code, err = invoke("-c", str(ini), "upgrade", str(ckpt))
        _assert_refused(code, err, f"cannot write in {folder}: permission denied")
        code, err = invoke("-c", str(ini), "stamp", str(ckpt), REV_B)
        _assert_refused(code, err, "permission denied")
        assert before.unchanged()
        assert leftovers(folder) == []


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str) -> Iterator[None]:
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        _root_only("mounting a small tmpfs needs CAP_SYS_ADMIN")
    try:
        yield
    finally:
        gc.collect()  # drop memory maps of files in it
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_disk_full_and_read_only_file_system_for_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = standard_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    disk = tmp_path / "small"
    with _tmpfs(disk, "1600k"):
        ckpt = disk / "model.pth"
        _checkpoint(ckpt)  # 1 MiB: the new file does not fit beside it
        before = _Snapshot(ckpt)
        free = os.statvfs(disk).f_bavail
        code, err = invoke("-c", str(ini), "upgrade", str(ckpt))
        _assert_refused(code, err, f"cannot write {ckpt}: the disk is full", "unchanged")
        assert before.unchanged()
        assert leftovers(disk) == []
        assert os.statvfs(disk).f_bavail == free  # the partial file's space is free again

        remount = ["mount", "-o", "remount,ro", str(disk)]
        if subprocess.run(remount, capture_output=True, check=False).returncode != 0:
            _root_only("remounting the tmpfs read-only needs CAP_SYS_ADMIN")
        code, err = invoke("-c", str(ini), "upgrade", str(ckpt), "-o", str(disk / "out.pth"))
        _assert_refused(code, err, f"cannot write in {disk}: the file system is read-only")
        assert before.unchanged()


# --------------------------------------------------------------------------- injected


class _FullDisk:
    """A file whose writes fail with ``error`` once ``budget`` bytes were written."""

    def __init__(self, fh: BinaryIO, state: dict[str, int]) -> None:
        self.fh = fh
        self.state = state

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.state["used"] += n
        if self.state["used"] > self.state["budget"]:
            raise OSError(self.state["errno"], os.strerror(self.state["errno"]))
        return self.fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


def _fail_after(monkeypatch: pytest.MonkeyPatch, budget: int, code: int) -> None:
    state = {"used": 0, "budget": budget, "errno": code}
    real_open, real_copy = fileio.open_for_writing, fileio.copy_range

    def opener(path: Path) -> Any:
        return _FullDisk(real_open(path), state)

    def copy(src: int, dst: int, offset: int, size: int) -> None:
        state["used"] += size
        if state["used"] > state["budget"]:
            raise OSError(code, os.strerror(code))
        real_copy(src, dst, offset, size)

    monkeypatch.setattr(fileio, "open_for_writing", opener)  # every format writes through it
    monkeypatch.setattr(fileio, "copy_range", copy)


def _raise(code: int) -> Callable[..., Any]:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


INJECTED: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], list[str], str]] = {
    "read-only folder (temporary file, EROFS)": (
        lambda mp: mp.setattr(tempfile, "mkstemp", _raise(errno.EROFS)),
        [],
        "cannot write in .: the file system is read-only",
    ),
    "no permission (temporary file, EACCES)": (
        lambda mp: mp.setattr(tempfile, "mkstemp", _raise(errno.EACCES)),
        [],
        "permission denied",
    ),
    "disk full while writing (ENOSPC)": (
        lambda mp: _fail_after(mp, 100_000, errno.ENOSPC),
        [],
        "cannot write model.pth: the disk is full",
    ),
    "disk full at the first byte (ENOSPC)": (
        lambda mp: _fail_after(mp, 0, errno.ENOSPC),
        [],
        "the disk is full",
    ),
    "quota exceeded (EDQUOT)": (
        lambda mp: _fail_after(mp, 300_000, errno.EDQUOT),
        [],
        "the disk is full",
    ),
    "disk full writing safetensors (ENOSPC)": (
        lambda mp: _fail_after(mp, 50_000, errno.ENOSPC),
        ["-o", "out.safetensors"],
        "cannot write out.safetensors: the disk is full",
    ),
    "I/O error at fsync (EIO)": (
        lambda mp: mp.setattr(os, "fsync", _raise(errno.EIO)),
        [],
        "cannot write model.pth: Input/output error",
    ),
    "switch refused (EACCES at rename)": (
        lambda mp: mp.setattr(os, "replace", _raise(errno.EACCES)),
        [],
        "cannot write model.pth: permission denied",
    ),
    "switch refused without fsync (EIO at exchange)": (
        lambda mp: mp.setattr(atomic, "_exchange", _raise(errno.EIO)),
        ["--no-fsync"],
        "cannot write model.pth: Input/output error",
    ),
}


@pytest.mark.parametrize("case", list(INJECTED))
def test_injected_write_errors(
    case: str, setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ini, ckpt = setup
    inject, extra, needle = INJECTED[case]
    before = _Snapshot(ckpt)
    with pytest.MonkeyPatch.context() as mp:
        inject(mp)
        code, err = invoke("-c", str(ini), "upgrade", "model.pth", *extra)
    line = _assert_refused(code, err, needle)
    assert "the input is unchanged" in line
    assert before.unchanged()
    assert leftovers(ckpt.parent) == []
    assert not (ckpt.parent / "out.safetensors").exists()
    # and the same command works once the disk behaves
    code, err = invoke("-c", str(ini), "upgrade", "model.pth", *extra)
    assert code == 0, err


# --------------------------------------------------------------------------- verification


def _wrap_write_torch(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[dict[str, Any]], None]
) -> None:
    real = torch_file.write_torch

    def write(*args: Any, **kwargs: Any) -> None:
        names = ["target", "source", "entries", "produce", "metadata"]
        bound = dict(zip(names, args)) | kwargs
        change(bound)
        real(**bound)

    monkeypatch.setattr(torch_file, "write_torch", write)


def _drop_entry(bound: dict[str, Any]) -> None:
    bound["entries"] = {k: v for k, v in bound["entries"].items() if k != "new"}


def _drop_stamp(bound: dict[str, Any]) -> None:
    bound["metadata"] = {k: {} for k in bound["metadata"]}


def _alter_tensor(how: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        real = torch_save.write

        def write(target: Path, obj: Any, *rest: Any, **kw: Any) -> None:
            obj = OrderedDict(obj)
            obj["renamed0"] = how(obj["renamed0"])
            real(target, obj, *rest, **kw)

        monkeypatch.setattr(torch_save, "write", write)

    return patch


VERIFY: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "an entry dropped": (
        lambda mp: _wrap_write_torch(mp, _drop_entry),
        "does not match the migration plan after writing (missing ['new']",
    ),
    "a dtype changed": (
        _alter_tensor(lambda t: t.double()),
        "does not match the migration plan after writing (missing [], unexpected [], "
        "changed ['renamed0'])",
    ),
    "a shape changed": (
        _alter_tensor(lambda t: t.reshape(-1)),
        "does not match the migration plan after writing (missing [], unexpected [], "
        "changed ['renamed0'])",
    ),
    "the stamp lost": (
        lambda mp: _wrap_write_torch(mp, _drop_stamp),
        f"records None after writing, expected ('{REV_B}',)",
    ),
}


@pytest.mark.parametrize("case", list(VERIFY))
def test_verification_stops_a_bad_write_and_no_verify_skips_it(
    case: str, setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ini, ckpt = setup
    inject, needle = VERIFY[case]
    before = _Snapshot(ckpt)
    inject(monkeypatch)
    code, err = invoke("-c", str(ini), "upgrade", "model.pth")
    _assert_refused(code, err, f"model.pth {needle}", "the input is unchanged")
    assert before.unchanged()
    assert leftovers(ckpt.parent) == []
    # --no-verify: the same bad writer gets its file through, so the check
    # above is what kept the input.
    code, err = invoke("-c", str(ini), "upgrade", "model.pth", "--no-verify")
    assert code == 0, err
    assert not before.unchanged()


def test_verification_of_a_safetensors_output(
    setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ini, ckpt = setup
    real = safetensors_file.write_safetensors

    def write(target: Path, keys: list[str], *rest: Any) -> None:
        real(target, [k for k in keys if k != "w1"], *rest)

    monkeypatch.setattr(safetensors_file, "write_safetensors", write)
    code, err = invoke("-c", str(ini), "upgrade", "model.pth", "-o", "out.safetensors")
    _assert_refused(
        code, err, "out.safetensors does not match the migration plan after writing (missing ['w1']"
    )
    assert not (ckpt.parent / "out.safetensors").exists()
    assert leftovers(ckpt.parent) == []


# --------------------------------------------------------------------------- stale files


def test_next_command_removes_stale_temporary_files(setup: tuple[Path, Path]) -> None:
    """Left by killed writers: removed by the next command, even one with nothing to do."""
    ini, ckpt = setup
    code, err = invoke("-c", str(ini), "upgrade", "model.pth")
    assert code == 0, err
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        stale = ckpt.parent / f".model.pth.{dead.pid}.abc123.ckptmigrate-tmp"
        running = ckpt.parent / f".model.pth.{alive.pid}.def456.ckptmigrate-tmp"
        other = ckpt.parent / f".other.pth.{dead.pid}.ghi789.ckptmigrate-tmp"
        here = ckpt.parent / f".model.pth.{dead.pid}@{atomic._host()}.jkl.ckptmigrate-tmp"
        # a folder shared with another machine: its pids mean nothing here
        away = ckpt.parent / f".model.pth.{dead.pid}@gpu-node-7.mno.ckptmigrate-tmp"
        for p in (stale, running, other, here, away):
            p.write_bytes(b"partial")
        code, err = invoke("-c", str(ini), "upgrade", "model.pth")
        assert code == 0 and "Nothing to upgrade" in err, err
        assert not stale.exists() and not here.exists()  # their writers are gone
        assert running.exists()  # its writer may still be writing
        assert other.exists()  # another checkpoint's business
        assert away.exists()  # kept, and said so
        assert f"Note: {away.name} was left by a ckptmigrate run on host gpu-node-7 (pid" in err
        assert "kept it: remove it once no run there writes the checkpoint" in err
        assert torch.load(ckpt, weights_only=True)["new"].shape == (256, 256)
    finally:
        alive.kill()
        alive.wait()


def test_fsync_by_default_only_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In place the only copy is rewritten, so it is fsynced; with -o it need not be."""
    import ckptmigrate.formats.atomic as atomic
    from ckptmigrate import command
    from ckptmigrate.config import Config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mig/versions").mkdir(parents=True)
    (tmp_path / "mig/versions/a1.py").write_text(
        '"""a"""\nfrom ckptmigrate import op\nrevision = "a1a1a1a1"\ndown_revision = None\n'
        'def upgrade():\n    op.rename_key("w", "v")\n'
        'def downgrade():\n    op.rename_key("v", "w")\n'
    )
    (tmp_path / "ini").write_text("[ckptmigrate]\nscript_location = %(here)s/mig\n")
    synced: list[str] = []
    real = atomic.os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append("x"), real(fd))[1])
    torch.save({"w": torch.ones(2)}, "m.pt")
    cfg = Config(tmp_path / "ini", quiet=True)
    command.upgrade(cfg, "m.pt", output="o.pt", from_revision="base")
    assert synced == []
    command.upgrade(cfg, "m.pt", from_revision="base")
    assert synced  # the data and the folder
    synced.clear()
    command.downgrade(cfg, "m.pt", "base", durable=False)
    assert synced == []


# --------------------------------------------------------------------------- sharded folders

INDEX = "model.safetensors.index.json"


def _sharded(folder: Path) -> None:
    """w0..w3 (256x256) over three safetensors shards, the index stamped at REV_A."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    groups = [["w0", "w1"], ["w2"], ["w3"]]
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: torch.randn(256, 256, generator=gen) for k in keys}, folder / name)
        weight_map.update((k, name) for k in keys)
    index = {"metadata": {"ckptmigrate.revision": REV_A}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index))


def _files(folder: Path) -> dict[str, bytes]:
    """Every file in the folder, hidden ones too, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _fail_on_replace_of(name: str, code: int) -> Callable[[pytest.MonkeyPatch], None]:
    def inject(mp: pytest.MonkeyPatch) -> None:
        real = os.replace

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if str(dst).endswith(name):
                raise OSError(code, os.strerror(code))
            real(src, dst, *args, **kwargs)

        mp.setattr(os, "replace", replace)

    return inject


SHARDED: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "disk full in the first shard (ENOSPC)": (
        lambda mp: _fail_after(mp, 0, errno.ENOSPC),
        "the disk is full",
    ),
    "disk full after a shard was written (ENOSPC)": (
        lambda mp: _fail_after(mp, 300_000, errno.ENOSPC),
        "the disk is full",
    ),
    "quota exceeded (EDQUOT)": (lambda mp: _fail_after(mp, 600_000, errno.EDQUOT), "disk is full"),
    "I/O error at fsync (EIO)": (
        lambda mp: mp.setattr(os, "fsync", _raise(errno.EIO)),
        "Input/output error",
    ),
    "read-only folder (EROFS)": (
        lambda mp: mp.setattr(tempfile, "mkstemp", _raise(errno.EROFS)),
        "the file system is read-only",
    ),
    "index switch refused (EACCES)": (
        _fail_on_replace_of(INDEX, errno.EACCES),
        f"cannot write ckpt/{INDEX}: permission denied",
    ),
    "a shard's switch refused (EIO)": (
        _fail_on_replace_of(".safetensors", errno.EIO),
        "Input/output error",
    ),
}


@pytest.mark.parametrize("case", list(SHARDED))
def test_injected_write_errors_in_a_sharded_folder(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = standard_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _sharded(folder)
    before = _files(folder)
    inject, needle = SHARDED[case]
    with pytest.MonkeyPatch.context() as mp:
        inject(mp)
        code, err = invoke("-c", str(ini), "upgrade", "ckpt")
    line = _assert_refused(code, err, needle)
    assert "unchanged" in line, line
    # every file as it was, and nothing else: no new shard, temporary file or journal
    assert _files(folder) == before
    code, err = invoke("-c", str(ini), "upgrade", "ckpt")
    assert code == 0, err
    assert json.loads((folder / INDEX).read_text())["metadata"]["ckptmigrate.revision"] == REV_B


def test_a_folder_sync_failing_after_the_index_switch_keeps_the_new_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = standard_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _sharded(folder)
    index = folder / INDEX
    real = atomic.fsync_dir

    def sync(path: Path) -> None:
        if json.loads(index.read_text())["metadata"]["ckptmigrate.revision"] == REV_B:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atomic, "fsync_dir", sync)
        code, err = invoke("-c", str(ini), "upgrade", "ckpt")
    line = _assert_refused(code, err, f"wrote ckpt/{INDEX}, but could not sync its folder")
    assert "the new file is in place" in line
    # the new shard set is whole: every tensor the new index names loads, migrated
    from ckptmigrate.formats import read_checkpoint

    ckpt = read_checkpoint(folder)
    try:
        assert ckpt.stamp is not None and ckpt.stamp.revisions == (REV_B,)
        assert ckpt.read("w3").dtype == torch.float64 and ckpt.read("new").shape == (256, 256)
        assert "renamed0" in ckpt.schema and "w0" not in ckpt.schema
    finally:
        ckpt.close()
    # the replaced shards are still there, and the next command removes them
    referenced = set(json.loads(index.read_text())["weight_map"].values())
    assert set(p.name for p in folder.iterdir()) - referenced - {INDEX}
    code, err = invoke("-c", str(ini), "upgrade", "ckpt")
    assert code == 0, err
    assert {p.name for p in folder.iterdir()} == referenced | {INDEX}


def test_old_files_deleted_in_the_background_are_gone_when_the_batch_ends(
    tmp_path: Path,
) -> None:
    """Without fsync a switch swaps the names; the old file, now hidden, is deleted by a thread."""
    from ckptmigrate.formats.atomic import TMP_SUFFIX, atomic_output, removals_in_background

    targets = [tmp_path / f"f{i}.bin" for i in range(5)]
    for target in targets:
        target.write_bytes(b"old")
    with removals_in_background():
        for target in targets:
            with atomic_output(target, durable=False) as tmp:
                tmp.write_bytes(b"new " + target.name.encode())
            assert target.read_bytes() == b"new " + target.name.encode()  # in place at once
    assert sorted(p.name for p in tmp_path.iterdir()) == [t.name for t in targets]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]


def test_a_batch_deletes_an_old_file_only_after_its_checkpoint_is_done(tmp_path: Path) -> None:
    """The old file stays (hidden) while its checkpoint's input may still map it, then goes."""
    import mmap

    from ckptmigrate.formats.atomic import (
        TMP_SUFFIX,
        atomic_output,
        removals_after,
        removals_in_background,
    )

    target = tmp_path / "model.pt"
    target.write_bytes(b"old" * 1000)
    with removals_in_background(), removals_after(), open(target, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # as an input is
        with atomic_output(target, durable=False) as tmp:
            tmp.write_bytes(b"new")
        assert target.read_bytes() == b"new"
        hidden = [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]
        assert len(hidden) == 1 and hidden[0].read_bytes() == b"old" * 1000
        assert mapped[:3] == b"old"
        mapped.close()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert target.read_bytes() == b"new"
