"""Fleets: many paths, whole trees, one report (upgrade, downgrade, stamp and current).

The walkthrough project (SimpleModel, 1a0c3e5f7b2d -> 2b7f0c1d9e4a, a base
schema, so unstamped files are identified) is the lineage unless a test
writes its own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import ADD_FC3, INITIAL, Run, make_lineage, v1_state_dict
from tests.harness.common import digest, stamp_state_dict, write_shards

import ckptmigrate
from ckptmigrate.errors import CkptMigrateError
from ckptmigrate.runtime.fleet_report import FleetReport


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) and its sha256."""
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as torch and safetensors themselves read them."""
    if path.is_dir():
        index = json.loads(next(path.glob("*.index.json")).read_text())
        out: dict[str, torch.Tensor] = {}
        for shard in dict.fromkeys(index["weight_map"].values()):
            out.update(load_file(path / shard))
        return out
    if path.suffix == ".safetensors":
        return load_file(path)
    return dict(torch.load(path, weights_only=True))


def _assert_upgraded_from(path: Path, original: dict[str, torch.Tensor]) -> None:
    """The walkthrough's upgrade: fc2 became fc3, the new fc2 is the identity."""
    got = _weights(path)
    assert sorted(got) == [
        "fc1.bias",
        "fc1.weight",
        "fc2.bias",
        "fc2.weight",
        "fc3.bias",
        "fc3.weight",
    ]
    assert torch.equal(got["fc1.weight"], original["fc1.weight"])
    assert torch.equal(got["fc3.weight"], original["fc2.weight"])
    assert torch.equal(got["fc3.bias"], original["fc2.bias"])
    assert torch.equal(got["fc2.weight"], torch.eye(20))


