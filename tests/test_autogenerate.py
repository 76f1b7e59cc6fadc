"""revision --autogenerate and check: the model is compared with the head schema."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tests.conftest import ADD_FC3, INITIAL, Run, init_with_model

MODELS = """
import torch
from torch import nn


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 20)
        self.fc2 = nn.Linear(20, 5)


VARIANT = "base"


def build():
    return VARIANTS[VARIANT]()
"""


def write_models(root: Path, variants: str, variant: str) -> None:
    """models.py with extra classes; ``build()`` returns VARIANTS[variant]()."""
    text = (
        MODELS + textwrap.dedent(variants) + f"\nVARIANTS['base'] = Base\nVARIANT = {variant!r}\n"
    )
    if "VARIANTS = " not in variants:
        text += ""
    (root / "models.py").write_text(text.replace('VARIANT = "base"\n', "VARIANTS = {}\n", 1))
    sys.modules.pop("models", None)


@pytest.fixture
def lineage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> Path:
    """A lineage started from the Base model with `revision --autogenerate`."""
    init_with_model(tmp_path, monkeypatch, run)
    write_models(tmp_path, "", "base")
    out = run("revision", "--autogenerate", "-m", "initial", "--rev-id", "a0000001")
    assert "Recorded the base schema (4 keys)" in out.stderr
    return tmp_path


def _set_model(root: Path, variants: str, variant: str) -> None:
    write_models(root, "VARIANTS = {}\n" + textwrap.dedent(variants), variant)


def _revision_text(root: Path, rev: str) -> str:
    (path,) = (root / "migrations/versions").glob(f"{rev}_*.py")
    return path.read_text()


def _base_checkpoint(path: str) -> dict[str, torch.Tensor]:
    sys.modules.pop("models", None)
    import models

    torch.manual_seed(0)
    sd = models.Base().state_dict()
    torch.save(sd, path)
    return sd


def _current_model() -> torch.nn.Module:
    sys.modules.pop("models", None)
    import models

    return models.build()


def test_no_change_writes_nothing(lineage: Path, run: Run) -> None:
    out = run("revision", "--autogenerate", "-m", "nothing").stdout
    assert "No changes detected" in out
    assert len(list((lineage / "migrations/versions").glob("*.py"))) == 1
    run("revision", "--autogenerate", "-m", "empty", "--allow-empty", "--rev-id", "a0000002")
    assert (lineage / "migrations/versions/a0000002_empty.py").exists()


def test_walkthrough_change_is_detected_and_loads_strictly(lineage: Path, run: Run) -> None:
    _set_model(
        lineage,
        """
        class V2(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(10, 20)
                self.fc2 = nn.Linear(20, 20)
                self.fc3 = nn.Linear(20, 5)
        VARIANTS['v2'] = V2
        """,
        "v2",
    )
    err = run("check", code=1)
    assert "differs from the schema" in err.stdout and "fc3.weight" in err.stdout
    assert err.stderr.startswith("Error: the model no longer matches the head schema")
    run("revision", "--autogenerate", "-m", "add fc3", "--rev-id", "a0000002")
    text = _revision_text(lineage, "a0000002")
    assert 'op.rename_prefix("fc2.", "fc3.")  # review: guessed rename' in text
    assert (
        'op.add_module("fc2", torch.nn.Linear(in_features=20, out_features=20, bias=True))' in text
    )
    assert 'op.rename_prefix("fc3.", "fc2.")' in text and 'op.drop_prefix("fc2.")' in text
    assert "import torch" in text
    run("check")
    sd = _base_checkpoint("model.pth")
    run("upgrade", "model.pth")  # identified by schema
    model = _current_model()
    loaded = torch.load("model.pth", weights_only=True)
    model.load_state_dict(loaded, strict=True)
    assert torch.equal(loaded["fc3.weight"], sd["fc2.weight"])
    run("downgrade", "model.pth", "-1")
    back = torch.load("model.pth", weights_only=True)
    assert all(torch.equal(back[k], sd[k]) for k in sd) and sorted(back) == sorted(sd)


def test_key_rename_and_whole_subtree_rename(lineage: Path, run: Run) -> None:
    _set_model(
        lineage,
        """
        class Renamed(nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = nn.Linear(10, 20)
                self.fc2 = nn.Linear(20, 5)
        VARIANTS['renamed'] = Renamed
        """,
        "renamed",
    )
    run("revision", "--autogenerate", "-m", "rename fc1", "--rev-id", "a0000002")
    text = _revision_text(lineage, "a0000002")
    assert 'op.rename_prefix("fc1.", "encoder.")  # review: guessed rename' in text
    sd = _base_checkpoint("model.pth")
    run("upgrade", "model.pth")
    loaded = torch.load("model.pth", weights_only=True)
    _current_model().load_state_dict(loaded, strict=True)
    assert torch.equal(loaded["encoder.weight"], sd["fc1.weight"])


def test_single_key_rename_is_marked(lineage: Path, run: Run) -> None:
    _set_model(
        lineage,
        """
        class Gain(Base):
            def __init__(self):
                super().__init__()
                self.gain = nn.Parameter(torch.ones(5))
        class Scale(Base):
            def __init__(self):
                super().__init__()
                self.scale = nn.Parameter(torch.ones(5))
        VARIANTS['gain'] = Gain
        VARIANTS['scale'] = Scale
        """,
        "gain",
    )
    run("revision", "--autogenerate", "-m", "add gain", "--rev-id", "a0000002")
    assert 'op.add_tensor("gain", shape=(5,), init="ones")  # review: initialisation guessed' in (
        _revision_text(lineage, "a0000002")
    )
    _set_model(lineage, "", "base")
    _set_model(
        lineage,
        """
        class Scale(Base):
            def __init__(self):
                super().__init__()
                self.gain_scale = nn.Parameter(torch.ones(5))
        VARIANTS['scale'] = Scale
        """,
        "scale",
    )
    run("revision", "--autogenerate", "-m", "rename gain", "--rev-id", "a0000003")
    text = _revision_text(lineage, "a0000003")
    assert 'op.rename_key("gain", "gain_scale")  # review: guessed rename' in text
    assert 'op.rename_key("gain_scale", "gain")' in text


def test_new_submodule_is_one_add_module(lineage: Path, run: Run) -> None:
    _set_model(
        lineage,
        """
        class WithHead(Base):
            def __init__(self):
                super().__init__()
                self.head = nn.Sequential(
                    nn.Linear(5, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 2)
                )
                self.bn = nn.BatchNorm1d(5)
        VARIANTS['head'] = WithHead
        """,
        "head",
    )
    run("revision", "--autogenerate", "-m", "add head", "--rev-id", "a0000002")
    text = _revision_text(lineage, "a0000002")
    ups = [
        line.strip() for line in text.split("def upgrade")[1].split("def downgrade")[0].splitlines()
    ]
    adds = [line for line in ups if line.startswith("op.")]
    assert len(adds) == 2  # one add_module per new submodule, nothing else
    assert adds[0].startswith(
        'op.add_module("head", torch.nn.Sequential(torch.nn.Linear(in_features=5, out_features=8, '
        "bias=True), torch.nn.ReLU(), torch.nn.LayerNorm((8,), eps=1e-05, elementwise_affine=True"
    )
    assert adds[0].endswith("torch.nn.Linear(in_features=8, out_features=2, bias=True)))")
    assert adds[1].startswith('op.add_module("bn", torch.nn.BatchNorm1d(5, eps=1e-05, momentum=0.1')
    assert adds[1].endswith("track_running_stats=True))")
    _base_checkpoint("model.pth")
    run("upgrade", "model.pth")
    loaded = torch.load("model.pth", weights_only=True)
    model = _current_model()
    model.load_state_dict(loaded, strict=True)
    # the module's own initialisation, seeded by the revision: same on every upgrade
    _base_checkpoint("again.pth")
    run("upgrade", "again.pth")
    again = torch.load("again.pth", weights_only=True)
    assert torch.equal(again["head.0.weight"], loaded["head.0.weight"])
    assert torch.equal(loaded["bn.running_var"], torch.ones(5))


def test_shape_and_dtype_changes(lineage: Path, run: Run) -> None:
    _set_model(
        lineage,
        """
        class Changed(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(10, 24)   # grows: resize
                self.fc2 = nn.Linear(24, 5, dtype=torch.float16)  # grows + half
        VARIANTS['changed'] = Changed
        """,
        "changed",
    )
    run("revision", "--autogenerate", "-m", "wider", "--rev-id", "a0000002")
    text = _revision_text(lineage, "a0000002")
    assert 'op.resize("fc1.weight", (24, 10))  # review: shape changed from [20, 10]' in text
    assert 'op.cast("fc2.weight", torch.float16)  # review: dtype changed from float32' in text
    assert 'op.resize("fc2.weight", (5, 24))' in text
    assert 'op.resize("fc1.weight", (20, 10))' in text  # the inverse
    sd = _base_checkpoint("model.pth")
    run("upgrade", "model.pth")
    loaded = torch.load("model.pth", weights_only=True)
    _current_model().load_state_dict(loaded, strict=True)
    assert torch.equal(loaded["fc1.weight"][:20], sd["fc1.weight"])
    assert torch.equal(loaded["fc1.weight"][20:], torch.zeros(4, 10))


def test_check_catches_broken_round_trip(lineage: Path, run: Run) -> None:
    run("revision", "-m", "lossy", "--rev-id", "a0000002")
    path = lineage / "migrations/versions/a0000002_lossy.py"
    path.write_text(
        path.read_text().replace(
            "def upgrade() -> None:\n    pass",
            'def upgrade() -> None:\n    op.drop_key("fc1.bias")',
        )
    )
    result = run("check", code=1)
    assert "Round trip broken in a0000002" in result.stdout
    assert "downgrade loses fc1.bias" in result.stdout
    assert "whose downgrade() does not undo upgrade(): a0000002" in result.stderr


def test_check_and_diff_on_the_walkthrough(project: Path, v1_checkpoint: Path, run: Run) -> None:
    out = run("check").stdout
    assert f"OK: examples.simple_model:build_model matches the schema at {ADD_FC3}" in out
    assert "downgrade() undoes upgrade() in all 2 revisions" in out
    table = run("diff", "model.pth").stdout.splitlines()
    assert table[0] == (
        "model.pth (4 entries) vs model (6 entries): 2 missing, 2 shape/dtype mismatch, 2 matching"
    )
    assert table[2].split() == ["missing", "fc3.weight", "-", "[5,", "20]", "float32"]
    assert table[4].split() == [
        "mismatch",
        "fc2.weight",
        "[5,",
        "20]",
        "float32",
        "[20,",
        "20]",
        "float32",
    ]
    assert "likely rename: fc2.weight -> fc3.weight (same shape and dtype)" in table[6]
    run("diff", "model.pth", "--exit-code", code=1)
    assert "matches" in run("diff", "model.pth", "--rev", INITIAL).stdout
    run("upgrade", "model.pth")
    assert "matches the model schema (6 entries)" in run("diff", "model.pth", "--exit-code").stdout
