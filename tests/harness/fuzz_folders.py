"""Damaged and lying checkpoint folders, by the thousand: exit 1 and one ``Error:`` line.

Run by tests/test_guarantee_fuzz.py as ``python -m tests.harness.fuzz_folders WORKDIR``.
Like tests/harness/fuzz.py (whose limits it shares: capped address space and
CPU time, a CPU-time alarm per case), but for checkpoints that are folders:
a Hugging Face sharded checkpoint whose index lies in every way a JSON file
can (wrong types, shards that are missing, outside the folder, folders or
damaged, keys its shards do not hold, stamps that are not stamps, flipped
bytes, truncation) and whose ``.bin`` shards may hold hostile pickles.

Per case: ``ckptmigrate upgrade FOLDER`` in-process; exit 1 with exactly one
``Error:`` line and no traceback, the folder's files unchanged and no
temporary file left; or exit 0 when the mutation left a valid checkpoint, which
must then open again. A hostile pickle's payload must never run. Prints a
JSON report as the last line of stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner
from tests.harness.common import REV_A, leftovers, write_project
from tests.harness.fuzz import FUZZ_DOWNGRADE, FUZZ_UPGRADE, CaseTimeout, _alarm, _bound

from ckptmigrate.cli import cli

INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
MARKER = "payload-ran"


@dataclass
class FolderCase:
    kind: str
    files: dict[str, bytes]  # name -> bytes (the index and the shards)
    may_migrate: bool = False
    detail: str = ""


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "fc1.weight": torch.randn(8, 4, generator=gen),
        "fc1.bias": torch.randn(8, generator=gen),
        "fc2.weight": torch.randn(3, 8, generator=gen),
        "emb.weight": torch.randn(6, 5, generator=gen),
    }


def _base_folder(kind: str) -> dict[str, bytes]:
    """A clean two-shard checkpoint at revision A, as bytes by file name."""
    from io import BytesIO

    from safetensors.torch import save as st_save

    w = _weights()
    parts = {"a": ["fc1.weight", "fc1.bias"], "b": ["fc2.weight", "emb.weight"]}
    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    for tag, keys in parts.items():
        if kind == "safetensors":
            name = f"model-0000{1 + (tag == 'b')}-of-00002.safetensors"
            files[name] = st_save({k: w[k] for k in keys}, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-0000{1 + (tag == 'b')}-of-00002.bin"
            buf = BytesIO()
            torch.save({k: w[k] for k in keys}, buf)
            files[name] = buf.getvalue()
        weight_map.update((k, name) for k in keys)
    index = {"metadata": {"total_size": 0, "ckptmigrate.revision": REV_A}, "weight_map": weight_map}
    files[INDEX if kind == "safetensors" else BIN_INDEX] = json.dumps(index, indent=2).encode()
    return files


def _index_name(files: dict[str, bytes]) -> str:
    return next(n for n in files if n.endswith(".index.json"))


def _with_index(base: dict[str, bytes], doc: Any, raw: bytes | None = None) -> dict[str, bytes]:
    out = dict(base)
    out[_index_name(base)] = raw if raw is not None else json.dumps(doc).encode()
    return out


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {MARKER}",))


#: Values that are not what a field should hold.
ODD_VALUES: list[Any] = [
    None,
    0,
    -1,
    2**70,
    1.5,
    True,
    "",
    "x" * 5000,
    [],
    [1, 2],
    {},
    {"a": 1},
    ["a"],
    "../secret.safetensors",
    "/etc/passwd",
    ".hidden",
    "sub/dir.safetensors",
    "\x00",
    "é",
]


def _lies(base: dict[str, bytes], rng: random.Random) -> FolderCase:
    """One structural lie in the index (or a shard), chosen at random."""
    doc = json.loads(base[_index_name(base)])
    wm: dict[str, Any] = doc["weight_map"]
    keys = list(wm)
    shards = sorted(set(wm.values()))
    pick = rng.randrange(14)
    if pick == 0:
        doc["weight_map"] = rng.choice(ODD_VALUES[:11])
        return FolderCase("index: weight_map not an object", _with_index(base, doc))
    if pick == 1:
        wm[rng.choice(keys)] = rng.choice(ODD_VALUES)
        return FolderCase("index: a shard name that is no shard", _with_index(base, doc))
    if pick == 2:
        wm[f"ghost.{rng.randrange(99)}"] = rng.choice(shards)
        return FolderCase("index: a key its shard does not hold", _with_index(base, doc))
    if pick == 3:
        del wm[rng.choice(keys)]
        # the shard still holds it: a key the index does not list
        return FolderCase("index: a shard key the index leaves out", _with_index(base, doc), True)
    if pick == 4:
        files = _with_index(base, doc)
        del files[rng.choice(shards)]
        return FolderCase("shard missing", files)
    if pick == 5:
        doc["metadata"] = rng.choice([None, 1, "x", [], ["a"]])
        may = doc["metadata"] is None
        return FolderCase("index: metadata not an object", _with_index(base, doc), may)
    if pick == 6:
        value = rng.choice([None, 7, [], {}, "", "zzzz0000", REV_A + ",", ",,", "a" * 300])
        doc["metadata"]["ckptmigrate.revision"] = value
        # "" (at base) and stray commas are other spellings of valid stamps
        valid = (isinstance(value, str) and not value.strip(",")) or value == REV_A + ","
        return FolderCase("index: a stamp that is no stamp", _with_index(base, doc), valid)
    if pick == 7:
        doc["metadata"]["ckptmigrate.format"] = rng.choice(["99.0", "x.y", "", None, 3])
        return FolderCase("index: a stamp format that is not ours", _with_index(base, doc))
    if pick == 8:
        doc = rng.choice([None, [], 1, "x", {"weight_map": None}, {}])
        return FolderCase("index: not an index", _with_index(base, doc))
    if pick == 9:
        depth = rng.choice([100, 10_000, 100_000])
        return FolderCase("index: nested too deep", _with_index(base, None, b"[" * depth))
    if pick == 10:
        raw = base[_index_name(base)]
        return FolderCase(
            "index: truncated", _with_index(base, None, raw[: rng.randrange(len(raw))])
        )
    if pick == 11:
        raw = bytearray(base[_index_name(base)])
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return FolderCase("index: flipped bits", _with_index(base, None, bytes(raw)), True)
    if pick == 12:
        files = _with_index(base, doc)
        victim = rng.choice(shards)
        data = bytearray(files[victim])
        cut = rng.choice(["truncate", "flip"])
        if cut == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            data[rng.randrange(len(data))] ^= 0xFF
        files[victim] = bytes(data)
        return FolderCase("shard damaged", files, cut == "flip", cut)
    files = _with_index(base, doc)
    victim = rng.choice(shards)
    files[victim] = b""
    return FolderCase("shard empty", files)


def _hostile(base: dict[str, bytes], rng: random.Random) -> FolderCase:
    """A .bin shard whose pickle would run code."""
    doc = json.loads(base[_index_name(base)])
    victim = rng.choice(sorted(set(doc["weight_map"].values())))
    files = dict(base)
    if rng.random() < 0.5:
        from io import BytesIO

        buf = BytesIO()
        torch.save({"fc1.weight": _Payload()}, buf)
        files[victim] = buf.getvalue()
    else:
        files[victim] = pickle.dumps(_Payload(), protocol=rng.choice([0, 2, 4]))
    return FolderCase("shard: hostile pickle", files)


@dataclass
class Tally:
    total: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


def _check(
    case: FolderCase, folder: Path, code: int, err: str, before: dict[str, str], tally: Tally
) -> list[str]:
    problems = []
    if leftovers(folder):
        problems.append(f"temporary files left: {leftovers(folder)}")
    if (folder / MARKER).exists() or Path(MARKER).exists():
        problems.append("the pickled payload ran")
    lines = err.strip().splitlines()
    if code == 1:
        tally.counts["refused: exit 1, one Error line"] += 1
        if sum(line.startswith("Error: ") for line in lines) != 1 or not lines[-1].startswith(
            "Error: "
        ):
            problems.append(f"not exactly one final Error line: {err[-300:]!r}")
        if "Traceback" in err or "internal error" in err:
            problems.append(f"a bug, not a clean refusal: {err[-300:]!r}")
        if _digests(folder) != before:
            problems.append("the folder's files changed")
        if lines:
            tally.messages.setdefault(case.kind + ": " + lines[-1][:60], lines[-1][:200])
    elif code == 0 and case.may_migrate:
        tally.counts["accepted: still a valid checkpoint"] += 1
        from ckptmigrate.formats import read_checkpoint

        try:
            ckpt = read_checkpoint(folder)
            for key in ckpt.schema:
                ckpt.read(key)
            ckpt.close()
        except Exception as exc:
            problems.append(f"upgraded, but the result does not open: {exc}")
    else:
        problems.append(f"exit {code}: {err[-300:]!r}")
    return problems


def harness_setup(
    argv: list[str] | None, seed: int, cases: int
) -> tuple[argparse.Namespace, Path, Path]:
    """The options every folder fuzz harness takes, and its project: (args, root, ini).

    Also one torch thread (the cases run in-process under CPU limits) and the
    project folder as the working directory.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--cases", type=int, default=cases)
    parser.add_argument("--case-cpu-seconds", type=float, default=10.0)
    parser.add_argument("--cpu-seconds", type=int, default=600)
    parser.add_argument("--headroom-mb", type=int, default=1536)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.workdir).resolve()
    ini = write_project(
        root,
        [
            ("aaaa00000001", None, "    pass", "    pass"),
            ("bbbb00000002", REV_A, FUZZ_UPGRADE, FUZZ_DOWNGRADE),
        ],
    )
    os.chdir(root)
    return args, root, ini


