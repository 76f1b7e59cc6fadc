"""Ctrl-C during a batch: a real SIGINT to a real ``ckptmigrate upgrade runs/`` process.

It is sent once the first checkpoint is reported done (read from the
process's stderr), while the others are still queued or being written. The
revision slows each tensor down, so there is always work left when it lands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from tests.harness.common import TMP_SUFFIX, digest, stamp_state_dict, write_project

N = 40
UP = """\
    op.map_tensor("a", _slow, shape=(256,), dtype=torch.float32)
    op.map_tensor("b", _slow, shape=(256,), dtype=torch.float32)"""
SLOW = "import time\n\n\ndef _slow(t):\n    time.sleep(0.01)\n    return t * 2\n\n\n"


def _tree(root: Path) -> dict[Path, str]:
    write_project(root, [("r0", None, "    pass", "    pass"), ("r1", "r0", UP, "    pass")])
    versions = root / "migrations" / "versions"
    text = (versions / "r1.py").read_text()
    (versions / "r1.py").write_text(text.replace("import torch\n", SLOW + "import torch\n", 1))
    originals = {}
    for i in range(N):
        path = root / "runs" / f"exp{i % 4}" / f"ckpt{i:02d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = OrderedDict(a=torch.full((256,), float(i)), b=torch.ones(256), c=torch.zeros(8))
        torch.save(stamp_state_dict(sd, "r0"), path)
        originals[path] = digest(path)
    return originals


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_leaves_every_checkpoint_old_or_new(tmp_path: Path, jobs: str) -> None:
    originals = _tree(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptmigrate", "upgrade", "runs", "-j", jobs],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # until the first checkpoint is done
            seen.append(line)
            if line.startswith("Upgraded "):
                proc.send_signal(signal.SIGINT)
                break
        out, rest = proc.communicate()
    finally:
        watchdog.cancel()
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert "Error: interrupted by Ctrl-C" in err.splitlines()[-1]

    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert len(rows) == N
    upgraded = {p for p, line in rows.items() if line.endswith("upgraded")}
    interrupted = {p for p, line in rows.items() if "interrupted: stopped by Ctrl-C" in line}
    assert upgraded and interrupted and len(upgraded) + len(interrupted) == N
    assert f"Stopped by Ctrl-C after {len(upgraded)} of {N} checkpoints" in err
    for path, before in originals.items():
        name = str(path.relative_to(tmp_path))
        if name in interrupted:
            assert digest(path) == before, name  # the old file, byte for byte
        else:
            sd = torch.load(path, weights_only=True)
            i = int(path.stem[4:])
            assert torch.equal(sd["a"], torch.full((256,), 2.0 * i)), name
            assert torch.equal(sd["b"], torch.full((256,), 2.0)), name
            assert sd._metadata[""]["ckptmigrate.revision"] == "r1"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(TMP_SUFFIX)]

    again = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "upgrade", "runs", "-j", jobs],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert again.returncode == 0, again.stderr
    totals = again.stdout.splitlines()[-1]
    assert totals.startswith(
        f"{N} checkpoints: {len(interrupted)} upgraded, {len(upgraded)} already at target"
    )
    for path in originals:
        i = int(path.stem[4:])
        assert torch.equal(torch.load(path, weights_only=True)["a"], torch.full((256,), 2.0 * i))


def test_a_reader_that_stops_early_ends_the_report_quietly(tmp_path: Path) -> None:
    """``ckptmigrate current runs/ --format json | head``: no traceback, no internal error."""
    _tree(tmp_path)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the report is printed
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ckptmigrate", "current", "runs", "--format", "json"],
            cwd=tmp_path,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=240,
        )
    finally:
        os.close(write)
    assert proc.returncode == 1
    assert proc.stderr == ""
