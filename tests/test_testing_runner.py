"""``ckptmigrate.testing.MigrationRunner``: what the ``ckptmigrate_runner`` fixture gives a test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import ADD_FC3, INITIAL
from tests.harness.common import write_revision

from ckptmigrate.config import Config
from ckptmigrate.errors import CkptMigrateError
from ckptmigrate.testing import MigrationRunner


def test_a_synthetic_checkpoint_goes_up_and_back(project: Path) -> None:
    runner = MigrationRunner(Config(project / "alembic_style.ini"))
    old = runner.sample(INITIAL, seed=1)
    new = runner.migrate(old, INITIAL)
    assert torch.equal(new["fc3.weight"], old["fc2.weight"])
    assert torch.equal(new["fc2.weight"], torch.eye(20))
    back = runner.migrate(new, ADD_FC3, INITIAL)
    assert list(back) == list(old) and all(torch.equal(back[k], old[k]) for k in old)
    at_base = runner.migrate(new, ADD_FC3, "base")
    assert list(at_base) == list(runner.schema("base"))


def test_migrating_to_several_heads_at_once_is_refused(project: Path) -> None:
    write_revision(project / "migrations" / "versions", "cccc3333", INITIAL)
    runner = MigrationRunner(Config(project / "alembic_style.ini"))
    with pytest.raises(CkptMigrateError, match=rf"'heads' is 2 revisions \({ADD_FC3}, cccc3333\)"):
        runner.migrate(runner.sample(INITIAL), INITIAL, "heads")
