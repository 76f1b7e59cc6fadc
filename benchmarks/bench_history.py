"""A long linear history: ``heads``, ``history`` and ``current``, side by side with Alembic.

    python benchmarks/bench_history.py [--revisions 10000] [--squash-to 100] [--repeat 3]

Builds, in a temporary folder, the same lineage twice: a ckptmigrate project
(each revision renames ``x<i-1>`` to ``x<i>``) and an Alembic project (a
SQLite database) with the same revision ids, one file per revision in each.
Every command runs as its own process, as a user runs it, so each pays what
it costs to read the history. Printed: each command's best wall time, cold
(the first run, before ckptmigrate's cache exists) and warm, and the
ratio to Alembic's time measured in the same run. Then the lineage is squashed
to ``--squash-to`` revisions and timed again: what squash saves on top.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ckptmigrate.script.cache import CACHE_DIR, RACY_NS

HEADER = '''"""step {i}

Revision ID: {rev}
Revises: {down}
Create Date: 2026-01-01 00:00:00
"""
from {package} import op

revision = "{rev}"
down_revision = {down_repr}
branch_labels = None
depends_on = None


def upgrade() -> None:
{up}


def downgrade() -> None:
{down_body}
'''

ALEMBIC_ENV = """\
from alembic import context
from sqlalchemy import create_engine

engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
"""


def rev_id(i: int) -> str:
    return f"{i:012x}"


def write_lineage(versions: Path, n: int, package: str) -> None:
    versions.mkdir(parents=True)
    for i in range(1, n + 1):
        down = rev_id(i - 1) if i > 1 else None
        if package == "ckptmigrate":
            up = f'    op.rename_key("x{i - 1}", "x{i}")'
            back = f'    op.rename_key("x{i}", "x{i - 1}")'
        else:
            up = back = "    pass"
        (versions / f"{rev_id(i)}_step_{i}.py").write_text(
            HEADER.format(
                i=i,
                rev=rev_id(i),
                down=down or "",
                down_repr=repr(down),
                package=package,
                up=up,
                down_body=back,
            ),
            encoding="utf-8",
        )


def make_ckptmigrate(root: Path, n: int) -> Path:
    """The project, its base schema and a checkpoint stamped at the head."""
    from collections import OrderedDict

    import torch
    from safetensors.torch import save_file

    from ckptmigrate.formats.stamp import flatten_stamps, write_stamp
    from ckptmigrate.plan.nodes import TensorSpec
    from ckptmigrate.schema import Schema, write_base_schema

    (root / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\n", encoding="utf-8"
    )
    write_lineage(root / "migrations" / "versions", n, "ckptmigrate")
    base = Schema.from_specs({"x0": TensorSpec.of(torch.zeros(4))})
    write_base_schema(root / "migrations", base, "the benchmark")
    meta: dict[str, object] = {}
    write_stamp(meta, [rev_id(n)])
    stamped: OrderedDict[str, torch.Tensor] = OrderedDict({f"x{n}": torch.zeros(4)})
    stamped._metadata = {"": meta}  # type: ignore[attr-defined]
    torch.save(stamped, root / "model.pt")
    save_file(dict(stamped), root / "model.safetensors", metadata=flatten_stamps({"": meta}))
    return root


def make_alembic(root: Path, n: int) -> Path:
    """The project, and its database stamped at the head."""
    (root / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s/migrations\n"
        f"sqlalchemy.url = sqlite:///{root / 'app.db'}\n",
        encoding="utf-8",
    )
    (root / "migrations").mkdir()
    (root / "migrations" / "env.py").write_text(ALEMBIC_ENV, encoding="utf-8")
    write_lineage(root / "migrations" / "versions", n, "alembic")
    alembic(root, "stamp", "head")
    return root


Timing = tuple[float, float]  # wall seconds, CPU seconds (user + system) of the process


def alembic(root: Path, *args: str) -> Timing:
    return timed([sys.executable, "-m", "alembic", "-c", str(root / "alembic.ini"), *args], root)


def ckptmigrate(root: Path, *args: str) -> Timing:
    return timed([sys.executable, "-m", "ckptmigrate", *args], root)


def timed(argv: Sequence[str], cwd: Path) -> Timing:
    """Wall time, and the CPU time of the process itself: on a busy machine the CPU time
    varies far less than the wall time."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed:\n{err.read().decode()}")
    return elapsed, usage.ru_utime + usage.ru_stime


