"""Hostile tensors and inputs changed under the reader.

A crafted torch file can give a tensor any view (offset, size, stride) over
any storage: views past the storage's end are refused, and views stretched by
stride 0 or overlapping strides are materialised only within a memory bound.
A file truncated by another program while ckptmigrate reads it ends the
command with one Error line instead of a SIGBUS, with the file left to that
program.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tests.conftest import invoke
from tests.harness.common import REV_A, REV_B, leftovers, stamp_state_dict, write_project

from ckptmigrate.formats import views

REPO = Path(__file__).resolve().parent.parent


class _View:
    """Pickles as a tensor with the given view of ``storage`` (what a crafted file holds)."""

    def __init__(self, storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: Any):
        self.args = (storage, offset, size, stride)

    def __reduce_ex__(self, _protocol: object) -> Any:
        storage, offset, size, stride = self.args
        typed = torch.storage.TypedStorage(
            wrap_storage=storage.untyped_storage(), dtype=torch.float32, _internal=True
        )
        return (
            torch._utils._rebuild_tensor_v2,
            (typed, offset, size, stride, False, OrderedDict()),
        )


def _project(root: Path) -> Path:
    return write_project(
        root,
        [
            (REV_A, None, "    pass", "    pass"),
            (REV_B, REV_A, '    op.map_tensor("w1", lambda t: t * 2)', "    pass"),
        ],
    )


def _crafted(path: Path, key: str, view: _View) -> OrderedDict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    sd: OrderedDict[str, Any] = OrderedDict(
        (f"w{i}", torch.randn(64, 64, generator=gen)) for i in range(3)
    )
    sd[key] = view
    torch.save(stamp_state_dict(sd, REV_A), path)
    return sd


HUGE = (1 << 20, 1 << 20)  # 4 TiB of float32 over 4 bytes
REFUSED = {
    "stride 0 over 4 bytes, computed": ("w1", _View(torch.zeros(1), 0, HUGE, (0, 0)), "stretched"),
    "stride 0 over 4 bytes, renamed": ("w0", _View(torch.zeros(1), 0, HUGE, (0, 0)), "stretched"),
    "offset past the storage's end": ("w1", _View(torch.zeros(10), 1000, (2,), (1,)), "readable"),
    "size past the storage's end": ("w1", _View(torch.zeros(10), 0, (64, 64), (64, 1)), "readable"),
    "overlap past the storage's end": (
        "w1",
        _View(torch.zeros(300), 0, (256, 256), (1, 1)),
        "readable",
    ),
    "negative stride": ("w1", _View(torch.zeros(10), 0, (2,), (-1,)), "readable"),
    "negative size": ("w1", _View(torch.zeros(10), 0, (-2,), (1,)), "readable"),
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("output", ["out.pth", "out.safetensors"])
def test_hostile_views_are_refused(
    case: str, output: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    key, view, needle = REFUSED[case]
    ckpt = tmp_path / "model.pth"
    _crafted(ckpt, key, view)
    before = ckpt.read_bytes()
    code, err = invoke("-c", str(ini), "upgrade", "model.pth", "-o", output)
    lines = err.strip().splitlines()
    assert code == 1, err
    assert sum(line.startswith("Error:") for line in lines) == 1 and lines[-1].startswith("Error:")
    assert needle in lines[-1] and "Traceback" not in err, err
    assert ckpt.read_bytes() == before
    assert not (tmp_path / output).exists() and leftovers(tmp_path) == []


def test_the_bound_is_the_free_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stretched view is made real when a quarter of the free memory holds it."""
    ini = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.pth"
    # 64 floats stretched to 4096 x 64 (1 MiB): stride 0 along the rows
    _crafted(ckpt, "w1", _View(torch.arange(64.0), 0, (4096, 64), (0, 1)))
    monkeypatch.setattr(views, "available_memory", lambda: 3 << 20)  # a quarter < 1 MiB
    code, err = invoke("-c", str(ini), "upgrade", "model.pth", "-o", "small.pth")
    assert code == 1 and "more than a quarter of the 3,145,728 bytes of memory free" in err, err
    monkeypatch.setattr(views, "available_memory", lambda: 8 << 20)
    code, err = invoke("-c", str(ini), "upgrade", "model.pth", "-o", "big.pth")
    assert code == 0, err
    out = torch.load(tmp_path / "big.pth", weights_only=True)
    assert torch.equal(out["w1"], (torch.arange(64.0) * 2).expand(4096, 64))


