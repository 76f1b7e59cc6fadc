"""Checkpoint files: containers, wrapper prefixes, formats, stamps, safety, atomicity."""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from examples.simple_model import SimpleModel
from tests.conftest import ADD_FC3, INITIAL, Run, assert_same_tensors, tensors, v1_state_dict


def _stamped(path: Path, run: Run) -> None:
    run("stamp", str(path), INITIAL)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_training_container_is_found_and_other_entries_carried(
    project: Path, run: Run, key: str
) -> None:
    sd = v1_state_dict()
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0)}},
        "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3]}],
    }
    torch.save({key: sd, "optimizer": optimizer, "epoch": 7, "hparams": {"lr": 0.1}}, "ckpt.pt")
    result = run("upgrade", "ckpt.pt", "--from", INITIAL)
    assert f"state dict found under '{key}'" in result.stderr
    obj = torch.load("ckpt.pt", weights_only=True)
    assert obj["epoch"] == 7 and obj["hparams"] == {"lr": 0.1}
    assert torch.equal(obj["optimizer"]["state"][0]["step"], torch.tensor(3.0))
    SimpleModel().load_state_dict(obj[key], strict=True)
    assert run("current", "ckpt.pt").stdout == f"{ADD_FC3} (head)\n"


def test_state_dict_key_option_and_ambiguity(project: Path, run: Run) -> None:
    torch.save({"student": v1_state_dict(1), "teacher": v1_state_dict(2)}, "kd.pt")
    err = run("current", "kd.pt", code=1).stderr
    assert "several state dicts ('student', 'teacher')" in err and "--state-dict-key" in err
    run("upgrade", "kd.pt", "--from", INITIAL, "--state-dict-key", "teacher")
    obj = torch.load("kd.pt", weights_only=True)
    assert "fc3.weight" in obj["teacher"] and "fc3.weight" not in obj["student"]
    assert_same_tensors(obj["student"], v1_state_dict(1))


def test_no_state_dict_found(project: Path, run: Run) -> None:
    torch.save({"epoch": 3, "notes": "hi"}, "x.pt")
    err = run("current", "x.pt", code=1).stderr
    assert "has no state dict" in err and "'epoch'" in err and "--state-dict-key" in err


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(project: Path, run: Run, prefix: str) -> None:
    sd = v1_state_dict()
    torch.save(OrderedDict((prefix + k, v) for k, v in sd.items()), "wrapped.pth")
    result = run("upgrade", "wrapped.pth", "--from", INITIAL)
    assert f"stripped wrapper prefix {prefix!r}" in result.stderr
    out = tensors(Path("wrapped.pth"))
    assert sorted(out) == sorted(
        ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    )
    assert torch.equal(out["fc3.weight"], sd["fc2.weight"])


def test_ddp_state_dict_metadata_is_rekeyed(project: Path, run: Run) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20))
    wrapped = torch.nn.DataParallel(model)
    torch.save(wrapped.state_dict(), "dp.pth")
    run("stamp", "dp.pth", INITIAL, "--force")  # another model's layout: only metadata matters
    sd = torch.load("dp.pth", weights_only=True)
    assert "0.weight" in sd and sd._metadata["1"]["version"] == 2
    assert sd._metadata[""]["ckptmigrate.revision"] == INITIAL
    fresh = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20))
    fresh.load_state_dict(sd, strict=True)


def test_plain_torch_load_still_works_and_metadata_is_kept(project: Path, run: Run) -> None:
    bn = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    torch.save(bn.state_dict(), "bn.pth")
    run("stamp", "bn.pth", INITIAL, "--force")  # another model's layout: only metadata matters
    sd = torch.load("bn.pth", weights_only=True)
    assert sd._metadata["1"] == {"version": 2}
    assert sd._metadata[""]["ckptmigrate.revision"] == INITIAL
    assert sd._metadata[""]["ckptmigrate.version"]
    bn.load_state_dict(sd)


def test_stamp_base_removes_stamp_and_purge(project: Path, v1_checkpoint: Path, run: Run) -> None:
    run("stamp", "model.pth", INITIAL)
    assert run("current", "model.pth").stdout == f"{INITIAL}\n"
    run("stamp", "model.pth", "base")
    (project / "migrations/base_schema.txt").unlink()  # nothing to identify it by
    result = run("current", "model.pth")
    assert result.stdout == "" and "no ckptmigrate stamp" in result.stderr
    assert "ckptmigrate.revision" not in torch.load("model.pth", weights_only=True)._metadata.get(
        "", {}
    )


def test_unknown_stamp_is_an_error(project: Path, v1_checkpoint: Path, run: Run) -> None:
    sd = torch.load(v1_checkpoint, weights_only=True)
    sd._metadata[""]["ckptmigrate.revision"] = "ffffeeee0000"
    torch.save(sd, v1_checkpoint)
    err = run("upgrade", "model.pth", code=1).stderr
    assert "stamped at revision ffffeeee0000, which is not in" in err and "--from" in err
    run("stamp", "model.pth", "--purge", INITIAL)
    assert run("current", "model.pth").stdout == f"{INITIAL}\n"


