"""A revision claimed for a checkpoint (--from, stamp, a recorded stamp) is checked, not trusted.

The schema at the claimed revision is computed from the lineage's base
schema; a file whose keys, shapes or dtypes contradict it is refused with the
difference and the revision it does match. ``--force`` overrides. And nothing
is ever written stamped at a revision whose schema the result contradicts.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from examples.simple_model import SimpleModel
from tests.conftest import (
    ADD_FC3,
    INITIAL,
    Run,
    make_lineage,
    tensors,
    v1_state_dict,
    write_revision,
)

import ckptmigrate
from ckptmigrate.errors import ClaimError


def _head_file(path: str = "head.pth") -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    sd = SimpleModel().state_dict()
    torch.save(sd, path)
    return sd


def _stamp_by_hand(path: Path, rev: str) -> None:
    """A stamp written without ckptmigrate's checks, as an old release or a script might."""
    sd = torch.load(path, weights_only=True)
    sd._metadata[""]["ckptmigrate.revision"] = rev
    torch.save(sd, path)


# ----------------------------------------------------------------------------- --from


def test_wrong_from_is_refused_with_the_difference_and_the_right_revision(
    project: Path, run: Run
) -> None:
    torch.save({"model": v1_state_dict(), "epoch": 1}, "train_v1.pt")
    before = Path("train_v1.pt").read_bytes()
    err = run("upgrade", "train_v1.pt", "--from", ADD_FC3, "-o", "out.pt", code=1).stderr
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"Error: train_v1.pt is not at {ADD_FC3}")
    assert "lacks fc3.weight, fc3.bias" in line
    assert "fc2.weight is [5, 20] float32 not [20, 20] float32" in line
    assert f"it matches {INITIAL}; pass --from {INITIAL}" in line and "--force" in line
    assert not Path("out.pt").exists()
    assert Path("train_v1.pt").read_bytes() == before
    # the hint works
    run("upgrade", "train_v1.pt", "--from", INITIAL, "-o", "out.pt")
    SimpleModel().load_state_dict(torch.load("out.pt", weights_only=True)["model"], strict=True)


def test_wrong_older_from_is_refused_before_any_step_runs(project: Path, run: Run) -> None:
    _head_file()
    result = run("upgrade", "head.pth", "--from", INITIAL, code=1)
    assert "Running upgrade" not in result.stderr
    assert f"head.pth is not at {INITIAL}" in result.stderr
    assert "has extra fc3.weight, fc3.bias" in result.stderr
    assert f"it matches {ADD_FC3}; pass --from {ADD_FC3}" in result.stderr
    err = run("downgrade", "head.pth", "base", "--from", INITIAL, code=1).stderr
    assert f"head.pth is not at {INITIAL}" in err


def test_force_overrides_the_check_and_says_so(project: Path, run: Run) -> None:
    torch.save(v1_state_dict(), "model.pth")
    result = run("upgrade", "model.pth", "--from", ADD_FC3, "-o", "out.pth", "--force")
    assert f"Warning: --force: model.pth is not at {ADD_FC3}" in result.stderr
    assert run("current", "out.pth").stdout == f"{ADD_FC3} (head)\n"


def test_right_from_is_quiet(project: Path, run: Run) -> None:
    torch.save(v1_state_dict(), "model.pth")
    result = run("upgrade", "model.pth", "--from", INITIAL)
    assert "Note" not in result.stderr and "Warning" not in result.stderr
    SimpleModel().load_state_dict(torch.load("model.pth", weights_only=True), strict=True)


def test_a_file_matching_no_revision(project: Path, run: Run) -> None:
    sd = v1_state_dict()
    sd["extra.weight"] = torch.ones(2)
    torch.save(sd, "odd.pth")
    err = run("upgrade", "odd.pth", "--from", INITIAL, code=1).stderr
    assert f"odd.pth is not at {INITIAL}" in err and "has extra extra.weight" in err
    assert "it matches no revision's schema" in err and "ckptmigrate diff odd.pth" in err


# ----------------------------------------------------------------------------- stamp


