"""The Python API offers every option the command line has, through one options object."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import click
import pytest
import torch
from tests.conftest import ADD_FC3, INITIAL, tensors, v1_state_dict

import ckptmigrate
from ckptmigrate.cli import cli
from ckptmigrate.errors import CkptMigrateError
from ckptmigrate.runtime.options import (
    CheckpointKwargs,
    CheckpointOptions,
    MigrationKwargs,
    MigrationOptions,
)

#: CLI flags whose option has another name in Python (flag -> option field).
RENAMED = {"no_verify": "verify", "fsync": "durable"}
#: CLI flags that are not checkpoint options (commands' own arguments, global options).
NOT_OPTIONS = {"checkpoint", "target", "revisions", "purge", "verbose", "help"}
#: What a fleet command takes besides: more PATHs, --pattern (an argument of the
#: *_all functions) and --format (how the report is printed; the API returns it).
FLEET = {"more", "pattern", "report_format"}


def _cli_options(name: str) -> set[str]:
    command = cli.commands[name]
    assert isinstance(command, click.Command)
    names = {p.name for p in command.params if p.expose_value and p.name}
    return {RENAMED.get(n, n) for n in names} - NOT_OPTIONS - FLEET


@pytest.mark.parametrize("name", ["upgrade", "downgrade", "stamp", "current"])
def test_fleet_flags_reach_the_api(name: str) -> None:
    command = cli.commands[name]
    names = {p.name for p in command.params}
    assert names >= FLEET
    assert "pattern" in inspect.signature(getattr(ckptmigrate, f"{name}_all")).parameters


def _fields(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


def test_keyword_types_list_exactly_the_option_fields() -> None:
    assert set(typing.get_type_hints(CheckpointKwargs)) == _fields(CheckpointOptions)
    assert set(typing.get_type_hints(MigrationKwargs)) == _fields(MigrationOptions)


@pytest.mark.parametrize("name", ["upgrade", "downgrade"])
def test_every_migration_flag_is_an_option(name: str) -> None:
    assert _cli_options(name) <= _fields(MigrationOptions)
    assert _fields(MigrationOptions) - _cli_options(name) == set()


def test_every_stamp_and_current_flag_is_an_option() -> None:
    assert _cli_options("stamp") <= _fields(MigrationOptions)
    assert _cli_options("current") == _fields(CheckpointOptions)
    assert _cli_options("diff") - {"revision", "exit_code"} == _fields(CheckpointOptions)


def test_api_stamp_takes_the_cli_options(project: Path) -> None:
    torch.save({"model": v1_state_dict(), "epoch": 1}, "train.pt")
    stamped = ckptmigrate.stamp(
        "train.pt", INITIAL, state_dict_key="model", output="stamped.pt", purge=True
    )
    assert stamped == (INITIAL,)
    assert ckptmigrate.current("stamped.pt", state_dict_key="model") == (INITIAL,)
    untouched = torch.load("train.pt", weights_only=True)["model"]._metadata[""]
    assert "ckptmigrate.revision" not in untouched


def test_api_current_returns_without_printing(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(v1_state_dict(), "model.pth")
    ckptmigrate.upgrade("model.pth", from_revision=INITIAL, target=ADD_FC3)
    assert ckptmigrate.current("model.pth") == (ADD_FC3,)
    out = capsys.readouterr()
    assert out.out == ""
    assert "fc3.weight" in tensors(Path("model.pth"))


def test_a_misspelt_option_is_named(project: Path) -> None:
    torch.save(v1_state_dict(), "model.pth")
    with pytest.raises(CkptMigrateError, match="unknown option: form_revision") as info:
        ckptmigrate.upgrade("model.pth", form_revision=INITIAL)  # type: ignore[call-arg]
    assert "from_revision" in str(info.value)


def test_stamp_refuses_options_it_cannot_honour(project: Path) -> None:
    torch.save(v1_state_dict(), "model.pth")
    with pytest.raises(CkptMigrateError, match="stamp takes no from_revision"):
        ckptmigrate.stamp("model.pth", INITIAL, from_revision=INITIAL)