def test_overlapping_strides_within_the_storage_are_materialised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.pth"
    base = torch.arange(600.0)
    _crafted(ckpt, "w1", _View(base, 0, (256, 256), (1, 1)))
    code, err = invoke("-c", str(ini), "upgrade", "model.pth", "-o", "out.safetensors")
    assert code == 0, err
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(tmp_path / "out.safetensors")["w1"], base.as_strided((256, 256), (1, 1)) * 2
    )


# --------------------------------------------------------------------------- truncated while read

WAIT_FOR_THE_TRUNCATION = """\
    def scale(t):
        import os, pathlib, time
        if t.device.type == "meta":  # the plan, on shapes alone
            return t * 2
        pathlib.Path(os.environ["CKPTMIGRATE_TEST_MARKER"]).touch()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the other program's truncate ends this
            time.sleep(0.01)
        return t * 2

    op.map_tensor("w1", scale)"""


def _fcntl_leases() -> bool:
    import fcntl

    return hasattr(fcntl, "F_SETLEASE")


@pytest.mark.skipif(not _fcntl_leases(), reason="file leases are Linux's")
@pytest.mark.parametrize(
    "name, extra",
    [("model.pth", []), ("model.pth", ["-o", "out.pth"]), ("model.safetensors", [])],
)
def test_a_file_truncated_while_read_is_one_error_line(
    name: str, extra: list[str], tmp_path: Path
) -> None:
    ini = write_project(
        tmp_path,
        [
            (REV_A, None, "    pass", "    pass"),
            (REV_B, REV_A, WAIT_FOR_THE_TRUNCATION, "    pass"),
        ],
    )
    gen = torch.Generator().manual_seed(3)
    sd = OrderedDict((f"w{i}", torch.randn(512, 512, generator=gen)) for i in range(4))
    ckpt = tmp_path / name
    if name.endswith(".pth"):
        torch.save(stamp_state_dict(sd, REV_A), ckpt)
    else:
        save_file(dict(sd), ckpt, metadata={"ckptmigrate.revision": REV_A})
    prefix = ckpt.read_bytes()[:4096]
    marker = tmp_path / "reading"
    env = {**os.environ, "CKPTMIGRATE_TEST_MARKER": str(marker)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptmigrate", "-c", str(ini), "upgrade", str(ckpt), *extra],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.communicate()
    # another program truncates the file the command is reading (it waits for
    # ckptmigrate to let go of it, then goes on)
    os.truncate(ckpt, 4096)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, err)  # not -7: no SIGBUS
    assert sum(line.startswith("Error:") for line in lines) == 1, err
    assert lines[-1].startswith(f"Error: {ckpt} is being changed by another program"), err
    assert "nothing was written" in lines[-1] and "Traceback" not in err
    # the file is what the other program made of it: ckptmigrate did not switch
    # its own output in, and left no output or temporary file
    assert ckpt.read_bytes() == prefix
    assert not (tmp_path / "out.pth").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(not _fcntl_leases(), reason="file leases are Linux's")
def test_a_file_open_for_writing_elsewhere_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.pth"
    _crafted(ckpt, "w1", _View(torch.zeros(4096), 0, (64, 64), (64, 1)))
    before = ckpt.read_bytes()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"f = open({str(ckpt)!r}, 'ab'); print('open', flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "open\n"
        code, err = invoke("-c", str(ini), "upgrade", "model.pth")
    finally:
        writer.communicate("\n", timeout=30)
    assert code == 1 and "model.pth is open for writing in another process" in err, err
    assert ckpt.read_bytes() == before
    code, err = invoke("-c", str(ini), "upgrade", "model.pth")  # once the writer has finished
    assert code == 0, err
