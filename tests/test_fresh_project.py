"""A new project reaches a passing ``check`` by doing what the tool says.

The tests start from ``init`` and run the command each message suggests,
parsed out of the output, until ``check`` passes: no hint may lead to a
command that is then refused.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from tests.conftest import ADD_FC3, INITIAL, Run, v1_state_dict, write_revision

from ckptmigrate.cli import cli

NET = """\
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def build_wide():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
"""

_QUOTED = re.compile(r"'(ckptmigrate [^']+)'")
_AFTER_COLON = re.compile(r"(?:run|with|instead): (ckptmigrate [^;'\n]+)")


def suggested(text: str) -> list[list[str]]:
    """Every command a message suggests, as argument lists (without 'ckptmigrate')."""
    found = []
    matches = [*_QUOTED.finditer(text), *_AFTER_COLON.finditer(text)]
    for match in sorted(matches, key=lambda m: m.start()):
        command = re.sub(r"\s*\(.*$", "", match.group(1)).rstrip(" .")
        found.append(shlex.split(command)[1:])
    return found


def follow(run: Run, result: Result, fill: dict[str, str] | None = None) -> list[str]:
    """Run the first command ``result`` suggests (placeholders filled from ``fill``)."""
    commands = suggested(result.stdout + result.stderr)
    assert commands, f"no command suggested in:\n{result.stdout}{result.stderr}"
    args = [(fill or {}).get(a, a) for a in commands[0]]
    assert not {"CKPT", "REV", "..."} & set(args), f"unfilled placeholder in {args}"
    run(*args)
    return args


def until_check_passes(run: Run, fill: dict[str, str] | None = None) -> list[list[str]]:
    """``check``; while it fails, run what it suggests. Returns the commands run."""
    ran = []
    for _ in range(5):
        result = run("check", code=None)
        if result.exit_code == 0:
            return ran
        assert result.exit_code == 1, result.output
        ran.append(follow(run, result, fill))
    raise AssertionError(f"check still fails after running {ran}")


@pytest.fixture
def run_any(run: Run) -> Run:
    """``run``, also with code=None: any exit status."""

    def _run(*args: str, code: int | None = 0) -> Result:
        if code is None:
            return CliRunner().invoke(cli, list(args), catch_exceptions=False)
        return run(*args, code=code)

    return _run


@pytest.fixture
def newproj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding a model file, nothing else."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "net.py").write_text(NET)
    return tmp_path


def _set_model(project: Path, spec: str) -> None:
    ini = project / "alembic_style.ini"
    text = ini.read_text()
    assert "# model = " in text
    ini.write_text(re.sub(r"(?m)^# model = .*$", f"model = {spec}", text))


def _base_rows(project: Path) -> list[list[str]]:
    text = (project / "migrations/base_schema.txt").read_text()
    return [line.split() for line in text.splitlines() if not line.startswith("#")]


NET_BASE = [
    ["0.weight", "float32", "[8,4]", "param"],
    ["0.bias", "float32", "[8]", "param"],
    ["2.weight", "float32", "[2,8]", "param"],
    ["2.bias", "float32", "[2]", "param"],
]

# SimpleModelV1's layout: the walkthrough lineage's base.
V1_BASE = [
    ["fc1.weight", "float32", "[20,10]"],
    ["fc1.bias", "float32", "[20]"],
    ["fc2.weight", "float32", "[5,20]"],
    ["fc2.bias", "float32", "[5]"],
]


def test_init_then_plain_revision_then_check_reaches_ok(newproj: Path, run_any: Run) -> None:
    """The issue's dead end: init, revision -m initial, check; each hint must work."""
    init = run_any("init", "migrations")
    assert "model = ..." in init.stdout
    _set_model(newproj, "net:build")
    assert follow(run_any, init) == ["revision", "-m", "initial"]
    ran = until_check_passes(run_any)
    assert ran == [["schema", "--record"]]
    assert _base_rows(newproj) == NET_BASE
    assert "OK: net:build matches the schema at" in run_any("check").stdout