COMMANDS = {  # what each tool runs for the same question
    "heads": (("heads",), ("heads",)),
    "history": (("history",), ("history",)),
    "current .pt": (("current", "model.pt"), ("current",)),
    "current .safetensors": (("current", "model.safetensors"), ("current",)),
}


def best(runs: Sequence[Timing]) -> Timing:
    return min(t[0] for t in runs), min(t[1] for t in runs)


def measure(ours: Path, theirs: Path, repeat: int) -> dict[str, tuple[Timing, Timing, Timing]]:
    """Per command: ckptmigrate cold, ckptmigrate warm, Alembic (best of ``repeat``)."""
    out = {}
    for name, (mine, alembics) in COMMANDS.items():
        colds = []
        for _ in range(repeat):
            shutil.rmtree(ours / "migrations" / CACHE_DIR, ignore_errors=True)
            colds.append(ckptmigrate(ours, *mine))
        ckptmigrate(ours, *mine)  # the cache is written
        warm = best([ckptmigrate(ours, *mine) for _ in range(repeat)])
        theirs_t = best([alembic(theirs, *alembics) for _ in range(repeat)])
        out[name] = (best(colds), warm, theirs_t)
    return out


def report(title: str, rows: dict[str, tuple[Timing, Timing, Timing]]) -> None:
    print(title)
    print(
        f"{'':<22}{'ckptmigrate cold':>17}{'ckptmigrate warm':>17}{'Alembic':>15}"
        f"{'cold/Alembic':>15}{'warm/Alembic':>15}"
    )
    print(f"{'command':<22}" + "{:>17}{:>17}{:>15}{:>15}{:>15}".format(*["wall  CPU"] * 5))
    for name, (cold, warm, theirs) in rows.items():
        cells = [f"{w:6.2f}s {c:5.2f}s" for w, c in (cold, warm, theirs)]
        ratios = [f"{m[0] / theirs[0]:5.2f}x {m[1] / theirs[1]:5.2f}x" for m in (cold, warm)]
        print(f"{name:<22}{cells[0]:>17}{cells[1]:>17}{cells[2]:>15}{ratios[0]:>15}{ratios[1]:>15}")


def squash_to(ours: Path, n: int, parts: int) -> float:
    """Squash the lineage into ``parts`` revisions of equal length; returns the seconds.

    In one process (``command.squash``, what the CLI calls), so the figure is the
    squashes' own work, not ``parts`` interpreter starts.
    """
    from ckptmigrate import command
    from ckptmigrate.config import Config

    config = Config(ours / "alembic_style.ini", quiet=True, stdout=io.StringIO())
    size = n // parts
    t0 = time.perf_counter()
    for k in range(parts):
        first, last = rev_id(k * size + 1), rev_id((k + 1) * size if k < parts - 1 else n)
        command.squash(config, f"{first}:{last}", f"squash {k}", rev_id=f"5a{k:010x}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--revisions", type=int, default=10_000)
    parser.add_argument("--squash-to", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.revisions
    with tempfile.TemporaryDirectory() as tmp:
        # both tools run with cached bytecode, as installed packages have it (an
        # environment may turn bytecode writing off; then every run recompiles)
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        ours, theirs = Path(tmp) / "ckptmigrate", Path(tmp) / "alembic"
        ours.mkdir()
        theirs.mkdir()
        t0 = time.perf_counter()
        make_ckptmigrate(ours, n)
        make_alembic(theirs, n)
        # the cache trusts no file changed just before it was written (see script/cache.py)
        time.sleep(max(0.0, RACY_NS / 1e9 - (time.perf_counter() - t0)) + 0.1)
        print(
            f"{n} revisions per tool, written in {time.perf_counter() - t0:.1f} s "
            f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)"
        )
        report(f"linear lineage of {n} revisions", measure(ours, theirs, args.repeat))
        if args.squash_to:
            spent = squash_to(ours, n, args.squash_to)
            time.sleep(RACY_NS / 1e9 + 0.1)
            left = len(list((ours / "migrations" / "versions").glob("*.py")))
            print(
                f"\nsquashed {n} revisions into {left} files in {spent:.1f} s "
                f"({args.squash_to} squash commands)"
            )
            report(
                f"after the squash ({left} files; Alembic still has {n})",
                measure(ours, theirs, args.repeat),
            )


if __name__ == "__main__":
    main()
