"""A fleet of checkpoints: one ckptmigrate process against a process per file, and against
the usual Python loop, side by side.

    python benchmarks/bench_fleet.py [--dir DIR] [--count 1000] [--mb 4] [--repeat 3]
                                     [--shell-sample 30]

Builds a ``runs/`` tree of ``--count`` small checkpoints (``--mb`` MB each,
float32, stamped at the lineage's first revision, in experiment and version
folders as Lightning lays them out), a lineage of three rename revisions and
its base schema, then times whole processes (wall, median of ``--repeat``):

* ``ckptmigrate current runs/`` against a shell loop running
  ``ckptmigrate current FILE`` once per file. The loop costs the same for
  every file (a process start and an ``import torch`` each), so it runs on
  ``--shell-sample`` files and is scaled to the whole tree (0 runs it on all);
* ``ckptmigrate upgrade runs/ -j 2`` against one Python process looping
  ``torch.load`` + renaming keys + ``torch.save`` (+ ``os.replace``) over the
  same files. Neither fsyncs (``--no-fsync``, like for like); the default,
  which fsyncs each rewritten file, is shown for reference, as is ``-j 1``.

Every upgrade run starts from a fresh copy of the tree, written back (sync)
first, and its result is checked: every checkpoint at head, keys renamed. The upgrades
run interleaved, one of each per round, and their CPU time (user + system,
worker processes included) is shown beside the wall time. Python's bytecode
is cached (in the benchmark's folder), as for an installed package; the first
command, which checks the tree, writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

REVISIONS = [  # (id, upgrade, downgrade): three renames, each a revision
    ("r0", "pass", "pass"),
    ("r1", 'op.rename_prefix("layers.", "blocks.")', 'op.rename_prefix("blocks.", "layers.")'),
    ("r2", 'op.rename_regex(r"\\.weight$", ".w")', 'op.rename_regex(r"\\.w$", ".weight")'),
    ("r3", 'op.rename_regex(r"\\.bias$", ".b")', 'op.rename_regex(r"\\.b$", ".bias")'),
]

NAIVE = """
import glob, os, re, sys, torch
for path in sorted(glob.glob("runs/**/*.ckpt", recursive=True)):
    sd = torch.load(path, weights_only=True)
    for pattern, repl in ((r"^layers\\.", "blocks."), (r"\\.weight$", ".w"), (r"\\.bias$", ".b")):
        sd = {re.sub(pattern, repl, k): v for k, v in sd.items()}
    torch.save(sd, path + ".tmp")
    os.replace(path + ".tmp", path)
