"""Upgrading a big checkpoint: ckptmigrate against the usual load-rename-save, side by side.

    python benchmarks/bench_upgrade.py [--dir DIR] [--layers 24] [--dim 1024] [--repeat 3]
                                       [--skip-large]

Builds a ~1.2 GB float32 state dict (24 layers x 1024 dim, 120 tensors) and
two lineages: 20 revisions that only rename/drop keys, and 6 that also change
tensors (split, transpose, resize, add_tensor, cast). Every approach runs as
its own process; wall time is the median of --repeat runs and peak anonymous
memory (RssAnon, sampled every 5 ms from /proc) the largest seen. The file
is in the page cache for every run alike, and written back (sync) before each.
Last, it runs the slow >4 GiB (zip64) test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(path: Path, layers: int, dim: int) -> None:
    import torch

    sd = {}
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        p = f"layers.{i}."
        sd[p + "attn.qkv.weight"] = torch.randn(3 * dim, dim, generator=g)
        sd[p + "attn.out.weight"] = torch.randn(dim, dim, generator=g)
        sd[p + "mlp.fc1.weight"] = torch.randn(4 * dim, dim, generator=g)
        sd[p + "mlp.fc2.weight"] = torch.randn(dim, 4 * dim, generator=g)
        sd[p + "norm.weight"] = torch.ones(dim)
    torch.save(sd, path)


RENAMES = [  # (pattern, replacement) applied in order; one revision each
    (r"^layers\.", "blocks."),
    (r"\.attn\.", ".attention."),
    (r"\.mlp\.", ".ffn."),
    (r"\.norm\.", ".ln."),
    (r"\.qkv\.", ".in_proj."),
    (r"\.out\.", ".out_proj."),
    (r"\.fc1\.", ".up."),
    (r"\.fc2\.", ".down."),
    (r"^blocks\.", "h."),
    (r"\.ln\.", ".norm1."),
    (r"\.attention\.", ".attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.up\.", ".w1."),
    (r"\.down\.", ".w2."),
    (r"^h\.", "layers."),
    (r"\.in_proj\.", ".qkv."),
    (r"\.out_proj\.", ".o."),
    (r"\.w1\.", ".fc_in."),
    (r"\.w2\.", ".fc_out."),
]


def write_lineage(root: Path, bodies: list[tuple[str, str]]) -> Path:
    versions = root / "versions"
    versions.mkdir(parents=True)
    down = None
    for i, (up, back) in enumerate(bodies):
        rev = f"r{i:011d}"
        (versions / f"{rev}.py").write_text(
            f'"""step {i}"""\nimport torch\nfrom ckptmigrate import op\n\n'
            f"revision = {rev!r}\ndown_revision = {down!r}\n\n"
            f"def upgrade():\n{textwrap.indent(up or 'pass', '    ')}\n\n"
            f"def downgrade():\n{textwrap.indent(back or 'pass', '    ')}\n"
        )
        down = rev
    return root


def rename_lineage(root: Path, layers: int) -> Path:
    bodies = [("pass", "pass")]
    for pat, repl in RENAMES:
        bodies.append((f"op.rename_regex({pat!r}, {repl!r})", "pass"))
    bodies[-1] = (bodies[-1][0] + f"\nop.drop_key('layers.{layers - 1}.norm1.weight')", "pass")
    return write_lineage(root, bodies)


def transform_lineage(root: Path, layers: int, dim: int) -> Path:
    loop = f"for i in range({layers}):\n    p = f'layers.{{i}}.'\n"
    bodies = [
        ("pass", "pass"),
        (
            loop + "    op.split(p + 'attn.qkv.weight', [p + 'attn.q.weight', p + 'attn.k.weight', "
            "p + 'attn.v.weight'])",
            "pass",
        ),
        (loop + "    op.transpose(p + 'attn.out.weight', 0, 1)", "pass"),
        (loop + f"    op.resize(p + 'mlp.fc1.weight', ({4 * dim + 512}, {dim}))", "pass"),
        (loop + f"    op.add_tensor(p + 'mlp.fc1.bias', ({4 * dim + 512},))", "pass"),
        (loop + "    op.cast(p + 'norm.weight', torch.float16)", "pass"),
    ]
    return write_lineage(root, bodies)


NAIVE = """
import os, re, sys, torch
src, renames, drop, mmap = sys.argv[1], eval(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
sd = torch.load(src, weights_only=True, mmap=mmap)
for pat, repl in renames:
    sd = {re.sub(pat, repl, k): v for k, v in sd.items()}
sd.pop(drop, None)
torch.save(sd, src + ".tmp")  # then replace: the input may be memory-mapped
if len(sys.argv) > 5:  # as durable as ckptmigrate's default: fsync before the rename
    with open(src + ".tmp", "rb+") as fh:
        os.fsync(fh.fileno())
os.replace(src + ".tmp", src)
"""

NAIVE_ST = """
import os, re, sys
from safetensors.torch import load_file, save_file
src, renames, drop = sys.argv[1], eval(sys.argv[2]), sys.argv[3]
sd = load_file(src)
for pat, repl in renames:
    sd = {re.sub(pat, repl, k): v for k, v in sd.items()}
sd.pop(drop, None)
save_file(sd, src + ".tmp")
os.replace(src + ".tmp", src)
"""


def measure(
    cmd: list[str], env: dict[str, str] | None = None, field: str = "RssAnon:"
) -> tuple[float, int]:
    """(wall seconds, peak ``field`` bytes: RssAnon, or VmRSS, ...) of one process."""
    peak = [0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def sample() -> None:
        status = f"/proc/{proc.pid}/status"
        while proc.poll() is None:
            try:
                with open(status) as fh:
                    for line in fh:
                        if line.startswith(field):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                break
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()}")
    return wall, peak[0]


def run(label: str, prepare, cmd: list[str], repeat: int, results: dict) -> None:  # type: ignore[no-untyped-def]
    walls, peaks = [], []
    for _ in range(repeat):
        prepare()
        wall, peak = measure(cmd)
        walls.append(wall)
        peaks.append(peak)
    results[label] = (statistics.median(walls), max(peaks))
    print(
        f"  {label:<58} {results[label][0]:7.2f} s  {results[label][1] / 2**20:8.0f} MB", flush=True
    )


def graph_bench(root: Path, n: int = 1000) -> tuple[float, float, bool]:
    versions = root / "big" / "versions"
    versions.mkdir(parents=True)
    down = None
    for i in range(n):
        rev = f"g{i:011d}"
        (versions / f"{rev}.py").write_text(
            f'"""revision {i}"""\nfrom ckptmigrate import op\n\nrevision = {rev!r}\n'
            f"down_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n\n"
            "def upgrade() -> None:\n    op.rename_key('a', 'b')\n\n"
            "def downgrade() -> None:\n    op.rename_key('b', 'a')\n"
        )
        down = rev
    ini = root / "big.ini"
    ini.write_text(f"[ckptmigrate]\nscript_location = {root / 'big'}\n")
    cli = [sys.executable, "-m", "ckptmigrate", "-c", str(ini)]
    subprocess.run([*cli, "heads"], check=True, capture_output=True)  # warm the page cache
    heads = min(measure([*cli, "heads"])[0] for _ in range(3))
    history = min(measure([*cli, "history"])[0] for _ in range(3))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom ckptmigrate.cli import main\n"
            f"try:\n    main(['-c', {str(ini)!r}, 'history'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return heads, history, probe.stderr.strip().endswith("False")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--skip-large", action="store_true", help="skip the >4 GiB zip64 test (writes ~10 GB)"
    )
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckptmigrate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench(work, args)
        if not args.skip_large:
            print("\n>4 GiB checkpoint (zip64), tests/test_large.py --runslow:", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "--runslow",
                    "-p",
                    "no:cacheprovider",
                    str(HERE.parent / "tests" / "test_large.py"),
                    f"--basetemp={work / 'large'}",
                ],
                cwd=HERE.parent,
                capture_output=True,
                text=True,
            )
            last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
            print(f"  {last} ({time.perf_counter() - t0:.0f} s)")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, args: argparse.Namespace) -> None:
    py = sys.executable
    original = work / "original.pt"
    build(original, args.layers, args.dim)
    size = original.stat().st_size
    st_original = work / "original.safetensors"
    subprocess.run(
        [
            py,
            "-c",
            "import torch, sys\nfrom safetensors.torch import save_file\n"
            "save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])",
            str(original),
            str(st_original),
        ],
        check=True,
    )
    ren = rename_lineage(work / "renames", args.layers)
    tra = transform_lineage(work / "transforms", args.layers, args.dim)
    target = work / "model.pt"
    st_target = work / "model.safetensors"

    def fresh() -> None:
        shutil.copyfile(original, target)
        os.sync()  # no writeback left over from the copy in anyone's measurement

    def fresh_st() -> None:
        shutil.copyfile(st_original, st_target)
        os.sync()

    renames = repr(RENAMES)
    drop = f"layers.{args.layers - 1}.norm1.weight"
    cli = [py, "-m", "ckptmigrate"]
    results: dict[str, tuple[float, int]] = {}
    print(
        f"checkpoint: {size / 1e9:.2f} GB, {args.layers * 5} float32 tensors "
        f"({args.layers} layers x {args.dim} dim); median wall of {args.repeat}, peak RssAnon"
    )
    run("cp of the file", fresh, ["cp", str(original), str(work / "copy.pt")], args.repeat, results)
    run('python -c "import torch"', fresh, [py, "-c", "import torch"], args.repeat, results)
    run(
        "naive: torch.load + rename keys + torch.save",
        fresh,
        [py, "-c", NAIVE, str(target), renames, drop, "0"],
        args.repeat,
        results,
    )
    run(
        "naive with torch.load(mmap=True)",
        fresh,
        [py, "-c", NAIVE, str(target), renames, drop, "1"],
        args.repeat,
        results,
    )
    run(
        "naive + fsync before the rename (durable)",
        fresh,
        [py, "-c", NAIVE, str(target), renames, drop, "0", "fsync"],
        args.repeat,
        results,
    )
    run(
        "naive safetensors: load_file + rename + save_file",
        fresh_st,
        [py, "-c", NAIVE_ST, str(st_target), renames, drop],
        args.repeat,
        results,
    )
    run(
        "ckptmigrate upgrade, 20 rename/drop revisions, in place",
        fresh,
        [*cli, "-q", "-c", _ini(work, ren), "upgrade", str(target), "--from", "r00000000000"],
        args.repeat,
        results,
    )
    run(
        "ckptmigrate upgrade, same, --no-fsync (like naive)",
        fresh,
        [
            *cli,
            "-q",
            "-c",
            _ini(work, ren),
            "upgrade",
            str(target),
            "--from",
            "r00000000000",
            "--no-fsync",
        ],
        args.repeat,
        results,
    )
    run(
        "ckptmigrate upgrade, same, .safetensors in place",
        fresh_st,
        [*cli, "-q", "-c", _ini(work, ren), "upgrade", str(st_target), "--from", "r00000000000"],
        args.repeat,
        results,
    )
    run(
        "ckptmigrate upgrade, 6 revisions changing tensors",
        fresh,
        [*cli, "-q", "-c", _ini(work, tra), "upgrade", str(target), "--from", "r00000000000"],
        args.repeat,
        results,
    )
    fresh()
    subprocess.run(
        [*cli, "-q", "-c", _ini(work, ren), "stamp", str(target), "r00000000000"], check=True
    )
    run(
        "ckptmigrate current (stamped file)",
        lambda: None,
        [*cli, "-c", _ini(work, ren), "current", str(target)],
        args.repeat,
        results,
    )
    heads, history, no_torch = graph_bench(work)

    naive = results["naive: torch.load + rename keys + torch.save"][0]
    naive_durable = results["naive + fsync before the rename (durable)"][0]
    fast = results["ckptmigrate upgrade, same, --no-fsync (like naive)"][0]
    cp, imp = results["cp of the file"][0], results['python -c "import torch"'][0]
    ren_w, ren_m = results["ckptmigrate upgrade, 20 rename/drop revisions, in place"]
    tra_w, tra_m = results["ckptmigrate upgrade, 6 revisions changing tensors"]
    cur = results["ckptmigrate current (stamped file)"][0]
    largest = 4 * args.dim * args.dim * 4 + 512 * args.dim * 4  # the resized fc1, in bytes
    print("\ntargets")
    rows = [
        (
            "rename/drop chain, both fsync: wall <= 0.5x naive+fsync",
            f"{ren_w / naive_durable:.2f}x",
            ren_w <= 0.5 * naive_durable,
        ),
        (
            "rename/drop chain, neither fsyncs: wall <= 0.5x naive",
            f"{fast / naive:.2f}x",
            fast <= 0.5 * naive,
        ),
        ("rename/drop chain: RssAnon <= 400 MB", f"{ren_m / 2**20:.0f} MB", ren_m <= 400 * 2**20),
        (
            "rename/drop chain --no-fsync: wall - import torch vs cp",
            f"{fast - imp:.2f} s vs {cp:.2f} s",
            None,
        ),
        ("tensor chain: wall <= 0.8x naive", f"{tra_w / naive:.2f}x", tra_w <= 0.8 * naive),
        (
            "tensor chain: RssAnon <= 400 MB + 3x largest tensor touched",
            f"{tra_m / 2**20:.0f} MB <= {(400 * 2**20 + 3 * largest) / 2**20:.0f} MB",
            tra_m <= 400 * 2**20 + 3 * largest,
        ),
        (
            "current (no torch): wall <= 0.3x python -c 'import torch'",
            f"{cur / imp:.2f}x",
            cur <= 0.3 * imp,
        ),
        (
            "graph commands, 1,000 revisions: < 0.5 s",
            f"heads {heads:.2f} s, history {history:.2f} s",
            max(heads, history) < 0.5,
        ),
        ("graph commands import no torch", str(no_torch), no_torch),
    ]
    for name, value, ok in rows:
        mark = "" if ok is None else ("met" if ok else "NOT MET")
        print(f"  {name:<58} {value:>24}  {mark}")


def _ini(work: Path, location: Path) -> str:
    ini = work / f"{location.name}.ini"
    ini.write_text(f"[ckptmigrate]\nscript_location = {location}\n")
    return str(ini)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