def _stamped(revision: str, **tensors: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    return stamp_state_dict(OrderedDict(tensors), revision)  # type: ignore[no-any-return]


def _report(result: Any) -> dict[str, Any]:
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def _statuses(data: dict[str, Any]) -> dict[str, str]:
    return {row["path"]: row["status"] for row in data["checkpoints"]}


@pytest.fixture
def runs(project: Path, run: Run) -> dict[str, Any]:
    """A tree mixing formats, nesting, a checkpoint at head, a broken one and non-checkpoints."""
    root = project / "runs"
    for sub in ("exp1/sub/deep", "exp2", "exp3/sharded", "exp4", "exp5", ".cache"):
        (root / sub).mkdir(parents=True)
    originals = {name: v1_state_dict(seed) for seed, name in enumerate("abcde")}
    torch.save(originals["a"], root / "exp1/model.pth")  # no stamp: identified
    torch.save(stamp_state_dict(originals["b"], INITIAL), root / "exp1/sub/deep/epoch3.pt")
    save_file(originals["c"], str(root / "exp2/model.safetensors"))
    sd = originals["d"]
    write_shards(
        root / "exp3/sharded",
        [{k: v for k, v in sd.items() if k.startswith(p)} for p in ("fc1.", "fc2.")],
        "safetensors",
    )
    torch.save(originals["e"], root / "exp4/head.pth")
    run("upgrade", "runs/exp4/head.pth")  # already at head before the batch
    good = root / "exp4/head.pth"
    (root / "exp5/broken.pt").write_bytes(good.read_bytes()[:300])  # truncated
    (root / "exp5/notes.txt").write_text("not a checkpoint, not picked up")
    torch.save(originals["a"], root / ".cache/hidden.pt")  # hidden: not picked up
    # what a killed write leaves beside its target: hidden too, never taken for a checkpoint
    torch.save(originals["a"], root / "exp1/.model.pth.99999.x1.ckptmigrate-tmp")
    return {"root": root, "originals": originals}


# ----------------------------------------------------------------- a batch over a tree


def test_a_tree_is_upgraded_checkpoint_by_checkpoint(runs: dict[str, Any], run: Run) -> None:
    root, originals = runs["root"], runs["originals"]
    at_head = (root / "exp4/head.pth").stat()
    broken = (root / "exp5/broken.pt").read_bytes()
    hidden = digest(root / ".cache/hidden.pt")

    result = run("upgrade", "runs", "-j", "2", code=1)

    table = result.stdout.splitlines()
    assert table[0].split() == ["checkpoint", "from", "to", "steps", "bytes", "time", "status"]
    rows = {line.split()[0]: line for line in table[1:-1]}
    assert list(rows) == [
        "runs/exp1/model.pth",
        "runs/exp1/sub/deep/epoch3.pt",
        "runs/exp2/model.safetensors",
        "runs/exp3/sharded",  # one checkpoint, not two shards
        "runs/exp4/head.pth",
        "runs/exp5/broken.pt",
    ]
    for path in list(rows)[:4]:
        assert rows[path].split()[1:4] == [INITIAL, ADD_FC3, "1"]
        assert rows[path].endswith("upgraded")
    assert rows["runs/exp4/head.pth"].split()[1:4] == [ADD_FC3, ADD_FC3, "0"]
    assert rows["runs/exp4/head.pth"].endswith("already at target")
    assert "failed: runs/exp5/broken.pt" in rows["runs/exp5/broken.pt"]
    assert table[-1].startswith("6 checkpoints: 4 upgraded, 1 already at target, 1 failed")
    err = result.stderr.splitlines()
    assert err[-1] == (
        "Error: 1 of 6 checkpoints failed (runs/exp5/broken.pt); the report says why; "
        "the other checkpoints went ahead"
    )
    assert f"Running upgrade {INITIAL} -> {ADD_FC3}, add fc3" in err
    assert any(line.startswith("Failed runs/exp5/broken.pt: ") for line in err)

    _assert_upgraded_from(root / "exp1/model.pth", originals["a"])
    _assert_upgraded_from(root / "exp1/sub/deep/epoch3.pt", originals["b"])
    _assert_upgraded_from(root / "exp2/model.safetensors", originals["c"])
    _assert_upgraded_from(root / "exp3/sharded", originals["d"])
    after = (root / "exp4/head.pth").stat()
    assert (after.st_ino, after.st_mtime_ns) == (at_head.st_ino, at_head.st_mtime_ns)  # skipped
    assert (root / "exp5/broken.pt").read_bytes() == broken
    assert digest(root / ".cache/hidden.pt") == hidden

    current = _report(run("current", "runs", "--format", "json", code=1))
    assert set(_statuses(current).values()) == {"at_head", "failed"}


def test_serial_and_parallel_runs_give_identical_files_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """Also for revisions that draw from torch's global RNG, which threads share."""
    up = """
    op.rename_key("w", "renamed")
    op.add_module("extra", torch.nn.Linear(8, 8))
    op.add_tensor("noise", shape=(64,), init=_fill)
    """
    header = (
        "import time\n\n\ndef _fill(t):\n    flat = t.view(-1)\n    for i in range(flat.numel()):\n"
        "        flat[i] = torch.rand(())\n        time.sleep(0)  # let the other threads run\n\n\n"
    )
    from tests.harness.common import write_revision

    base = "w  float32  [16]  tensor\n"
    make_lineage(
        tmp_path, "migrations", base, [("r0", None, "pass", "pass")], ini="alembic_style.ini"
    )
    write_revision(tmp_path / "migrations/versions", "r1", "r0", up, header=header)
    tree = tmp_path / "serial" / "runs"
    for i in range(10):
        folder = tree / f"e{i % 3}" / f"run{i}"
        folder.mkdir(parents=True)
        sd = {"w": torch.full((16,), float(i))}
        if i % 2:
            save_file(sd, str(folder / "w.safetensors"))
        else:
            torch.save(sd, folder / "w.pt")
    shutil.copytree(tmp_path / "serial", tmp_path / "parallel")
    reports = {}
    for name, jobs in (("serial", "1"), ("parallel", "4")):
        monkeypatch.chdir(tmp_path / name)
        args = ("-c", str(tmp_path / "alembic_style.ini"), "upgrade", "runs", "-j", jobs)
        reports[name] = _report(run(*args, "--format", "json"))
    for report in reports.values():
        report.pop("seconds")
        for row in report["checkpoints"]:
            row.pop("seconds")
    assert reports["serial"] == reports["parallel"]
    assert set(_statuses(reports["serial"]).values()) == {"upgraded"}
    assert _files(tmp_path / "serial") == _files(tmp_path / "parallel")
    noise = {_weights(p)["noise"].sum().item() for p in tree.rglob("w.*")}
    assert len(noise) == 1  # the same seeded values in every file, whichever thread ran it


def test_dry_run_plans_the_whole_tree_and_writes_nothing(runs: dict[str, Any], run: Run) -> None:
    before = _files(runs["root"])
    result = run("upgrade", "runs", "--dry-run", code=1)
    assert _files(runs["root"]) == before
    plans = [line for line in result.stdout.splitlines() if line.startswith("Plan for ")]
    assert len(plans) == 4
    assert plans[0].startswith(f"Plan for runs/exp1/model.pth: {INITIAL} -> {ADD_FC3}, 1 step")
    assert "4 would upgrade, 1 already at target, 1 failed" in result.stdout.splitlines()[-1]

    data = _report(run("upgrade", "runs", "--dry-run", "--format", "json", code=1))
    assert data["dry_run"] is True
    assert _statuses(data)["runs/exp3/sharded"] == "would_upgrade"
    assert _files(runs["root"]) == before


def test_json_report_fields(runs: dict[str, Any], run: Run) -> None:
    data = _report(run("upgrade", "runs", "--format", "json", code=1))
    assert data["report_version"] == 1
    assert (data["command"], data["target"], data["heads"]) == ("upgrade", "head", [ADD_FC3])
    assert data["counts"] == {"upgraded": 4, "at_target": 1, "failed": 1}
    assert (data["failed"], data["interrupted"]) == (1, False)
    rows = {row["path"]: row for row in data["checkpoints"]}
    model = rows["runs/exp1/model.pth"]
    assert model["from"] == [INITIAL] and model["to"] == [ADD_FC3] and model["steps"] == 1
    assert model["found_by"] == "schema"  # it had no stamp
    assert rows["runs/exp1/sub/deep/epoch3.pt"]["found_by"] == "stamp"
    assert model["bytes"] == (runs["root"] / "exp1/model.pth").stat().st_size
    sharded = runs["root"] / "exp3/sharded"
    assert rows["runs/exp3/sharded"]["bytes"] == sum(p.stat().st_size for p in sharded.iterdir())
    broken = rows["runs/exp5/broken.pt"]
    assert broken["status"] == "failed" and broken["from"] is None
    assert "runs/exp5/broken.pt" in broken["error"] and broken["hint"]
    assert all(row["seconds"] >= 0 for row in data["checkpoints"])


def test_the_readme_documents_the_json_report(runs: dict[str, Any], run: Run) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- fleet-json -->", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    documented = json.loads(block)
    data = _report(run("upgrade", "runs", "--format", "json", code=1))
    assert set(documented) == set(data)
    assert set(documented["checkpoints"][0]) == set(data["checkpoints"][0])


def test_a_downgrade_of_a_tree_goes_one_step_back(runs: dict[str, Any], run: Run) -> None:
    root, originals = runs["root"], runs["originals"]
    run("upgrade", "runs", "-q", code=1)
    data = _report(run("downgrade", "runs", "-1", "--format", "json", code=1))
    assert data["counts"] == {"downgraded": 5, "failed": 1}
    for name, path in (("a", "exp1/model.pth"), ("c", "exp2/model.safetensors")):
        got = _weights(root / path)
        assert sorted(got) == sorted(originals[name])
        assert all(torch.equal(got[k], originals[name][k]) for k in got)


# ----------------------------------------------------------------- current


def _three_step_lineage(root: Path) -> None:
    steps = [
        ("r0", None, "pass", "pass"),
        ("r1", "r0", 'op.rename_key("w", "w1")', 'op.rename_key("w1", "w")'),
        ("r2", "r1", 'op.rename_key("w1", "w2")', 'op.rename_key("w2", "w1")'),
    ]
    make_lineage(root, "migrations", "w  float32  [4]  tensor\n", steps, ini="alembic_style.ini")


def test_current_over_a_tree_says_which_are_behind_and_by_how_much(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    _three_step_lineage(tmp_path)
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()
    torch.save(_stamped("r0", w=torch.ones(4)), runs / "old.pt")
    torch.save(_stamped("r1", w1=torch.ones(4)), runs / "middle.pt")
    torch.save(_stamped("r2", w2=torch.ones(4)), runs / "new.pt")
    torch.save({"w1": torch.ones(4)}, runs / "unstamped.pt")

    data = _report(run("current", "runs", "--format", "json"))
    rows = {row["path"]: row for row in data["checkpoints"]}
    assert {p: (r["to"], r["steps"], r["status"]) for p, r in rows.items()} == {
        "runs/middle.pt": (["r1"], 1, "behind"),
        "runs/new.pt": (["r2"], 0, "at_head"),
        "runs/old.pt": (["r0"], 2, "behind"),
        "runs/unstamped.pt": (["r1"], 1, "behind"),
    }
    assert rows["runs/unstamped.pt"]["found_by"] == "schema"

    text = run("current", "runs").stdout.splitlines()
    assert text[0].split() == ["checkpoint", "revision", "to", "head", "status"]
    assert text[1].split() == ["runs/middle.pt", "r1", "1", "behind"]
    assert text[2].split() == ["runs/new.pt", "r2", "(head)", "0", "at", "head"]
    assert text[4].split() == ["runs/unstamped.pt", "r1", "(schema)", "1", "behind"]
    assert text[-1].startswith("4 checkpoints: 1 at head, 3 behind (by up to 2 steps); head: r2")

    (runs / "broken.pt").write_bytes(b"PK\x03\x04 not really")
    result = run("current", "runs", code=1)
    assert "failed: runs/broken.pt" in result.stdout
    assert result.stderr.splitlines()[-1].startswith("Error: 1 of 5 checkpoints failed")


def test_current_verbose_shows_each_revision_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    _three_step_lineage(tmp_path)
    monkeypatch.chdir(tmp_path)
    Path("a").mkdir()
    torch.save(_stamped("r1", w1=torch.ones(4)), "a/x.pt")
    torch.save(_stamped("r2", w2=torch.ones(4)), "a/y.pt")
    out = run("current", "a", "-v").stdout
    assert "a/x.pt:\nRev: r1\n" in out and "a/y.pt:\nRev: r2 (head)\n" in out
    assert out.splitlines()[-1].startswith("2 checkpoints: 1 at head, 1 behind")


def test_steps_to_head_with_two_heads_count_the_branch_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    steps = [
        ("r0", None, "pass", "pass"),
        ("left1", "r0", "pass", "pass"),
        ("left2", "left1", "pass", "pass"),
        ("right1", "r0", "pass", "pass"),
    ]
    make_lineage(tmp_path, "migrations", None, steps, ini="alembic_style.ini")
    monkeypatch.chdir(tmp_path)
    Path("runs").mkdir()
    for rev in ("r0", "left1", "left2", "right1"):
        torch.save(_stamped(rev, w=torch.ones(1)), f"runs/{rev}.pt")
    data = _report(run("current", "runs", "--format", "json"))
    assert sorted(data["heads"]) == ["left2", "right1"]
    assert {r["path"]: r["steps"] for r in data["checkpoints"]} == {
        "runs/left1.pt": 1,
        "runs/left2.pt": 0,
        "runs/r0.pt": 3,  # both branches lie above it
        "runs/right1.pt": 0,  # at the head of its branch
    }


def test_current_without_a_base_schema_says_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    make_lineage(tmp_path, "migrations", None, [("r0", None, "pass", "pass")], ini="x.ini")
    monkeypatch.chdir(tmp_path)
    Path("runs").mkdir()
    torch.save({"w": torch.ones(1)}, "runs/a.pt")
    torch.save(_stamped("r0", w=torch.ones(1)), "runs/b.pt")
    data = _report(run("-c", "x.ini", "current", "runs", "--format", "json"))
    rows = {r["path"]: r for r in data["checkpoints"]}
    assert rows["runs/a.pt"]["status"] == "unknown" and rows["runs/a.pt"]["to"] is None
    assert "no base schema" in rows["runs/a.pt"]["error"]
    assert rows["runs/b.pt"]["status"] == "at_head"


# ----------------------------------------------------------------- paths and the target


@pytest.fixture
def two(project: Path) -> tuple[Path, Path]:
    torch.save(v1_state_dict(1), project / "a.pt")
    torch.save(v1_state_dict(2), project / "b.pt")
    return project / "a.pt", project / "b.pt"


def _at(path: str, run: Run) -> str:
    return run("current", path).stdout.split()[0]


def test_several_files_then_the_target(two: tuple[Path, Path], run: Run) -> None:
    result = run("upgrade", "a.pt", "b.pt")
    assert "2 checkpoints: 2 upgraded" in result.stdout
    assert _at("a.pt", run) == _at("b.pt", run) == ADD_FC3
    run("downgrade", "a.pt", "b.pt", "-1")
    assert _at("a.pt", run) == _at("b.pt", run) == INITIAL
    run("upgrade", "a.pt", "b.pt", ADD_FC3[:6])
    assert _at("a.pt", run) == _at("b.pt", run) == ADD_FC3


def test_one_file_and_a_target_is_the_command_as_before(two: tuple[Path, Path], run: Run) -> None:
    result = run("upgrade", "a.pt", "head")
    assert result.stdout == ""  # no table: one checkpoint named, as before
    assert result.stderr.splitlines()[-1] == f"Upgraded a.pt: {INITIAL} -> {ADD_FC3} (1 step)"
    assert run("current", "b.pt").stdout.startswith(INITIAL)  # untouched


def test_a_missing_path_is_a_failed_checkpoint_not_a_target(
    two: tuple[Path, Path], run: Run
) -> None:
    result = run("upgrade", "a.pt", "c.pt", code=1)
    assert "c.pt: no such file" in result.stdout
    assert _at("a.pt", run) == ADD_FC3


def test_a_path_that_is_also_a_revision_is_ambiguous(two: tuple[Path, Path], run: Run) -> None:
    Path("head").write_bytes(b"")
    err = run("upgrade", "a.pt", "head", code=2).stderr
    assert (
        "Error: 'head' is both a path and a revision: write ./head for the path, or "
        "--to head for the revision" in err
    )
    assert _at("a.pt", run) == INITIAL  # nothing ran
    run("upgrade", "a.pt", "b.pt", "--to", "head")
    assert _at("b.pt", run) == ADD_FC3


def test_target_mistakes_are_usage_errors(two: tuple[Path, Path], run: Run) -> None:
    assert "Missing argument 'TARGET'" in run("downgrade", "a.pt", "b.pt", code=2).stderr
    err = run("upgrade", "-1", "a.pt", code=2).stderr
    assert "-1 is a relative TARGET: put it after the paths" in err
    assert "No such option '--bogus'" in run("upgrade", "a.pt", "b.pt", "--bogus", code=2).stderr
    assert "Missing argument 'REVISIONS...'" in run("stamp", "a.pt", "b.pt", code=2).stderr


def test_a_target_no_checkpoint_can_reach_is_refused_once(two: tuple[Path, Path], run: Run) -> None:
    result = run("upgrade", "a.pt", "b.pt", "nosuchrev", code=1)
    assert result.stderr.splitlines() == [
        "Error: no such revision or branch 'nosuchrev'; run 'ckptmigrate history' to list revisions"
    ]


def test_stamp_many_and_skip_the_ones_already_stamped(two: tuple[Path, Path], run: Run) -> None:
    result = run("stamp", "a.pt", "b.pt", INITIAL)
    assert "2 checkpoints: 2 stamped" in result.stdout
    before = [p.stat().st_mtime_ns for p in two]
    result = run("stamp", "--to", INITIAL, "a.pt", "b.pt")
    assert "2 checkpoints: 2 already at target" in result.stdout
    assert [p.stat().st_mtime_ns for p in two] == before
    assert _at("a.pt", run) == _at("b.pt", run) == INITIAL


def test_output_with_several_checkpoints_is_refused(two: tuple[Path, Path], run: Run) -> None:
    err = run("upgrade", "a.pt", "b.pt", "-o", "out.pt", code=1).stderr
    assert "Error: -o out.pt names one output, but 2 checkpoints were found" in err
    assert not Path("out.pt").exists()


def test_json_for_one_checkpoint(two: tuple[Path, Path], run: Run) -> None:
    data = _report(run("upgrade", "a.pt", "--format", "json"))
    assert [(r["path"], r["status"]) for r in data["checkpoints"]] == [("a.pt", "upgraded")]


# ----------------------------------------------------------------- finding checkpoints


def test_pattern_and_globs_narrow_the_search(project: Path, run: Run) -> None:
    for path in ("runs/e1/last.ckpt", "runs/e1/epoch=1.ckpt", "runs/e2/last.ckpt", "runs/e2/w.pt"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(v1_state_dict(), path)

    def found(*args: str) -> list[str]:
        data = _report(run("current", *args, "--format", "json"))
        return [row["path"] for row in data["checkpoints"]]

    assert found("runs") == [
        "runs/e1/epoch=1.ckpt",
        "runs/e1/last.ckpt",
        "runs/e2/last.ckpt",
        "runs/e2/w.pt",
    ]
    assert found("runs", "--pattern", "last.ckpt") == ["runs/e1/last.ckpt", "runs/e2/last.ckpt"]
    assert found("runs", "--pattern", "e2/*") == ["runs/e2/last.ckpt", "runs/e2/w.pt"]
    assert found("runs", "--pattern", "*.pt", "--pattern", "epoch=*") == [
        "runs/e1/epoch=1.ckpt",
        "runs/e2/w.pt",
    ]
    assert found("runs/*/last.ckpt") == ["runs/e1/last.ckpt", "runs/e2/last.ckpt"]  # quoted glob
    assert found("runs/e2", "runs/e2/w.pt", "runs") == [  # each checkpoint once, in order
        "runs/e2/last.ckpt",
        "runs/e2/w.pt",
        "runs/e1/epoch=1.ckpt",
        "runs/e1/last.ckpt",
    ]


def test_a_checkpoint_reached_twice_is_done_once(project: Path, run: Run) -> None:
    Path("runs/a").mkdir(parents=True)
    torch.save(v1_state_dict(), "runs/a/w.pt")
    os.symlink("a/w.pt", "runs/link.pt")
    os.symlink("a", "runs/linked")  # a link to a folder is not searched
    data = _report(run("upgrade", "runs", "runs/a/w.pt", "--format", "json"))
    assert [(r["path"], r["status"]) for r in data["checkpoints"]] == [("runs/a/w.pt", "upgraded")]


def test_a_shard_named_stands_for_its_folder(project: Path, run: Run) -> None:
    folder = Path("big")
    folder.mkdir()
    sd = v1_state_dict()
    write_shards(folder, [{"fc1.weight": sd["fc1.weight"]}, {"fc1.bias": sd["fc1.bias"]}], "torch")
    torch.save(sd, "small.pt")
    shards = sorted(str(p) for p in folder.glob("*.bin"))
    data = _report(run("current", *shards, "small.pt", "--format", "json", code=1))
    assert [row["path"] for row in data["checkpoints"]] == ["big", "small.pt"]


def test_a_tree_without_checkpoints_says_what_was_looked_for(project: Path, run: Run) -> None:
    Path("empty/sub").mkdir(parents=True)
    Path("empty/sub/notes.txt").write_text("x")
    err = run("upgrade", "empty", code=1).stderr.splitlines()
    assert err == [err[-1]]
    assert err[-1].startswith(
        "Error: empty is a directory with no checkpoint in it; looked for files named *.bin"
    )
    assert err[-1].endswith("pass --pattern GLOB to look for others")
    torch.save(v1_state_dict(), "one.pt")
    result = run("upgrade", "empty", "one.pt")
    assert result.stderr.splitlines()[0].startswith("Note: no checkpoints in empty (looked for")


# ----------------------------------------------------------------- the Python API


def test_the_api_returns_the_report_and_prints_nothing(
    runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    report = ckptmigrate.upgrade_all(["runs"], jobs=2)
    assert isinstance(report, FleetReport)
    assert [o.status for o in report.checkpoints] == ["upgraded"] * 4 + ["at_target", "failed"]
    assert not report.ok and [o.path for o in report.failed] == ["runs/exp5/broken.pt"]
    assert capsys.readouterr() == ("", "")
    now = ckptmigrate.current_all(["runs/exp1", "runs/exp2"])
    assert [(o.path, o.to_revisions, o.steps) for o in now.checkpoints] == [
        ("runs/exp1/model.pth", (ADD_FC3,), 0),
        ("runs/exp1/sub/deep/epoch3.pt", (ADD_FC3,), 0),
        ("runs/exp2/model.safetensors", (ADD_FC3,), 0),
    ]
    back = ckptmigrate.downgrade_all(["runs/exp1"], INITIAL, pattern=["model.*"])
    assert [(o.path, o.status) for o in back.checkpoints] == [("runs/exp1/model.pth", "downgraded")]
    again = ckptmigrate.stamp_all(["runs/exp1/model.pth"], INITIAL)
    assert again.checkpoints[0].status == "at_target"
    with pytest.raises(CkptMigrateError, match="unknown option: job"):
        ckptmigrate.upgrade_all(["runs"], job=2)  # type: ignore[call-arg]
    assert os.path.exists("runs/exp1/model.pth")


def test_an_adapter_folder_in_a_tree_is_one_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """An unstamped PEFT adapter is identified as ``current ADAPTER`` does, then upgraded."""
    from tests.test_peft import (
        INITIAL as ADAPTER_INITIAL,
    )
    from tests.test_peft import (
        SPLIT,
        SPLIT_DOWN,
        SPLIT_UP,
        adapter_config,
        fused,
        save_adapter,
        trained_fused,
        two_revisions,
    )

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    two_revisions(tmp_path, fused(), SPLIT_UP, SPLIT_DOWN)
    save_adapter(trained_fused(), tmp_path / "runs/exp1/adapter", target_modules=["c_attn"])

    report = _report(run("current", "runs", "--format", "json"))
    assert [
        (row["path"], row["status"], row["to"], row["steps"], row["found_by"])
        for row in report["checkpoints"]
    ] == [("runs/exp1/adapter", "behind", [ADAPTER_INITIAL], 1, "schema")]

    report = _report(run("upgrade", "runs", "--format", "json"))
    assert _statuses(report) == {"runs/exp1/adapter": "upgraded"}
    assert adapter_config(tmp_path / "runs/exp1/adapter")["target_modules"] == ["k", "q", "v"]
    assert run("current", "runs/exp1/adapter").stdout.strip() == f"{SPLIT} (head)"
