"""Remote storage and the torch-free ``current``, side by side in one run.

    python benchmarks/bench_remote.py [--dir DIR] [--layers 24] [--dim 1024] [--repeat 5]
                                      [--s3-layers 2] [--baseline REF]

Builds the ~1.2 GB checkpoint of bench_upgrade.py (24 layers x 1024 dim, 120
float32 tensors) and its 20-revision rename chain, then measures, each as a
whole process, the median of --repeat interleaved runs:

1. on an S3-compatible server started here (moto, localhost, every response
   counted by the server): the bytes ``ckptmigrate current s3://...`` makes
   it send for the stamped .pt and .safetensors, and what a whole upgrade
   between two objects reads (of a --s3-layers file: moto copies the whole
   object for each ranged GET, so its times say nothing of a real store);
2. ``ckptmigrate current FILE`` on the stamped local files against
   ``python -c "import torch"``;
3. the upgrade with ``-o`` and ``--no-fsync``: ckptmigrate, the naive
   ``torch.load`` + rename + ``torch.save``, ``cp`` and ``import torch``; and
   what checking the CRC of every input record costs, timed on its own;
4. with ``--baseline REF`` (default: the commit before the storage layer),
   the same local upgrade and ``current`` run by that older tree, to show the
   local fast paths lost nothing.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from bench_upgrade import NAIVE, RENAMES, build, rename_lineage  # noqa: E402


def wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return took


def interleaved(
    runs: dict[str, tuple[list[str], dict[str, str] | None]],
    repeat: int,
    prepare: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median wall time of each command, the commands taking turns ``repeat`` times."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, (cmd, env) in runs.items():
            prepare()
            times[name].append(wall(cmd, env))
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(name: str, value: str, ok: bool | None = None) -> None:
    mark = "" if ok is None else ("met" if ok else "NOT MET")
    print(f"  {name:<62} {value:>22}  {mark}", flush=True)


def crc_seconds(path: Path) -> float:
    """Checking every record's CRC, as an upgrade reads them: the file mapped, zlib's crc32."""
    from ckptmigrate.formats.zip64 import crc32, read_index

    index = read_index(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        t0 = time.perf_counter()
        for record in index.records.values():
            part = view[record.data_offset : record.data_offset + record.size]
            assert crc32(part) == record.crc
            part.release()
        took = time.perf_counter() - t0
        view.release()
    return took


def baseline_tree(work: Path, ref: str | None) -> Path | None:
    """``src/`` of an older commit, to run the same commands with."""
    if ref is None:
        added = subprocess.run(
            [
                "git",
                "log",
                "--diff-filter=A",
                "--format=%H",
                "--",
                "src/ckptmigrate/formats/storage.py",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.split()
        if not added:
            return None
        ref = added[-1] + "^"
    out = work / "baseline"
    out.mkdir()
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    print(f"baseline: {ref} ({out / 'src'})")
    return out / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--s3-layers", type=int, default=2, help="layers of the S3 upgrade's file")
    parser.add_argument("--baseline", help="git ref of the tree to compare local runs with")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckptmigrate-bench-remote-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench(work, args)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, args: argparse.Namespace) -> None:
    from tests.harness.s3 import S3Server

    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cli = [py, "-m", "ckptmigrate"]
    original = work / "original.pt"
    build(original, args.layers, args.dim)
    size = original.stat().st_size
    ren = rename_lineage(work / "renames", args.layers)
    ini = work / "renames.ini"
    ini.write_text(f"[ckptmigrate]\nscript_location = {ren}\n")
    first = "r00000000000"
    stamped_pt, stamped_st = work / "stamped.pt", work / "stamped.safetensors"
    for out in (stamped_pt, stamped_st):
        subprocess.run(
            [*cli, "-q", "-c", str(ini), "stamp", str(original), first, "-o", str(out)],
            env=env,
            check=True,
        )
    print(
        f"checkpoint: {size / 1e9:.2f} GB, {args.layers * 5} float32 tensors; "
        f"median wall of {args.repeat} interleaved runs, each a whole process\n"
    )

    # 1. on the S3 server ------------------------------------------------------------
    server = S3Server()
    s3_env = {**env, **server.env()}
    import boto3

    keys = server.env()
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=keys["AWS_DEFAULT_REGION"],
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket="bench")
    for path in (stamped_pt, stamped_st):
        client.upload_file(str(path), "bench", path.name)
    print("on the S3 server (moto, localhost): bytes the server sent, counted by the server")
    sent: dict[str, int] = {}
    for path in (stamped_pt, stamped_st):
        mark = server.mark()
        took = wall([*cli, "-c", str(ini), "current", f"s3://bench/{path.name}"], s3_env)
        sent[path.suffix] = server.bytes_sent(mark)
        gets = sum(r.method == "GET" for r in server.since(mark))
        row(
            f"current s3://.../{path.name} ({gets} GETs, {took:.2f} s)",
            f"{sent[path.suffix] / 1e3:.1f} kB",
        )
    # moto copies the whole object for every ranged GET, so its wall times are no
    # store's; the upgrade (one GET per tensor) runs on a smaller file to stay short.
    small, small_ini = work / "small.pt", work / "small.ini"
    build(small, args.s3_layers, args.dim)
    small_ini.write_text(
        f"[ckptmigrate]\nscript_location = {rename_lineage(work / 'small', args.s3_layers)}\n"
    )
    client.upload_file(str(small), "bench", small.name)
    mark = server.mark()
    took = wall(
        [
            *cli,
            "-q",
            "-c",
            str(small_ini),
            "upgrade",
            f"s3://bench/{small.name}",
            "--from",
            first,
            "-o",
            "s3://bench/upgraded.pt",
        ],
        s3_env,
    )
    got = server.bytes_sent(mark)
    parts = sum(r.is_part for r in server.since(mark))
    small_size = small.stat().st_size
    row(
        f"upgrade s3://...{small_size / 1e6:.0f} MB.pt -o s3://... ({parts} parts, {took:.1f} s)",
        f"{got / small_size:.2f}x its size read",
    )
    server.stop()

    # 2. current without torch -------------------------------------------------------
    print("\ncurrent on a stamped local file")
    current = interleaved(
        {
            "import torch": ([py, "-c", "import torch"], env),
            ".pt": ([*cli, "-c", str(ini), "current", str(stamped_pt)], env),
            ".safetensors": ([*cli, "-c", str(ini), "current", str(stamped_st)], env),
        },
        args.repeat,
    )
    imp = current["import torch"]
    row('python -c "import torch"', f"{imp:.2f} s")
    for kind in (".pt", ".safetensors"):
        row(
            f"ckptmigrate current FILE{kind}", f"{current[kind]:.2f} s ({current[kind] / imp:.2f}x)"
        )

    # 3. the whole-process upgrade ---------------------------------------------------
    print("\nupgrade, 20 rename/drop revisions, -o (nothing fsynced)")
    target, copy = work / "model.pt", work / "copy.pt"
    out = work / "out.pt"

    def fresh() -> None:
        shutil.copyfile(original, target)
        for p in (out, copy):
            p.unlink(missing_ok=True)
        os.sync()

    drop = f"layers.{args.layers - 1}.norm1.weight"
    upgrade = [*cli, "-q", "-c", str(ini), "upgrade", str(target), "--from", first, "-o", str(out)]
    up = interleaved(
        {
            "cp": (["cp", str(target), str(copy)], env),
            "import torch": ([py, "-c", "import torch"], env),
            "naive": ([py, "-c", NAIVE, str(target), repr(RENAMES), drop, "0"], env),
            "ckptmigrate": ([*upgrade, "--no-fsync"], env),
        },
        args.repeat,
        fresh,
    )
    crc = crc_seconds(original)
    for name, label in (
        ("cp", "cp of the file"),
        ("import torch", 'python -c "import torch"'),
        ("naive", "naive: torch.load + rename + torch.save"),
        ("ckptmigrate", "ckptmigrate upgrade -o OUT --no-fsync"),
    ):
        row(label, f"{up[name]:.2f} s")
    row("  of which: checking every input record's CRC (timed alone)", f"{crc:.2f} s")

    # 4. the same, by the tree before the storage layer ------------------------------
    base_src = baseline_tree(work, args.baseline)
    local: dict[str, float] = {}
    if base_src is not None:
        old = {**env, "PYTHONPATH": str(base_src)}
        local = interleaved(
            {
                "upgrade, this tree": ([*upgrade, "--no-fsync"], env),
                "upgrade, baseline": ([*upgrade, "--no-fsync"], old),
                "current, this tree": ([*cli, "-c", str(ini), "current", str(stamped_pt)], env),
                "current, baseline": ([*cli, "-c", str(ini), "current", str(stamped_pt)], old),
            },
            args.repeat,
            fresh,
        )
        print("\nlocal files, this tree against the baseline")
        for name, took in local.items():
            row(name, f"{took:.2f} s")

    print("\ntargets")
    for suffix in (".pt", ".safetensors"):
        row(
            f"S3: current on a {size / 1e9:.1f} GB {suffix} sends < 1 MB",
            f"{sent[suffix] / 1e3:.1f} kB",
            sent[suffix] < 1e6,
        )
    for kind in (".pt", ".safetensors"):
        ratio = current[kind] / imp
        row(f"current FILE{kind}: wall <= 0.3x import torch", f"{ratio:.2f}x", ratio <= 0.3)
    ratio = up["ckptmigrate"] / up["naive"]
    row("upgrade -o --no-fsync: wall vs naive", f"{ratio:.2f}x", None)
    extra = up["ckptmigrate"] - up["import torch"] - up["cp"]
    row("upgrade: wall - (import torch + cp)", f"{extra:+.2f} s", None)
    if local:
        for what in ("upgrade", "current"):
            ratio = local[f"{what}, this tree"] / local[f"{what}, baseline"]
            row(
                f"local {what}: this tree vs baseline (no slowdown: <= 1.05x)",
                f"{ratio:.2f}x",
                ratio <= 1.05,
            )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
