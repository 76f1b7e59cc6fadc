"""DCP checkpoint folders offline, in one process (dcp.save and dcp.load need no process group).

Renames and drops rewrite ``.metadata`` alone; tensor-changing ops write new
data files only for what they change; the optimizer state saved by
``get_state_dict`` (keyed by name) follows every op; every result loads with
a plain ``dcp.load`` into the new model with the expected tensors.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tests.conftest import Run
from tests.harness import dcp_models as tiny
from tests.harness.common import digest
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # dcp without a process group

V1, V2 = tiny.REV_V1, tiny.REV_V2


def save_v1(folder: Path, *, steps: int = 2, optimizer: bool = True) -> tuple[Any, Any]:
    """A trained TinyV1 saved as a DCP checkpoint ``{"model", "optim", "step"}``."""
    torch.manual_seed(0)
    model = tiny.TinyV1()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tiny.train(model, opt, range(steps))
    msd, osd = get_state_dict(model, opt)
    state: dict[str, Any] = {"model": msd, "step": steps}
    if optimizer:
        state["optim"] = osd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder)
    return model, opt


def load_into(
    cls: type[torch.nn.Module], folder: Path, *, optimizer: bool = True, fresh: tuple[str, ...] = ()
) -> Any:
    """A fresh ``cls`` (and Adam), loaded from the folder by plain dcp.load: (model, opt, step).

    ``fresh``: parameters the checkpoint has no optimizer state for (never trained, or
    added by a migration).
    """
    model = cls()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(model, opt)
    for key in fresh:
        del osd["state"][key]
    state: dict[str, Any] = {"model": msd, "step": 0}
    if optimizer:
        state["optim"] = osd
    dcp.load(state, checkpoint_id=folder)
    if not optimizer:
        set_model_state_dict(model, state["model"])
        return model, opt, state["step"]
    set_state_dict(
        model,
        opt,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=not fresh),  # PyTorch's way to start some state afresh
    )
    return model, opt, state["step"]


def optim_state(model: Any, opt: Any) -> dict[str, dict[str, torch.Tensor]]:
    return dict(get_state_dict(model, opt)[1]["state"])


def data_files(folder: Path) -> dict[str, tuple[int, str]]:
    """Every data file: (inode, sha256)."""
    return {p.name: (p.stat().st_ino, digest(p)) for p in sorted(folder.glob("*.distcp"))}


def storage_of(folder: Path) -> dict[str, set[str]]:
    """Flat key -> the files its chunks live in, read straight from ``.metadata``."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    out: dict[str, set[str]] = {}
    for index, info in md.storage_data.items():
        out.setdefault(index.fqn, set()).add(info.relative_path)
    return out


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.fixture
def renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tiny.write_project(tmp_path, tiny.RENAMES_UP, tiny.RENAMES_DOWN)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def restructure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tiny.write_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_renames_and_drops_rewrite_only_the_metadata(renames: Path, run: Run) -> None:
    ckpt = renames / "ckpt"
    model, opt = save_v1(ckpt)
    before = data_files(ckpt)
    run("stamp", str(ckpt), V1)
    result = run("upgrade", str(ckpt))
    assert f"Running upgrade {V1} -> {V2}, layers, fused mlp" in result.stderr
    assert "Optimizer state at 'optim': 16 -> 15 parameters" in result.stderr
    assert data_files(ckpt) == before  # the same files: same inodes, same bytes, none new
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", *before]
    assert run("current", str(ckpt)).stdout.strip() == f"{V2} (head)"

    new, new_opt, step = load_into(tiny.TinyRenamed, ckpt)
    v1 = model.state_dict()
    assert_equal(new.state_dict(), {tiny.renamed(k): v for k, v in v1.items() if k != "old_scale"})
    old_state = optim_state(model, opt)
    got = optim_state(new, new_opt)
    assert sorted(got) == sorted(tiny.renamed(k) for k in old_state if k != "old_scale")
    for key, st in old_state.items():
        if key != "old_scale":
            assert_equal(got[tiny.renamed(key)], st)
    assert step == 2


def test_the_written_metadata_stores_equal_sizes_and_properties_once(
    renames: Path, run: Run
) -> None:
    ckpt = renames / "ckpt"
    save_v1(ckpt)
    before = (ckpt / ".metadata").stat().st_size
    run("upgrade", str(ckpt), "--from", V1)
    with open(ckpt / ".metadata", "rb") as fh:
        md = pickle.load(fh)  # as DCP's own reader does
    tensors = [e for e in md.state_dict_metadata.values() if hasattr(e, "properties")]
    by_value: dict[Any, set[int]] = {}
    for e in tensors:
        for size in (e.size, *(c.offsets for c in e.chunks), *(c.sizes for c in e.chunks)):
            by_value.setdefault(("size", tuple(size)), set()).add(id(size))
        by_value.setdefault(("properties", e.properties.dtype), set()).add(id(e.properties))
    assert len(by_value) < len(tensors)  # values repeat, as in any model ...
    assert all(len(ids) == 1 for ids in by_value.values())  # ... and each is one object
    assert (ckpt / ".metadata").stat().st_size < before


