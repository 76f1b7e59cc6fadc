"""The command line's manners: options where users type them, help that explains.

Global options also work after the command (``upgrade CKPT -q``) without
breaking Alembic's ``downgrade CKPT -1``; every option has help text; the
command list shows each command's whole summary; ``upgrade --help`` spells
out the target grammar; and no message suggests ``--traceback`` to someone
who already passed it.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from tests.conftest import ADD_FC3, INITIAL, Run, assert_same_tensors, tensors, write_revision

from ckptmigrate import command
from ckptmigrate.cli import cli

# ----------------------------------------------------------------- global options


@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_quiet_after_the_command(v1_checkpoint: Path, run: Run, flag: str) -> None:
    before = run(flag, "upgrade", "model.pth", "--from", INITIAL, "-o", "a.pth")
    after = run("upgrade", "model.pth", "--from", INITIAL, "-o", "b.pth", flag)
    assert after.stderr == before.stderr == ""  # no notes, no step log
    assert_same_tensors(tensors(Path("a.pth")), tensors(Path("b.pth")))
    assert run("current", "b.pth").stdout == f"{ADD_FC3} (head)\n"


def test_quiet_after_the_command_keeps_relative_targets(v1_checkpoint: Path, run: Run) -> None:
    run("upgrade", "model.pth", "--from", INITIAL)
    result = run("downgrade", "model.pth", "-1", "-q")
    assert result.stderr == ""
    assert run("current", "model.pth").stdout == f"{INITIAL}\n"
    loud = run("upgrade", "model.pth", "+1")
    assert f"Running upgrade {INITIAL} -> {ADD_FC3}" in loud.stderr


def test_quiet_after_a_graph_command(project: Path, run: Run) -> None:
    assert run("history", "-q").stdout == run("-q", "history").stdout != ""


@pytest.mark.parametrize("flag", ["-c", "--config", "-n", "--name"])
def test_config_and_name_after_the_command_are_explained(
    v1_checkpoint: Path, run: Run, flag: str
) -> None:
    for args in (["upgrade", "model.pth", flag, "x"], ["heads", flag, "x"]):
        result = run(*args, code=2)
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"Error: {flag} is a global option: put it before the command")
        assert f"ckptmigrate {flag} x {args[0]} ..." in line


def test_an_unknown_option_is_not_taken_for_a_revision(v1_checkpoint: Path, run: Run) -> None:
    err = run("upgrade", "model.pth", "-x", code=2).stderr
    assert "No such option '-x'" in err and "revision" not in err


# ----------------------------------------------------------------- --traceback


@pytest.fixture
def broken_step(v1_checkpoint: Path) -> Path:
    write_revision(
        v1_checkpoint.parent / "migrations/versions",
        "boom0001",
        ADD_FC3,
        up='raise ValueError("no way")',
    )
    return v1_checkpoint


def _error_line(stderr: str) -> str:
    (line,) = [x for x in stderr.splitlines() if x.startswith("Error:")]
    return line


def test_traceback_hint_only_without_traceback(broken_step: Path, run: Run) -> None:
    plain = run("upgrade", "model.pth", "--from", INITIAL, code=1).stderr
    assert "Traceback (most recent call last)" not in plain
    assert "upgrade() raised ValueError: no way" in plain
    assert _error_line(plain).endswith("(--traceback shows the full trace)")
    for args in (
        ["--traceback", "upgrade", "model.pth", "--from", INITIAL],
        ["upgrade", "model.pth", "--from", INITIAL, "--traceback"],
    ):
        traced = run(*args, code=1).stderr
        assert "Traceback (most recent call last)" in traced and 'ValueError("no way")' in traced
        line = _error_line(traced)
        assert "upgrade() raised ValueError: no way" in line and "--traceback" not in line


def test_traceback_hint_for_a_revision_file_that_fails_to_import(
    v1_checkpoint: Path, run: Run
) -> None:
    # A header that is not made of literals makes the file be imported to read it.
    (v1_checkpoint.parent / "migrations/versions/imp00001.py").write_text(
        "import no_such_module_anywhere\n\n"
        f'revision = "imp" + "00001"\ndown_revision = "{ADD_FC3}"\n'
    )
    plain = _error_line(run("history", code=1).stderr)
    assert "no_such_module_anywhere" in plain and "--traceback" in plain
    traced = run("--traceback", "history", code=1).stderr
    assert "Traceback (most recent call last)" in traced
    assert "--traceback" not in _error_line(traced)


def test_internal_error_hint_only_without_traceback(
    project: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kw: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(command, "heads", broken)
    plain = _error_line(run("heads", code=1).stderr)
    assert plain == "Error: internal error: KeyError: 'a bug' (run with --traceback and report it)"
    traced = run("heads", "--traceback", code=1).stderr
    assert "Traceback (most recent call last)" in traced
    assert _error_line(traced) == "Error: internal error: KeyError: 'a bug' (please report it)"


# ----------------------------------------------------------------- help


def _commands() -> dict[str, click.Command]:
    assert isinstance(cli, click.Group)
    return dict(cli.commands)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_has_help_text(name: str) -> None:
    cmd = _commands()[name]
    ctx = click.Context(cmd, info_name=name)
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{name} {'/'.join(param.opts)} has no help text"


def test_verbose_explains_itself(project: Path, run: Run) -> None:
    for name in ("heads", "branches", "history", "current"):
        out = run(name, "--help").stdout
        (line,) = [x for x in out.splitlines() if "-v, --verbose" in x]
        assert len(line.split("--verbose", 1)[1].strip()) > 10, out


@pytest.mark.parametrize("width", [80, 100])
def test_command_list_shows_whole_summaries(width: int) -> None:
    out = CliRunner().invoke(cli, ["--help"], terminal_width=width).stdout
    listed = out.split("Commands:\n", 1)[1].splitlines()
    rows = dict(line.strip().split(None, 1) for line in listed if line.strip())
    assert set(rows) == set(_commands())
    for name, text in rows.items():
        assert not text.endswith("..."), f"{name}: {text}"
        assert text.endswith("."), f"{name}: {text}"
        assert text == _commands()[name].short_help
    assert rows["downgrade"].startswith("Downgrade CHECKPOINT to TARGET (e.g. -1")


@pytest.mark.parametrize("name", ["upgrade", "downgrade"])
def test_migration_help_shows_the_target_grammar(name: str) -> None:
    out = " ".join(CliRunner().invoke(cli, [name, "--help"]).stdout.split())
    for form in ("head", "heads", "base", "+N", "-N", "REV+N", "REV-N", "LABEL@head"):
        assert re.search(rf"(?<![\w@+-]){re.escape(form)}(?![\w@])", out), (form, out)
    assert "unique prefix" in out