def test_revision_note_points_at_a_command_that_works(newproj: Path, run_any: Run) -> None:
    run_any("init", "migrations")
    _set_model(newproj, "net:build")
    result = run_any("revision", "-m", "initial")
    assert follow(run_any, result) == ["schema", "--record"]
    assert run_any("check").exit_code == 0


def test_without_a_model_the_hints_lead_through_a_checkpoint(newproj: Path, run_any: Run) -> None:
    import net

    torch.save(net.build().state_dict(), "trained.pt")  # saved before versioning: no stamp
    rev = "c0ffee000001"
    run_any("init", "migrations")
    run_any("revision", "-m", "initial", "--rev-id", rev)
    check = run_any("check", code=1)
    assert suggested(check.stderr)[0] == ["schema", "--record", "CKPT", "--from", "REV"]
    ran = until_check_passes(run_any, {"CKPT": "trained.pt", "REV": rev})
    assert ran == [["schema", "--record", "trained.pt", "--from", rev]]
    assert _base_rows(newproj) == [[*row[:3], "tensor"] for row in NET_BASE]
    assert "OK: downgrade() undoes upgrade()" in run_any("check").stdout
    current = run_any("current", "trained.pt").stdout
    assert current.startswith(rev) and "(identified by schema)" in current


def test_record_from_an_unstamped_checkpoint_says_from(newproj: Path, run_any: Run) -> None:
    import net

    torch.save(net.build().state_dict(), "trained.pt")
    rev = "c0ffee000001"
    run_any("init", "migrations")
    run_any("revision", "-m", "initial", "--rev-id", rev)
    refused = run_any("schema", "--record", "trained.pt", code=1)
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: trained.pt has no ckptmigrate stamp")
    assert suggested(line)[0] == ["schema", "--record", "trained.pt", "--from", "REV"]
    assert rev in line  # the head is named as the likely answer
    follow(run_any, refused, {"REV": rev})
    assert run_any("check").exit_code == 0


def test_autogenerate_records_the_base_then_check_passes(newproj: Path, run_any: Run) -> None:
    run_any("init", "migrations")
    _set_model(newproj, "net:build")
    result = run_any("revision", "--autogenerate", "-m", "initial")
    assert "Recorded the base schema (4 keys)" in result.stderr
    assert _base_rows(newproj) == NET_BASE
    assert "OK: net:build matches" in run_any("check").stdout
    # The model changes: check fails, and its hint writes the migration.
    _set_model_line(newproj, "net:build_wide")
    failed = run_any("check", code=1)
    cmd = suggested(failed.stderr)[0]
    assert cmd[:2] == ["revision", "--autogenerate"]
    run_any("revision", "--autogenerate", "-m", "wider head")
    assert "OK: net:build_wide matches" in run_any("check").stdout


def _set_model_line(project: Path, spec: str) -> None:
    ini = project / "alembic_style.ini"
    ini.write_text(re.sub(r"(?m)^model = .*$", f"model = {spec}", ini.read_text()))


def test_record_from_the_model_runs_the_downgrades_to_base(project: Path, run_any: Run) -> None:
    """The walkthrough's lineage: the model (SimpleModel) is at head, base is SimpleModelV1."""
    expected = _base_rows(project)
    (project / "migrations/base_schema.txt").unlink()
    result = run_any("schema", "--record")
    assert f"from the model examples.simple_model:build_model, taken to be at {ADD_FC3}" in (
        result.stderr
    )
    assert [r[:3] for r in _base_rows(project)] == [r[:3] for r in expected]
    assert run_any("check").exit_code == 0
    # The same base as recording from the old checkpoint, the walkthrough's way:
    from_model = (project / "migrations/base_schema.txt").read_text()
    torch.save(v1_state_dict(), "original.pth")
    run_any("schema", "--record", "original.pth", "--from", INITIAL)
    rows = [r[:3] for r in _base_rows(project)]
    assert rows == [line.split()[:3] for line in from_model.splitlines() if line[:1] != "#"]