def test_newer_stamp_format_is_refused(project: Path, v1_checkpoint: Path, run: Run) -> None:
    sd = torch.load(v1_checkpoint, weights_only=True)
    sd._metadata[""].update(
        {"ckptmigrate.revision": INITIAL, "ckptmigrate.version": "9.0", "ckptmigrate.format": "2.0"}
    )
    torch.save(sd, v1_checkpoint)
    before = v1_checkpoint.read_bytes()
    err = run("upgrade", "model.pth", code=1).stderr
    assert "stamp format 2.0" in err and "upgrade ckptmigrate" in err
    assert v1_checkpoint.read_bytes() == before


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_and_never_runs(project: Path, run: Run) -> None:
    torch.save({"fc1.weight": torch.zeros(2), "evil": _Evil()}, "evil.pth")
    assert not Path("pwned").exists()
    err = run("upgrade", "evil.pth", "--from", INITIAL, code=1).stderr
    assert "refusing to load evil.pth" in err and "--trust-pickle" in err
    assert "system" in err
    assert not Path("pwned").exists()


def test_trust_pickle_warns(project: Path, run: Run) -> None:
    class Box(dict):  # a non-allow-listed but harmless container class
        pass

    buf = io.BytesIO()
    torch.save(v1_state_dict(), buf)
    torch.save({"model": v1_state_dict(), "extra": pickle.dumps(1)}, "plain.pt")
    result = run("current", "plain.pt", "--trust-pickle")
    assert "--trust-pickle" in result.stderr and "arbitrary code" in result.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"not a checkpoint at all", "is not a checkpoint (it looks like text)"),
    ],
)
def test_bad_files(project: Path, run: Run, content: bytes, message: str) -> None:
    Path("bad.pth").write_bytes(content)
    err = run("upgrade", "bad.pth", code=1).stderr
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert Path("bad.pth").read_bytes() == content


