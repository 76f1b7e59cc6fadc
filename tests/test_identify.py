"""Unstamped checkpoints are identified by their schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import Run, write_revision

BASE = """\
# ckptmigrate schema: test lineage
a.w  float32  [4,4]  param
b.w  float32  [3]    param
"""

REVISIONS = {
    # id: (down_revision, upgrade body, downgrade body)
    "r1000001": (None, 'op.rename_key("a.w", "x.w")', 'op.rename_key("x.w", "a.w")'),
    "r2000002": ("r1000001", 'op.add_tensor("c", (2,))', 'op.drop_key("c")'),
    "r3000003": ("r1000001", 'op.resize("b.w", (5,))', 'op.resize("b.w", (3,))'),
    "r4000004": (("r2000002", "r3000003"), "pass", "pass"),
    "r5000005": ("r4000004", 'op.cast("c", torch.float16)', 'op.cast("c", torch.float32)'),
}


@pytest.fixture
def branching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    versions = tmp_path / "migrations/versions"
    versions.mkdir(parents=True)
    (tmp_path / "migrations/base_schema.txt").write_text(BASE)
    (tmp_path / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\n"
    )
    for rev, (down, up, down_body) in REVISIONS.items():
        write_revision(versions, rev, down, up, down_body)
    return tmp_path


SCHEMAS = {
    "r1000001": {"x.w": ((4, 4), torch.float32), "b.w": ((3,), torch.float32)},
    "r2000002": {
        "x.w": ((4, 4), torch.float32),
        "b.w": ((3,), torch.float32),
        "c": ((2,), torch.float32),
    },
    "r3000003": {"x.w": ((4, 4), torch.float32), "b.w": ((5,), torch.float32)},
    "r5000005": {
        "x.w": ((4, 4), torch.float32),
        "b.w": ((5,), torch.float32),
        "c": ((2,), torch.float16),
    },
}


def save(
    path: str, schema: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, torch.Tensor]:
    sd = {k: torch.randn(shape).to(dtype) for k, (shape, dtype) in schema.items()}
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize("rev", ["r1000001", "r2000002", "r3000003", "r5000005"])
def test_every_revision_is_identified(branching: Path, run: Run, rev: str) -> None:
    sd = save("x.pth", SCHEMAS[rev])
    result = run("current", "x.pth")
    assert result.stdout.split("\n")[0].startswith(rev)
    assert result.stdout.rstrip().endswith("(identified by schema)")
    up = run("upgrade", "x.pth", "heads")
    assert f"identified by schema as {rev}" in up.stderr
    out = torch.load("x.pth", weights_only=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in out.items()} == SCHEMAS["r5000005"]
    assert torch.equal(out["x.w"], sd["x.w"])
    if rev == "r5000005":  # nothing to do: the file is left as it was
        assert "Nothing to upgrade" in up.stderr
    else:
        assert run("current", "x.pth").stdout == "r5000005 (head)\n"


def test_merge_with_no_ops_is_ambiguous_with_its_parents(branching: Path, run: Run) -> None:
    # r4 (a merge that changes nothing) has the same schema as r2+r3 applied, so a
    # checkpoint with that schema matches r4 only: r2 and r3 alone lack each other's change.
    save(
        "m.pth",
        {"x.w": ((4, 4), torch.float32), "b.w": ((5,), torch.float32), "c": ((2,), torch.float32)},
    )
    assert run("current", "m.pth").stdout == "r4000004 (mergepoint) (identified by schema)\n"


def test_base_matches_only_when_no_revision_does(branching: Path, run: Run) -> None:
    save("b.pth", {"a.w": ((4, 4), torch.float32), "b.w": ((3,), torch.float32)})
    assert run("current", "b.pth").stdout == "base (identified by schema)\n"
    up = run("upgrade", "b.pth", "r1000001")
    assert "Running upgrade  -> r1000001" in up.stderr


def test_value_only_revisions_are_ambiguous(branching: Path, run: Run) -> None:
    write_revision(
        branching / "migrations/versions",
        "r6000006",
        "r5000005",
        'op.map_tensor("x.w", lambda t: t * 2)',
        'op.map_tensor("x.w", lambda t: t / 2)',
    )
    save("v.pth", SCHEMAS["r5000005"])
    err = run("upgrade", "v.pth", code=1).stderr
    assert "match several revisions (r5000005, r6000006)" in err
    assert "differ only in tensor values" in err and "--from" in err


def test_no_match_shows_closest(branching: Path, run: Run) -> None:
    sd = {"x.w": ((4, 4), torch.float32), "b.w": ((3,), torch.float32), "zz": ((1,), torch.float32)}
    save("n.pth", sd)
    before = Path("n.pth").read_bytes()
    err = run("upgrade", "n.pth", code=1).stderr
    lines = err.strip().splitlines()
    assert lines[0] == "Closest revisions to n.pth:"
    assert lines[1].startswith("  r1000001: 1 difference(s): has extra zz")
    assert lines[-1].startswith("Error: n.pth has no stamp and matches no revision's schema")
    assert "--from" in lines[-1]
    assert Path("n.pth").read_bytes() == before


def test_schema_command_prints_and_records(branching: Path, run: Run) -> None:
    out = run("schema", "r3000003").stdout.splitlines()
    assert out[0] == "# ckptmigrate schema: the state dict at r3000003"
    assert [line.split()[:3] for line in out[2:]] == [
        ["x.w", "float32", "[4,4]"],
        ["b.w", "float32", "[5]"],
    ]
    # Record the base from a checkpoint at r5: downgrades run symbolically back to base.
    (branching / "migrations/base_schema.txt").unlink()
    save("h.pth", SCHEMAS["r5000005"])
    err = run("schema", "--record", "h.pth", code=1).stderr
    assert "no ckptmigrate stamp" in err
    run("schema", "--record", "h.pth", "--from", "r5000005")
    rows = [
        line.split()[:3]
        for line in (branching / "migrations/base_schema.txt").read_text().splitlines()
        if not line.startswith("#")
    ]
    assert rows == [["a.w", "float32", "[4,4]"], ["b.w", "float32", "[3]"]]
