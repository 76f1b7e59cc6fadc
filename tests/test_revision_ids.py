"""New revision ids, branch labels and file names stay inside ``versions/``.

A revision id and the message's slug become part of a file name; a branch
label becomes target syntax (``label@head``). Whatever the user types, the
new file lands directly in ``versions/`` (where ``history`` reads it) or the
command refuses and writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.conftest import Run


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> Path:
    """A new project two levels below tmp_path, so '../..' still lands inside tmp_path."""
    root = tmp_path / "work" / "proj"
    root.mkdir(parents=True)
    monkeypatch.chdir(root)
    run("init", "migrations")
    return root


def _files(top: Path) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob("*")}


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "rev_id",
    ["../../evil", "a/b", "a\\b", "..", "a.b", "a-b", "a+b", "a@b", "a:b", "a b", "ab\n", "head"],
)
def test_revision_id_outside_letters_digits_underscore_is_refused(
    fresh: Path, tmp_path: Path, run: Run, rev_id: str
) -> None:
    before = _files(tmp_path)
    line = _one_error(run("revision", "-m", "x", "--rev-id", rev_id, code=1).stderr)
    assert repr(rev_id) in line or f"'{rev_id}'" in line
    assert "letters, digits and underscores" in line
    assert _files(tmp_path) == before
    assert run("history").stdout == ""


@pytest.mark.parametrize("rev_id", ["../../evil", "a/b"])
def test_merge_checks_its_revision_id_too(
    fresh: Path, tmp_path: Path, run: Run, rev_id: str
) -> None:
    run("revision", "-m", "a", "--rev-id", "aaaa")
    run("revision", "-m", "b", "--rev-id", "bbbb", "--head", "base")
    before = _files(tmp_path)
    line = _one_error(run("merge", "heads", "-m", "m", "--rev-id", rev_id, code=1).stderr)
    assert "letters, digits and underscores" in line
    assert _files(tmp_path) == before


@pytest.mark.parametrize("label", ["a/b", "x@y", "a-b", "a:b", "head", "base", "heads", ""])
def test_branch_label_must_be_a_plain_name(
    fresh: Path, tmp_path: Path, run: Run, label: str
) -> None:
    before = _files(tmp_path)
    line = _one_error(run("revision", "-m", "x", "--branch-label", label, code=1).stderr)
    assert f"branch label {label!r}" in line
    assert "letters, digits and underscores" in line
    assert _files(tmp_path) == before


def test_good_ids_and_labels_land_in_versions_and_in_history(fresh: Path, run: Run) -> None:
    run("revision", "-m", "first", "--rev-id", "Init_01")
    run("revision", "-m", "second", "--rev-id", "2", "--branch-label", "main_line")
    assert sorted(p.name for p in (fresh / "migrations/versions").iterdir()) == [
        "2_second.py",
        "Init_01_first.py",
    ]
    out = run("history").stdout
    assert "Init_01 -> 2 (main_line) (head), second" in out
    assert "main_line@head" not in run("heads").stdout  # a label, shown next to its head
    run("show", "main_line@head")


@pytest.mark.parametrize("message", ["../../x", "a/b/../c", "/etc/passwd", "..\\..\\y"])
def test_a_message_cannot_steer_the_file_name(
    fresh: Path, tmp_path: Path, run: Run, message: str
) -> None:
    before = _files(tmp_path)
    run("revision", "-m", message, "--rev-id", "abc1")
    new = _files(tmp_path) - before
    assert len(new) == 1
    (name,) = new
    path = tmp_path / name
    assert path.parent == fresh / "migrations/versions"
    assert path.name.startswith("abc1_") and "/" not in path.name[5:]
    assert "abc1" in run("history").stdout


@pytest.mark.parametrize(
    "template",
    ["../%(rev)s", "sub/%(rev)s", "%(slug)s/../../%(rev)s", "{tmp}/abs/%(rev)s", "./../%(rev)s"],
)
def test_file_template_cannot_leave_versions(
    fresh: Path, tmp_path: Path, run: Run, template: str
) -> None:
    template = template.replace("{tmp}", str(tmp_path))  # an absolute path
    ini = fresh / "alembic_style.ini"
    ini.write_text(
        ini.read_text().replace(
            "file_template = %%(rev)s_%%(slug)s", "file_template = " + template.replace("%", "%%")
        )
    )
    before = _files(tmp_path)
    line = _one_error(run("revision", "-m", "x", "--rev-id", "abc1", code=1).stderr)
    assert "file_template" in line and "versions" in line
    assert _files(tmp_path) == before


def test_a_symlink_in_versions_is_not_followed(fresh: Path, tmp_path: Path, run: Run) -> None:
    outside = tmp_path / "outside.py"
    link = fresh / "migrations/versions/abc1_x.py"
    os.symlink(outside, link)  # dangling: writing through it would create outside.py
    line = _one_error(run("revision", "-m", "x", "--rev-id", "abc1", code=1).stderr)
    assert "abc1_x.py" in line
    assert not outside.exists() and link.is_symlink()


def test_a_symlinked_versions_folder_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """Sharing a versions folder through a symlink is a layout choice, not an escape."""
    monkeypatch.chdir(tmp_path)
    run("init", "migrations")
    shared = tmp_path / "shared_versions"
    (tmp_path / "migrations/versions").rename(shared)
    os.symlink(shared, tmp_path / "migrations/versions")
    run("revision", "-m", "x", "--rev-id", "abc1")
    assert (shared / "abc1_x.py").is_file()
    assert "abc1" in run("history").stdout
