"""The README's story, end to end, through the public command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from examples.simple_model import SimpleModel, SimpleModelV1
from tests.conftest import ADD_FC3, INITIAL, REPO, Run, assert_same_tensors, tensors


def test_old_checkpoint_does_not_load_without_migration(v1_checkpoint: Path) -> None:
    with pytest.raises(RuntimeError, match=r"fc3\.weight"):
        SimpleModel().load_state_dict(torch.load(v1_checkpoint, weights_only=True))


def test_walkthrough(v1_checkpoint: Path, run: Run) -> None:
    original = tensors(v1_checkpoint)
    old = SimpleModelV1()
    old.load_state_dict(original)

    # An unstamped legacy file, and no base schema to identify it by:
    # tell the user how to record its revision.
    base_schema = v1_checkpoint.parent / "migrations/base_schema.txt"
    base_schema.unlink()
    result = run("upgrade", str(v1_checkpoint), code=1)
    assert "no ckptmigrate stamp" in result.stderr
    assert "ckptmigrate stamp" in result.stderr and "--from" in result.stderr

    run("stamp", "model.pth", INITIAL)
    assert run("current", "model.pth").stdout == f"{INITIAL}\n"

    dry = run("upgrade", "model.pth", "--dry-run")
    assert f"upgrade {INITIAL} -> {ADD_FC3}, add fc3" in dry.stdout
    assert "fc2.weight: [20, 20] float32" in dry.stdout
    assert "fc3.weight: [5, 20] float32" in dry.stdout
    assert_same_tensors(tensors(v1_checkpoint), original)  # nothing written

    up = run("upgrade", "model.pth")
    assert f"Running upgrade {INITIAL} -> {ADD_FC3}, add fc3" in up.stderr
    assert run("current", "model.pth").stdout == f"{ADD_FC3} (head)\n"

    new = SimpleModel()
    new.load_state_dict(torch.load(v1_checkpoint, weights_only=True), strict=True)
    x = torch.randn(64, 10)
    assert torch.equal(new(x), old(x))

    down = run("downgrade", "model.pth", INITIAL)
    assert f"Running downgrade {ADD_FC3} -> {INITIAL}, add fc3" in down.stderr
    assert run("current", "model.pth").stdout == f"{INITIAL}\n"
    assert_same_tensors(tensors(v1_checkpoint), original)


def test_upgrade_from_option_and_output_leave_input_untouched(
    v1_checkpoint: Path, run: Run
) -> None:
    before = v1_checkpoint.read_bytes()
    run("upgrade", "model.pth", "--from", INITIAL, "-o", "new.pth")
    assert v1_checkpoint.read_bytes() == before
    SimpleModel().load_state_dict(torch.load("new.pth", weights_only=True), strict=True)
    assert run("current", "new.pth").stdout == f"{ADD_FC3} (head)\n"


def test_repeated_upgrades_are_bit_identical(v1_checkpoint: Path, run: Run) -> None:
    run("upgrade", "model.pth", "--from", INITIAL, "-o", "a.pth")
    run("upgrade", "model.pth", "--from", INITIAL, "-o", "b.pth")
    assert_same_tensors(tensors(Path("a.pth")), tensors(Path("b.pth")))


def test_downgrade_minus_one_like_alembic(v1_checkpoint: Path, run: Run) -> None:
    run("upgrade", "model.pth", "--from", INITIAL)
    result = run("downgrade", "model.pth", "-1")
    assert f"Running downgrade {ADD_FC3} -> {INITIAL}" in result.stderr
    result = run("downgrade", "model.pth", "-1")
    assert f"Running downgrade {INITIAL} -> , initial" in result.stderr
    assert run("current", "model.pth").stdout == ""


def test_init_and_revision_write_the_walkthrough_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    run("init", "migrations")
    assert (tmp_path / "alembic_style.ini").exists()
    assert (tmp_path / "migrations" / "versions").is_dir()
    assert (tmp_path / "migrations" / "script.py.tmpl").exists()
    run("revision", "-m", "initial", "--rev-id", INITIAL)
    out = run("revision", "-m", "add fc3", "--rev-id", ADD_FC3).stdout
    written = tmp_path / "migrations" / "versions" / f"{ADD_FC3}_add_fc3.py"
    assert str(written.relative_to(tmp_path)) in out
    text = written.read_text()
    assert f'revision = "{ADD_FC3}"' in text
    assert f'down_revision = "{INITIAL}"' in text
    assert "Revises: " + INITIAL in text
    assert "from ckptmigrate import op" in text
    assert "def upgrade() -> None:" in text and "def downgrade() -> None:" in text
    # The repository's own migrations are exactly these files, filled in.
    shipped = REPO / "migrations" / "versions" / f"{ADD_FC3}_add_fc3.py"
    shutil.copy(shipped, written)
    assert run("heads").stdout == f"{ADD_FC3} (head)\n"


def test_output_keys_follow_the_configured_models_order(v1_checkpoint: Path, run: Run) -> None:
    run("upgrade", "model.pth", "--from", INITIAL)
    assert list(tensors(v1_checkpoint)) == list(SimpleModel().state_dict())
    # without `model =` the migration's own order is kept (added keys last)
    ini = v1_checkpoint.parent / "alembic_style.ini"
    ini.write_text(ini.read_text().replace("model = examples", "# model = examples"))
    run("downgrade", "model.pth", INITIAL)
    run("upgrade", "model.pth")
    assert list(tensors(v1_checkpoint))[-2:] == ["fc2.weight", "fc2.bias"]
