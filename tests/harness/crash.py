"""Kill ``upgrade``/``downgrade``/``stamp`` with SIGKILL at random moments.

Run by tests/test_guarantee_crash.py as ``python -m tests.harness.crash WORKDIR``.
It imports torch and ckptmigrate once, then, for every trial, forks a child
that runs the command line in place on a checkpoint of some tens of MB,
sleeps a seeded random time in [0, 1.2 T] (T: one clean run), freezes the
child (SIGSTOP) to note how far it got (did its temporary file exist?), kills
it (SIGKILL) and checks that the file under the checkpoint's name is exactly
the old file or exactly the new one (same bytes; tensors equal bit for bit
after ``torch.load(weights_only=True)``). A final clean run must leave no
temporary file behind. Prints a JSON report as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tests.harness.common import (
    REV_A,
    REV_B,
    cli_child,
    digest,
    leftovers,
    same,
    standard_project,
    tmp_files_of,
)

from ckptmigrate.cli import main as cli_main


def _run_clean(argv: list[str]) -> tuple[int, float]:
    """Run the command to completion in a forked child: (exit code, seconds of work).

    The seconds run from the fork to the moment the command returned in the
    child, not to the parent reaping it (process teardown is no part of the run).
    """
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        cli_child(argv, write_fd)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd, "rb") as fh:
        text = fh.read().decode() or "nan"
    return os.waitstatus_to_exitcode(status), float(text) - start


def _warm_up(base: list[str], ckpt: Path, scratch: Path) -> None:
    """One in-process run, so forked children find every module imported already
    (the first meta-tensor arithmetic alone imports torch._dynamo: about a second)."""
    warm = scratch / "warm.pth"
    shutil.copyfile(ckpt, warm)
    for cmd in (["stamp", str(warm), REV_A], ["upgrade", str(warm), "-o", str(scratch / "w.pth")]):
        try:
            cli_main(base + cmd)
        except SystemExit as exc:
            if exc.code:
                raise
    warm.unlink()
    (scratch / "w.pth").unlink()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True, map_location="cpu")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class Scenario:
    """One command killed again and again: the file goes from ``before`` to ``after``."""

    def __init__(self, name: str, argv: list[str], before: Path, after: Path) -> None:
        self.name = name
        self.argv = argv
        self.before = before
        self.after = after
        self.before_digest = digest(before)
        self.after_digest = digest(after)
        self.before_tensors = _tensors(before)
        self.after_tensors = _tensors(after)
        assert self.before_digest != self.after_digest, name


def _trials(
    scenario: Scenario, ckpt: Path, kills: int, rng: random.Random, clean_seconds: float
) -> dict[str, Any]:
    """Trial after trial until ``kills`` SIGKILLs landed on a running process.

    A delay past the run's end lets it finish first; such trials are counted
    (and checked) too, but do not count as kills. The window the delays are
    drawn from follows how long runs take now (a loaded machine runs slower or
    faster than the clean run that measured it): it shrinks after a run that
    finished first and grows back after a kill near its end.
    """
    folder = ckpt.parent
    phases: Counter[str] = Counter()
    failures: list[str] = []
    max_leftovers = 0
    landed = trials = 0
    at_before = digest(ckpt) == scenario.before_digest
    window = 1.2 * clean_seconds
    while landed < kills and trials < 8 * kills:
        trials += 1
        if not at_before:
            shutil.copyfile(scenario.before, ckpt)
        delay = rng.uniform(0.0, window)
        pid = os.fork()
        if pid == 0:
            cli_child(scenario.argv)
        time.sleep(delay)
        os.kill(pid, signal.SIGSTOP)  # freeze it to see how far it got
        had_tmp = bool(tmp_files_of(folder, pid))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        landed += killed
        if not killed:
            window = max(0.8 * window, 0.01)
        elif delay > 0.8 * window:
            window = min(1.1 * window, 4 * clean_seconds)
        if not killed and os.waitstatus_to_exitcode(status) != 0:
            failures.append(f"trial {trials}: the run failed with exit {status} before the kill")
        now = digest(ckpt)
        at_before = now == scenario.before_digest
        if at_before:
            state, expected = "old", scenario.before_tensors
            phase = "killed while writing" if had_tmp else "killed before writing"
        elif now == scenario.after_digest:
            state, expected = "new", scenario.after_tensors
            phase = "killed after the switch" if killed else "finished before the kill"
        else:
            failures.append(f"trial {trials} (delay {delay:.3f}s): the file is neither old nor new")
            continue
        phases[phase] += 1
        try:
            if not same(_tensors(ckpt), expected):
                failures.append(f"trial {trials}: the {state} file's tensors differ")
        except Exception as exc:  # not loadable: the guarantee is broken
            failures.append(f"trial {trials}: the {state} file does not load: {exc}")
        max_leftovers = max(max_leftovers, len(leftovers(folder)))
    if landed < kills:
        failures.append(f"only {landed} of {trials} kills landed while the command ran")
    # The next run, on whatever the last trial left (so it may have nothing to
    # do), cleans what killed runs left and leaves nothing itself.
    stale_before_final = len(leftovers(folder))
    code, _ = _run_clean(scenario.argv)
    final_ok = code == 0 and digest(ckpt) == scenario.after_digest
    if not final_ok:
        failures.append(f"the final clean run failed (exit {code}) or wrote other bytes")
    final_leftovers = leftovers(folder)
    if final_leftovers:
        failures.append(f"temporary files left after the final clean run: {final_leftovers}")
    return {
        "kills": landed,
        "trials": trials,
        "clean_seconds": round(clean_seconds, 4),
        "phases": dict(phases),
        "old": phases["killed before writing"] + phases["killed while writing"],
        "new": phases["killed after the switch"] + phases["finished before the kill"],
        "max_leftovers_seen": max_leftovers,
        "stale_before_final_run": stale_before_final,
        "leftovers_after_final_run": len(final_leftovers),
        "failures": failures,
    }


def _state_dict(megabytes: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    n = 512
    count = max(4, megabytes * (1 << 20) // (n * n * 4))
    return {f"w{i}": torch.randn(n, n, generator=gen) for i in range(count)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--upgrade", type=int, default=50)
    parser.add_argument("--upgrade-no-fsync", type=int, default=20)
    parser.add_argument("--downgrade", type=int, default=20)
    parser.add_argument("--stamp", type=int, default=20)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    root = Path(args.workdir).resolve()
    ini = standard_project(root)
    os.chdir(root)
    pristine = root / "pristine"
    pristine.mkdir()
    ckpt = root / "model.pth"
    torch.save(_state_dict(args.megabytes), ckpt)
    base = ["-q", "-c", str(ini)]
    _warm_up(base, ckpt, pristine)

    def clean(cmd: list[str], keep_as: str) -> float:
        """Run ``cmd`` three times from the same input: the same bytes each time."""
        source = pristine / "input.tmp"
        shutil.copyfile(ckpt, source)
        times, digests = [], []
        for _ in range(3):
            shutil.copyfile(source, ckpt)
            code, seconds = _run_clean(base + cmd)
            if code != 0:
                raise SystemExit(f"clean run {cmd} failed with exit {code}")
            times.append(seconds)
            digests.append(digest(ckpt))
        if len(set(digests)) != 1:
            raise SystemExit(f"clean run {cmd} is not deterministic")
        shutil.copyfile(ckpt, pristine / keep_as)
        source.unlink()
        return sorted(times)[1]  # the median

    clean(["stamp", str(ckpt), REV_A], "at_a.pth")
    t_up = clean(["upgrade", str(ckpt)], "at_b.pth")
    t_down = clean(["downgrade", str(ckpt), REV_A], "down_a.pth")
    shutil.copyfile(pristine / "at_b.pth", ckpt)
    t_stamp = clean(["stamp", str(ckpt), REV_A], "stamped_a.pth")
    shutil.copyfile(pristine / "at_a.pth", ckpt)
    t_nofsync = clean(["upgrade", "--no-fsync", str(ckpt)], "at_b_nofsync.pth")

    scenarios = [
        (
            Scenario(
                "upgrade",
                [*base, "upgrade", str(ckpt)],
                pristine / "at_a.pth",
                pristine / "at_b.pth",
            ),
            args.upgrade,
            t_up,
        ),
        (
            Scenario(
                "upgrade --no-fsync",
                [*base, "upgrade", "--no-fsync", str(ckpt)],
                pristine / "at_a.pth",
                pristine / "at_b_nofsync.pth",
            ),
            args.upgrade_no_fsync,
            t_nofsync,
        ),
        (
            Scenario(
                "downgrade",
                [*base, "downgrade", str(ckpt), REV_A],
                pristine / "at_b.pth",
                pristine / "down_a.pth",
            ),
            args.downgrade,
            t_down,
        ),
        (
            Scenario(
                "stamp",
                [*base, "stamp", str(ckpt), REV_A],
                pristine / "at_b.pth",
                pristine / "stamped_a.pth",
            ),
            args.stamp,
            t_stamp,
        ),
    ]
    rng = random.Random(args.seed)
    report: dict[str, Any] = {
        "seed": args.seed,
        "file_bytes": (pristine / "at_a.pth").stat().st_size,
        "revision_b": REV_B,
        "commands": {},
    }
    for scenario, kills, seconds in scenarios:
        if kills <= 0:
            continue
        result = _trials(scenario, ckpt, kills, rng, seconds)
        report["commands"][scenario.name] = result
        print(
            f"{scenario.name}: {result['kills']} kills in {result['trials']} trials over "
            f"[0, {1.2 * seconds:.3f}s]: "
            + ", ".join(f"{k} {v}" for k, v in sorted(result["phases"].items()))
            + f"; up to {result['max_leftovers_seen']} stale temp files seen, "
            f"{result['leftovers_after_final_run']} after the final run; "
            f"{len(result['failures'])} failures",
            file=sys.stderr,
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