def test_walkthrough_path_still_records_from_the_old_file(project: Path, run_any: Run) -> None:
    (project / "migrations/base_schema.txt").unlink()
    torch.save(v1_state_dict(), "original.pth")
    out = run_any("schema", "--record", "original.pth", "--from", INITIAL).stdout
    assert out == "Recorded the base schema (4 keys) in migrations/base_schema.txt\n"
    assert "OK: examples.simple_model:build_model matches the schema at" in run_any("check").stdout


def test_several_heads_need_from(project: Path, run_any: Run) -> None:
    (project / "migrations/base_schema.txt").unlink()
    write_revision(project / "migrations/versions", "feat0001", INITIAL)
    err = run_any("schema", "--record", code=1).stderr
    assert ADD_FC3 in err and "feat0001" in err and "several heads" in err
    assert ["schema", "--record", "--from", "REV"] in suggested(err)
    run_any("schema", "--record", "--from", ADD_FC3)
    assert [r[:3] for r in _base_rows(project)] == V1_BASE


def test_a_downgrade_that_cannot_run_symbolically_is_named(project: Path, run_any: Run) -> None:
    (project / "migrations/base_schema.txt").unlink()
    write_revision(
        project / "migrations/versions",
        "oneway01",
        ADD_FC3,
        down_body='raise NotImplementedError("this migration cannot be undone")',
    )
    before = set(project.joinpath("migrations").iterdir())
    err = run_any("schema", "--record", code=1).stderr
    line = err.strip().splitlines()[-1]
    assert line.startswith("Error: cannot derive the base schema from the model")
    assert "oneway01" in line and "cannot be undone" in line
    assert "schema --record CKPT --from REV" in line
    assert set(project.joinpath("migrations").iterdir()) == before  # nothing recorded


def test_a_model_behind_the_head_is_told_to_say_its_revision(project: Path, run_any: Run) -> None:
    """The revision was written, the class not yet changed: --from names where it is."""
    (project / "migrations/base_schema.txt").unlink()
    (project / "fresh_v1_model.py").write_text(
        "from examples.simple_model import SimpleModelV1\n\n\n"
        "def build_v1():\n    return SimpleModelV1()\n"
    )
    _set_model_line(project, "fresh_v1_model:build_v1")
    err = run_any("schema", "--record", code=1).stderr
    assert f"taken to be at {ADD_FC3}" in err and "--from REV" in err
    run_any("schema", "--record", "--from", INITIAL)
    assert [r[:3] for r in _base_rows(project)] == V1_BASE


def test_a_pinned_versioned_class_is_recorded_at_its_pin(project: Path, run_any: Run) -> None:
    (project / "migrations/base_schema.txt").unlink()
    write_revision(
        project / "migrations/versions",
        "norm0001",
        ADD_FC3,
        'op.add_module("norm", torch.nn.LayerNorm(20))',
        'op.drop_prefix("norm.")',
    )
    (project / "fresh_pinned_model.py").write_text(
        "import ckptmigrate\nfrom examples.simple_model import SimpleModel\n\n\n"
        f'@ckptmigrate.versioned("migrations", revision="{ADD_FC3}")\n'
        "class PinnedModel(SimpleModel):\n    pass\n"
    )
    _set_model_line(project, "fresh_pinned_model:PinnedModel")
    result = run_any("schema", "--record")
    assert f"at {ADD_FC3} (the revision PinnedModel is pinned to)" in result.stderr
    assert [r[:3] for r in _base_rows(project)] == V1_BASE


def test_from_model_on_an_empty_lineage_is_the_model(newproj: Path, run_any: Run) -> None:
    run_any("init", "migrations")
    _set_model(newproj, "net:build")
    run_any("schema", "--record")
    assert _base_rows(newproj) == NET_BASE


def test_a_refused_record_keeps_the_recorded_base(project: Path, run_any: Run) -> None:
    base = project / "migrations/base_schema.txt"
    before = base.read_text()
    write_revision(project / "migrations/versions", "feat0001", INITIAL)
    run_any("schema", "--record", code=1)
    assert base.read_text() == before
