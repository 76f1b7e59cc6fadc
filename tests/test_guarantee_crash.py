"""Crash safety: SIGKILL at any moment leaves the old file or the new one, never a mix.

The work happens in tests/harness/crash.py (one process that imports torch
once and forks a child per trial); this test runs it and checks its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.harness.common import TMP_SUFFIX

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sigkill_at_random_moments_leaves_old_or_new(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.harness.crash", str(tmp_path), "--seed", "20260101"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = proc.stderr.strip()
    print(summary)  # kills per command, and where they landed (pytest -s shows it)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    commands = report["commands"]
    assert report["file_bytes"] > 30_000_000
    wanted = {"upgrade": 50, "upgrade --no-fsync": 20, "downgrade": 20, "stamp": 20}
    assert set(commands) == set(wanted)
    for name, result in commands.items():
        assert result["failures"] == [], (name, summary)
        assert result["kills"] >= wanted[name], (name, summary)
        phases = result["phases"]
        # Every trial ended with the old file or the new one, bit for bit: the
        # harness counts a trial in a phase only after comparing the bytes and
        # the loaded tensors with the clean runs' files.
        assert sum(phases.values()) == result["trials"], (name, phases)
        assert result["leftovers_after_final_run"] == 0, name
    up = commands["upgrade"]["phases"]
    # The kills really spread over the run: before writing, while the temporary
    # file was being written, and (over all commands) after the switch.
    assert up.get("killed while writing", 0) >= 10, summary
    assert up.get("killed before writing", 0) >= 3, summary
    after = sum(c["phases"].get("killed after the switch", 0) for c in commands.values())
    finished = sum(c["phases"].get("finished before the kill", 0) for c in commands.values())
    assert after + finished >= 10, summary
    # Killed writers did leave temporary files, and later runs removed them.
    assert max(c["max_leftovers_seen"] for c in commands.values()) >= 1, summary
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sigkill_of_a_sharded_folder_leaves_old_or_new_and_the_next_command_cleans(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.harness.crash_folders", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = proc.stderr.strip()
    print(summary)
    commands = json.loads(proc.stdout.strip().splitlines()[-1])["commands"]
    assert set(commands) == {"upgrade", "downgrade"}
    for name, result in commands.items():
        # each trial compared the index and every shard it references, byte for
        # byte, with the clean runs' folders, and loaded every tensor
        assert result["failures"] == [], (name, summary)
        assert result["kills"] >= 15, (name, summary)
        assert result["phases"].get("killed during the shard writes", 0) >= 3, (name, summary)
        assert result["phases"].get("killed before writing", 0) >= 1, (name, summary)
        for moment in ("killed before the index switch", "killed after it"):
            kill = result[moment]
            assert kill["signal"] == 9, (name, moment, kill)
            assert kill["state"] == ("old" if moment.endswith("switch") else "new"), kill
            # the kill did leave files behind (new shards, or replaced ones) ...
            assert kill["left behind"], (name, moment, kill)
            # ... and the next command removed every one and ended at the new state
            assert kill["after the next command"] == [], (name, moment, kill)
            assert kill["next command ends at new"], (name, moment, kill)
        assert result["final run clean"], name
