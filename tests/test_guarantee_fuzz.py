"""Damaged files, by the thousand: exit 1, one ``Error:`` line, input unchanged.

tests/harness/fuzz.py runs every case in one child process with a capped
address space and CPU time, and a per-case CPU-time alarm; this test runs it
and checks its report. A case that blows up memory or time is a failure the
child reports (``MemoryError`` under RLIMIT_AS, the alarm); no outcome here
depends on how fast or how loaded the machine is.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tests.harness.common import REV_A, REV_B, TMP_SUFFIX, stamp_state_dict, write_project
from tests.harness.fuzz import ZIP_DAMAGE

from ckptmigrate.cli import cli

REPO = Path(__file__).resolve().parent.parent

ZIP_KINDS = {*ZIP_DAMAGE, "safetensors length flip"}
#: Fields of a stored, single-disk zip that no reader gives meaning to (or, in
#: torch.save's files, left zero because a data descriptor follows the data).
MEANINGLESS = (
    "extra field (padding)",
    "version",
    "date",
    "time",
    "flags",
    "disk start",
    "internal attributes",
    "external attributes",
    "zip64 end record",
    "comment length",
    "end record entries",
    "cd disk",
    "end record disk",
    "valid CRC",
)
#: Records ckptmigrate never reads (it writes its own): their fields carry no meaning either.
UNUSED_RECORDS = (
    "(.format_version)",
    "(.storage_alignment)",
    "(version)",
    "(.data/serialization_id)",
)


def test_damaged_and_lying_files_are_refused_cleanly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.harness.fuzz",
            str(tmp_path),
            "--seed",
            "1",
            "--scale",
            "1.5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,  # only ends a hang: the child bounds its own CPU time
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    kinds = report["kinds"]
    for kind, result in kinds.items():
        print(f"{kind}: {result['cases']} cases, {result['outcomes']}")
    print({k: v for k, v in report.items() if k != "kinds"})

    assert report["cases"] >= 1000
    failures = [f for r in kinds.values() for f in r["failures"]]
    assert failures == [], "\n".join(failures[:20])
    assert set(kinds) >= ZIP_KINDS
    lies = [k for k in kinds if k.startswith("safetensors: ")]
    assert len(lies) >= 15  # offsets past the end, overlaps, gaps, 2**63 lengths, ...
    for kind, result in kinds.items():
        outcomes = result["outcomes"]
        assert sum(outcomes.values()) == result["cases"], kind
        refused = outcomes.get("refused: exit 1, one Error line", 0)
        benign = outcomes.get("benign: output identical to a clean run", 0)
        accepted = outcomes.get("accepted: a valid file with other contents", 0)
        if kind in ("data.pkl flip", "tensor record flip", "truncate") or kind.startswith(
            "safetensors"
        ):
            # every byte there matters: nothing may get through
            assert refused == result["cases"], (kind, outcomes)
        elif kind == "data.pkl flip, CRC fixed":
            # a pickle with a valid checksum may still be a valid (other) file
            assert refused >= result["cases"] // 2, (kind, outcomes)
        else:
            assert accepted == 0, (kind, outcomes)
            # most flips in the zip structure matter; in the small records
            # only byteorder's do (ckptmigrate writes the others afresh)
            share = 10 if kind == "small record flip" else 3
            assert refused >= result["cases"] // share, (kind, outcomes)
            # what got through hit only fields nobody reads, and gave the
            # clean run's output bit for bit (the harness compared the bytes)
            assert benign + refused == result["cases"], (kind, outcomes)
            for where in result["benign_fields"]:
                field = where.split(": ", 1)[1]
                data_descriptor = where.startswith("torch.save") and field.startswith(
                    ("crc (", "size (", "compressed size (")
                )
                unused = field.endswith(UNUSED_RECORDS)
                assert data_descriptor or unused or any(m in field for m in MEANINGLESS), where

    # every case ran bounded (within these limits, or it is in the failures), no descriptor leaks
    limits = report["limits"]  # -1 would be unlimited
    assert limits["address_space_mb"] > 0 and limits["cpu_seconds"] > 0, limits
    assert report["open_fds_after"] == report["open_fds_before"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]


# ------------------------------------------------------------- what the fuzzer found


def _flip_at(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x5A
    return bytes(out)


def _optimizer_moment_flipped(base: Path) -> bytes:
    """A flipped byte in Adam's exp_avg of emb.weight, which the migration transposes."""
    from ckptmigrate.formats import torch_save

    obj, source = torch_save.load(base)
    record = source.locate(obj["optimizer"]["state"][0]["exp_avg"].untyped_storage())
    assert record is not None
    return _flip_at(base.read_bytes(), record.data_offset + 3)


def _zip64_disk_flipped(base: Path) -> bytes:
    data = base.read_bytes()
    return _flip_at(data, data.rfind(b"PK\x06\x07") + 4)


def _local_crc_flipped(base: Path) -> bytes:
    data = base.read_bytes()
    return _flip_at(data, data.find(b"PK\x03\x04", 1) + 14)  # the second record's header


def _byteorder_flipped(base: Path) -> bytes:
    data = base.read_bytes()
    return _flip_at(data, data.rfind(b"little"))


def _cd_version_flipped(base: Path) -> bytes:
    data = base.read_bytes()
    return _flip_at(data, data.find(b"PK\x01\x02") + 6)  # version needed to extract


