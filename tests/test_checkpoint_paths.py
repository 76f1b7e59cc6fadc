"""Paths that are no checkpoint get a plain answer, before torch is even imported.

A missing file, a folder, an empty file or a file that is something else (a
Python script, a JSON config, notes) is refused from the path and the first
bytes alone: the message says what the file looks like instead of quoting
PyTorch's unpickling advice, and it comes without the seconds ``import torch``
costs (the subprocess tests look at ``sys.modules`` after the command).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import INITIAL, Run, v1_state_dict

# Runs the CLI, then reports whether torch got imported on the way.
PROBE = """\
import sys
from ckptmigrate.cli import main
try:
    main(sys.argv[1:])
finally:
    print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
"""


def _cli_in_subprocess(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _make(project: Path, what: str) -> str:
    """A path that is not a checkpoint; returns its name."""
    if what == "missing":
        return "nope.pt"
    if what == "directory":
        (project / "adir").mkdir()
        return "adir"
    if what == "empty":
        (project / "empty.pt").write_bytes(b"")
        return "empty.pt"
    if what == "python":
        (project / "model.py").write_text("import torch\n\n\ndef build():\n    pass\n")
        return "model.py"
    if what == "json":
        (project / "config.json").write_text(json.dumps({"hidden_size": 16}))
        return "config.json"
    raise AssertionError(what)


COMMANDS = {
    "current": lambda p: ["current", p],
    "upgrade": lambda p: ["upgrade", p],
    "downgrade": lambda p: ["downgrade", p, "base"],
    "stamp": lambda p: ["stamp", p, INITIAL],
    "diff": lambda p: ["diff", p],
    "schema --record": lambda p: ["schema", "--record", p, "--from", INITIAL],
}

EXPECTED = {
    "missing": "nope.pt: no such file",
    "directory": "adir is a directory",
    "empty": "empty.pt is empty (0 bytes)",
    "python": "model.py is not a checkpoint (it looks like Python source)",
    "json": "config.json is not a checkpoint (it looks like JSON)",
}


@pytest.mark.parametrize("what", list(EXPECTED))
@pytest.mark.parametrize("command", ["current", "upgrade"])
def test_answered_before_torch_is_imported(project: Path, what: str, command: str) -> None:
    name = _make(project, what)
    result = _cli_in_subprocess(project, *COMMANDS[command](name))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert lines[-1] == "torch not imported", result.stderr
    assert len(lines) == 2 and lines[0].startswith(f"Error: {EXPECTED[what]}")


@pytest.mark.parametrize("command", ["downgrade", "stamp", "diff", "schema --record"])
def test_every_checkpoint_command_answers_before_torch(project: Path, command: str) -> None:
    result = _cli_in_subprocess(project, *COMMANDS[command]("nope.pt"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: nope.pt: no such file; check the checkpoint path",
        "torch not imported",
    ]


def test_a_real_checkpoint_does_import_torch(project: Path) -> None:
    """The probe itself can tell: reading a checkpoint needs torch."""
    torch.save(v1_state_dict(), project / "model.pth")
    result = _cli_in_subprocess(project, "stamp", "model.pth", INITIAL)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "torch imported"


@pytest.mark.parametrize(
    "content, looks_like",
    [
        (b"#!/usr/bin/env python\nprint('hi')\n", "Python source"),
        (b"from torch import nn\nclass Net(nn.Module):\n    pass\n", "Python source"),
        (b'[{"a": 1}]', "JSON"),
        (b'  {\n  "weight_map": {}\n}', "JSON"),
        (b"epoch 3: loss 0.25\nepoch 4: loss 0.21\n", "text"),
        ("Gewichte für später\n".encode(), "text"),
    ],
)
def test_text_files_are_not_checkpoints(
    project: Path, run: Run, content: bytes, looks_like: str
) -> None:
    Path("thing.pth").write_bytes(content)
    err = run("current", "thing.pth", code=1).stderr
    assert err.startswith(f"Error: thing.pth is not a checkpoint (it looks like {looks_like})")
    assert "weights_only" not in err and "damaged" not in err
    assert "torch.save" in err and "safetensors" in err  # what would be accepted
    assert len(err.strip().splitlines()) == 1


def test_python_source_is_named_by_its_suffix_too(project: Path, run: Run) -> None:
    Path("train.py").write_text("x = 1\n")
    err = run("upgrade", "train.py", code=1).stderr
    assert err.startswith("Error: train.py is not a checkpoint (it looks like Python source)")


@pytest.mark.parametrize(
    "content, named",
    [
        (b"\x1f\x8b\x08\x00" + bytes(40), "a gzip file"),
        (b"\x93NUMPY\x01\x00" + bytes(40), "a NumPy array file"),
        (b"\x89HDF\r\n\x1a\n" + bytes(40), "an HDF5 file"),
    ],
)
def test_other_known_formats_are_named(project: Path, run: Run, content: bytes, named: str) -> None:
    Path("w.bin").write_bytes(content)
    err = run("current", "w.bin", code=1).stderr
    assert err.startswith(f"Error: w.bin is not a checkpoint (it looks like {named})")


def test_unknown_bytes_say_not_a_checkpoint_or_damaged(project: Path, run: Run) -> None:
    Path("w.pt").write_bytes(bytes(range(200, 256)) * 4)
    err = run("current", "w.pt", code=1).stderr
    assert err.startswith("Error: w.pt is not a checkpoint, or it is damaged: it starts with")
    assert "c8 c9 ca cb" in err  # the bytes it saw
    assert len(err.strip().splitlines()) == 1


def test_every_real_layout_is_still_read(project: Path, run: Run) -> None:
    """Zip, legacy pickle and safetensors (under any suffix) are recognised as before."""
    sd = v1_state_dict()
    torch.save(sd, "zip.pth")
    torch.save(sd, "legacy.pth", _use_new_zipfile_serialization=False)
    from safetensors.torch import save_file

    save_file(sd, "st.bin")
    for name in ("zip.pth", "legacy.pth", "st.bin"):
        result = run("current", name)
        assert result.stdout == f"{INITIAL} (identified by schema)\n", name
    head = Path("st.bin").read_bytes()[:9]
    assert struct.unpack("<Q", head[:8])[0] > 0 and head[8:9] == b"{"


def test_an_index_under_another_name_is_told_the_naming_rule(project: Path, run: Run) -> None:
    Path("index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"a": "x.bin"}}))
    err = run("current", "index.json", code=1).stderr
    assert err.startswith("Error: index.json is not a checkpoint (it looks like JSON)")
    assert "must be named *.index.json" in err
