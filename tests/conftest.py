"""Shared fixtures and helpers: the walkthrough project, an in-process CLI, lineages."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from tests.harness.common import write_revision

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


def init_with_model(root: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> None:
    """`ckptmigrate init migrations` in ``root`` (made current), with `model = models:build`."""
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    run("init", "migrations")
    ini = root / "alembic_style.ini"
    ini.write_text(
        ini.read_text().replace("# model = mypackage.models:build_model", "model = models:build")
    )


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


def make_lineage(
    root: Path,
    name: str,
    base: str | None,
    revisions: Sequence[tuple[str, object, str, str]],
    *,
    ini: str | None = None,
    model: str | None = None,
) -> str:
    """A migrations folder ``root/name``: its base schema text (unless None) and
    (rev, down, upgrade, downgrade) files; with ``ini``, an ini file of that name
    in ``root`` pointing at it (and at ``model``, importable from ``root``)."""
    folder = root / name
    (folder / "versions").mkdir(parents=True, exist_ok=True)
    if base is not None:
        (folder / "base_schema.txt").write_text(base)
    for rev, down, up, down_body in revisions:
        write_revision(folder / "versions", rev, down, up, down_body)
    if ini is not None:
        text = f"[ckptmigrate]\nscript_location = %(here)s/{name}\n"
        if model is not None:
            text += f"prepend_sys_path = .\nmodel = {model}\n"
        (root / ini).write_text(text)
    return str(folder)


def two_step_lineage(
    root: Path,
    revs: tuple[str, str],
    up: str,
    down: str = "pass",
    *,
    name: str = "migrations",
    model: str | None = None,
) -> Path:
    """``alembic_style.ini`` and the folder ``name`` with two revisions: the first
    (the layout as saved, nothing to do), the second (``up``/``down``)."""
    first, second = revs
    steps = [(first, None, "pass", "pass"), (second, first, up, down)]
    return Path(make_lineage(root, name, None, steps, ini="alembic_style.ini", model=model))


def invoke(*args: str) -> tuple[int, str]:
    """Run the CLI in-process without asserting: (exit code, stderr)."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stderr


def load_dict(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as the dict it holds (weights only)."""
    obj = torch.load(path, weights_only=True)
    assert isinstance(obj, dict)
    return obj


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
