"""Versioned model classes: automatic upgrade on load, stamps, nested lineages."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from examples.simple_model import SimpleModel, SimpleModelV1
from tests.conftest import ADD_FC3, INITIAL, REPO, Run, make_lineage, v1_state_dict
from torch import nn

import ckptmigrate
from ckptmigrate.errors import LoadError

MIGRATIONS = str(REPO / "migrations")


@ckptmigrate.versioned(MIGRATIONS)
class Model(SimpleModel):
    pass


@ckptmigrate.versioned(MIGRATIONS, revision=INITIAL)
class OldModel(SimpleModelV1):
    """The class pinned to the first revision (its own, older layout)."""


def test_schema_revision_attribute() -> None:
    assert Model.__schema_revision__ == ADD_FC3
    assert OldModel.__schema_revision__ == INITIAL
    assert Model().__schema_revision__ == ADD_FC3


def test_old_checkpoint_loads_with_plain_load_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = SimpleModelV1()
    torch.save(old.state_dict(), tmp_path / "old.pth")  # unstamped, identified by schema
    model = Model()
    model.load_state_dict(torch.load(tmp_path / "old.pth", weights_only=True))
    x = torch.randn(32, 10)
    assert torch.equal(model(x), old(x))


def test_state_dict_is_stamped_and_plain_pytorch_still_loads_it(tmp_path: Path) -> None:
    model = Model()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    assert sd._metadata[""]["ckptmigrate.revision"] == ADD_FC3
    plain = SimpleModel()  # no ckptmigrate involved
    plain.load_state_dict(sd)
    assert torch.equal(plain.fc3.weight, model.fc3.weight)


def test_stamped_old_checkpoint_upgrades_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = OldModel()
    torch.save(old.state_dict(), tmp_path / "old.pth")
    assert (
        torch.load(tmp_path / "old.pth", weights_only=True)._metadata[""]["ckptmigrate.revision"]
        == INITIAL
    )
    model = Model()
    with caplog.at_level(logging.INFO, logger="ckptmigrate"):
        model.load_state_dict(torch.load(tmp_path / "old.pth", weights_only=True))
    assert f"Running upgrade {INITIAL} -> {ADD_FC3}, add fc3" in caplog.text
    assert torch.equal(model.fc3.weight, old.fc2.weight)
    assert torch.equal(model.fc2.weight, torch.eye(20))


def test_pinned_older_class_downgrades_newer_checkpoint() -> None:
    new = Model()
    sd = new.state_dict()
    old = OldModel()
    old.load_state_dict(sd)
    assert torch.equal(old.fc2.weight, new.fc3.weight)
    assert old.fc2.weight.shape == (5, 20)


def test_unknown_newer_revision_is_refused() -> None:
    sd = Model().state_dict()
    sd._metadata[""]["ckptmigrate.revision"] = "9f9f9f9f9f9f"
    with pytest.raises(LoadError) as info:
        Model().load_state_dict(sd)
    message = str(info.value)
    assert "9f9f9f9f9f9f" in message and ADD_FC3 in message and "newer code" in message
    assert isinstance(info.value, RuntimeError)


def test_load_error_lists_what_is_wrong_and_how_to_fix_it() -> None:
    sd = Model().state_dict()
    sd._metadata[""]["ckptmigrate.revision"] = ADD_FC3  # a lie: the layout below is different
    sd["fc3_new.weight"] = sd.pop("fc3.weight")
    sd["fc2.bias"] = torch.zeros(7)
    with pytest.raises(LoadError) as info:
        Model().load_state_dict(sd)
    message = str(info.value)
    assert "missing fc3.weight" in message
    assert "unexpected fc3_new.weight" in message
    assert "fc2.bias is [7] float32 in the checkpoint but [20] float32 in the model" in message
    assert "likely renames: fc3_new.weight -> fc3.weight" in message
    assert "ckptmigrate revision --autogenerate" in message


def test_unversioned_load_error_suggests_versioning(tmp_path: Path) -> None:
    torch.save(v1_state_dict(), tmp_path / "old.pth")
    with pytest.raises(LoadError, match=r"@ckptmigrate\.versioned"):
        ckptmigrate.load(SimpleModel(), tmp_path / "old.pth")


def test_load_and_save_round_trip_with_container_and_prefix(tmp_path: Path) -> None:
    torch.manual_seed(1)
    old = SimpleModelV1()
    wrapped = OrderedDict(("module." + k, v) for k, v in old.state_dict().items())
    torch.save({"model": wrapped, "epoch": 4, "optimizer": {"state": {}}}, tmp_path / "ddp.pt")
    model = Model()
    report = ckptmigrate.load(model, tmp_path / "ddp.pt")
    assert report.wrapper_prefix == "module."
    assert report.state_dict_key == "model"
    assert report.from_revision == INITIAL and report.to_revision == ADD_FC3
    assert report.steps == [f"upgrade {INITIAL} -> {ADD_FC3}, add fc3"]
    assert report.lineages[0].identified
    assert torch.equal(model.fc3.bias, old.fc2.bias)

    ckptmigrate.save(model, tmp_path / "ckpt.pt", epoch=5)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["epoch"] == 5
    assert saved["state_dict"]._metadata[""]["ckptmigrate.revision"] == ADD_FC3
    again = Model()
    report = ckptmigrate.load(again, tmp_path / "ckpt.pt")
    assert not report.migrated
    assert all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values())
    )


def test_save_safetensors_is_stamped(tmp_path: Path) -> None:
    model = Model()
    ckptmigrate.save(model, tmp_path / "m.safetensors")
    fresh = Model()
    report = ckptmigrate.load(fresh, tmp_path / "m.safetensors")
    assert not report.migrated
    assert torch.equal(fresh.fc2.weight, model.fc2.weight)
    assert ckptmigrate.current(tmp_path / "m.safetensors", location=MIGRATIONS) == (ADD_FC3,)


def test_load_with_location_for_an_unversioned_model(tmp_path: Path) -> None:
    torch.save(v1_state_dict(), tmp_path / "old.pth")
    model = SimpleModel()
    report = ckptmigrate.load(model, tmp_path / "old.pth", location=MIGRATIONS)
    assert report.to_revision == ADD_FC3


def test_upgrade_state_dict_leaves_input_alone() -> None:
    sd = v1_state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    out = ckptmigrate.upgrade_state_dict(sd, MIGRATIONS)
    assert out["fc3.weight"] is sd["fc2.weight"]  # moved, not copied
    assert out._metadata[""]["ckptmigrate.revision"] == ADD_FC3
    assert all(torch.equal(sd[k], before[k]) for k in sd) and list(sd) == list(before)
    back = ckptmigrate.upgrade_state_dict(out, MIGRATIONS, INITIAL)
    assert all(torch.equal(back[k], before[k]) for k in before)


def test_caller_rng_untouched_by_load_time_migration() -> None:
    old_sd = OldModel().state_dict()
    model = Model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.load_state_dict(old_sd)  # runs the "add fc3" upgrade
    assert torch.equal(torch.rand(3), expected)


def test_checkpoint_on_another_branch_is_refused(tmp_path: Path) -> None:
    folder = make_lineage(
        tmp_path,
        "br",
        "w float32 [2]\n",
        [
            ("x1000001", None, "pass", "pass"),
            ("x2a00002", "x1000001", 'op.add_tensor("a", (1,))', 'op.drop_key("a")'),
            ("x2b00003", "x1000001", 'op.add_tensor("b", (1,))', 'op.drop_key("b")'),
        ],
    )

    @ckptmigrate.versioned(folder, revision="x2a00002")
    class A(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))
            self.a = nn.Parameter(torch.zeros(1))

    sd = OrderedDict(w=torch.ones(2), b=torch.ones(1))
    sd._metadata = {"": {"ckptmigrate.revision": "x2b00003"}}  # type: ignore[attr-defined]
    with pytest.raises(LoadError, match="on another branch"):
        A().load_state_dict(sd)


# ----------------------------------------------------------------------------- nested lineages


@pytest.fixture
def nested(tmp_path: Path) -> dict[str, type[nn.Module]]:
    """Encoder (own lineage: proj -> linear), Seq2Seq (own lineage: enc. -> encoder.)."""
    enc = make_lineage(
        tmp_path,
        "enc",
        "proj.weight float32 [8,4]\nproj.bias float32 [8]\n",
        [
            ("e1000001", None, "pass", "pass"),
            (
                "e2000002",
                "e1000001",
                'op.rename_prefix("proj.", "linear.")',
                'op.rename_prefix("linear.", "proj.")',
            ),
        ],
    )
    s2s = make_lineage(
        tmp_path,
        "s2s",
        "enc.proj.weight float32 [8,4]\nenc.proj.bias float32 [8]\nhead.weight float32 [2,8]\n",
        [
            ("s1000001", None, "pass", "pass"),
            (
                "s2000002",
                "s1000001",
                'op.rename_prefix("enc.", "encoder.")',
                'op.rename_prefix("encoder.", "enc.")',
            ),
        ],
    )

    @ckptmigrate.versioned(enc, revision="e1000001")
    class OldEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 8)

    @ckptmigrate.versioned(enc)
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 8)

    @ckptmigrate.versioned(s2s, revision="s1000001")
    class OldSeq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = OldEncoder()
            self.head = nn.Linear(8, 2, bias=False)

    @ckptmigrate.versioned(s2s)
    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Encoder()
            self.head = nn.Linear(8, 2, bias=False)

    return {
        "OldEncoder": OldEncoder,
        "Encoder": Encoder,
        "OldSeq2Seq": OldSeq2Seq,
        "Seq2Seq": Seq2Seq,
    }


def test_nested_lineages_each_upgrade_at_their_prefix(nested: dict[str, type[nn.Module]]) -> None:
    old = nested["OldSeq2Seq"]()
    sd = old.state_dict()
    assert sd._metadata[""]["ckptmigrate.revision"] == "s1000001"
    assert sd._metadata["enc"]["ckptmigrate.revision"] == "e1000001"
    new = nested["Seq2Seq"]()
    new.load_state_dict(sd)
    assert torch.equal(new.encoder.linear.weight, old.enc.proj.weight)
    stamped = new.state_dict()._metadata
    assert stamped[""]["ckptmigrate.revision"] == "s2000002"
    assert stamped["encoder"]["ckptmigrate.revision"] == "e2000002"
    # and back down, through both lineages
    again = nested["OldSeq2Seq"]()
    again.load_state_dict(new.state_dict())
    assert torch.equal(again.enc.proj.bias, old.enc.proj.bias)


def test_versioned_modules_inside_plain_containers(nested: dict[str, type[nn.Module]]) -> None:
    OldEncoder, Encoder = nested["OldEncoder"], nested["Encoder"]
    old = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([OldEncoder(), OldEncoder()]))
    sd = old.state_dict()
    assert sd._metadata["1.0"]["ckptmigrate.revision"] == "e1000001"
    new = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([Encoder(), Encoder()]))
    new.load_state_dict(sd)  # plain root: each encoder migrates in its load pre-hook
    assert torch.equal(new[1][1].linear.weight, old[1][1].proj.weight)
    assert torch.equal(new[1][0].linear.bias, old[1][0].proj.bias)


def test_batchnorm_version_upgrade_still_runs(tmp_path: Path) -> None:
    folder = make_lineage(
        tmp_path,
        "bn",
        "bn.weight float32 [3]\nbn.bias float32 [3]\n"
        "bn.running_mean float32 [3]\nbn.running_var float32 [3]\n",
        [
            ("b1000001", None, "pass", "pass"),
            (
                "b2000002",
                "b1000001",
                'op.rename_prefix("bn.", "norm.")',
                'op.rename_prefix("norm.", "bn.")',
            ),
        ],
    )

    @ckptmigrate.versioned(folder)
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(3)

    old = nn.Module()
    old.bn = nn.BatchNorm1d(3)
    sd = old.state_dict()
    del sd["bn.num_batches_tracked"]  # as saved by PyTorch before BatchNorm's version 2
    sd._metadata["bn"]["version"] = 1
    sd._metadata[""]["ckptmigrate.revision"] = "b1000001"
    net = Net()
    net.load_state_dict(sd)  # strict: PyTorch's own upgrade adds num_batches_tracked
    assert net.norm.num_batches_tracked.item() == 0
    assert torch.equal(net.norm.running_var, old.bn.running_var)


def test_check_flags_pinned_classes(project: Path, run: Run) -> None:
    (project / "pinned_model.py").write_text(
        "import ckptmigrate\nfrom examples.simple_model import SimpleModelV1\n\n"
        f"@ckptmigrate.versioned('migrations', revision='{INITIAL}')\n"
        "class Pinned(SimpleModelV1):\n    pass\n\n"
        "def build():\n    return Pinned()\n"
    )
    ini = project / "alembic_style.ini"
    ini.write_text(
        ini.read_text().replace("examples.simple_model:build_model", "pinned_model:build")
    )
    result = run("check", code=1)
    assert f"Pinned is pinned to revision {INITIAL}, but its lineage's head is {ADD_FC3}" in (
        result.stderr
    )


def test_check_flags_unknown_pinned_revision(project: Path, run: Run) -> None:
    (project / "ghost_model.py").write_text(
        "import ckptmigrate\nfrom examples.simple_model import SimpleModel\n\n"
        "@ckptmigrate.versioned('migrations', revision='deadbeef0000')\n"
        "class Ghost(SimpleModel):\n    pass\n\n"
        "def build():\n    return Ghost()\n"
    )
    ini = project / "alembic_style.ini"
    ini.write_text(
        ini.read_text().replace("examples.simple_model:build_model", "ghost_model:build")
    )
    err = run("check", code=1).stderr
    assert "Ghost: cannot resolve its schema revision 'deadbeef0000'" in err
    assert err.strip().splitlines()[-1].startswith("Error: ")
