"""Kill an in-place upgrade/downgrade of a sharded folder at random moments, and at two
chosen ones: between the shard writes and the index switch, and after the switch
before the replaced shards are removed.

Run by tests/test_guarantee_crash.py as ``python -m tests.harness.crash_folders WORKDIR``.
Like tests/harness/crash.py for single files. A folder's checkpoint is the
index plus the shards it references: after every kill that set must be the old
one or the new one, byte for byte, and loadable. The next command on the folder
(any upgrade, even one with nothing to do) must leave nothing else behind: no
temporary file, no shard the index does not reference, no journal.
Prints a JSON report as the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
from tests.harness.common import REV_A, quiet_fds, standard_project
from tests.harness.crash import _run_clean

from ckptmigrate.cli import main as cli_main

INDEX = "model.safetensors.index.json"
PENDING = f".{INDEX}.ckptmigrate-pending"


def state(folder: Path) -> tuple[str, ...] | None:
    """The checkpoint a folder holds: the index and its shards' digests (None: unreadable)."""
    try:
        raw = (folder / INDEX).read_bytes()
        shards = sorted(set(json.loads(raw)["weight_map"].values()))
        parts = [hashlib.sha256(raw).hexdigest()]
        parts += [f"{s}:{hashlib.sha256((folder / s).read_bytes()).hexdigest()}" for s in shards]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tuple(parts)


def unreferenced(folder: Path) -> list[str]:
    """Every file in the folder that is neither the index nor a shard it references."""
    try:
        wanted = set(json.loads((folder / INDEX).read_bytes())["weight_map"].values()) | {INDEX}
    except (OSError, ValueError, KeyError):
        wanted = {INDEX}
    return sorted(p.name for p in folder.iterdir() if p.name not in wanted)


def _loads(folder: Path) -> bool:
    from ckptmigrate.formats import read_checkpoint

    ckpt = read_checkpoint(folder)
    try:
        return all(isinstance(ckpt.read(k), torch.Tensor) for k in ckpt.schema)
    finally:
        ckpt.close()


def _build(folder: Path, megabytes: int) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    n = 512
    count = max(6, megabytes * (1 << 20) // (n * n * 4))
    weights = {f"w{i}": torch.randn(n, n, generator=gen) for i in range(count)}
    keys = list(weights)
    third = len(keys) // 3
    groups = [keys[:third], keys[third : 2 * third], keys[2 * third :]]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: weights[k] for k in group}, folder / name, metadata={"format": "pt"})
        weight_map.update((k, name) for k in group)
    index = {"metadata": {"ckptmigrate.revision": REV_A}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))


def _restore(snapshot: Path, folder: Path) -> None:
    shutil.rmtree(folder)
    shutil.copytree(snapshot, folder)


def _kill_at_switch(argv: list[str], after: bool) -> int:
    """Run argv in a child that SIGKILLs itself just before (or after) the index switch."""
    pid = os.fork()
    if pid == 0:
        quiet_fds()
        real = os.replace

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if str(dst).endswith(INDEX) and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, *args, **kwargs)
            if str(dst).endswith(INDEX) and after:
                os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace  # type: ignore[assignment]
        with contextlib.suppress(BaseException):
            cli_main(argv)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1


def _check(folder: Path, before: tuple[str, ...], after: tuple[str, ...]) -> str:
    now = state(folder)
    if now == before:
        return "old"
    if now == after:
        return "new"
    return "neither old nor new"


