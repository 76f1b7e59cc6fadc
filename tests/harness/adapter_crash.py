"""Kill ``upgrade`` of a PEFT adapter folder with SIGKILL at random moments.

Run by tests/test_guarantee_adapters.py as ``python -m tests.harness.adapter_crash
WORKDIR``. It imports torch and ckptmigrate once (one thread, so forked
children never wait on a thread pool they did not inherit), runs the upgrade
three times cleanly, then for every trial restores the old folder, forks a
child that upgrades it in place, kills it after a seeded random time in
[0, 1.2 T] (T: the slowest clean run; past the planned trials, the range
moves toward the side of the switch on which fewer than three kills landed)
and records whether the folder holds exactly the old pair of files, exactly
the new pair, or a mix. A final run next to a dead writer's half-built folder
must remove it. Prints a JSON report as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tests.harness.common import cli_child, write_project

from ckptmigrate.cli import main as cli_main
from ckptmigrate.schema import Schema, write_base_schema

REV_A, REV_B = "aaaa00000001", "bbbb00000002"
LAYERS, WIDTH, RANK = 4, 1024, 512
SPLIT = """\
for i in range(4):
    op.split(f"layers.{i}.weight", into=[f"layers.{i}.a.weight", f"layers.{i}.b.weight"])
"""


def make_adapter(root: Path) -> Path:
    """A lineage that splits every layer, and a 32 MB LoRA adapter on all four layers."""
    write_project(root, [(REV_A, None, "pass", "pass"), (REV_B, REV_A, SPLIT, "pass")])
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(4))
    write_base_schema(root / "migrations", Schema.from_module(model), "test")
    folder = root / "adapter"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(LAYERS):
        p = f"base_model.model.layers.{i}."
        tensors[p + "lora_A.weight"] = torch.randn(RANK, WIDTH, generator=g)
        tensors[p + "lora_B.weight"] = torch.randn(WIDTH, RANK, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"), {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": RANK,
        "target_modules": ["0", "1", "2", "3"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text("an adapter\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


def _fork(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:
        cli_child(argv)
    return pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--trials", type=int, default=24)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    root = Path(args.workdir).resolve()
    os.chdir(root)
    folder = make_adapter(root)
    pristine = root / "pristine"
    shutil.copytree(folder, pristine)
    old = snapshot(folder)
    command = ["-q", "upgrade", "adapter"]

    shutil.copytree(pristine, root / "warm")  # import everything before forking
    try:
        cli_main(["-q", "upgrade", "warm"])
    except SystemExit as exc:
        if exc.code:
            raise

    def clean_run() -> float:
        """One upgrade run to its end, started as every trial is."""
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
        start = time.perf_counter()
        _, status = os.waitpid(_fork(command), 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("the clean run failed")
        return time.perf_counter() - start

    clean = max(clean_run() for _ in range(3))  # a busy machine slows some runs down
    new = snapshot(folder)

    rng = random.Random(args.seed)
    outcomes = {"old": 0, "new": 0, "mixed": 0}
    most_leftovers = 0
    trials, spread = 0, 1.2
    # every kill is checked; more trials (over a wider spread) only until kills have
    # landed on both sides of the switch, so that a slow run does not decide the result
    while trials < args.trials or (
        min(outcomes["old"], outcomes["new"]) < 3 and trials < 4 * args.trials
    ):
        if trials >= args.trials:  # toward the side that has too few kills
            spread = spread * 1.25 if outcomes["new"] < 3 else spread / 1.25
        trials += 1
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
        pid = _fork(command)
        time.sleep(rng.uniform(0, spread * clean))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        now = snapshot(folder)
        outcomes["old" if now == old else "new" if now == new else "mixed"] += 1
        most_leftovers = max(most_leftovers, len(leftovers(folder)))

    shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    (root / f".adapter.{2**22 + 7}.x.ckptmigrate-dir.ckptmigrate-tmp").mkdir()  # a dead writer's
    _, status = os.waitpid(_fork(command), 0)
    report = {
        "clean_seconds": clean,
        "trials": trials,
        "outcomes": outcomes,
        "changed": new != old,
        "new_config": json.loads(new["adapter_config.json"]),
        "most_leftovers_after_a_kill": most_leftovers,
        "final_exit": os.waitstatus_to_exitcode(status),
        "final_is_new": snapshot(folder) == new,
        "leftovers_after_final_run": leftovers(folder),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
