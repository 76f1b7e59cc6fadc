"""Load: many ckptmigrate processes at once, on different checkpoints and on one.

The work happens in tests/harness/load.py (one process that imports torch once
and forks every command, all released at the same moment); this test runs it
and checks its report. Also: a long-lived process that migrates many times
keeps no file descriptor open.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tests.conftest import ADD_FC3, INITIAL, v1_state_dict

import ckptmigrate

REPO = Path(__file__).resolve().parent.parent


def test_fifty_upgrades_and_a_crowd_on_one_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.harness.load", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["fleet"]["processes"] == 50
    assert report["fleet"]["failures"] == []
    crowd = report["crowd"]
    assert crowd["processes"] == 10 and crowd["failures"] == []
    assert sum(crowd["finals"].values()) == crowd["rounds"]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_no_file_descriptor_leaks_across_many_runs(project: Path) -> None:
    torch.save(v1_state_dict(), "model.pth")
    ckptmigrate.upgrade("model.pth", from_revision=INITIAL)  # warm: imports, caches
    ckptmigrate.downgrade("model.pth", INITIAL)
    before = _open_fds()
    for _ in range(20):
        ckptmigrate.upgrade("model.pth")
        assert ckptmigrate.current("model.pth") == (ADD_FC3,)
        ckptmigrate.downgrade("model.pth", INITIAL)
        ckptmigrate.stamp("model.pth", INITIAL, output="copy.pth")
    assert _open_fds() == before
