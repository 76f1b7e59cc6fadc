"""Damaged, lying and hostile DCP ``.metadata`` files, by the thousand.

Run by tests/test_guarantee_fuzz.py as ``python -m tests.harness.fuzz_dcp WORKDIR``.
Like tests/harness/fuzz_folders.py (whose checks it shares), for PyTorch
distributed checkpoints: a clean folder saved by ``torch.distributed.checkpoint``
and stamped, then one lie per case in its ``.metadata`` (truncated, flipped
bits, not a pickle, pickles that would run code, and every field of
``Metadata`` holding what it should not: sizes, chunks, dtypes, storage
entries naming other files or ranges past their end, planner data, stamps) or
in its data file.

Per case: ``ckptmigrate upgrade FOLDER`` in-process, bounded in CPU time and
memory; exit 1 with exactly one ``Error:`` line and no traceback, every file
unchanged and no temporary file left; or exit 0 where the lie left a valid
checkpoint, which must then open again. A pickled payload must never run.
Prints a JSON report as the last line of stdout.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner
from tests.harness.common import REV_A
from tests.harness.fuzz import _bound
from tests.harness.fuzz_folders import (
    MARKER,
    ODD_VALUES,
    FolderCase,
    Tally,
    _check,
    _digests,
    harness_setup,
    kinds_report,
    run_cases,
)

from ckptmigrate.cli import cli

METADATA = ".metadata"

#: Pickles that would run code if loaded by a plain unpickler.
PAYLOADS = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("subprocess", "getoutput"),
    ("importlib", "import_module"),
]


def _base_folder(root: Path, ini: Path) -> dict[str, bytes]:
    """A clean DCP checkpoint (saved by DCP itself), stamped at revision A."""
    import torch.distributed.checkpoint as dcp
    from tests.harness.fuzz_folders import _weights

    folder = root / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP says it saves alone
        dcp.save(_weights(), checkpoint_id=str(folder))
    result = CliRunner().invoke(cli, ["-q", "-c", str(ini), "stamp", str(folder), REV_A])
    assert result.exit_code == 0, result.output
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _split(raw: bytes) -> tuple[Any, bytes]:
    """The Metadata object and whatever follows its pickle (blobs kept inside .metadata)."""
    fh = io.BytesIO(raw)
    md = pickle.Unpickler(fh).load()  # our own clean file: trusted here
    return md, raw[fh.tell() :]


def _with(base: dict[str, bytes], md: Any = None, raw: bytes | None = None) -> dict[str, bytes]:
    out = dict(base)
    if raw is None:
        _, tail = _split(base[METADATA])
        raw = pickle.dumps(md, protocol=2) + tail
    out[METADATA] = raw
    return out


def _payload(module: str, name: str) -> bytes:
    """A protocol-2 pickle calling module.name('touch MARKER')."""
    arg = f"touch {MARKER}".encode()
    return (
        b"\x80\x02c"
        + module.encode()
        + b"\n"
        + name.encode()
        + b"\n"
        + b"X"
        + len(arg).to_bytes(4, "little")
        + arg
        + b"\x85R."
    )


def _odd_size() -> list[Any]:
    return [None, -1, 2**70, "x", [1.5], torch.Size([-4, 2]), torch.Size([2**40, 2**40]), [[]]]


def _lies(base: dict[str, bytes], rng: random.Random) -> FolderCase:
    """One lie in the checkpoint, chosen at random."""
    md, _ = _split(base[METADATA])
    md = copy.deepcopy(md)
    sdm: dict[str, Any] = md.state_dict_metadata
    keys = list(sdm)
    storage = md.storage_data
    data_files = sorted(n for n in base if n.endswith(".distcp"))
    pick = rng.randrange(18)
    if pick == 0:
        raw = base[METADATA]
        return FolderCase("metadata: truncated", _with(base, raw=raw[: rng.randrange(len(raw))]))
    if pick == 1:
        raw = bytearray(base[METADATA])
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return FolderCase("metadata: flipped bits", _with(base, raw=bytes(raw)), True)
    if pick == 2:
        raw = rng.choice(
            [b"", b"\x00" * 64, os.urandom(rng.randrange(1, 400)), b"{}", b"\x80\x05."]
        )
        return FolderCase("metadata: not a pickle", _with(base, raw=raw))
    if pick == 3:
        doc = rng.choice([None, {}, [], 1, "Metadata", {"state_dict_metadata": {}}])
        return FolderCase("metadata: not a Metadata", _with(base, raw=pickle.dumps(doc)))
    if pick == 4:
        md.state_dict_metadata = rng.choice(ODD_VALUES[:11])
        return FolderCase("metadata: state_dict_metadata not a map", _with(base, md))
    if pick == 5:
        sdm[rng.choice(keys)] = rng.choice([*ODD_VALUES[:11], md.version])
        return FolderCase("metadata: an entry that is no entry", _with(base, md))
    if pick == 6:
        entry = sdm[rng.choice(keys)]
        entry.size = rng.choice(_odd_size())
        return FolderCase("metadata: a tensor's size lies", _with(base, md))
    if pick == 7:
        entry = sdm[rng.choice(keys)]
        chunk = entry.chunks[0]
        how = rng.randrange(4)
        if how == 0:
            chunk.offsets = torch.Size([rng.choice([1, 7, 2**40])] * len(chunk.offsets))
        elif how == 1:
            chunk.sizes = torch.Size([s + rng.choice([1, 9, 2**40]) for s in chunk.sizes])
        elif how == 2:
            entry.chunks = rng.choice([[], None, "x", [chunk, chunk]])
        else:
            chunk.sizes = rng.choice(_odd_size())
        return FolderCase(
            "metadata: chunks that do not tile the tensor", _with(base, md), detail=f"how={how}"
        )
    if pick == 8:
        entry = sdm[rng.choice(keys)]
        entry.properties.dtype = rng.choice([None, "float32", 1, torch.Size([1])])
        return FolderCase("metadata: a dtype that is no dtype", _with(base, md))
    if pick == 9:
        index = rng.choice(list(storage))
        info = storage[index]
        info.relative_path = rng.choice(ODD_VALUES)
        return FolderCase(
            "metadata: a chunk in a file that is no data file",
            _with(base, md),
            detail=repr(info.relative_path)[:20],
        )
    if pick == 10:
        index = rng.choice(list(storage))
        info = storage[index]
        size = len(base[data_files[0]])
        field, value = rng.choice(
            [
                ("offset", -1),
                ("offset", size),
                ("offset", 2**63),
                ("length", -5),
                ("length", size + 1),
                ("length", 2**63),
                ("length", 0),
                ("offset", "x"),
            ]
        )
        setattr(info, field, value)
        return FolderCase(
            "metadata: a chunk's range lies", _with(base, md), detail=f"{field}={value}"
        )
    if pick == 11:
        del storage[rng.choice(list(storage))]
        return FolderCase("metadata: a chunk without storage", _with(base, md))
    if pick == 12:
        md.storage_data = rng.choice([None, [], {}, "x", {1: 2}])
        return FolderCase("metadata: storage_data not a map", _with(base, md))
    if pick == 13:
        md.planner_data = rng.choice([None, 1, [], {"fc1.weight": 3}, {"x": ("y",)}])
        # DCP's planner looks it up only by the entries' keys: a missing map is valid
        return FolderCase("metadata: planner_data lies", _with(base, md), md.planner_data is None)
    if pick == 14:
        stamp_key = next(k for k in md.planner_data if str(k).startswith("__ckptmigrate"))
        value = rng.choice(
            [
                None,
                7,
                [],
                "x",
                {"ckptmigrate.revision": 5},
                {"ckptmigrate.revision": "zzzz0000"},
                {"ckptmigrate.format": "99.0"},
            ]
        )
        md.planner_data[stamp_key] = value
        return FolderCase("metadata: a stamp that is no stamp", _with(base, md))
    if pick == 15:
        md.version = rng.choice([None, 3, "99.0.0", "", [], "x.y"])
        return FolderCase("metadata: a version that is not DCP's", _with(base, md), True)
    if pick == 16:
        files = dict(base)
        victim = rng.choice(data_files)
        how = rng.choice(["missing", "empty", "truncated", "flipped"])
        if how == "missing":
            del files[victim]
        elif how == "empty":
            files[victim] = b""
        elif how == "truncated":
            files[victim] = files[victim][: rng.randrange(len(files[victim]))]
        else:
            data = bytearray(files[victim])
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            files[victim] = bytes(data)
        return FolderCase(f"data file {how}", files, how == "flipped", how)
    module, name = rng.choice(PAYLOADS)
    return FolderCase(
        "metadata: a pickle that runs code",
        _with(base, raw=_payload(module, name)),
        detail=f"{module}.{name}",
    )


def _check_dcp(
    case: FolderCase, folder: Path, code: int, err: str, before: dict[str, str], tally: Tally
) -> list[str]:
    problems = _check(case, folder, code, err, before, tally)
    if code == 0 and case.kind == "data file flipped":
        # a flip in a chunk a rename carries is not read (no data file is), and
        # the data file stays as it was; every chunk that is read is checked
        data = [n for n in case.files if n.endswith(".distcp")]
        if all(_digests(folder).get(n) == before[n] for n in data):
            problems = [p for p in problems if not p.startswith("upgraded, but")]
    return problems


def main(argv: list[str] | None = None) -> int:
    args, root, ini = harness_setup(argv, seed=3, cases=1100)
    base = _base_folder(root, ini)
    rng = random.Random(args.seed)
    cases = [_lies(base, rng) for _ in range(args.cases)]
    limits = _bound(args.headroom_mb, args.cpu_seconds)
    folder = root / "case"
    tallies = run_cases(cases, ini, folder, args.case_cpu_seconds, _check_dcp)
    report = {
        "cases": len(cases),
        "limits": limits,
        "payload_ran": Path(MARKER).exists() or (folder / MARKER).exists(),
        "kinds": kinds_report(tallies),
    }
    for kind, t in sorted(tallies.items()):
        print(f"{kind}: {t.total} cases, {dict(t.counts)}", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