def test_stamp_at_a_contradicted_revision_is_refused(project: Path, run: Run) -> None:
    torch.save(v1_state_dict(), "model.pth")
    before = Path("model.pth").read_bytes()
    err = run("stamp", "model.pth", ADD_FC3, code=1).stderr
    assert f"model.pth is not at {ADD_FC3}" in err and "lacks fc3.weight" in err
    assert f"it matches {INITIAL}; stamp it with 'ckptmigrate stamp model.pth {INITIAL}'" in err
    assert Path("model.pth").read_bytes() == before
    run("stamp", "model.pth", INITIAL)
    assert run("current", "model.pth").stdout == f"{INITIAL}\n"
    # with --force the user's word goes, and a warning says what was overridden
    out = run("stamp", "model.pth", ADD_FC3, "--force", "-o", "forced.pth")
    assert f"Warning: --force: model.pth is not at {ADD_FC3}" in out.stderr
    assert run("current", "forced.pth").stdout == f"{ADD_FC3} (head)\n"


def test_a_lying_stamp_is_caught_before_upgrading(project: Path, run: Run) -> None:
    _head_file()
    _stamp_by_hand(Path("head.pth"), INITIAL)  # the file is really at the head
    before = Path("head.pth").read_bytes()
    result = run("upgrade", "head.pth", code=1)
    assert "Running upgrade" not in result.stderr
    assert f"head.pth is stamped at {INITIAL}, but it is not at {INITIAL}" in result.stderr
    assert f"it matches {ADD_FC3}; pass --from {ADD_FC3}" in result.stderr
    assert Path("head.pth").read_bytes() == before
    # ... and an already-at-target file with a lying stamp is not copied under it either
    run("upgrade", "head.pth", INITIAL, "-o", "copy.pth", code=1)
    assert not Path("copy.pth").exists()


# ----------------------------------------------------------------------------- the result


def test_nothing_is_written_at_a_revision_whose_schema_the_result_contradicts(
    project: Path, run: Run
) -> None:
    """A script that behaves differently for real than when its schema was computed."""
    write_revision(
        project / "migrations/versions",
        "3c0000000003",
        ADD_FC3,
        up='op.add_tensor("norm.weight" if torch.empty(0).is_meta else "nrom.weight", (20,))',
        down_body='op.drop_key("norm.weight")',
    )
    torch.save(v1_state_dict(), "model.pth")
    before = Path("model.pth").read_bytes()
    result = run("upgrade", "model.pth", "--from", INITIAL, code=1)
    assert "Running upgrade" in result.stderr  # the steps ran ...
    err = result.stderr.strip().splitlines()[-1]
    assert "would be stamped at 3c0000000003" in err  # ... but the result was refused
    assert "lacks norm.weight; has extra nrom.weight" in err
    assert Path("model.pth").read_bytes() == before
    assert not list(project.glob(".model.pth.*"))
    dry = run("upgrade", "model.pth", "--from", INITIAL, "--dry-run")
    assert "norm.weight" in dry.stdout  # the dry run computes the plan symbolically
    run("upgrade", "model.pth", "--from", INITIAL, "--force")
    assert "nrom.weight" in tensors(Path("model.pth"))


# ----------------------------------------------------------------------------- unknown schemas


def test_without_a_base_schema_only_identification_talks_about_it(project: Path, run: Run) -> None:
    """A plain --from or stamp workflow needs no base schema, so it hears nothing of one."""
    (project / "migrations/base_schema.txt").unlink()
    torch.save(v1_state_dict(), "model.pth")
    result = run("stamp", "model.pth", INITIAL)
    assert "base schema" not in result.stderr
    plain = run("upgrade", "model.pth")  # stamped: nothing to identify
    assert "base schema" not in plain.stderr
    torch.save(v1_state_dict(), "other.pth")
    claimed = run("upgrade", "other.pth", "--from", INITIAL)
    assert "base schema" not in claimed.stderr
    torch.save(v1_state_dict(), "legacy.pth")
    unknown = run("upgrade", "legacy.pth", code=1)  # identification needed, and impossible
    assert "no ckptmigrate stamp" in unknown.stderr and "schema --record" in unknown.stderr


# ----------------------------------------------------------------------------- partial schemas