def test_truncated_file(project: Path, v1_checkpoint: Path, run: Run) -> None:
    data = v1_checkpoint.read_bytes()
    v1_checkpoint.write_bytes(data[: len(data) // 2])
    err = run("upgrade", "model.pth", "--from", INITIAL, code=1).stderr
    assert "not a readable PyTorch checkpoint" in err and "truncated" in err


def test_missing_file_and_directory(project: Path, run: Run) -> None:
    assert "no such file" in run("current", "nope.pth", code=1).stderr
    Path("dir.pth").mkdir()
    assert "is a directory" in run("current", "dir.pth", code=1).stderr


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "ckptmigrate-tmp" in p.name]


def test_failed_migration_leaves_input_untouched(
    project: Path, v1_checkpoint: Path, run: Run
) -> None:
    script = project / "migrations/versions/2b7f0c1d9e4a_add_fc3.py"
    script.write_text(
        script.read_text().replace(
            'op.rename_key("fc2.bias", "fc3.bias")', 'op.rename_key("fc2.bais", "fc3.bias")'
        )
    )
    line = _line_of(script, "fc2.bais")
    run("stamp", "model.pth", INITIAL)
    before = v1_checkpoint.read_bytes()
    err = run("upgrade", "model.pth", code=1).stderr
    assert (
        f"revision 2b7f0c1d9e4a (migrations/versions/2b7f0c1d9e4a_add_fc3.py, line {line})" in err
    )
    assert "rename_key('fc2.bais', 'fc3.bias'): key 'fc2.bais' does not exist" in err
    assert "nearest existing keys: fc2.bias" in err
    assert v1_checkpoint.read_bytes() == before
    assert _leftovers(project) == []


def test_exception_in_script_names_file_and_line(
    project: Path, v1_checkpoint: Path, run: Run
) -> None:
    script = project / "migrations/versions/2b7f0c1d9e4a_add_fc3.py"
    text = script.read_text().replace(
        "def upgrade() -> None:\n", "def upgrade() -> None:\n    1 / 0\n"
    )
    script.write_text(text)
    line = _line_of(script, "1 / 0")
    before = v1_checkpoint.read_bytes()
    err = run("upgrade", "model.pth", "--from", INITIAL, code=1).stderr
    assert "upgrade() raised ZeroDivisionError" in err and f"add_fc3.py, line {line}" in err
    assert "nothing was written" in err
    assert v1_checkpoint.read_bytes() == before


def test_unwritable_output_folder(project: Path, v1_checkpoint: Path, run: Run) -> None:
    err = run("upgrade", "model.pth", "--from", INITIAL, "-o", "no/such/dir/out.pth", code=1).stderr
    assert "folder no/such/dir does not exist" in err
    Path("taken.pth").mkdir()
    err = run("upgrade", "model.pth", "--from", INITIAL, "-o", "taken.pth", code=1).stderr
    assert "it is a directory" in err
    assert _leftovers(project) == []


def test_unreachable_target(project: Path, v1_checkpoint: Path, run: Run) -> None:
    err = run("upgrade", "model.pth", "nope1234", "--from", INITIAL, code=1).stderr
    assert "no such revision or branch 'nope1234'" in err
    err = run("downgrade", "model.pth", "+1", "--from", INITIAL, code=1).stderr
    assert "downgrade takes -N" in err and "run 'ckptmigrate upgrade model.pth +1'" in err


def test_safetensors_round_trip_and_conversion(project: Path, run: Run) -> None:
    from safetensors.torch import load_file, save_file

    sd = v1_state_dict()
    save_file(sd, "model.safetensors", metadata={"format": "pt"})
    run("upgrade", "model.safetensors", "--from", INITIAL)
    loaded = load_file("model.safetensors")
    SimpleModel().load_state_dict(loaded, strict=True)
    assert torch.equal(loaded["fc3.weight"], sd["fc2.weight"])
    assert run("current", "model.safetensors").stdout == f"{ADD_FC3} (head)\n"
    # .safetensors -> .pt and back, by output suffix
    run("downgrade", "model.safetensors", INITIAL, "-o", "back.pt")
    assert_same_tensors(tensors(Path("back.pt")), sd, ordered=False)
    run("upgrade", "back.pt", "-o", "again.safetensors")
    assert_same_tensors(load_file("again.safetensors"), loaded, ordered=False)


def test_training_container_cannot_become_safetensors(project: Path, run: Run) -> None:
    torch.save({"model": v1_state_dict(), "epoch": 1}, "ckpt.pt")
    err = run("upgrade", "ckpt.pt", "--from", INITIAL, "-o", "x.safetensors", code=1).stderr
    assert "holds only tensors" in err and "'epoch'" in err


def test_legacy_torch_format_is_read(project: Path, run: Run) -> None:
    torch.save(v1_state_dict(), "legacy.pth", _use_new_zipfile_serialization=False)
    result = run("upgrade", "legacy.pth", "--from", INITIAL)
    assert "legacy" in result.stderr
    SimpleModel().load_state_dict(torch.load("legacy.pth", weights_only=True), strict=True)


def test_tied_weights_stay_shared(project: Path, run: Run) -> None:
    sd = v1_state_dict()
    sd["head.weight"] = sd["fc1.weight"]  # tied: the same tensor under two keys
    torch.save(sd, "tied.pth")
    run("upgrade", "tied.pth", "--from", INITIAL, "--force")  # head.weight: not in the lineage
    out = torch.load("tied.pth", weights_only=True)
    assert out["head.weight"].data_ptr() == out["fc1.weight"].data_ptr()


def test_lineage_under_a_key_prefix(project: Path, run: Run) -> None:
    """A Lightning-style container: the model's keys sit under 'model.'."""
    sd = v1_state_dict()
    full = OrderedDict(("model." + k, v) for k, v in sd.items())
    full["criterion.weight"] = torch.ones(3)
    torch.save({"state_dict": full, "epoch": 2}, "lit.ckpt")
    err = run("upgrade", "lit.ckpt", "--from", INITIAL, "--key-prefix", "nope.", code=1).stderr
    assert "no keys under the prefix 'nope.'" in err
    run("upgrade", "lit.ckpt", "--from", INITIAL, "--key-prefix", "model.")
    obj = torch.load("lit.ckpt", weights_only=True)
    out = obj["state_dict"]
    assert list(out) == [  # the configured model's order, the rest after
        "model.fc1.weight",
        "model.fc1.bias",
        "model.fc2.weight",
        "model.fc2.bias",
        "model.fc3.weight",
        "model.fc3.bias",
        "criterion.weight",
    ]
    assert torch.equal(out["model.fc3.weight"], sd["fc2.weight"])
    assert torch.equal(out["criterion.weight"], torch.ones(3))
    assert obj["epoch"] == 2
    assert out._metadata["model"]["ckptmigrate.revision"] == ADD_FC3
    assert "ckptmigrate.revision" not in out._metadata.get("", {})
    assert run("current", "lit.ckpt", "--key-prefix", "model.").stdout == f"{ADD_FC3} (head)\n"
    # the prefix can live in the configuration too
    ini = project / "alembic_style.ini"
    ini.write_text(ini.read_text() + "key_prefix = model.\n")
    run("downgrade", "lit.ckpt", INITIAL)
    back = torch.load("lit.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(back["model." + k], v) for k, v in sd.items())


def test_safetensors_stamp_under_prefix(project: Path, run: Run) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    sd = {"enc." + k: v for k, v in v1_state_dict().items()}
    save_file(sd, "p.safetensors")
    run("stamp", "p.safetensors", INITIAL, "--key-prefix", "enc.")
    with safe_open("p.safetensors", "pt") as f:
        assert f.metadata()["enc:ckptmigrate.revision"] == INITIAL
    run("upgrade", "p.safetensors", "--key-prefix", "enc.")
    assert run("current", "p.safetensors", "--key-prefix", "enc.").stdout == f"{ADD_FC3} (head)\n"
