"""Two writers on one checkpoint: a migration is applied once, writes never interleave."""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import invoke
from tests.harness.common import (
    DOWNGRADE_B,
    REV_A,
    REV_B,
    UPGRADE_B,
    leftovers,
    stamp_state_dict,
    write_project,
)

from ckptmigrate.formats import lock

# When the test sets a gate, upgrade() holds the lock until the gate file
# exists: the test opens it once the other processes wait, so they surely overlap.
SLOW_UPGRADE = (
    "    import os, time\n"
    "    gate = os.environ.get('CKPTMIGRATE_TEST_GATE')\n"
    "    deadline = time.monotonic() + 60\n"
    "    while gate and not os.path.exists(gate) and time.monotonic() < deadline:\n"
    "        time.sleep(0.02)\n" + UPGRADE_B
)


def _project(root: Path) -> tuple[Path, Path]:
    ini = write_project(
        root, [(REV_A, None, "    pass", "    pass"), (REV_B, REV_A, SLOW_UPGRADE, DOWNGRADE_B)]
    )
    gen = torch.Generator().manual_seed(11)
    sd = OrderedDict((f"w{i}", torch.randn(256, 256, generator=gen)) for i in range(4))
    ckpt = root / "model.pth"
    torch.save(stamp_state_dict(sd, REV_A), ckpt)
    return ini, ckpt


def test_processes_upgrading_one_file_at_once(tmp_path: Path) -> None:
    ini, ckpt = _project(tmp_path)
    expected = tmp_path / "expected.pth"
    code, err = invoke("-c", str(ini), "upgrade", str(ckpt), "-o", str(expected))
    assert code == 0, err
    gate = tmp_path / "gate"
    env = {**os.environ, "CKPTMIGRATE_TEST_GATE": str(gate)}
    logs = [tmp_path / f"stderr{i}.txt" for i in range(3)]
    procs = []
    for log in logs:
        with open(log, "w") as fh:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ckptmigrate", "-c", str(ini), "upgrade", str(ckpt)],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=fh,
                )
            )
    # One of them holds the lock (inside upgrade(), at the gate); open the gate
    # once the two others report that they wait for it.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        waiting = sum("Waiting for another ckptmigrate process" in p.read_text() for p in logs)
        if waiting == 2 or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    gate.touch()
    for p in procs:
        p.wait(timeout=120)
    errs = [p.read_text() for p in logs]
    summary = "\n---\n".join(errs)
    assert [p.returncode for p in procs] == [0, 0, 0], summary
    assert waiting == 2, summary  # they really overlapped
    running = f"Running upgrade {REV_A} -> {REV_B}"
    # The migration ran exactly once; the others then found the file upgraded.
    assert sum(err.count(running) for err in errs) == 1, summary
    assert sum("Nothing to upgrade" in err and f"is at {REV_B}" in err for err in errs) == 2
    assert ckpt.read_bytes() == expected.read_bytes()
    assert leftovers(tmp_path) == []


def _hold(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_writer_that_cannot_get_the_lock_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini, ckpt = _project(tmp_path)
    before = ckpt.read_bytes()
    monkeypatch.setattr(lock, "locked", functools.partial(lock.locked, timeout=0.3))
    fd = _hold(ckpt)  # another writer holds it
    try:
        for command in (["upgrade"], ["downgrade", "base"], ["stamp", REV_B]):
            args = [command[0], str(ckpt), *command[1:]]
            code, err = invoke("-c", str(ini), *args)
            assert code == 1, err
            assert err.strip().splitlines()[-1] == (
                f"Error: {ckpt} is being written by another ckptmigrate process; "
                "wait for it to finish and run the command again"
            )
    finally:
        os.close(fd)
    assert ckpt.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_a_waiting_writer_reads_the_file_the_other_one_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other writer replaces the file while we wait: we lock and read the new one."""
    ini, ckpt = _project(tmp_path)
    upgraded = tmp_path / "upgraded.pth"
    code, err = invoke("-c", str(ini), "upgrade", str(ckpt), "-o", str(upgraded))
    assert code == 0, err
    staged = tmp_path / "staged.pth"
    shutil.copyfile(upgraded, staged)
    waiting = threading.Event()
    real_locked = lock.locked

    def locked(path: Path, **kwargs: Any) -> Any:
        """The real lock, which also tells this test when it starts to wait."""
        notify = kwargs.get("notify")

        def told(message: str) -> None:
            if notify is not None:
                notify(message)
            waiting.set()

        return real_locked(path, **{**kwargs, "notify": told})

    monkeypatch.setattr(lock, "locked", locked)
    fd = _hold(ckpt)

    def other_writer() -> None:
        waiting.wait(timeout=120)  # the timeout only ends a hang; the asserts below tell
        os.replace(staged, ckpt)  # its atomic switch, then its process ends
        os.close(fd)

    thread = threading.Thread(target=other_writer)
    thread.start()
    code, err = invoke("-c", str(ini), "upgrade", str(ckpt))
    thread.join()
    assert waiting.is_set(), err
    assert code == 0, err
    assert err.startswith(f"Waiting for another ckptmigrate process writing {ckpt}")
    assert "Running upgrade" not in err
    assert f"Nothing to upgrade: {ckpt} is at {REV_B}" in err
    assert ckpt.read_bytes() == upgraded.read_bytes()
