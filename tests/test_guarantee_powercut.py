"""Power loss, simulated: every disk state a crash could leave holds the old checkpoint or the new.

Each command runs once for real with a recorder preloaded (tests/harness/fslog.c)
that logs its file-system operations; tests/harness/powercut.py replays the log
and, after every operation, builds every state the disk could be in after a
power cut there (unsynced writes lost, partly kept or reordered; folder
operations since the folder's last fsync persisted as any prefix). With the
default settings each of those states must hold the old checkpoint or the new
one, byte for byte. ``--no-fsync`` does not promise that, and the test shows
what it can lose, as the README says.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.harness import powercut
from tests.harness.common import REV_A, REV_B, UPGRADE_B, standard_project

if shutil.which("gcc") is None:  # pragma: no cover - gcc is part of every supported set-up
    pytest.fail("the power-cut tests compile their recorder with gcc")


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return powercut.build_shim(tmp_path_factory.mktemp("shim"))


def _weights() -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return OrderedDict((f"w{i}", torch.randn(96, 96, generator=gen)) for i in range(6))


def _single_file_verdict(target: Path, old: bytes, new: bytes) -> powercut.Verdict:
    key = str(target.resolve())

    def verdict(get: Callable[[str], bytes | None]) -> str:
        data = get(key)
        if data is None:
            return "missing"
        return "old" if data == old else "new" if data == new else "damaged"

    return verdict


def _torch_at_a(target: Path) -> None:
    from tests.harness.common import stamp_state_dict

    torch.save(stamp_state_dict(_weights(), REV_A), target)


def _torch_at_b(target: Path) -> None:
    _torch_at_a(target)
    ini = target.parent.parent / "alembic_style.ini"
    from ckptmigrate import command
    from ckptmigrate.config import Config

    command.upgrade(Config(ini, quiet=True), target)


def _safetensors_at_a(target: Path) -> None:
    from safetensors.torch import save_file

    save_file(_weights(), target, metadata={"ckptmigrate.revision": REV_A})


@pytest.mark.parametrize(
    ("name", "command", "setup"),
    [
        ("model.pt", "upgrade", _torch_at_a),
        ("model.pt", "downgrade", _torch_at_b),
        ("model.pt", "stamp", _torch_at_a),
        ("model.safetensors", "upgrade", _safetensors_at_a),
    ],
    ids=["upgrade .pt", "downgrade .pt", "stamp .pt", "upgrade .safetensors"],
)
def test_every_power_cut_leaves_the_old_or_the_new_checkpoint(
    tmp_path: Path, shim: Path, name: str, command: str, setup: Callable[[Path], None]
) -> None:
    ini = standard_project(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    target = folder / name
    setup(target)
    extra = {"upgrade": [], "downgrade": [REV_A], "stamp": [REV_B]}[command]
    result = _explore(tmp_path, shim, ini, folder, target, [command, str(target), *extra])
    print(result.summary())
    assert result.losses == [], result.summary()
    assert result.verdicts.get("old", 0) > 0 and result.verdicts.get("new", 0) > 0
    assert result.states >= 30  # the log gave the replay real work


def _explore(
    tmp_path: Path, shim: Path, ini: Path, folder: Path, target: Path, argv: list[str]
) -> powercut.Exploration:
    before = powercut.snapshot(folder)
    old = target.read_bytes()
    ops, proc = powercut.record(
        ["-m", "ckptmigrate", "-c", str(ini), *argv], folder, tmp_path, shim
    )
    assert proc.returncode == 0, proc.stderr
    new = target.read_bytes()
    assert new != old
    verdict = _single_file_verdict(target, old, new)
    return powercut.explore(ops, before, folder, verdict)


def test_no_fsync_can_lose_the_checkpoint_as_documented(tmp_path: Path, shim: Path) -> None:
    """In place with --no-fsync, the switch can reach the disk before the new data."""
    ini = standard_project(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    target = folder / "model.pt"
    _torch_at_a(target)
    result = _explore(tmp_path, shim, ini, folder, target, ["upgrade", str(target), "--no-fsync"])
    print(result.summary())
    assert result.verdicts.get("damaged", 0) > 0, result.summary()
    assert any("rename" in loss for loss in result.losses), result.losses


def test_sharded_index_switch_survives_every_power_cut(tmp_path: Path, shim: Path) -> None:
    ini = standard_project(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    from safetensors.torch import save_file

    weights = _weights()
    keys = list(weights)
    shards = {
        "model-00001-of-00002.safetensors": keys[:3],
        "model-00002-of-00002.safetensors": keys[3:],
    }
    for shard, names in shards.items():
        save_file({k: weights[k] for k in names}, folder / shard, metadata={"format": "pt"})
    index = {
        "metadata": {"ckptmigrate.revision": REV_A},
        "weight_map": {k: shard for shard, names in shards.items() for k in names},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    before = powercut.snapshot(folder)
    ops, proc = powercut.record(
        ["-m", "ckptmigrate", "-c", str(ini), "upgrade", str(folder)], folder, tmp_path, shim
    )
    assert proc.returncode == 0, proc.stderr
    after = powercut.snapshot(folder)
    index_key = str((folder / "model.safetensors.index.json").resolve())

    def version(get: Callable[[str], bytes | None], files: dict[str, bytes]) -> bool:
        raw = get(index_key)
        if raw != files[index_key]:
            return False
        wanted = set(json.loads(raw)["weight_map"].values())
        return all(get(str(folder / s)) == files[str(folder / s)] for s in wanted)

    def verdict(get: Callable[[str], bytes | None]) -> str:
        return "old" if version(get, before) else "new" if version(get, after) else "damaged"

    result = powercut.explore(ops, before, folder, verdict)
    print(result.summary())
    assert result.losses == [], result.summary()
    assert result.verdicts.get("old", 0) > 0 and result.verdicts.get("new", 0) > 0


RENAMES_ONLY = """\
    op.rename_key("w0", "renamed0")
    op.drop_key("w5")"""


@pytest.mark.parametrize("chain", ["renames only", "tensors changed"])
def test_dcp_metadata_switch_survives_every_power_cut(
    chain: str, tmp_path: Path, shim: Path
) -> None:
    """A DCP folder: new data files (for changed tensors), then .metadata switched last."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp
    from tests.harness.common import write_project

    upgrade = RENAMES_ONLY if chain == "renames only" else UPGRADE_B
    ini = write_project(
        tmp_path, [(REV_A, None, "    pass", "    pass"), (REV_B, REV_A, upgrade, "    pass")]
    )
    folder = tmp_path / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saved by one process, no process group
        dcp.save(dict(_weights()), checkpoint_id=str(folder))
    from click.testing import CliRunner

    from ckptmigrate.cli import cli

    stamped = CliRunner().invoke(cli, ["-q", "-c", str(ini), "stamp", str(folder), REV_A])
    assert stamped.exit_code == 0, stamped.output
    before = powercut.snapshot(folder)
    ops, proc = powercut.record(
        ["-m", "ckptmigrate", "-c", str(ini), "upgrade", str(folder)], folder, tmp_path, shim
    )
    assert proc.returncode == 0, proc.stderr
    after = powercut.snapshot(folder)
    meta_key = str((folder / ".metadata").resolve())
    if chain == "renames only":  # not one data file written
        assert {k: v for k, v in after.items() if k != meta_key} == {
            k: v for k, v in before.items() if k != meta_key
        }
    else:
        assert set(after) - set(before), "the tensor chain wrote new data files"

    def referenced(files: dict[str, bytes]) -> set[str]:
        md = pickle.loads(files[meta_key])  # the test's own clean files
        return {str(folder.resolve() / i.relative_path) for i in md.storage_data.values()}

    wanted = {"old": referenced(before), "new": referenced(after)}

    def version(get: Callable[[str], bytes | None], files: dict[str, bytes], name: str) -> bool:
        if get(meta_key) != files[meta_key]:
            return False
        return all(get(f) == files[f] for f in wanted[name] if f != meta_key)

    def verdict(get: Callable[[str], bytes | None]) -> str:
        if version(get, before, "old"):
            return "old"
        return "new" if version(get, after, "new") else "damaged"

    result = powercut.explore(ops, before, folder, verdict)
    print(result.summary())
    assert result.losses == [], result.summary()
    assert result.verdicts.get("old", 0) > 0 and result.verdicts.get("new", 0) > 0
    assert result.states >= (3 if chain == "renames only" else 10)
