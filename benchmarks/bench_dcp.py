"""DCP folders: ckptmigrate against the usual convert-edit-convert scripts, side by side.

    python benchmarks/bench_dcp.py [--dir DIR] [--sizes 0.25,1,4] [--dim 1024] [--repeat 3]

Builds ``torch.distributed.checkpoint`` folders of about 0.25, 1 and 4 GB
(float32 layers of ``--dim``: qkv, out, fc1, fc2, norm; 50 MB a layer at
1024) and two lineages per size (those of bench_upgrade.py): 20 revisions
that only rename and drop keys, and 6 that change tensors (split, transpose,
resize, add_tensor, cast). At every size, each in one run:

* the interpreter start: ``python -c "import torch.distributed.checkpoint"``,
  which every approach pays before it touches the checkpoint; and the same
  import under the collector setting ckptmigrate's command line imports
  with (``ckptmigrate.runtime.heap``: what survives a collection while
  modules are imported is frozen), which makes that import faster. Each
  side's figures "minus start" subtract the start that side pays:
  ckptmigrate's the second, the naive scripts' the first;
* the rename/drop chain in place, with ckptmigrate, and with the naive
  offline script: ``dcp_to_torch_save``, ``torch.load(mmap=True)``, rename,
  ``dcp.save`` into a new folder, swap the folders (the cheapest form of
  ``dcp_to_torch_save`` + rename + ``torch_save_to_dcp``);
* the tensor-changing chain in place, with ckptmigrate, and with a full
  ``dcp.load`` + the same changes + ``dcp.save``, swap the folders;
* converting the folder to a torch file: ``-o out.pt`` against
  ``dcp_to_torch_save``.

Python's bytecode is cached (outside the repository) and warm, as for an
installed package, by a first round on the smallest size that is not
counted. Both sides are durable alike: ``dcp.save`` fsyncs its files, ckptmigrate
fsyncs in place. Every run starts from a fresh copy of the built folder
whose data files are hard links to the original's (no cost, and in the page
cache for everyone alike), written back (sync) before the run. Wall time is
the median of --repeat runs, peak anonymous memory (RssAnon, sampled every
5 ms) the largest seen. ckptmigrate's own time (tens of milliseconds) is the
median of its run in every round and of --own-runs more runs of it alone
after the rounds: on a small machine, what the naive scripts' gigabytes of
I/O leave behind varies that figure by more than it varies with the size.
The layers share their values, so building a 4 GB folder needs one
layer's memory; nothing measured depends on the values.
After the rename chains, the data files must be the very same files
(inode, size, modification time); at the smallest size, the two tensor
chains' results must load with equal tensors.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench_upgrade import RENAMES, _ini, measure, rename_lineage, transform_lineage

LAYER_TENSORS = 5
START = "import torch.distributed.checkpoint"
# the same import under the command line's collector setting, its module loaded by path:
# the ckptmigrate package itself is not imported (that is part of ckptmigrate's own cost)
OWN_START = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("heap", sys.argv[1])
heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heap)
with heap.imports_frozen():
    import torch.distributed.checkpoint
"""
# ckptmigrate's own time, measured inside the process: from the end of the DCP import (under
# the command line's collector setting) to the end of the command, written to argv[2]. The
# interpreter start is left out exactly, not subtracted from another process's wall.
TIMED = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("heap", sys.argv[1])
heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heap)
with heap.imports_frozen():
    import torch.distributed.checkpoint
t0 = time.perf_counter()
from ckptmigrate import cli
try:
    cli.main(sys.argv[3:])
except SystemExit as exc:
    if exc.code:
        raise
with open(sys.argv[2], "a") as fh:
    fh.write(f"{time.perf_counter() - t0}\\n")