def main(argv: list[str] | None = None) -> int:
    args, root, ini = harness_setup(argv, seed=2, cases=1200)
    rng = random.Random(args.seed)
    bases = {kind: _base_folder(kind) for kind in ("safetensors", "bin")}
    makers: list[tuple[float, Callable[[dict[str, bytes], random.Random], FolderCase]]] = [
        (0.9, _lies),
        (0.1, _hostile),
    ]
    cases: list[FolderCase] = []
    while len(cases) < args.cases:
        kind = rng.choice(["safetensors", "bin"])
        maker = _lies if rng.random() < makers[0][0] or kind == "safetensors" else _hostile
        cases.append(maker(bases[kind], rng))

    limits = _bound(args.headroom_mb, args.cpu_seconds)
    tallies = run_cases(cases, ini, root / "case", args.case_cpu_seconds)
    hard = resource_hard()
    report = {"cases": len(cases), "limits": limits, "kinds": kinds_report(tallies)}
    report["cpu_limit_after"] = hard
    for kind, t in sorted(tallies.items()):
        print(f"{kind}: {t.total} cases, {dict(t.counts)}", file=sys.stderr)
    print(json.dumps(report))
    return 0


Check = Callable[[FolderCase, Path, int, str, dict[str, str], "Tally"], list[str]]


