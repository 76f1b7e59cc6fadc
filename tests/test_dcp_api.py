"""DCP from Python: ``ckptmigrate.dcp.load``/``save``, @versioned with DCP's state-dict API.

One process, no process group (the multi-rank runs are in test_dcp_distributed.py).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tests.conftest import Run
from tests.harness import dcp_models as tiny
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
)

import ckptmigrate
import ckptmigrate.dcp
from ckptmigrate.errors import LoadError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tiny.write_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def versioned(cls: type[torch.nn.Module], root: Path, revision: str) -> Any:
    return ckptmigrate.versioned(str(root / "migrations"), revision=revision)(
        type(cls.__name__, (cls,), {})
    )


def trained(cls: Any) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = cls()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tiny.train(model, opt, range(2))
    return model, opt


def test_a_versioned_model_saved_with_dcp_records_its_revision(project: Path, run: Run) -> None:
    v1 = versioned(tiny.TinyV1, project, tiny.REV_V1)
    model, _ = trained(v1)
    msd = get_model_state_dict(model)
    assert msd._metadata[""]["ckptmigrate.revision"] == tiny.REV_V1  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckptmigrate.dcp.save({"model": msd}, project / "ckpt")
        dcp.save(
            {"model": msd}, checkpoint_id=project / "plain", planner=ckptmigrate.dcp.SavePlanner()
        )
    for folder in ("ckpt", "plain"):
        assert run("current", folder).stdout.strip() == tiny.REV_V1
    # without ckptmigrate's planner DCP keeps no stamp: such a folder needs --from
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd}, checkpoint_id=project / "unstamped")
    assert "no ckptmigrate stamp" in run("current", "unstamped").stderr


def test_set_model_state_dict_upgrades_an_old_state_dict(project: Path) -> None:
    v1 = versioned(tiny.TinyV1, project, tiny.REV_V1)
    v2 = versioned(tiny.TinyV2, project, tiny.REV_V2)
    old, _ = trained(v1)
    sd = old.state_dict()  # stamped at V1
    model = v2()
    set_model_state_dict(model, sd)  # through the versioned class's load_state_dict
    expected = tiny.expected_v2({k: v for k, v in sd.items()})
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_load_migrates_an_old_checkpoint_on_the_fly(project: Path) -> None:
    v1 = versioned(tiny.TinyV1, project, tiny.REV_V1)
    v2 = versioned(tiny.TinyV2, project, tiny.REV_V2)
    old, old_opt = trained(v1)
    msd, osd = get_state_dict(old, old_opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckptmigrate.dcp.save({"model": msd, "optim": osd}, project / "ckpt")
    before = (project / "ckpt" / ".metadata").read_bytes()
    model = v2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    msd2, osd2 = get_state_dict(model, opt)
    state = {"model": msd2, "optim": osd2}
    result = ckptmigrate.dcp.load(state, project / "ckpt", model=model)
    assert (result.from_revisions, result.to_revisions) == ((tiny.REV_V1,), (tiny.REV_V2,))
    want = tiny.expected_v2(old.state_dict())
    for key, value in want.items():
        assert torch.equal(state["model"][key], value), key
    moments = {k: st["exp_avg_sq"] for k, st in osd["state"].items()}
    for key, value in tiny.expected_v2(moments).items():
        assert torch.equal(state["optim"]["state"][key]["exp_avg_sq"], value), key
    assert (project / "ckpt" / ".metadata").read_bytes() == before  # nothing was written


def test_load_going_down_keeps_the_fresh_state_of_a_parameter_it_adds(
    project: Path, run: Run
) -> None:
    """V2's checkpoint into V1: ``old_scale`` is back (ones), its Adam state as the job made it."""
    v1 = versioned(tiny.TinyV1, project, tiny.REV_V1)
    v2 = versioned(tiny.TinyV2, project, tiny.REV_V2)
    new, new_opt = trained(v2)
    msd, osd = get_state_dict(new, new_opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckptmigrate.dcp.save({"model": msd, "optim": osd}, project / "ckpt")
    model = v1()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    msd1, osd1 = get_state_dict(model, opt)  # a fresh optimizer's (initialised) state
    fresh = {n: v.clone() for n, v in osd1["state"]["old_scale"].items()}
    state = {"model": msd1, "optim": osd1}
    result = ckptmigrate.dcp.load(state, project / "ckpt", model=model)
    assert result.to_revisions == (tiny.REV_V1,)
    assert torch.equal(state["model"]["old_scale"], torch.ones(tiny.DIM))
    assert torch.equal(state["model"]["head.weight"], new.lm_head.weight)
    for name, value in fresh.items():
        assert torch.equal(state["optim"]["state"]["old_scale"][name], value), name
    assert torch.equal(
        state["optim"]["state"]["head.weight"]["exp_avg"], osd["state"]["lm_head.weight"]["exp_avg"]
    )


def test_load_into_a_model_at_another_revision_says_so(project: Path) -> None:
    v1 = versioned(tiny.TinyV1, project, tiny.REV_V1)
    old, _ = trained(v1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckptmigrate.dcp.save({"model": get_model_state_dict(old)}, project / "ckpt")
    wrong = {"model": dict(tiny.TinyV1().state_dict())}  # V1's layout, but asked for V2
    with pytest.raises(LoadError, match=r"migrated to d2c0bb000002, does not fit the state dict"):
        ckptmigrate.dcp.load(wrong, project / "ckpt", location=project / "alembic_style.ini")


def test_output_into_an_existing_dcp_folder_replaces_its_checkpoint(
    project: Path, run: Run
) -> None:
    v1 = versioned(tiny.TinyV1, project, tiny.REV_V1)
    old, _ = trained(v1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckptmigrate.dcp.save({"model": get_model_state_dict(old)}, project / "ckpt")
        dcp.save({"model": dict(tiny.TinyV2().state_dict())}, checkpoint_id=project / "target")
    stale = {p.name for p in (project / "target").glob("*.distcp")}
    run("upgrade", "ckpt", "-o", "target")
    files = {p.name for p in (project / "target").glob("*.distcp")}
    md = pickle.loads((project / "target" / ".metadata").read_bytes())
    assert files == {i.relative_path for i in md.storage_data.values()} - {".metadata"}
    assert not files & stale or all(
        (project / "target" / f).read_bytes() == (project / "ckpt" / f).read_bytes()
        for f in files & stale
    )
    state = {"model": {k: torch.zeros_like(v) for k, v in tiny.TinyV2().state_dict().items()}}
    dcp.load(state, checkpoint_id=project / "target")
    for key, value in tiny.expected_v2(old.state_dict()).items():
        assert torch.equal(state["model"][key], value), key


def test_diff_reads_a_dcp_folder(project: Path, run: Run) -> None:
    v1 = versioned(tiny.TinyV1, project, tiny.REV_V1)
    old, _ = trained(v1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckptmigrate.dcp.save({"model": get_model_state_dict(old)}, project / "ckpt")
    run("schema", "--record", "ckpt")  # the base schema, from the folder (stamped at V1)
    out = run("diff", "ckpt", "--rev", tiny.REV_V2).stdout
    assert "layers.0.q.weight" in out and "block.qkv.weight" in out
