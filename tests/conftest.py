"""Shared fixtures: a copy of the walkthrough project and an in-process CLI."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from ckptmigrate.cli import cli

REPO = Path(__file__).resolve().parent.parent
INITIAL = "1a0c3e5f7b2d"
ADD_FC3 = "2b7f0c1d9e4a"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("CKPTMIGRATE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or CKPTMIGRATE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTMIGRATE_CONFIG", raising=False)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The repository's walkthrough project (ini, migrations, examples) in a temp dir."""
    shutil.copy(REPO / "alembic_style.ini", tmp_path / "alembic_style.ini")
    shutil.copytree(REPO / "migrations", tmp_path / "migrations", ignore=_pycache)
    shutil.copytree(REPO / "examples", tmp_path / "examples", ignore=_pycache)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _pycache(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]


Run = Callable[..., Result]


@pytest.fixture
def run() -> Run:
    """Invoke the CLI in-process; asserts the exit code (default 0)."""

    def _run(*args: str, code: int = 0) -> Result:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == code, (
            f"exit {result.exit_code} != {code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        return result

    return _run


def v1_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from examples.simple_model import SimpleModelV1

    torch.manual_seed(seed)
    return SimpleModelV1().state_dict()


@pytest.fixture
def v1_checkpoint(project: Path) -> Path:
    """model.pth as the user saved it before the class changed (no stamp)."""
    path = project / "model.pth"
    torch.save(v1_state_dict(), path)
    return path


def tensors(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True)
    sd = obj[key] if key else obj
    return {k: v for k, v in sd.items()}


def assert_same_tensors(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, ordered: bool = True
) -> None:
    assert (list(a) if ordered else sorted(a)) == (list(b) if ordered else sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def write_revision(
    versions: Path, rev: str, down: object, up: str = "pass", down_body: str = "pass"
) -> Path:
    """A revision file with one-line upgrade()/downgrade() bodies (use ';' for more)."""
    versions.mkdir(parents=True, exist_ok=True)
    path = versions / f"{rev}.py"
    path.write_text(
        f'"""{rev}"""\nimport torch\nfrom ckptmigrate import op\n\n'
        f"revision = {rev!r}\ndown_revision = {down!r}\nbranch_labels = None\n"
        "depends_on = None\n\n"
        f"def upgrade():\n    {up}\n\ndef downgrade():\n    {down_body}\n"
    )
    return path


def make_lineage(
    root: Path, name: str, base: str, revisions: list[tuple[str, object, str, str]]
) -> str:
    """A migrations folder: its base schema text and (rev, down, upgrade, downgrade) files."""
    folder = root / name
    (folder / "versions").mkdir(parents=True)
    (folder / "base_schema.txt").write_text(base)
    for rev, down, up, down_body in revisions:
        write_revision(folder / "versions", rev, down, up, down_body)
    return str(folder)


# A revision file with one upgrade() body, for tests that run a single step.
REVISION_TEMPLATE = '''"""test revision

Revision ID: {rev}
Revises:
Create Date: 2026-01-01 00:00:00
"""
import torch

from ckptmigrate import op

revision = "{rev}"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
{body}


def downgrade() -> None:
    pass
'''
