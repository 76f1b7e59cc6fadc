"""Hostile pickles: refused with the global named, the payload never runs.

Every payload's side effect is creating a marker file. A positive control
runs each file with ``--trust-pickle`` and sees the marker appear, so the
check would catch a payload that ran.
"""

from __future__ import annotations

import argparse
import builtins
import os
import pickle
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.conftest import invoke
from tests.harness.common import (
    REV_A,
    REV_B,
    leftovers,
    stamp_state_dict,
    standard_project,
    torch_zip_file,
)


class _Reduce:
    """Pickles as ``fn(*args)``: what a hostile checkpoint does."""

    def __init__(self, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.fn, self.args


def _sd() -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    names = ["w0", "w1", "w2", "w3"]
    sd = OrderedDict((k, torch.randn(4, 4, generator=gen)) for k in names)
    return stamp_state_dict(sd, REV_A)  # type: ignore[no-any-return]


def _write_payload(kind: str, path: Path, marker: Path) -> str:
    """Write a checkpoint whose pickle creates ``marker``; return the global it names."""
    touch = f"open({str(marker)!r}, 'w').close()"
    saved = {
        "os.system": (_Reduce(os.system, (f"touch {marker}",)), "posix.system"),
        "eval": (_Reduce(eval, (touch,)), "builtins.eval"),
        "builtins.exec": (_Reduce(builtins.exec, (touch,)), "builtins.exec"),
        "subprocess.Popen": (
            _Reduce(subprocess.Popen, (["touch", str(marker)],)),
            "subprocess.Popen",
        ),
    }
    if kind in saved:  # torch.save of an object with __reduce__, inside a container
        obj, name = saved[kind]
        torch.save({"model": _sd(), "evil": obj}, path)
        return name
    if kind == "legacy format":  # the pre-1.6 serialization, read by torch.load
        obj, _ = saved["os.system"]
        torch.save({"model": _sd(), "evil": obj}, path, _use_new_zipfile_serialization=False)
        return "posix.system"
    cmd = f"touch {marker}".encode()
    hand = {
        # GLOBAL + REDUCE, protocol 0, as the whole data.pkl
        "GLOBAL os.system": b"cos\nsystem\n(S'" + cmd + b"'\ntR.",
        # protocol 4: STACK_GLOBAL, which PyTorch's unpickler has no case for
        "STACK_GLOBAL": pickle.dumps(_Reduce(os.system, (cmd.decode(),)), protocol=4),
        # INST and OBJ call a class (here: any callable) without REDUCE
        "INST": b"(S'" + cmd + b"'\nios\nsystem\n.",
        "OBJ": b"(cos\nsystem\nS'" + cmd + b"'\no.",
        # inside a plain dict, after a harmless entry
        "nested in a dict": b"}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bcos\nsystem\n(S'"
        + cmd
        + b"'\ntRu.",
    }
    if kind in hand:  # hand-written pickle bytes in a valid torch zip (CRCs right)
        torch_zip_file(path, hand[kind])
        return "posix.system" if kind == "STACK_GLOBAL" else "os.system"
    if kind == "big-endian zip (torch.load fallback)":
        torch_zip_file(path, hand["GLOBAL os.system"], byteorder="big")
        return "os.system"
    raise AssertionError(kind)


KINDS = [
    "os.system",
    "eval",
    "builtins.exec",
    "subprocess.Popen",
    "legacy format",
    "GLOBAL os.system",
    "STACK_GLOBAL",
    "INST",
    "OBJ",
    "nested in a dict",
    "big-endian zip (torch.load fallback)",
]


def _wait_for(path: Path, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


def _child_processes() -> set[int]:
    """This process's children: running, or exited and not yet reaped (a zombie stays listed)."""
    me = str(os.getpid())
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, ...
        except OSError:
            continue  # ended meanwhile
        if fields[1] == me:
            found.add(int(stat.parent.name))
    return found


def _payload_ran(marker: Path, children_before: set[int]) -> bool:
    """Whether a payload ran, decided now, without waiting.

    ``os.system``, ``eval`` and ``exec`` create the marker before the command
    returns. A ``Popen`` child is this process's child until it is reaped,
    and only ``Popen``'s finaliser reaps it, once it exited, that is once the
    marker exists.
    """
    return marker.exists() or bool(_child_processes() - children_before)


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_pickle_is_refused_and_never_runs(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = standard_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.pth"
    name = _write_payload(kind, ckpt, marker)
    before = ckpt.read_bytes()
    children = _child_processes()
    for command in (["upgrade"], ["current"], ["stamp"], ["downgrade"]):
        args = ["-c", str(ini), *command, str(ckpt)]
        args += {"stamp": [REV_B], "downgrade": ["base"]}.get(command[0], [])
        code, err = invoke(*args)
        lines = err.strip().splitlines()
        assert code == 1, (command, err)
        assert len(lines) == 1 and lines[0].startswith("Error: refusing to load"), err
        assert f"its pickle needs the global {name}," in lines[0], lines[0]
        assert "--trust-pickle" in lines[0]
        assert "Traceback" not in err
        assert ckpt.read_bytes() == before
        assert leftovers(tmp_path) == []
    assert not _payload_ran(marker, children), "the payload ran"

    # Positive control: --trust-pickle is the way in, and then the payload runs.
    code, err = invoke("-c", str(ini), "current", str(ckpt), "--trust-pickle")
    assert err.startswith("Warning: --trust-pickle: loading the checkpoint can run arbitrary code")
    assert _payload_ran(marker, children), (kind, code, err)
    assert _wait_for(marker), (kind, code, err)


def test_trust_pickle_loads_a_benign_unlisted_global_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = standard_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "lightning_style.ckpt"
    gen = torch.Generator().manual_seed(3)
    sd = OrderedDict((f"w{i}", torch.randn(512, 512, generator=gen)) for i in range(4))
    stamp_state_dict(sd, REV_A)
    hparams = argparse.Namespace(lr=0.1, layers=4)  # old Lightning checkpoints hold these
    torch.save({"state_dict": sd, "hparams": hparams, "epoch": 7}, ckpt)
    before = ckpt.read_bytes()

    code, err = invoke("-c", str(ini), "upgrade", str(ckpt))
    assert code == 1 and "argparse.Namespace" in err and "--trust-pickle" in err, err
    assert ckpt.read_bytes() == before

    code, err = invoke("-c", str(ini), "upgrade", str(ckpt), "--trust-pickle")
    assert code == 0, err
    assert err.splitlines()[0] == (
        "Warning: --trust-pickle: loading the checkpoint can run arbitrary code from the file"
    )
    assert f"Running upgrade {REV_A} -> {REV_B}" in err
    out = torch.load(ckpt, weights_only=False)
    assert out["hparams"] == hparams and out["epoch"] == 7
    assert torch.equal(out["state_dict"]["renamed0"], sd["w0"])
    assert torch.equal(out["state_dict"]["w1"], sd["w1"] * 2)
    # Without the flag the upgraded file is still refused: the global is still there.
    code, err = invoke("-c", str(ini), "current", str(ckpt))
    assert code == 1 and "argparse.Namespace" in err


def test_refusal_is_one_line_in_a_real_process(tmp_path: Path) -> None:
    """No warning or trace around the Error line when the CLI runs for real."""
    ini = standard_project(tmp_path)
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.pth"
    _write_payload("STACK_GLOBAL", ckpt, marker)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "-c", str(ini), "upgrade", str(ckpt)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"Error: refusing to load {ckpt}: its pickle needs the global posix.system, which "
        "could run arbitrary code; if you trust the file's origin, pass --trust-pickle"
    ]
    assert not marker.exists()


class _Sneaky:
    """Saved as a harmless ``_Sneaky()``; once ``armed``, it pickles as a payload."""

    armed: Path | None = None

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        if _Sneaky.armed is not None:
            return os.system, (f"touch {_Sneaky.armed}",)
        return _Sneaky, ()


def test_verification_never_runs_the_written_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --trust-pickle the output holds unlisted globals; checking it runs none of them."""
    ini = standard_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.pth"
    torch.save({"state_dict": _sd(), "extra": _Sneaky()}, ckpt)
    marker = tmp_path / "PWNED"
    monkeypatch.setattr(_Sneaky, "armed", marker)  # the output will carry os.system
    code, err = invoke("-c", str(ini), "upgrade", str(ckpt), "--trust-pickle")
    assert code == 0, err
    assert not marker.exists(), "verification ran the output's pickle"
    code, err = invoke("-c", str(ini), "current", str(ckpt))
    assert code == 1 and "posix.system" in err  # what verification read without running
