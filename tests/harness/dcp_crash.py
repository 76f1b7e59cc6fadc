"""Kill an in-place ``upgrade`` of a DCP folder with SIGKILL at random moments.

Run by tests/test_dcp_guarantees.py as ``python -m tests.harness.dcp_crash WORKDIR``.
The folder (about 16 MB, saved with ``dcp.save``) is upgraded by revision B
of the standard project: a rename (``.metadata`` only) and tensors that are
computed (new data files). For every trial a forked child runs the command
line, is frozen (SIGSTOP) after a seeded random delay to note how far it got,
and killed (SIGKILL). Then the folder must be exactly the old checkpoint or
exactly the new one: its ``.metadata`` byte for byte the old or the new, and
``dcp.load`` giving every tensor of that one, bit for bit. A last clean run
must leave no temporary or unreferenced data file. Prints a JSON report as
the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from tests.harness.common import REV_A, cli_child, same, standard_project
from tests.harness.crash import _run_clean

from ckptmigrate.cli import main as cli_main


def _tensors(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What plain ``dcp.load`` reads from the folder into a state dict shaped ``like``."""
    state = {k: torch.zeros_like(v) for k, v in like.items()}
    dcp.load(state, checkpoint_id=folder)
    return state


def _expected(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder as our reader sees it (for the clean runs' results)."""
    from ckptmigrate.formats.dcp.reading import read_dcp

    ckpt = read_dcp(folder)
    try:
        return {k: ckpt.read(k).clone() for k in ckpt.schema}
    finally:
        ckpt.close()


def _unexpected_files(folder: Path) -> list[str]:
    """Temporary files, and data files ``.metadata`` does not reference."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    used = {info.relative_path for info in md.storage_data.values()} | {".metadata"}
    return sorted(p.name for p in folder.iterdir() if p.name not in used)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--seed", type=int, default=20260202)
    parser.add_argument("--kills", type=int, default=24)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    root = Path(args.workdir).resolve()
    ini = standard_project(root)
    os.chdir(root)
    gen = torch.Generator().manual_seed(7)
    state = {f"w{i}": torch.randn(512, 512, generator=gen) for i in range(16)}
    pristine, ckpt = root / "pristine", root / "ckpt"
    dcp.save(state, checkpoint_id=pristine)
    base = ["-q", "-c", str(ini)]
    cli_main_ok([*base, "stamp", str(pristine), REV_A])
    shutil.copytree(pristine, ckpt)
    cli_main_ok([*base, "upgrade", str(ckpt)])  # warm: every module imported before forking
    new_md = (ckpt / ".metadata").read_bytes()
    new_tensors = _expected(ckpt)
    old_md = (pristine / ".metadata").read_bytes()
    argv_up = [*base, "upgrade", str(ckpt)]
    shutil.rmtree(ckpt)
    shutil.copytree(pristine, ckpt)
    code, seconds = _run_clean(argv_up)
    assert code == 0 and (ckpt / ".metadata").read_bytes() == new_md, "not deterministic"

    rng = random.Random(args.seed)
    phases: Counter[str] = Counter()
    failures: list[str] = []
    landed = trials = max_left = 0
    while landed < args.kills and trials < 4 * args.kills:
        trials += 1
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        delay = rng.uniform(0.0, 1.2 * seconds)
        pid = os.fork()
        if pid == 0:
            cli_child(argv_up)
        time.sleep(delay)
        os.kill(pid, signal.SIGSTOP)
        wrote = any(p.name.startswith("ckptmigrate-") for p in ckpt.iterdir())
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        landed += killed
        now = (ckpt / ".metadata").read_bytes()
        if now == old_md:
            phase, want = ("killed while writing" if wrote else "killed before writing"), state
        elif now == new_md:
            phase = "killed after the switch" if killed else "finished before the kill"
            want = new_tensors
        else:
            failures.append(f"trial {trials} (delay {delay:.3f}s): .metadata is neither")
            continue
        phases[phase] += 1
        try:
            if not same(_tensors(ckpt, want), want):
                failures.append(f"trial {trials}: the tensors after '{phase}' differ")
        except Exception as exc:
            failures.append(f"trial {trials}: after '{phase}' dcp.load fails: {exc}")
        max_left = max(max_left, len(_unexpected_files(ckpt)))
    if landed < args.kills:
        failures.append(f"only {landed} of {trials} kills landed while the command ran")
    # the next command (here one with nothing to do, or the whole upgrade) cleans up
    cli_main_ok(argv_up)
    left = _unexpected_files(ckpt)
    if left or (ckpt / ".metadata").read_bytes() != new_md:
        failures.append(f"after the final run: left {left}")
    report: dict[str, Any] = {
        "kills": landed,
        "trials": trials,
        "clean_seconds": round(seconds, 4),
        "phases": dict(phases),
        "max_leftovers_seen": max_left,
        "leftovers_after_final_run": len(left),
        "failures": failures,
    }
    print(
        f"upgrade of a DCP folder: {landed} kills in {trials} trials over "
        f"[0, {1.2 * seconds:.3f}s]: "
        + ", ".join(f"{k} {v}" for k, v in sorted(phases.items()))
        + f"; up to {max_left} leftovers seen; {len(failures)} failures",
        file=sys.stderr,
    )
    print(json.dumps(report))
    return 0


def cli_main_ok(argv: list[str]) -> None:
    try:
        cli_main(argv)
    except SystemExit as exc:
        if exc.code:
            raise


if __name__ == "__main__":
    sys.exit(main())
