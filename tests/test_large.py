"""Checkpoints past 4 GiB: zip64 records and offsets, with sharing preserved.

Slow (it writes ~10 GB): skipped unless --runslow or CKPTMIGRATE_SLOW=1;
``benchmarks/bench_upgrade.py`` runs it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from tests.conftest import Run, write_revision

GIB = 1 << 30


@pytest.mark.slow
def test_upgrade_past_4_gib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> None:
    monkeypatch.chdir(tmp_path)
    write_revision(tmp_path / "mig/versions", "a0000001", None)
    write_revision(
        tmp_path / "mig/versions",
        "a0000002",
        "a0000001",
        'op.rename_key("small", "tiny"); op.resize("tail", (6,), init="ones")',
        'op.resize("tail", (3,)); op.rename_key("tiny", "small")',
    )
    (tmp_path / "alembic_style.ini").write_text("[ckptmigrate]\nscript_location = %(here)s/mig\n")
    n = 4 * GIB + 12345
    big = torch.empty(n, dtype=torch.uint8)  # untouched pages read as zeros and cost no memory
    big[0], big[n // 2], big[-1] = 7, 8, 9
    sd = {
        "small": torch.arange(5.0),
        "big": big,
        "view": big[n // 2 : n // 2 + 4],
        "tail": torch.ones(3),
    }
    torch.save(sd, "huge.pt")
    del big, sd
    assert Path("huge.pt").stat().st_size > 4 * GIB
    run("upgrade", "huge.pt", "--from", "a0000001", "--no-fsync")
    with zipfile.ZipFile("huge.pt") as zf:
        info = {i.filename.split("/", 1)[1]: i for i in zf.infolist()}
        assert max(i.file_size for i in info.values()) > 4 * GIB
        assert max(i.header_offset for i in info.values()) > 4 * GIB  # zip64 offsets too
    out = torch.load("huge.pt", weights_only=True, mmap=True)
    assert list(out) == ["tiny", "big", "view", "tail"]
    assert out["big"].numel() == n and out["big"][0] == 7 and out["big"][-1] == 9
    assert out["view"].untyped_storage().data_ptr() == out["big"].untyped_storage().data_ptr()
    assert out["view"].tolist() == [8, 0, 0, 0]
    assert torch.equal(out["tail"], torch.ones(6)) and torch.equal(out["tiny"], torch.arange(5.0))
    assert run("current", "huge.pt").stdout == "a0000002 (head)\n"