def _fork_cli(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:
        quiet_fds()
        with contextlib.suppress(BaseException):
            cli_main(argv)
        os._exit(0)
    return pid


def _writing_window(argv: list[str], folder: Path, snapshot: Path) -> tuple[float, float]:
    """When, after the fork, the journal of the shard writes exists: (first seen, last seen).

    Watched once on a clean run, so that half the random kills can aim at the
    shard writes, which are a small part of a run on a small folder.
    """
    _restore(snapshot, folder)
    start = time.perf_counter()
    pid = _fork_cli(argv)
    seen: list[float] = []
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if (folder / PENDING).exists():
            seen.append(time.perf_counter() - start)
        time.sleep(0.0005)
    return (seen[0], seen[-1]) if seen else (0.0, 0.0)


def _phase(killed: bool, writing: bool, verdict: str) -> str:
    if not killed:
        return "finished before the kill"
    if verdict == "old":
        return "killed during the shard writes" if writing else "killed before writing"
    return "killed after the switch, before cleanup" if writing else "killed after cleanup"


def _random_kills(
    argv: list[str], folder: Path, snaps: tuple[Path, Path], kills: int, seconds: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    before, after = state(snaps[0]), state(snaps[1])
    assert before is not None and after is not None
    first, last = _writing_window(argv, folder, snaps[0])
    phases: Counter[str] = Counter()
    failures: list[str] = []
    landed, trials, stale_seen = 0, 0, 0
    while landed < kills and trials < 4 * kills:
        trials += 1
        _restore(snaps[0], folder)
        # half the kills anywhere in the run, half aimed at the shard writes
        aim = (0.0, seconds) if trials % 2 else (0.8 * first, 1.2 * last + 0.002)
        pid = _fork_cli(argv)
        time.sleep(rng.uniform(*aim))
        os.kill(pid, signal.SIGSTOP)  # freeze it to see how far it got
        writing = (folder / PENDING).exists()
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        landed += killed
        verdict = _check(folder, before, after)
        phases[_phase(killed, writing, verdict)] += 1
        if verdict.startswith("neither"):
            failures.append(
                f"trial {trials}: the folder holds neither the old nor the new checkpoint"
            )
            continue
        if not _loads(folder):
            failures.append(f"trial {trials}: the {verdict} checkpoint does not load")
        stale_seen = max(stale_seen, len(unreferenced(folder)))
    return {
        "kills": landed,
        "trials": trials,
        "phases": dict(phases),
        "stale_seen": stale_seen,
        "writing_window_s": [round(first, 4), round(last, 4)],
        "run_s": round(seconds, 4),
        "failures": failures + ([] if landed >= kills else [f"only {landed} kills landed"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--megabytes", type=int, default=12)
    parser.add_argument("--kills", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # forked children must not meet their parent's OpenMP pool
    root = Path(args.workdir).resolve()
    ini = standard_project(root)
    folder = root / "ckpt"
    folder.mkdir()
    _build(folder, args.megabytes)
    base = ["-q", "-c", str(ini)]
    at_a, at_b, down = root / "at_a", root / "at_b", root / "down"
    shutil.copytree(folder, at_a)
    shutil.copytree(at_a, root / "warm")
    for warm in (["upgrade"], ["downgrade", REV_A]):  # in this process: children fork warm
        try:
            cli_main([*base, warm[0], str(root / "warm"), *warm[1:]])
        except SystemExit as exc:
            assert not exc.code
    shutil.rmtree(root / "warm")
    code, t_up = _run_clean([*base, "upgrade", str(folder)])
    assert code == 0
    shutil.copytree(folder, at_b)
    code, t_down = _run_clean([*base, "downgrade", str(folder), REV_A])
    assert code == 0
    shutil.copytree(folder, down)
    report: dict[str, Any] = {"shards": 3, "commands": {}}
    plans = {
        "upgrade": ([*base, "upgrade", str(folder)], (at_a, at_b), t_up),
        "downgrade": ([*base, "downgrade", str(folder), REV_A], (at_b, down), t_down),
    }
    for name, (cmd, snaps, seconds) in plans.items():
        result = _random_kills(cmd, folder, snaps, args.kills, seconds, args.seed)
        before, after = state(snaps[0]), state(snaps[1])
        assert before is not None and after is not None
        for moment, after_switch in (("before the index switch", False), ("after it", True)):
            _restore(snaps[0], folder)
            signum = _kill_at_switch(cmd, after_switch)
            verdict = _check(folder, before, after)
            left = unreferenced(folder)
            # the next command, with nothing or everything to do, clears what was left
            code, _ = _run_clean(cmd)
            result[f"killed {moment}"] = {
                "signal": signum,
                "state": verdict,
                "left behind": left,
                "after the next command": unreferenced(folder),
                "next command ends at new": code == 0 and state(folder) == after,
            }
        _restore(snaps[0], folder)
        code, _ = _run_clean(cmd)
        result["final run clean"] = (
            code == 0 and state(folder) == after and not unreferenced(folder)
        )
        report["commands"][name] = result
        print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
