"""What upgrade and downgrade write: wrapper prefixes kept on request, -o always honoured,
and outputs that cannot be written refused before any migration work."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from examples.simple_model import SimpleModel, SimpleModelV1
from tests.conftest import ADD_FC3, INITIAL, Run, assert_same_tensors, tensors, v1_state_dict

import ckptmigrate


def _wrap(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    if kind == "module.":
        return torch.nn.DataParallel(model)  # DDP's layout: the same "module." keys
    return torch.compile(model)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- wrapper prefix


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_keep_wrapper_prefix_writes_keys_the_wrapped_model_loads(
    project: Path, run: Run, prefix: str
) -> None:
    torch.manual_seed(0)
    old = SimpleModelV1()
    torch.save(_wrap(prefix, old).state_dict(), "dp_v1.pth")
    result = run("upgrade", "dp_v1.pth", "--from", INITIAL, "--keep-wrapper-prefix")
    assert f"stripped wrapper prefix {prefix!r}" in result.stderr
    assert "written back with it" in result.stderr
    sd = torch.load("dp_v1.pth", weights_only=True)
    assert list(sd) == [prefix + k for k in SimpleModel().state_dict()]
    model = SimpleModel()
    _wrap(prefix, model).load_state_dict(sd, strict=True)  # the training code's wrapped model
    x = torch.randn(4, 10)
    assert torch.equal(model(x), old(x))
    assert run("current", "dp_v1.pth").stdout == f"{ADD_FC3} (head)\n"
    # and back down, still wrapped
    run("downgrade", "dp_v1.pth", INITIAL, "--keep-wrapper-prefix")
    back = torch.load("dp_v1.pth", weights_only=True)
    assert list(back) == [prefix + k for k in old.state_dict()]
    assert all(torch.equal(back[prefix + k], v) for k, v in old.state_dict().items())


def test_without_the_option_keys_are_written_plain(project: Path, run: Run) -> None:
    torch.save(torch.nn.DataParallel(SimpleModelV1()).state_dict(), "dp_v1.pth")
    read_only = run("current", "dp_v1.pth").stderr  # writes nothing: no word about output keys
    assert "stripped wrapper prefix 'module.'" in read_only and "output" not in read_only
    result = run("upgrade", "dp_v1.pth", "--from", INITIAL)
    assert "output keys are written without it (--keep-wrapper-prefix keeps it)" in result.stderr
    sd = torch.load("dp_v1.pth", weights_only=True)
    assert list(sd) == list(SimpleModel().state_dict())
    SimpleModel().load_state_dict(sd, strict=True)


def test_keep_wrapper_prefix_in_a_training_container_and_the_api(project: Path) -> None:
    sd = OrderedDict(("module." + k, v) for k, v in v1_state_dict().items())
    torch.save({"model": sd, "epoch": 3}, "train.pt")
    ckptmigrate.upgrade("train.pt", from_revision=INITIAL, keep_wrapper_prefix=True)
    obj = torch.load("train.pt", weights_only=True)
    assert obj["epoch"] == 3
    assert sorted(obj["model"]) == sorted("module." + k for k in SimpleModel().state_dict())
    assert torch.equal(obj["model"]["module.fc3.weight"], sd["module.fc2.weight"])
    assert ckptmigrate.current("train.pt") == (ADD_FC3,)


def test_keep_wrapper_prefix_without_a_wrapper_changes_nothing(
    project: Path, v1_checkpoint: Path, run: Run
) -> None:
    result = run("upgrade", "model.pth", "--from", INITIAL, "--keep-wrapper-prefix")
    assert "has no wrapper prefix" in result.stderr
    SimpleModel().load_state_dict(torch.load("model.pth", weights_only=True), strict=True)


def test_keep_wrapper_prefix_is_refused_for_safetensors_before_any_work(
    project: Path, run: Run
) -> None:
    torch.save(torch.nn.DataParallel(SimpleModelV1()).state_dict(), "dp_v1.pth")
    args = ("upgrade", "dp_v1.pth", "--from", INITIAL, "-o", "x.safetensors")
    result = run(*args, "--keep-wrapper-prefix", code=1)
    assert "Running upgrade" not in result.stderr
    assert "--keep-wrapper-prefix" in result.stderr and "safetensors" in result.stderr
    assert not Path("x.safetensors").exists()


# ----------------------------------------------------------------------------- -o at the target


def test_upgrade_at_the_target_still_writes_the_output(project: Path, run: Run) -> None:
    torch.save(SimpleModel().state_dict(), "head.pth")
    run("stamp", "head.pth", ADD_FC3)
    before = Path("head.pth").read_bytes()
    result = run("upgrade", "head.pth", "-o", "out.pth")
    assert "Nothing to upgrade" in result.stderr and "written to out.pth" in result.stderr
    assert_same_tensors(tensors(Path("out.pth")), tensors(Path("head.pth")))
    assert run("current", "out.pth").stdout == f"{ADD_FC3} (head)\n"
    assert Path("head.pth").read_bytes() == before
    # an unstamped file identified at the target: the copy carries the stamp
    torch.save(v1_state_dict(), "v1.pth")
    run("downgrade", "v1.pth", INITIAL, "-o", "v1_copy.pth")
    assert run("current", "v1_copy.pth").stdout == f"{INITIAL}\n"
    assert_same_tensors(tensors(Path("v1_copy.pth")), v1_state_dict())
    # a training container too, everything carried
    torch.save({"model": v1_state_dict(), "epoch": 4}, "train.pt")
    run("upgrade", "train.pt", INITIAL, "-o", "train_copy.pt")
    assert torch.load("train_copy.pt", weights_only=True)["epoch"] == 4
    assert run("current", "train_copy.pt").stdout == f"{INITIAL}\n"


# ----------------------------------------------------------------------------- outputs first


def test_a_directory_output_is_refused_before_reading_anything(project: Path, run: Run) -> None:
    Path("not_a_checkpoint.pth").write_bytes(b"garbage")
    Path("outdir").mkdir()
    for out in (".", "outdir"):
        err = run("upgrade", "not_a_checkpoint.pth", "-o", out, code=1).stderr
        assert f"cannot write {out}: it is a directory" in err, err
    err = run("stamp", "not_a_checkpoint.pth", INITIAL, "-o", "outdir", code=1).stderr
    assert "it is a directory" in err


def test_a_training_container_to_safetensors_is_refused_before_migrating(
    project: Path, run: Run
) -> None:
    torch.save({"model": v1_state_dict(), "epoch": 1}, "ckpt.pt")
    result = run("upgrade", "ckpt.pt", "-o", "t.safetensors", code=1)
    assert "holds only tensors" in result.stderr
    assert "identified by schema" not in result.stderr and "Running" not in result.stderr
    assert not Path("t.safetensors").exists()