def test_tensor_changing_ops_write_only_what_they_change(restructure: Path, run: Run) -> None:
    ckpt = restructure / "ckpt"
    model, opt = save_v1(ckpt)
    (old_file,) = data_files(ckpt)
    old_inode, old_digest = data_files(ckpt)[old_file]
    run("upgrade", str(ckpt), "--from", V1)

    files = data_files(ckpt)
    assert files[old_file] == (old_inode, old_digest)  # still referenced, never rewritten
    new_files = set(files) - {old_file}
    assert new_files and all(n.startswith("ckptmigrate-") for n in new_files)
    where = storage_of(ckpt)
    parts = [f"layers.0.{m}.{p}" for m in ("q", "k", "v", "gate_up") for p in ("weight", "bias")]
    changed = {f"model.{key}" for key in ["embed.weight", *parts]}
    moments = ("exp_avg", "exp_avg_sq", "step")
    changed |= {f"optim.state.{k[len('model.') :]}.{n}" for k in changed for n in moments}
    changed.add("optim.param_groups.0.params")
    for key, names in where.items():
        if key in changed:
            assert old_file not in names, key
        else:
            assert names == {old_file}, key  # untouched: referenced where it was

    new, new_opt, _ = load_into(tiny.TinyV2, ckpt)
    assert_equal(new.state_dict(), tiny.expected_v2(model.state_dict()))
    old_state = optim_state(model, opt)
    got = optim_state(new, new_opt)
    for name in ("exp_avg", "exp_avg_sq"):
        moments = {k: st[name] for k, st in old_state.items()}
        want = tiny.expected_v2(moments)  # moments split, joined and padded with zeros
        assert_equal({k: st[name] for k, st in got.items()}, want)
    assert {float(st["step"]) for st in got.values()} == {2.0}


def test_downgrade_gives_back_the_trained_values(restructure: Path, run: Run) -> None:
    ckpt = restructure / "ckpt"
    model, opt = save_v1(ckpt)
    run("upgrade", str(ckpt), "--from", V1)
    upgraded = {p.name for p in ckpt.glob("ckptmigrate-*.distcp")}
    run("downgrade", str(ckpt), V1)
    back, back_opt, _ = load_into(tiny.TinyV1, ckpt, fresh=("old_scale",))
    assert_equal(back.state_dict(), model.state_dict())
    got = optim_state(back, back_opt)
    for key, st in optim_state(model, opt).items():
        if key != "old_scale":  # dropped on the way up (intended): it starts afresh
            assert_equal(got[key], st)
    # what the upgrade wrote is no longer referenced, and is gone; nothing else is left
    referenced = set().union(*storage_of(ckpt).values()) - {".metadata"}
    assert {p.name for p in ckpt.glob("*.distcp")} == referenced
    assert upgraded and not upgraded & referenced


def test_dry_run_prints_the_plan_and_writes_nothing(restructure: Path, run: Run) -> None:
    ckpt = restructure / "ckpt"
    save_v1(ckpt)
    before = {p.name: digest(p) for p in ckpt.iterdir()}
    out = run("upgrade", str(ckpt), "--from", V1, "--dry-run").stdout
    assert "split('layers.0.qkv.weight'" in out
    assert "Optimizer state at 'optim': 16 -> 17 parameters" in out
    assert "layers.0.q.weight: state of block.qkv.weight (split)" in out
    assert {p.name: digest(p) for p in ckpt.iterdir()} == before


def test_output_folder_leaves_the_input_alone(restructure: Path, run: Run) -> None:
    ckpt, out = restructure / "ckpt", restructure / "v2"
    model, _ = save_v1(ckpt)
    before = {p.name: digest(p) for p in ckpt.iterdir()}
    run("upgrade", str(ckpt), "--from", V1, "-o", str(out))
    assert {p.name: digest(p) for p in ckpt.iterdir()} == before
    assert run("current", str(out)).stdout.strip() == f"{V2} (head)"
    new, _, _ = load_into(tiny.TinyV2, out)
    assert_equal(new.state_dict(), tiny.expected_v2(model.state_dict()))


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_jobs_write_data_files_in_parallel(restructure: Path, run: Run, jobs: str) -> None:
    ckpt = restructure / "ckpt"
    model, _ = save_v1(ckpt, optimizer=False)
    run("upgrade", str(ckpt), "--from", V1, "-j", jobs)
    new_files = [p for p in ckpt.glob("ckptmigrate-*.distcp")]
    assert len(new_files) == int(jobs)
    new, _, _ = load_into(tiny.TinyV2, ckpt, optimizer=False)
    assert_equal(new.state_dict(), tiny.expected_v2(model.state_dict()))