"""


def build(root: Path, count: int, mb: float) -> list[Path]:
    """The project (ini, lineage, base schema) and the tree; returns the checkpoint paths."""
    import torch

    from ckptmigrate.formats.stamp import write_stamp

    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    down = None
    for rev, up, back in REVISIONS:
        (versions / f"{rev}.py").write_text(
            f'"""{rev}"""\nfrom ckptmigrate import op\n\nrevision = {rev!r}\n'
            f"down_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n\n\n"
            f"def upgrade() -> None:\n    {up}\n\n\ndef downgrade() -> None:\n    {back}\n"
        )
        down = rev
    (root / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\n"
    )
    dim = max(8, int((mb * 1e6 / 4 / 4) ** 0.5))  # four dim x dim layers make --mb MB
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for i in range(4):
        base[f"layers.{i}.weight"] = torch.randn(dim, dim, generator=g)
        base[f"layers.{i}.bias"] = torch.randn(dim, generator=g)
    lines = [f"{k}  float32  [{','.join(map(str, v.shape))}]  tensor" for k, v in base.items()]
    (root / "migrations" / "base_schema.txt").write_text("\n".join(lines) + "\n")
    paths = []
    for n in range(count):
        path = root / "runs" / f"exp{n % 25:02d}" / f"version_{n // 25 % 4}"
        path = path / "checkpoints" / f"epoch={n // 100}-step={n}.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = OrderedDict((k, v + n) for k, v in base.items())
        meta: dict[str, str] = {}
        write_stamp(meta, ("r0",))  # as a versioned model's state_dict() saves it
        sd._metadata = OrderedDict({"": meta})  # type: ignore[attr-defined]
        torch.save(sd, path)
        paths.append(path)
    return paths


def timed(cmd: list[str], cwd: Path, shell: bool = False) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, shell=shell)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall


def _children_cpu() -> float:
    """User + system time of the finished child processes (and theirs: -j's workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fresh(root: Path) -> None:
    """The tree as built, written back to disk."""
    shutil.rmtree(root / "runs")
    shutil.copytree(root / "pristine", root / "runs")
    os.sync()


def check_upgraded(root: Path, count: int) -> None:
    """Every checkpoint at head, its keys renamed (by ckptmigrate or by the naive loop)."""
    import torch

    files = sorted((root / "runs").rglob("*.ckpt"))
    assert len(files) == count
    want = {f"blocks.{i}.{s}" for i in range(4) for s in ("w", "b")}
    for path in files[:: max(1, count // 20)]:
        keys = set(torch.load(path, weights_only=True))
        assert keys == want, (path, keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shell-sample", type=int, default=30)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir=args.dir))
    # every process runs with cached bytecode, as an installed package has it (an
    # environment may turn bytecode writing off; then each run recompiles ckptmigrate)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    try:
        return _bench(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bench(root: Path, args: argparse.Namespace) -> int:
    paths = build(root, args.count, args.mb)
    size = sum(p.stat().st_size for p in paths)
    shutil.copytree(root / "runs", root / "pristine")
    os.sync()
    cli = [sys.executable, "-m", "ckptmigrate"]
    print(
        f"{args.count} checkpoints, {size / args.count / 1e6:.1f} MB each ({size / 1e9:.2f} GB), "
        f"{len(REVISIONS) - 1} rename revisions; wall time of whole processes, "
        f"median of {args.repeat}",
        flush=True,
    )

    sample = paths if args.shell_sample <= 0 else paths[: args.shell_sample]
    loop = "for f in " + " ".join(f"'{p.relative_to(root)}'" for p in sample)
    loop += f'; do {" ".join(cli)} current "$f" > /dev/null || exit 1; done'
    rows: dict[str, float] = {}

    def median(label: str, runs: Callable[[], float]) -> float:
        rows[label] = statistics.median(runs() for _ in range(args.repeat))
        print(f"  {label:<62} {rows[label]:8.2f} s", flush=True)
        return rows[label]

    def upgrade(*flags: str) -> Callable[[], float]:
        def once() -> float:
            fresh(root)
            wall = timed([*cli, "-q", "upgrade", "runs", *flags], root)
            check_upgraded(root, args.count)
            return wall

        return once

    def naive() -> float:
        fresh(root)
        wall = timed([sys.executable, "-c", NAIVE], root)
        check_upgraded(root, args.count)
        return wall

    fresh(root)
    report = subprocess.run(
        [*cli, "current", "runs", "--format", "json"], cwd=root, capture_output=True, text=True
    )
    assert json.loads(report.stdout)["counts"] == {"behind": args.count}, report.stdout[-500:]
    current = median(
        "ckptmigrate current runs/ (one process)", lambda: timed([*cli, "current", "runs"], root)
    )
    shell_sample = median(
        f"shell loop of ckptmigrate current FILE ({len(sample)} files)",
        lambda: timed(["bash", "-c", loop], root),
    )
    shell = shell_sample * len(paths) / len(sample)
    if len(sample) != len(paths):
        rows[f"  ... scaled to {len(paths)} files"] = shell
        print(f"  {'  ... scaled to ' + str(len(paths)) + ' files':<62} {shell:8.2f} s")
    # The upgrades interleaved, round by round, so that each round's runs share the
    # machine's state; the median of each over the rounds.
    batch = {
        "naive loop: torch.load + rename + torch.save (+ os.replace)": naive,
        "ckptmigrate upgrade runs/ -j 2 --no-fsync": upgrade("-j", "2", "--no-fsync"),
        "ckptmigrate upgrade runs/ -j 1 --no-fsync": upgrade("-j", "1", "--no-fsync"),
        "ckptmigrate upgrade runs/ -j 2 (fsyncs each file, the default)": upgrade("-j", "2"),
    }
    walls: dict[str, list[float]] = {label: [] for label in batch}
    cpus: dict[str, list[float]] = {label: [] for label in batch}
    for _ in range(args.repeat):
        for label, once in batch.items():
            before = _children_cpu()
            walls[label].append(once())
            cpus[label].append(_children_cpu() - before)
    print(f"  {'':<62} {'wall':>8}   {'CPU (user + system)':>8}")
    for label in batch:
        rows[label] = statistics.median(walls[label])
        cpu = statistics.median(cpus[label])
        print(f"  {label:<62} {rows[label]:8.2f} s {cpu:8.2f} s", flush=True)
    naive_wall = rows["naive loop: torch.load + rename + torch.save (+ os.replace)"]
    j2 = rows["ckptmigrate upgrade runs/ -j 2 --no-fsync"]

    print()
    targets = [
        ("current over the tree <= 0.1x a shell loop per file", current / shell, 0.1),
        ("upgrade -j 2 <= 0.5x the naive Python loop", j2 / naive_wall, 0.5),
    ]
    met = True
    for text, ratio, limit in targets:
        ok = ratio <= limit
        met &= ok
        print(f"  {text:<62} {ratio:6.3f}x  {'met' if ok else 'NOT MET'}")
    print(f"\n{'all targets met' if met else 'targets not met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