def run_cases(
    cases: list[FolderCase], ini: Path, folder: Path, cpu_seconds: float, check: Check | None = None
) -> dict[str, Tally]:
    """``upgrade`` each case's folder in-process, bounded in CPU time; the outcomes by kind."""
    runner = CliRunner()
    signal.signal(signal.SIGPROF, _alarm)
    tallies: dict[str, Tally] = defaultdict(Tally)
    for i, case in enumerate(cases):
        tally = tallies[case.kind]
        tally.total += 1
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for name, data in case.files.items():
            (folder / name).write_bytes(data)
        before = _digests(folder)
        label = f"case {i} [{case.kind} {case.detail}]"
        signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
        try:
            result = runner.invoke(
                cli, ["-c", str(ini), "upgrade", str(folder)], catch_exceptions=False
            )
            code, err = result.exit_code, result.stderr
        except CaseTimeout:
            tally.failures.append(f"{label}: no result after {cpu_seconds}s of CPU time")
            continue
        except BaseException as exc:
            tally.failures.append(f"{label}: escaped the CLI: {type(exc).__name__}: {exc}")
            continue
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        problems = (check or _check)(case, folder, code, err, before, tally)
        tally.failures += [f"{label}: {p}" for p in problems]
    return tallies


def kinds_report(tallies: dict[str, Tally]) -> dict[str, Any]:
    """Per kind of case: how many, their outcomes, sample errors and failures."""
    return {
        kind: {
            "cases": t.total,
            "outcomes": dict(t.counts),
            "distinct_errors": len(t.messages),
            "sample_errors": sorted(t.messages.values())[:4],
            "failures": t.failures[:10],
            "failure_count": len(t.failures),
        }
        for kind, t in sorted(tallies.items())
    }


def resource_hard() -> int:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))  # the cases are done: exit in peace
    return hard


if __name__ == "__main__":
    raise SystemExit(main())