def test_key_prefix_focuses_the_lineage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    tiny.write_project(tmp_path, 'op.rename_key("weight", "w")', 'op.rename_key("w", "weight")')
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt"
    model, _ = save_v1(ckpt, optimizer=False)
    run("upgrade", str(ckpt), "--from", V1, "--key-prefix", "head.")
    loaded: dict[str, Any] = {
        "model": {
            ("head.w" if k == "head.weight" else k): torch.zeros_like(v)
            for k, v in model.state_dict().items()
        }
    }
    dcp.load(loaded, checkpoint_id=ckpt)
    assert torch.equal(loaded["model"]["head.w"], model.head.weight)
    assert run("current", str(ckpt), "--key-prefix", "head.").stdout.strip() == f"{V2} (head)"


def test_stamp_is_in_the_metadata_and_survives_dcp_load(renames: Path, run: Run) -> None:
    ckpt = renames / "ckpt"
    save_v1(ckpt)
    files = data_files(ckpt)
    run("stamp", str(ckpt), V1)
    assert data_files(ckpt) == files  # the stamp is in .metadata: no data file changes
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    assert md.planner_data["__ckptmigrate__"]["model:ckptmigrate.revision"] == V1
    load_into(tiny.TinyV1, ckpt, fresh=("old_scale",))  # dcp.load does not mind the stamp
    assert run("current", str(ckpt)).stdout.strip() == V1
    run("stamp", str(ckpt), "base")
    assert "__ckptmigrate__" not in pickle.loads((ckpt / ".metadata").read_bytes()).planner_data


Convert = Callable[[Path], dict[str, torch.Tensor]]


def test_convert_to_a_torch_file_and_back(restructure: Path, run: Run) -> None:
    ckpt = restructure / "ckpt"
    model, opt = save_v1(ckpt)
    run("upgrade", str(ckpt), "--from", V1, "-o", str(restructure / "v2.pt"))
    obj = torch.load(restructure / "v2.pt", weights_only=True)
    assert sorted(obj) == ["model", "optim", "step"]
    assert_equal(dict(obj["model"]), tiny.expected_v2(model.state_dict()))
    assert obj["step"] == 2
    moments = {k: st["exp_avg"] for k, st in optim_state(model, opt).items()}
    assert_equal(
        {k: st["exp_avg"] for k, st in obj["optim"]["state"].items()}, tiny.expected_v2(moments)
    )
    # and back into a DCP folder, from the torch file
    back = restructure / "back"
    back.mkdir()
    run("stamp", str(restructure / "v2.pt"), V2, "-o", str(back))
    new, _, step = load_into(tiny.TinyV2, back)
    assert_equal(new.state_dict(), tiny.expected_v2(model.state_dict()))
    assert step == 2
    assert run("current", str(back)).stdout.strip() == f"{V2} (head)"


def test_convert_weights_to_safetensors(restructure: Path, run: Run) -> None:
    from safetensors.torch import load_file

    ckpt = restructure / "ckpt"
    model, _ = save_v1(ckpt, optimizer=False)
    # a state dict with other entries (``step``) holds more than tensors
    run("upgrade", str(ckpt), "--from", V1, "-o", str(restructure / "v2.safetensors"), code=1)
    plain = restructure / "plain"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(model.state_dict()), checkpoint_id=plain)
    run("upgrade", str(plain), "--from", V1, "-o", str(restructure / "v2.safetensors"))
    assert_equal(load_file(restructure / "v2.safetensors"), tiny.expected_v2(model.state_dict()))


@pytest.mark.parametrize("output", ["v2.pt", "v2.safetensors", "v2", None])
def test_tensors_are_read_one_at_a_time(
    restructure: Path, run: Run, monkeypatch: pytest.MonkeyPatch, output: str | None
) -> None:
    """Converting or migrating a folder holds at most a few read tensors at once, not all."""
    import weakref

    from ckptmigrate.formats.dcp.store import ChunkStore

    ckpt = restructure / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {f"extra.{i}": torch.randn(64, 64) for i in range(12)}
        dcp.save({**tiny.TinyV1().state_dict(), **extra}, checkpoint_id=ckpt)
    alive: list[weakref.ref[torch.Tensor]] = []
    keys: list[str] = []
    most = [0]
    read = ChunkStore.tensor

    def spy(self: ChunkStore, key: str, entry: Any, storage: Any) -> torch.Tensor:
        value = read(self, key, entry, storage)
        alive.append(weakref.ref(value))
        keys.append(key)
        most[0] = max(most[0], sum(r() is not None for r in alive))
        return value

    monkeypatch.setattr(ChunkStore, "tensor", spy)
    args = ["-o", str(restructure / output)] if output else []
    run("upgrade", str(ckpt), "--from", V1, *args)
    if output in ("v2", None):  # a DCP folder again: what is not computed stays where it is
        assert not any(k.startswith("extra.") for k in keys), keys
    else:  # a file: every tensor is read to be written
        assert sorted(k for k in keys if k.startswith("extra.")) == sorted(extra)
    assert most[0] <= 2, most[0]  # one tensor (and the one it is computed from), never all
