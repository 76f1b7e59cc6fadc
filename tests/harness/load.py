"""Many ckptmigrate processes at once: different checkpoints, and one checkpoint.

Run by tests/test_guarantee_load.py as ``python -m tests.harness.load WORKDIR``.
It imports torch and ckptmigrate once and forks every command as its own
process, all started together (a pipe releases them at the same moment), so
they really run at the same time:

* ``fleet``: 50 upgrades of 50 different checkpoints;
* ``crowd``: 10 commands (upgrade, downgrade, stamp, current) on one checkpoint,
  in a seeded random mix, repeated over several rounds.

Afterwards every file must be byte for byte the file a serial run produces at
its revision (so some serial order of the commands explains it), no temporary
file may remain, and each file must be lockable again at once (no writer left
holding it). Prints a JSON report as the last line of stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from tests.harness.common import REV_A, REV_B, digest, leftovers, standard_project
from tests.harness.crash import _run_clean, _warm_up

from ckptmigrate.cli import main as cli_main


def _weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(256, 256, generator=gen) for i in range(4)}


def _together(argvs: list[list[str]], logs: Path) -> list[int]:
    """Fork one child per argv, release them all at once, wait: their exit codes."""
    read_fd, write_fd = os.pipe()
    pids = []
    for i, argv in enumerate(argvs):
        pid = os.fork()
        if pid == 0:
            os.close(write_fd)
            os.read(read_fd, 1)  # blocks until the parent closes its end: the start signal
            out = os.open(logs / f"{i}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            code = 1
            try:
                cli_main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                code = 99
            os._exit(code)
        pids.append(pid)
    os.close(read_fd)
    os.close(write_fd)  # every child's read returns now
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


def _unlocked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _single_error_lines(logs: Path, codes: list[int]) -> list[str]:
    """A failed command must have said why in one ``Error:`` line, never a traceback."""
    problems = []
    for i, code in enumerate(codes):
        text = (logs / f"{i}.log").read_text()
        if code == 0:
            continue
        errors = [line for line in text.splitlines() if line.startswith("Error: ")]
        if code != 1 or len(errors) != 1 or "Traceback" in text:
            problems.append(f"command {i} exited {code}: {text[-300:]}")
    return problems


def fleet(work: Path, base: list[str], n: int) -> dict[str, Any]:
    folder = work / "fleet"
    folder.mkdir()
    files = []
    for i in range(n):
        path = folder / f"m{i:02d}.pt"
        torch.save(_weights(i), path)
        files.append(path)
    expected = {}
    for path in files:  # the serial result, for comparison
        ref = work / f"ref-{path.name}"
        code, _ = _run_clean([*base, "upgrade", str(path), "--from", REV_A, "-o", str(ref)])
        assert code == 0, path
        expected[path] = digest(ref)
    logs = work / "fleet-logs"
    logs.mkdir()
    codes = _together([[*base, "upgrade", str(p), "--from", REV_A] for p in files], logs)
    failures = _single_error_lines(logs, codes)
    failures += [f"{p.name} failed (exit {c})" for p, c in zip(files, codes) if c != 0]
    failures += [
        f"{p.name} differs from a serial upgrade" for p in files if digest(p) != expected[p]
    ]
    failures += [f"{p.name} is still locked" for p in files if not _unlocked(p)]
    failures += [f"left behind: {name}" for name in leftovers(folder)]
    return {"processes": n, "failures": failures}


def crowd(work: Path, base: list[str], processes: int, rounds: int, seed: int) -> dict[str, Any]:
    folder = work / "crowd"
    folder.mkdir()
    ckpt = folder / "model.pt"
    torch.save(_weights(99), ckpt)
    at = {REV_A: work / "at-a.pt", REV_B: work / "at-b.pt"}
    assert _run_clean([*base, "stamp", str(ckpt), REV_A, "-o", str(at[REV_A])])[0] == 0
    assert _run_clean([*base, "upgrade", str(at[REV_A]), "-o", str(at[REV_B])])[0] == 0
    # with a base schema, stamp checks its claim: "stamp B" on a file at A is refused
    assert _run_clean([*base, "schema", "--record", str(at[REV_A])])[0] == 0
    digests = {rev: digest(p) for rev, p in at.items()}
    rng = random.Random(seed)
    choices = [
        ["upgrade", str(ckpt)],
        ["downgrade", str(ckpt), REV_A],
        ["stamp", str(ckpt), REV_B],  # refused (by its schema) unless the file is at B
        ["current", str(ckpt)],
    ]
    failures: list[str] = []
    finals: dict[str, int] = {}
    for r in range(rounds):
        start = REV_A if r % 2 == 0 else REV_B
        shutil.copyfile(at[start], ckpt)
        logs = work / f"crowd-logs-{r}"
        logs.mkdir()
        argvs = [[*base, *rng.choice(choices)] for _ in range(processes)]
        codes = _together(argvs, logs)
        failures += [f"round {r}: {p}" for p in _single_error_lines(logs, codes)]
        now = digest(ckpt)
        final = next((rev for rev, d in digests.items() if d == now), None)
        if final is None:
            failures.append(f"round {r}: the file is neither the serial result at A nor at B")
        else:
            finals[final] = finals.get(final, 0) + 1
        if not _unlocked(ckpt):
            failures.append(f"round {r}: the file is still locked")
        failures += [f"round {r}: left behind: {name}" for name in leftovers(folder)]
    return {"processes": processes, "rounds": rounds, "finals": finals, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--fleet", type=int, default=50)
    parser.add_argument("--crowd", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=20261201)
    args = parser.parse_args(argv)
    # Forked children must not enter an OpenMP pool their parent started (libgomp is
    # not fork-safe); one intra-op thread each is also what 60 processes on 2 cores get.
    torch.set_num_threads(1)
    work = Path(args.workdir)
    ini = standard_project(work)
    base = ["-q", "-c", str(ini)]
    warm = work / "warm"
    warm.mkdir()
    seed_file = warm / "m.pt"
    torch.save(_weights(0), seed_file)
    _warm_up(base, seed_file, warm)
    report = {
        "fleet": fleet(work, base, args.fleet),
        "crowd": crowd(work, base, args.crowd, args.rounds, args.seed),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