def _truncated(base: Path) -> bytes:
    return base.read_bytes()[:-30]


def _st_header(raw: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(raw) if length is None else length) + raw


FINDINGS: dict[str, tuple[str, Callable[[Path], bytes], str]] = {
    "optimizer state computed from a damaged record": (
        "torch.save",
        _optimizer_moment_flipped,
        "fails its checksum",
    ),
    "zip64 locator names a second disk": (
        "torch.save",
        _zip64_disk_flipped,
        "damaged zip directory: zipfiles that span multiple disks are not supported",
    ),
    "zip directory asks for an unknown zip version": (
        "torch.save",
        _cd_version_flipped,
        "damaged zip directory: zip file version",
    ),
    "truncated zip (no end record)": ("torch.save", _truncated, "damaged zip directory"),
    "local header checksum disagrees": (
        "ckptmigrate",
        _local_crc_flipped,
        "disagrees with its local header",
    ),
    "byteorder record damaged": ("ckptmigrate", _byteorder_flipped, "byteorder record fails"),
    "safetensors dtype that is a list": (
        "safetensors",
        lambda _b: (
            _st_header(b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}')
            + b"\0" * 4
        ),
        "entry 'w' has unknown dtype ['F32']",
    ),
    "safetensors header nested 100000 deep": (
        "safetensors",
        lambda _b: _st_header(b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "nested too deeply",
    ),
    "safetensors header length 2**63": (
        "safetensors",
        lambda _b: _st_header(b'{"__metadata__": {}}', 2**63),
        "header length 9223372036854775808 is larger than the 104857600-byte limit",
    ),
}


@pytest.mark.parametrize("case", list(FINDINGS))
def test_fuzzer_findings_stay_fixed(case: str, tmp_path: Path) -> None:
    """Each of these once escaped as a traceback, a wrong message, or a wrong file."""
    from tests.harness.fuzz import FUZZ_DOWNGRADE, FUZZ_UPGRADE, _model_state

    ini = write_project(
        tmp_path,
        [(REV_A, None, "    pass", "    pass"), (REV_B, REV_A, FUZZ_UPGRADE, FUZZ_DOWNGRADE)],
    )
    kind, mutate, needle = FINDINGS[case]
    sd, opt = _model_state()
    base = tmp_path / "base.pth"
    torch.save({"model": stamp_state_dict(sd, REV_A), "optimizer": opt, "epoch": 3}, base)
    if kind == "ckptmigrate":  # rewritten by ckptmigrate: sizes and CRCs in local headers
        result = CliRunner().invoke(cli, ["-c", str(ini), "stamp", str(base), REV_A])
        assert result.exit_code == 0, result.stderr
    path = tmp_path / ("case.safetensors" if kind == "safetensors" else "case.pth")
    path.write_bytes(mutate(base))
    before = path.read_bytes()
    result = CliRunner().invoke(cli, ["-c", str(ini), "upgrade", str(path)], catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.stderr
    assert len([x for x in lines if x.startswith("Error:")]) == 1 and lines[-1].startswith("Error:")
    assert needle in lines[-1], lines[-1]
    assert "internal error" not in result.stderr
    assert path.read_bytes() == before


def test_damaged_and_lying_sharded_folders(tmp_path: Path) -> None:
    """1,200 seeded sharded checkpoints whose index or shards lie: each ends cleanly."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.harness.fuzz_folders", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,  # only ends a hang: every case is bounded in CPU time by the harness
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cases"] >= 1000
    kinds = report["kinds"]
    for kind, result in kinds.items():
        assert result["failure_count"] == 0, (kind, result["failures"])
    assert len(kinds) >= 14  # every way of lying was tried
    for kind in ("index: nested too deep", "index: a shard name that is no shard", "shard missing"):
        assert kinds[kind]["outcomes"] == {"refused: exit 1, one Error line": kinds[kind]["cases"]}
    hostile = kinds["shard: hostile pickle"]
    assert hostile["cases"] >= 20
    assert hostile["outcomes"] == {"refused: exit 1, one Error line": hostile["cases"]}


def test_damaged_lying_and_hostile_dcp_metadata(tmp_path: Path) -> None:
    """1,100 seeded DCP folders whose .metadata (or data file) lies: each ends cleanly."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.harness.fuzz_dcp", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,  # only ends a hang: every case is bounded in CPU time by the harness
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cases"] >= 1000
    assert not report["payload_ran"]
    kinds = report["kinds"]
    for kind, result in kinds.items():
        assert result["failure_count"] == 0, (kind, result["failures"])
    assert len(kinds) >= 18  # every way of lying was tried
    refused_always = [
        "metadata: a pickle that runs code",
        "metadata: a chunk's range lies",
        "metadata: chunks that do not tile the tensor",
        "metadata: a chunk in a file that is no data file",
        "metadata: truncated",
        "data file truncated",
    ]
    for kind in refused_always:
        assert kinds[kind]["cases"] >= 15, kind
        assert kinds[kind]["outcomes"] == {"refused: exit 1, one Error line": kinds[kind]["cases"]}
    # a flip in a chunk that is read fails its checksum; one in a chunk only carried
    # by a rename leaves that data file as it was (checked by the harness)
    assert kinds["data file flipped"]["outcomes"].get("refused: exit 1, one Error line", 0) >= 1
