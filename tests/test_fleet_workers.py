"""``-j N`` on local files: N forked worker processes, and what happens when one dies.

The revisions below are trusted code (as every migration script is), so
they can say which process ran them, or kill it. The command runs as its own
process, as a user runs it: forking is only done in a process with no other
thread, and the test process has some (a progress bar's monitor, say).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from tests.conftest import Run
from tests.harness.common import TMP_SUFFIX, digest, stamp_state_dict, write_project

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="forked workers are used on Linux only"
)

N = 8

#: Each upgrade appends the pid of the process running it, and its parent's, to $PIDS_FILE.
WHO = """\
    import os as _os

    with open(_os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{_os.getpid()} {_os.getppid()}\\n")
    op.map_tensor("a", lambda t: t * 2)"""

#: The worker that gets the checkpoint whose "a" starts at 3.0 is killed mid-write.
KILL = """\
    op.map_tensor("a", _maybe_die, shape=(64,), dtype=torch.float32)"""
KILL_HEADER = (
    "import os\nimport signal\n\n\ndef _maybe_die(t):\n    if float(t[0]) == 3.0:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n    return t * 2\n\n\n"
)


def _ckptmigrate(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptmigrate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=240,
    )


def _tree(root: Path, up: str, header: str = "") -> dict[Path, str]:
    write_project(root, [("r0", None, "    pass", "    pass"), ("r1", "r0", up, "    pass")])
    if header:
        script = root / "migrations" / "versions" / "r1.py"
        text = script.read_text()
        script.write_text(text.replace("import torch\n", "import torch\n" + header, 1))
    originals = {}
    for i in range(N):
        path = root / "runs" / f"exp{i % 2}" / f"ckpt{i}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = OrderedDict(a=torch.full((64,), float(i)), b=torch.arange(8.0))
        torch.save(stamp_state_dict(sd, "r0"), path)
        originals[path] = digest(path)
    return originals


@pytest.mark.parametrize("fsync", [[], ["--no-fsync"]])
def test_jobs_run_in_worker_processes(tmp_path: Path, fsync: list[str]) -> None:
    """Also without fsync, where each old file is swapped out and deleted in the background."""
    _tree(tmp_path, WHO)
    pids = tmp_path / "pids.txt"
    proc = _ckptmigrate(tmp_path, "upgrade", "runs", "-j", "2", *fsync, PIDS_FILE=str(pids))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith(f"{N} checkpoints: {N} upgraded")
    ran = [line.split() for line in pids.read_text().splitlines()]
    assert len(ran) == N
    assert len({pid for pid, _ in ran}) == 2  # two workers, each taking the next checkpoint
    assert len({parent for _, parent in ran}) == 1  # forked by the one command
    assert not {pid for pid, _ in ran} & {parent for _, parent in ran}  # not in the command itself
    for i in range(N):
        sd = torch.load(tmp_path / "runs" / f"exp{i % 2}" / f"ckpt{i}.pt", weights_only=True)
        assert torch.equal(sd["a"], torch.full((64,), 2.0 * i))
        assert sd._metadata[""]["ckptmigrate.revision"] == "r1"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(TMP_SUFFIX)]  # old files gone


def test_a_program_running_threads_of_its_own_gets_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """Forking a process with other threads can deadlock the copy: the batch stays in-process."""
    _tree(tmp_path, WHO)
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("PIDS_FILE", str(pids))
    monkeypatch.chdir(tmp_path)
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        result = run("upgrade", "runs", "-j", "2")
    finally:
        release.set()
        other.join()
    assert result.stdout.splitlines()[-1].startswith(f"{N} checkpoints: {N} upgraded")
    assert {line.split()[0] for line in pids.read_text().splitlines()} == {str(os.getpid())}
    sd = torch.load(tmp_path / "runs" / "exp1" / "ckpt5.pt", weights_only=True)
    assert torch.equal(sd["a"], torch.full((64,), 10.0))


def test_a_worker_that_dies_fails_its_checkpoint_and_the_others_go_on(tmp_path: Path) -> None:
    originals = _tree(tmp_path, KILL, KILL_HEADER)
    proc = _ckptmigrate(tmp_path, "upgrade", "runs", "-j", "2")
    assert proc.returncode == 1, proc.stderr
    victim = os.path.join("runs", "exp1", "ckpt3.pt")
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:-1]}
    assert len(rows) == N
    assert "failed: the worker process running it was killed by signal 9 (SIGKILL)" in rows[victim]
    assert f"Failed {victim}: the worker process running it was killed" in proc.stderr
    assert f"'ckptmigrate current {victim}' says which" in proc.stderr
    assert proc.stdout.splitlines()[-1].startswith(f"{N} checkpoints: {N - 1} upgraded, 1 failed")
    for path, before in originals.items():
        i = int(path.stem[4:])
        if i == 3:
            assert digest(path) == before  # the old file, byte for byte
        else:
            sd = torch.load(path, weights_only=True)
            assert torch.equal(sd["a"], torch.full((64,), 2.0 * i))
    # the temporary file the killed worker was writing is gone
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(TMP_SUFFIX)]
