"""What the checkpoint commands tell a user: wrong-way targets, where a file stands in diff,
and pickles whose classes live in the project."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from examples.simple_model import SimpleModel
from tests.conftest import ADD_FC3, INITIAL, Run, v1_state_dict


@pytest.fixture
def head_file(project: Path, run: Run) -> Path:
    torch.save(SimpleModel().state_dict(), "head.pth")
    run("stamp", "head.pth", ADD_FC3)
    return project / "head.pth"


# ----------------------------------------------------------------------------- wrong-way targets


@pytest.mark.parametrize("target", [INITIAL, "base", "-1"])
def test_upgrade_to_an_older_revision_is_refused(head_file: Path, run: Run, target: str) -> None:
    before = head_file.read_bytes()
    err = run("upgrade", "head.pth", target, code=1).stderr
    line = err.strip().splitlines()[-1]
    assert line.startswith("Error: "), err
    assert "ckptmigrate downgrade head.pth" in line
    assert head_file.read_bytes() == before


def test_upgrade_to_an_older_revision_names_both(head_file: Path, run: Run) -> None:
    err = run("upgrade", "head.pth", INITIAL, code=1).stderr
    assert err == (
        f"Error: head.pth is at {ADD_FC3}, which is past {INITIAL}; upgrade only goes forward; "
        f"to go back, run 'ckptmigrate downgrade head.pth {INITIAL}'\n"
    )


def test_upgrade_to_where_it_is_is_still_nothing_to_do(head_file: Path, run: Run) -> None:
    for target in ("head", "heads", ADD_FC3):
        assert "Nothing to upgrade" in run("upgrade", "head.pth", target).stderr


@pytest.mark.parametrize("target", [ADD_FC3, "head"])
def test_downgrade_to_a_newer_revision_points_to_upgrade(
    project: Path, v1_checkpoint: Path, run: Run, target: str
) -> None:
    run("stamp", "model.pth", INITIAL)
    err = run("downgrade", "model.pth", target, code=1).stderr
    assert f"{target} is not a valid downgrade target from {INITIAL}" in err
    assert f"to go forward, run 'ckptmigrate upgrade model.pth {target}'" in err


# ----------------------------------------------------------------------------- diff


def test_diff_says_where_the_file_is_and_what_fixes_it(
    project: Path, v1_checkpoint: Path, run: Run
) -> None:
    out = run("diff", "model.pth").stdout
    assert out.rstrip().splitlines()[-1] == (
        f"model.pth is at {INITIAL} (identified by schema); 'ckptmigrate upgrade model.pth' "
        f"brings it to head ({ADD_FC3}), which matches the model"
    )
    run("stamp", "model.pth", INITIAL)
    assert f"model.pth is at {INITIAL} (stamped)" in run("diff", "model.pth").stdout
    run("upgrade", "model.pth")
    same = run("diff", "model.pth").stdout
    assert same == (
        "model.pth matches the model schema (6 entries)\n"
        f"model.pth is at {ADD_FC3} (stamped), the head\n"
    )


def test_diff_against_a_revision(project: Path, v1_checkpoint: Path, run: Run) -> None:
    out = run("diff", "model.pth", "--rev", INITIAL).stdout
    assert out.startswith(f"model.pth matches the schema at {INITIAL} (4 entries)\n")
    run("upgrade", "model.pth")
    back = run("diff", "model.pth", "--rev", INITIAL).stdout
    assert (
        f"model.pth is at {ADD_FC3} (stamped); 'ckptmigrate downgrade model.pth {INITIAL}' "
        f"brings it to {INITIAL}"
    ) in back


def test_diff_when_the_model_is_ahead_of_the_head(
    project: Path, v1_checkpoint: Path, run: Run
) -> None:
    ini = project / "alembic_style.ini"
    ini.write_text(ini.read_text().replace(":build_model\n", ":build_model_v3\n"))
    out = run("diff", "model.pth").stdout
    assert f"brings it to head ({ADD_FC3}); the model differs from the schema at head" in out
    assert "ckptmigrate revision --autogenerate" in out


def test_diff_of_a_file_no_revision_describes(project: Path, run: Run) -> None:
    sd = v1_state_dict()
    sd["extra"] = torch.ones(1)
    torch.save(sd, "odd.pth")
    out = run("diff", "odd.pth").stdout
    assert "odd.pth is at no known revision: it has no stamp and its schema matches none" in out


# ----------------------------------------------------------------------------- --trust-pickle


CONFIG_CLASS = """
class TrainConfig:
    def __init__(self, lr):
        self.lr = lr
"""


def test_trust_pickle_imports_the_projects_classes_through_prepend_sys_path(
    project: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "lab").mkdir()
    (project / "lab/train_config.py").write_text(CONFIG_CLASS)
    spec = importlib.util.spec_from_file_location("train_config", project / "lab/train_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_config", module)
    spec.loader.exec_module(module)
    torch.save({"model": v1_state_dict(), "config": module.TrainConfig(0.1)}, "train.pt")
    monkeypatch.delitem(sys.modules, "train_config")
    monkeypatch.setattr(sys, "path", list(sys.path))  # whatever the command adds is undone
    err = run("current", "train.pt", "--trust-pickle", code=1).stderr
    assert "its pickle needs the module 'train_config', which cannot be imported" in err
    assert "prepend_sys_path" in err  # the hint the next step follows
    ini = project / "alembic_style.ini"
    ini.write_text(ini.read_text().replace("prepend_sys_path = .", "prepend_sys_path = . lab"))
    result = run("current", "train.pt", "--trust-pickle")
    assert result.stdout == f"{INITIAL} (identified by schema)\n"
