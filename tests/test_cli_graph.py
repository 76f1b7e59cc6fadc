"""Graph commands through the CLI: init, revision, merge, heads, branches, history, show."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import Run


@pytest.fixture
def empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> Path:
    monkeypatch.chdir(tmp_path)
    run("init", "migrations")
    return tmp_path


@pytest.fixture
def branched(empty: Path, run: Run) -> Path:
    """a -> b -> {c, d (label 'exp')} ; c, d merged by m."""
    run("revision", "-m", "first", "--rev-id", "aaaa1111")
    run("revision", "-m", "second", "--rev-id", "bbbb2222")
    run("revision", "-m", "main line", "--rev-id", "cccc3333")
    run(
        "revision",
        "-m",
        "experiment",
        "--rev-id",
        "dddd4444",
        "--head",
        "bbbb2222",
        "--splice",
        "--branch-label",
        "exp",
    )
    return empty


def test_init_refuses_non_empty_directory(empty: Path, run: Run) -> None:
    result = run("init", "migrations", code=1)
    assert result.stderr.startswith("Error: directory migrations already exists and is not empty")
    assert len(result.stderr.strip().splitlines()) == 1


def test_revision_on_multiple_heads_is_an_error(branched: Path, run: Run) -> None:
    result = run("revision", "-m", "x", code=1)
    err = result.stderr
    assert "multiple heads" in err and "cccc3333" in err and "dddd4444" in err
    assert "--head" in err and "merge" in err
    assert len(err.strip().splitlines()) == 1


def test_revision_without_splice_on_non_head(branched: Path, run: Run) -> None:
    result = run("revision", "-m", "x", "--head", "aaaa1111", code=1)
    assert "aaaa1111 is not a head revision" in result.stderr and "--splice" in result.stderr


def test_heads_and_branches(branched: Path, run: Run) -> None:
    assert run("heads").stdout.splitlines() == ["cccc3333 (head)", "dddd4444 (exp) (head)"]
    out = run("branches").stdout.splitlines()
    assert out[0] == "bbbb2222 (branchpoint)"
    assert out[1] == "         -> cccc3333 (head)"
    assert out[2] == "         -> dddd4444 (exp) (head)"


def test_history_alembic_format(branched: Path, run: Run) -> None:
    lines = run("history").stdout.splitlines()
    assert lines == [
        "bbbb2222 -> cccc3333 (head), main line",
        "bbbb2222 -> dddd4444 (exp) (head), experiment",
        "aaaa1111 -> bbbb2222 (branchpoint), second",
        "<base> -> aaaa1111, first",
    ]
    assert run("history", "-r", "bbbb2222:cccc3333").stdout.splitlines() == [
        "bbbb2222 -> cccc3333 (head), main line",
        "aaaa1111 -> bbbb2222 (branchpoint), second",
    ]
    err = run("history", "-r", "bbbb2222", code=1).stderr
    assert "needs a colon" in err


def test_history_verbose_and_show(branched: Path, run: Run) -> None:
    out = run("history", "-v", "-r", "aaaa:aaaa").stdout
    assert "Rev: aaaa1111\nParent: <base>\nPath: migrations/versions/aaaa1111_first.py" in out
    shown = run("show", "bbbb").stdout
    assert "Rev: bbbb2222 (branchpoint)" in shown
    assert "Branches into: cccc3333, dddd4444" in shown


def test_merge_and_graph(branched: Path, run: Run) -> None:
    run("merge", "heads", "-m", "join", "--rev-id", "eeee5555")
    assert run("heads").stdout == "eeee5555 (exp) (head)\n"
    text = (branched / "migrations/versions/eeee5555_join.py").read_text()
    assert 'down_revision = ("cccc3333", "dddd4444")' in text
    graph = run("history", "--graph").stdout.splitlines()
    assert graph == [
        "* eeee5555 (exp) (head) (mergepoint), join",
        "|\\",
        "* | cccc3333, main line",
        "| * dddd4444 (exp), experiment",
        "|/",
        "* bbbb2222 (branchpoint), second",
        "* aaaa1111, first",
    ]


def test_merge_needs_two_revisions(branched: Path, run: Run) -> None:
    err = run("merge", "cccc3333", "-m", "x", code=1).stderr
    assert "at least two" in err


def test_depends_on_and_independent_base(empty: Path, run: Run) -> None:
    run("revision", "-m", "model", "--rev-id", "aaaa1111")
    run(
        "revision",
        "-m",
        "tokenizer",
        "--rev-id",
        "ffff0000",
        "--head",
        "base",
        "--branch-label",
        "tok",
    )
    run(
        "revision",
        "-m",
        "model uses tok",
        "--rev-id",
        "aaaa2222",
        "--head",
        "aaaa1111",
        "--depends-on",
        "ffff",
    )
    text = (empty / "migrations/versions/aaaa2222_model_uses_tok.py").read_text()
    assert 'depends_on = "ffff0000"' in text
    lines = run("history").stdout.splitlines()
    assert "aaaa1111 (ffff0000) -> aaaa2222 (head), model uses tok" in lines
    assert run("heads", "--resolve-dependencies").stdout == "aaaa2222 (head)\n"


def test_unknown_and_ambiguous_revisions(branched: Path, run: Run) -> None:
    err = run("show", "zzzz9999", code=1).stderr
    assert err.startswith("Error: no such revision or branch 'zzzz9999'")
    run("revision", "-m", "x", "--rev-id", "cccc3334", "--head", "cccc3333")
    err = run("show", "cccc", code=1).stderr
    assert "multiple revisions start with 'cccc'" in err and "cccc3333" in err


def test_no_configuration_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    err = run("heads", code=1).stderr
    assert err.startswith("Error: no configuration found")
    assert "ckptmigrate init" in err


def test_pyproject_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mig/versions").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.ckptmigrate]\nscript_location = "%(here)s/mig"\n\n'
        '[tool.ckptmigrate.encoder]\nscript_location = "%(here)s/enc"\n'
    )
    run("revision", "-m", "one", "--rev-id", "abcd0001")
    assert (tmp_path / "mig/versions/abcd0001_one.py").exists()
    err = run("-n", "encoder", "heads", code=1).stderr
    assert "not a migrations folder" in err


def test_named_sections_and_config_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a/versions").mkdir(parents=True)
    (tmp_path / "b/versions").mkdir(parents=True)
    (tmp_path / "multi.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/a\n[decoder]\nscript_location = %(here)s/b\n"
    )
    run("-c", "multi.ini", "-n", "decoder", "revision", "-m", "d", "--rev-id", "dddd0001")
    assert (tmp_path / "b/versions/dddd0001_d.py").exists()
    err = run("-c", "multi.ini", "-n", "nope", "heads", code=1).stderr
    assert "no [nope] section" in err
    monkeypatch.setenv("CKPTMIGRATE_CONFIG", str(tmp_path / "multi.ini"))
    assert run("-n", "decoder", "heads").stdout == "dddd0001 (head)\n"


def test_broken_revision_files_are_named(empty: Path, run: Run) -> None:
    versions = empty / "migrations/versions"
    run("revision", "-m", "one", "--rev-id", "aaaa1111")
    bad = versions / "bbbb_bad.py"
    bad.write_text('revision = "bbbb2222"\ndown_revision = "aaaa1111"\ndef upgrade(:\n')
    err = run("heads", code=1).stderr
    assert "bbbb_bad.py, line 3: syntax error" in err
    bad.write_text('down_revision = "aaaa1111"\n')
    assert "does not define 'revision'" in run("heads", code=1).stderr
    bad.write_text('revision = "bbbb2222"\ndown_revision = "zzzz9999"\n')
    err = run("heads", code=1).stderr
    assert "zzzz9999 referenced from bbbb2222 is not present" in err
    bad.write_text('revision = "aaaa1111"\ndown_revision = None\n')
    err = run("heads", code=1).stderr
    assert "aaaa1111 is used by two files" in err and "bbbb_bad.py" in err
    bad.write_text('revision = "bbbb2222"\ndown_revision = "cccc3333"\n')
    (versions / "cccc_loop.py").write_text('revision = "cccc3333"\ndown_revision = "bbbb2222"\n')
    err = run("heads", code=1).stderr
    assert "cycle detected" in err and "bbbb2222" in err and "cccc3333" in err


def test_traceback_flag_shows_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("--traceback", "heads", code=1)
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: no configuration found")


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_graph_commands_do_not_import_torch(branched: Path) -> None:
    code = (
        "import sys\n"
        "from ckptmigrate.cli import main\n"
        "for args in (['heads'], ['history', '-v'], ['branches'], ['show', 'bbbb'],"
        " ['revision', '-m', 'x', '--head', 'cccc3333']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (args, e.code)\n"
        "print('torch' in sys.modules)\n"
    )
    result = _python(code, branched)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_python_dash_m_and_exit_codes(branched: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "heads"], cwd=branched, capture_output=True, text=True
    )
    assert ok.returncode == 0 and "cccc3333 (head)" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "show", "nope9999"],
        cwd=branched,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith(
        "Error: "
    )
    usage = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "upgrade"],
        cwd=branched,
        capture_output=True,
        text=True,
    )
    assert usage.returncode == 2