os._exit(0)
"""
HEAD = f"r{len(RENAMES):011d}"  # the rename lineage's last revision

BUILD = """
import sys, warnings, torch
warnings.simplefilter("ignore")  # the note that no process group is set up
import torch.distributed.checkpoint as dcp
folder, layers, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
layer = {
    "attn.qkv.weight": torch.randn(3 * dim, dim, generator=g),
    "attn.out.weight": torch.randn(dim, dim, generator=g),
    "mlp.fc1.weight": torch.randn(4 * dim, dim, generator=g),
    "mlp.fc2.weight": torch.randn(dim, 4 * dim, generator=g),
    "norm.weight": torch.ones(dim),
}
sd = {f"layers.{i}.{k}": v for i in range(layers) for k, v in layer.items()}
dcp.save(sd, checkpoint_id=folder, no_dist=True)
"""

# the folder swap both naive scripts end with: the new folder replaces the old one
SWAP = """
os.rename(src, src + ".old")
os.rename(new, src)
shutil.rmtree(src + ".old")
"""

NAIVE_RENAMES = (
    """
import os, re, shutil, sys, torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
src, renames, drop = sys.argv[1], eval(sys.argv[2]), sys.argv[3]
new, pt = src + ".new", src + ".pt"
dcp_to_torch_save(src, pt)
sd = torch.load(pt, weights_only=True, mmap=True)
for pat, repl in renames:
    sd = {re.sub(pat, repl, k): v for k, v in sd.items()}
sd.pop(drop)
dcp.save(sd, checkpoint_id=new, no_dist=True)
os.remove(pt)
"""
    + SWAP
)

# every tensor the folder holds, allocated for dcp.load to fill (as a job's state dict is)
ALLOC = """
def alloc(folder):
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items()}
"""

NAIVE_TENSORS = (
    """
import os, shutil, sys, torch
import torch.distributed.checkpoint as dcp
"""
    + ALLOC
    + """
src, layers, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
new = src + ".new"
sd = alloc(src)
dcp.load(sd, checkpoint_id=src, no_dist=True)
for i in range(layers):
    p = f"layers.{i}."
    q, k, v = sd.pop(p + "attn.qkv.weight").chunk(3)
    sd[p + "attn.q.weight"], sd[p + "attn.k.weight"], sd[p + "attn.v.weight"] = q, k, v
    sd[p + "attn.out.weight"] = sd[p + "attn.out.weight"].t().contiguous()
    fc1 = sd[p + "mlp.fc1.weight"]
    sd[p + "mlp.fc1.weight"] = torch.cat([fc1, fc1.new_zeros(512, dim)])
    sd[p + "mlp.fc1.bias"] = torch.zeros(4 * dim + 512)
    sd[p + "norm.weight"] = sd[p + "norm.weight"].half()
dcp.save(sd, checkpoint_id=new, no_dist=True)
"""
    + SWAP
)

CONVERT = """
import sys
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
dcp_to_torch_save(sys.argv[1], sys.argv[2])
"""

SAME = (
    """
import sys, torch
import torch.distributed.checkpoint as dcp
"""
    + ALLOC
    + """
a, b = alloc(sys.argv[1]), alloc(sys.argv[2])
for sd, folder in ((a, sys.argv[1]), (b, sys.argv[2])):
    dcp.load(sd, checkpoint_id=folder, no_dist=True)
assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
assert not bad, bad[:5]
"""
)


def copy_folder(src: Path, dst: Path) -> None:
    """A fresh copy of a DCP folder: data files as hard links, ``.metadata`` as a real copy."""
    for leftover in (dst, Path(f"{dst}.new"), Path(f"{dst}.old")):
        shutil.rmtree(leftover, ignore_errors=True)
    Path(f"{dst}.pt").unlink(missing_ok=True)
    dst.mkdir()
    for path in src.iterdir():
        if path.suffix == ".distcp":
            os.link(path, dst / path.name)
        else:
            shutil.copyfile(path, dst / path.name)
    os.sync()


def data_files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each data file's (inode, size, modification time): the same file, not rewritten."""
    out = {}
    for path in folder.glob("*.distcp"):
        st = path.stat()
        out[path.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def interleaved(
    approaches: dict[str, list[str]],
    fresh: Callable[[], None],
    after: Callable[[str], None],
    repeat: int,
    *,
    echo: bool = True,
) -> dict[str, tuple[float, float, int]]:
    """(median wall, median CPU seconds, largest RssAnon) of each command.

    Each round runs every command once, so the shared machine's changing load
    falls on all of them alike; CPU time (user + system) is printed beside the
    wall because it varies less with that load. Each run starts from
    ``fresh()``; ``after(label)`` sees its result.
    """
    walls: dict[str, list[float]] = {label: [] for label in approaches}
    cpus: dict[str, list[float]] = {label: [] for label in approaches}
    peaks: dict[str, int] = dict.fromkeys(approaches, 0)
    for _ in range(repeat):
        for label, cmd in approaches.items():
            fresh()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall, peak = measure(cmd)
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            after(label)
            walls[label].append(wall)
            cpus[label].append(used.ru_utime - before.ru_utime + used.ru_stime - before.ru_stime)
            peaks[label] = max(peaks[label], peak)
    out = {
        label: (statistics.median(walls[label]), statistics.median(cpus[label]), peaks[label])
        for label in approaches
    }
    for label, (wall, cpu, peak) in out.items() if echo else ():
        print(f"    {label:<52} {wall:7.2f} s {cpu:7.2f} s {peak / 2**20:7.0f} MB", flush=True)
    return out


def bench_size(
    work: Path, gb: float, dim: int, repeat: int, *, compare: bool, warm_up: bool, own_runs: int
) -> dict[str, object]:
    """Every approach on one checkpoint size; the figures for the table of targets."""
    py = sys.executable
    layer_bytes = (12 * dim * dim + dim) * 4
    layers = max(1, round(gb * 1e9 / layer_bytes))
    root = work / f"{gb:g}gb"
    root.mkdir()
    built = root / "built"
    subprocess.run([py, "-c", BUILD, str(built), str(layers), str(dim)], check=True)
    nbytes = sum(p.stat().st_size for p in built.iterdir())
    print(
        f"\n  {nbytes / 1e9:.2f} GB DCP folder: {layers} layers x {dim} dim, "
        f"{layers * LAYER_TENSORS} float32 tensors",
        flush=True,
    )
    ren_ini = _ini(root, rename_lineage(root / "renames", layers))
    tra_ini = _ini(root, transform_lineage(root / "transforms", layers, dim))
    ckpt = root / "ckpt"
    cli = [py, "-m", "ckptmigrate", "-q"]
    drop = f"layers.{layers - 1}.norm1.weight"
    start = "interpreter start (import DCP)"
    own_start = "the same, ckptmigrate's collector setting"
    heap = importlib.util.find_spec("ckptmigrate.runtime.heap")
    assert heap is not None and heap.origin is not None
    ren = "ckptmigrate upgrade, 20 rename/drop revisions"
    naive_ren = "naive: dcp_to_torch_save + rename + dcp.save"
    tra = "ckptmigrate upgrade, 6 revisions changing tensors"
    naive_tra = "naive: dcp.load + change tensors + dcp.save"
    convert = "ckptmigrate -o out.pt (conversion alone)"
    naive_convert = "dcp_to_torch_save"
    out_pt = root / "out.pt"
    timed = "the same, timed inside the process (ckptmigrate's own)"
    timings = root / "timed.txt"
    ren_args = ["-c", ren_ini, "upgrade", str(ckpt), "--from", "r00000000000"]
    approaches = {
        start: [py, "-c", START],
        own_start: [py, "-c", OWN_START, heap.origin],
        ren: [*cli, *ren_args],
        timed: [py, "-c", TIMED, heap.origin, str(timings), "-q", *ren_args],
        naive_ren: [py, "-c", NAIVE_RENAMES, str(ckpt), repr(RENAMES), drop],
        tra: [*cli, "-c", tra_ini, "upgrade", str(ckpt), "--from", "r00000000000"],
        naive_tra: [py, "-c", NAIVE_TENSORS, str(ckpt), str(layers), str(dim)],
        # at the lineage's head already: no step, the folder is only converted
        convert: [*cli, "-c", ren_ini, "upgrade", str(ckpt), "--from", HEAD, "-o", str(out_pt)],
        naive_convert: [py, "-c", CONVERT, str(ckpt), str(out_pt)],
    }
    untouched: list[bool] = []
    ours, theirs = root / "ours", root / "theirs"

    def after(label: str) -> None:
        out_pt.unlink(missing_ok=True)
        if label in (ren, timed):
            untouched.append(data_files(ckpt) == data_files(built))
        if label in (tra, naive_tra):  # the last result of each, to compare
            kept = ours if label == tra else theirs
            shutil.rmtree(kept, ignore_errors=True)
            ckpt.rename(kept)

    print(
        f"    {f'{repeat} interleaved rounds, medians':<52} {'wall':>9} {'CPU':>9} {'RssAnon':>10}"
    )
    if warm_up:
        interleaved(approaches, lambda: copy_folder(built, ckpt), after, 1, echo=False)
    timings.unlink(missing_ok=True)
    figures = interleaved(approaches, lambda: copy_folder(built, ckpt), after, repeat)
    for _ in range(own_runs):  # more samples of the smallest figure, away from the heavy runs
        copy_folder(built, ckpt)
        measure(approaches[timed])
        after(timed)
    own = [float(line) for line in timings.read_text().split()]
    print(
        f"    {f'  ... its own time ({len(own)} runs: median, least)':<52} "
        f"{statistics.median(own):7.3f} s "
        f"{min(own):7.3f} s",
        flush=True,
    )
    same = None
    if compare:  # both results in memory at once: on the smallest size only
        done = subprocess.run(
            [py, "-c", SAME, str(ours), str(theirs)], capture_output=True, text=True
        )
        if done.returncode != 0:
            print(done.stderr[-2000:])
        same = done.returncode == 0
    shutil.rmtree(root)
    return {
        "gb": nbytes / 1e9,
        "start": figures[start][0],
        "start_cpu": figures[start][1],
        "own_start": figures[own_start][0],
        "own_start_cpu": figures[own_start][1],
        "ren": figures[ren][0],
        "ren_cpu": figures[ren][1],
        "ren_mem": figures[ren][2],
        "own": statistics.median(own),
        "untouched": all(untouched),
        "naive_ren": figures[naive_ren][0],
        "tra": figures[tra][0],
        "tra_mem": figures[tra][2],
        "naive_tra": figures[naive_tra][0],
        "naive_tra_mem": figures[naive_tra][2],
        "same": same,
        "convert": figures[convert][0],
        "convert_mem": figures[convert][2],
        "naive_convert": figures[naive_convert][0],
        "naive_convert_mem": figures[naive_convert][2],
        # the resized fc1, the largest tensor the tensor chain touches
        "largest": (4 * dim + 512) * dim * 4,
    }


NOISE = "noise"


def _unless_noise(ok: bool, *nets: float) -> bool | str:
    """The verdict, unless a time minus its interpreter start is not above zero (noise)."""
    return ok if all(n > 0 for n in nets) else NOISE


def report(sizes: list[dict[str, object]]) -> None:
    """The targets, measured, side by side."""

    def f(row: dict[str, object], key: str) -> float:
        value = row[key]
        assert isinstance(value, (int, float))
        return float(value)

    print("\nwall minus each side's interpreter start: ckptmigrate | naive = ratio")
    print(f"  {'size':>8}  {'rename/drop chain':^36}  {'tensor-changing chain':^32}")
    for row in sizes:
        s, own = f(row, "start"), f(row, "own_start")
        ren, naive_ren = f(row, "ren") - own, f(row, "naive_ren") - s
        tra, naive_tra = f(row, "tra") - own, f(row, "naive_tra") - s
        print(
            f"  {f(row, 'gb'):5.2f} GB  {ren:6.2f} s | {naive_ren:6.2f} s = {ren / naive_ren:.3f}x"
            f" ({f(row, 'ren_mem') / 2**20:.0f} MB)"
            f"  {tra:6.2f} s | {naive_tra:6.2f} s = {tra / naive_tra:.2f}x"
        )
    small, large = sizes[0], sizes[-1]
    rows: list[tuple[str, str, bool | str | None]] = []
    big, little = f(large, "own"), f(small, "own")
    rows.append(
        (
            f"renames: own time at {f(large, 'gb'):.2f} / {f(small, 'gb'):.2f} GB <= 1.2",
            f"{big:.3f} / {little:.3f} s = {big / little:.2f}",
            big <= 1.2 * little,
        )
    )
    for unit, wall, start in (("wall", "ren", "own_start"), ("CPU", "ren_cpu", "own_start_cpu")):
        big, little = f(large, wall) - f(large, start), f(small, wall) - f(small, start)
        rows.append(
            (
                f"  (whole processes: {unit} - own start, {f(large, 'gb'):.2f} / "
                f"{f(small, 'gb'):.2f} GB)",
                f"{big:.2f} / {little:.2f} s" + (f" = {big / little:.2f}" if little > 0 else ""),
                None,
            )
        )
    rows.append(
        (
            "renames: data files not rewritten (inode, size, mtime)",
            ", ".join("yes" if row["untouched"] else "NO" for row in sizes),
            all(bool(row["untouched"]) for row in sizes),
        )
    )
    for row in sizes:
        size = f"{f(row, 'gb'):.2f} GB"
        whole = f(row, "ren") / f(row, "naive_ren")
        ours, theirs = f(row, "own"), f(row, "naive_ren") - f(row, "start")
        rows.append(
            (
                f"renames, {size}: own time <= 0.05x naive (wall - start; whole wall)",
                f"{ours / theirs:.3f}x; {whole:.2f}x",
                _unless_noise(ours <= 0.05 * theirs, theirs),
            )
        )
    for row in sizes:
        size = f"{f(row, 'gb'):.2f} GB"
        ratio = f(row, "tra") / f(row, "naive_tra")
        rows.append((f"tensor chain, {size}: wall <= 0.8x naive", f"{ratio:.2f}x", ratio <= 0.8))
    for row in sizes:
        size = f"{f(row, 'gb'):.2f} GB"
        bound = 400 * 2**20 + 3 * f(row, "largest")
        mem, naive_mem = f(row, "tra_mem"), f(row, "naive_tra_mem")
        rows.append(
            (
                f"tensor chain, {size}: RssAnon <= 400 MB + 3x largest touched",
                f"{mem / 2**20:.0f} <= {bound / 2**20:.0f} MB (naive {naive_mem / 2**20:.0f})",
                mem <= bound,
            )
        )
    rows.append(
        (
            f"tensor chain, {f(small, 'gb'):.2f} GB: ckptmigrate's tensors == naive's",
            "yes" if small["same"] else "NO",
            bool(small["same"]),
        )
    )
    for row in sizes:
        size = f"{f(row, 'gb'):.2f} GB"
        mem, naive_mem = f(row, "convert_mem"), f(row, "naive_convert_mem")
        ratio = f(row, "convert") / f(row, "naive_convert")
        rows.append(
            (
                f"-o out.pt, {size}: vs dcp_to_torch_save (wall; RssAnon)",
                f"{ratio:.2f}x; {mem / 2**20:.0f} vs {naive_mem / 2**20:.0f} MB",
                None,
            )
        )
    print("\ntargets (noise: a figure minus the interpreter start is below zero, so the")
    print("machine's noise is larger than what is measured; rerun on a quieter machine)")
    for name, value, ok in rows:
        mark = {None: "", True: "met", False: "NOT MET", NOISE: "noise"}[ok]
        print(f"  {name:<62} {value:>30}  {mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--sizes", default="0.25,1,4", help="checkpoint sizes in GB")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--own-runs", type=int, default=5, help="extra runs of ckptmigrate's own time, alone"
    )
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckptmigrate-bench-dcp-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(float(s) for s in args.sizes.split(","))
    # compiled bytecode, cached outside the repository, as an installed package has it;
    # the warm-up round below fills the cache (otherwise every run compiles ckptmigrate)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    print(f"median wall of {args.repeat} runs, peak RssAnon; every approach in place")
    try:
        report(
            [
                bench_size(
                    work,
                    gb,
                    args.dim,
                    args.repeat,
                    compare=gb == sizes[0],
                    warm_up=gb == sizes[0],
                    own_runs=args.own_runs,
                )
                for gb in sizes
            ]
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