def test_lineage_under_a_key_prefix_compares_only_its_keys(project: Path, run: Run) -> None:
    full = OrderedDict(("model." + k, v) for k, v in v1_state_dict().items())
    full["criterion.weight"] = torch.ones(3)
    torch.save({"state_dict": full, "epoch": 2}, "lit.ckpt")
    err = run("upgrade", "lit.ckpt", "--key-prefix", "model.", "--from", ADD_FC3, code=1).stderr
    assert f"is not at {ADD_FC3}" in err and "criterion" not in err
    run("upgrade", "lit.ckpt", "--key-prefix", "model.", "--from", INITIAL)
    assert run("current", "lit.ckpt", "--key-prefix", "model.").stdout == f"{ADD_FC3} (head)\n"


def _lineage(root: Path, name: str, base: str, revisions: list[tuple[str, object, str]]) -> Path:
    steps = [(rev, down, up, "pass") for rev, down, up in revisions]
    make_lineage(root, name, base, steps, ini=f"{name}.ini")
    return root / f"{name}.ini"


def test_keys_of_a_nested_lineage_are_left_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """A parent lineage's schema says nothing reliable about a versioned child's keys."""
    monkeypatch.chdir(tmp_path)
    _lineage(
        tmp_path,
        "enc",
        "proj.weight float32 [8,4]\nproj.bias float32 [8]\n",
        [("e1000001", None, "pass"), ("e2000002", "e1000001", 'op.rename_prefix("proj.", "lin.")')],
    )
    ini = _lineage(
        tmp_path,
        "s2s",
        "enc.proj.weight float32 [8,4]\nenc.proj.bias float32 [8]\nhead.weight float32 [2,8]\n",
        [
            ("s1000001", None, "pass"),
            ("s2000002", "s1000001", 'op.rename_prefix("enc.", "encoder.")'),
        ],
    )
    # saved by the newest code: the encoder's own lineage renamed proj -> lin
    sd = OrderedDict(
        [
            ("encoder.lin.weight", torch.ones(8, 4)),
            ("encoder.lin.bias", torch.ones(8)),
            ("head.weight", torch.ones(2, 8)),
        ]
    )
    sd._metadata = {"encoder": {"ckptmigrate.revision": "e2000002"}}  # type: ignore[attr-defined]
    torch.save(sd, "seq.pth")
    run("-c", str(ini), "stamp", "seq.pth", "s2000002")
    assert run("-c", str(ini), "current", "seq.pth").stdout == "s2000002 (head)\n"
    err = run("-c", str(ini), "stamp", "seq.pth", "s1000001", code=1).stderr
    assert "is not at s1000001" in err and "lacks enc.proj.weight" in err


def test_extra_state_objects_are_compared_as_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    ini = _lineage(
        tmp_path,
        "m",
        "w float32 [2]\nq._extra_state object -\n",
        [("m1000001", None, "pass"), ("m2000002", "m1000001", 'op.add_tensor("b", (2,))')],
    )
    torch.save({"w": torch.ones(2), "q._extra_state": {"scale": 0.5}}, "x.pth")
    run("-c", str(ini), "upgrade", "x.pth", "--from", "m1000001")
    assert set(tensors(Path("x.pth"))) == {"w", "q._extra_state", "b"}
    torch.save({"w": torch.ones(2)}, "y.pth")
    err = run("-c", str(ini), "stamp", "y.pth", "m1000001", code=1).stderr
    assert "lacks q._extra_state" in err


# ----------------------------------------------------------------------------- Python API


def test_python_api_checks_claims_and_takes_force(project: Path) -> None:
    torch.save(v1_state_dict(), "model.pth")
    with pytest.raises(ClaimError, match=f"it matches {INITIAL}"):
        ckptmigrate.upgrade("model.pth", from_revision=ADD_FC3, output="out.pth")
    with pytest.raises(ClaimError):
        ckptmigrate.stamp("model.pth", ADD_FC3)
    ckptmigrate.stamp("model.pth", ADD_FC3, output="forced.pth", force=True)
    assert ckptmigrate.current("forced.pth") == (ADD_FC3,)
    result = ckptmigrate.upgrade("model.pth", from_revision=INITIAL)
    assert result.to_revisions == (ADD_FC3,)
