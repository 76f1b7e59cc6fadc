"""The formats seam: a format is one module that registers itself; nothing else changes.

A throwaway format (a JSON file of nested lists, defined here, in the test
module) is registered, and the CLI upgrades, identifies, downgrades and
converts its files end to end, like any built-in format's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from tests.conftest import Run, write_revision

from ckptmigrate.formats import (
    Checkpoint,
    FileFormat,
    ReadOptions,
    WriteOptions,
    formats,
    lock_path,
    read_checkpoint,
    register,
    unregister,
)
from ckptmigrate.formats.stamp import read_stamp
from ckptmigrate.plan.nodes import TensorSpec
from ckptmigrate.plan.state import Evaluator, PlanState

REV0, REV1 = "base00000001", "next00000002"
_MAGIC = b'{"toy-lists"'

#: The built-in formats, in the order they are asked.
BUILT_IN = [
    "peft",
    "Hugging Face Trainer checkpoint",
    "sharded",
    "Hugging Face model folder",
    "DCP",
    "safetensors",
    "torch",
]


class ToyFormat(FileFormat):
    """Tensors as nested JSON lists, per-module metadata (the stamp) as a JSON object."""

    name: ClassVar[str] = "toy"
    suffixes: ClassVar[tuple[str, ...]] = (".toy",)

    def recognise(self, path: Path, head: bytes) -> bool:
        return head.startswith(_MAGIC)

    def open(self, path: Path, options: ReadOptions) -> Checkpoint:
        doc = json.loads(path.read_text())
        tensors = doc["tensors"]
        dtype = {"float32": torch.float32, "int64": torch.int64}
        schema: dict[str, TensorSpec | None] = {
            k: TensorSpec(tuple(t["shape"]), dtype[t["dtype"]]) for k, t in tensors.items()
        }

        def reader(key: str) -> torch.Tensor:
            spec = schema[key]
            assert spec is not None
            return torch.tensor(tensors[key]["data"], dtype=spec.dtype).reshape(spec.shape)

        metadata = doc["metadata"]
        return Checkpoint(
            path=path,
            format=self,
            schema=schema,
            metadata=metadata,
            stamp=read_stamp(metadata.get(""), str(path)),
            reader=reader,
        )

    def write_file(
        self,
        path: Path,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        produce = Evaluator(full.entries, source.read)
        tensors = {}
        for key in full.entries:
            value = produce(key)
            tensors[key] = {
                "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape),
                "data": value.tolist(),
            }
        doc = {"toy-lists": 1, "metadata": {k: dict(v) for k, v in metadata.items()}}
        path.write_text(json.dumps({**doc, "tensors": tensors}))


def write_toy(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    body = {
        k: {"dtype": "float32", "shape": list(v.shape), "data": v.tolist()}
        for k, v in tensors.items()
    }
    path.write_text(json.dumps({"toy-lists": 1, "metadata": {}, "tensors": body}))


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The toy format registered, and a lineage: rename a -> b, add c (ones)."""
    fmt = register(ToyFormat())
    monkeypatch.chdir(tmp_path)
    versions = tmp_path / "mig" / "versions"
    write_revision(versions, REV0, None)
    write_revision(
        versions,
        REV1,
        REV0,
        'op.rename_key("a", "b"); op.add_tensor("c", (2,), init="ones")',
        'op.drop_key("c"); op.rename_key("b", "a")',
    )
    (tmp_path / "alembic_style.ini").write_text("[ckptmigrate]\nscript_location = %(here)s/mig\n")
    try:
        yield tmp_path
    finally:
        unregister(fmt)


A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])


def test_a_registered_format_upgrades_end_to_end(toy: Path, run: Run) -> None:
    write_toy(toy / "model.toy", {"a": A})
    err = run("upgrade", "model.toy", "--from", REV0).stderr
    assert f"Running upgrade {REV0} -> {REV1}" in err
    doc = json.loads((toy / "model.toy").read_text())
    assert list(doc["tensors"]) == ["b", "c"]
    assert doc["tensors"]["b"]["data"] == A.tolist()
    assert doc["tensors"]["c"]["data"] == [1.0, 1.0]
    assert doc["metadata"][""]["ckptmigrate.revision"] == REV1
    assert run("current", "model.toy").stdout == f"{REV1} (head)\n"
    assert run("upgrade", "model.toy").stderr.startswith("Nothing to upgrade")


def test_a_registered_format_converts_both_ways(toy: Path, run: Run) -> None:
    write_toy(toy / "model.toy", {"a": A})
    run("upgrade", "model.toy", "--from", REV0)
    run("downgrade", "model.toy", REV0, "-o", "old.pt")
    old = torch.load(toy / "old.pt", weights_only=True)
    assert list(old) == ["a"] and torch.equal(old["a"], A)
    run("upgrade", "old.pt", "-o", "again.toy")
    again = read_checkpoint(toy / "again.toy")
    assert again.format.name == "toy"
    assert again.stamp is not None and again.stamp.revisions == (REV1,)
    assert torch.equal(again.read("b"), A) and torch.equal(again.read("c"), torch.ones(2))


def test_capabilities_are_asked_of_the_output_format(toy: Path, run: Run) -> None:
    """A toy file holds only tensors (FileFormat's default): a training container is refused."""
    torch.save({"state_dict": {"a": A}, "epoch": 3}, toy / "train.pt")
    err = run("upgrade", "train.pt", "--from", REV0, "-o", "out.toy", code=1).stderr
    assert err.splitlines()[-1] == (
        "Error: out.toy: a toy file holds only tensors, but train.pt is a training checkpoint "
        "with other entries ('epoch'); write a .pt output, or save the state dict alone first"
    )
    assert not (toy / "out.toy").exists()


class _Clash(ToyFormat):
    name: ClassVar[str] = "torch"


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="'torch' is registered already"):
        register(_Clash())
    assert [f.name for f in formats()] == BUILT_IN


@pytest.mark.parametrize(
    "first",
    ["torch_file", "safetensors_file", "sharded", "hf_folder", "hf_trainer", "peft", "dcp"],
)
def test_built_in_order_does_not_depend_on_which_module_is_imported_first(
    tmp_path: Path, first: str
) -> None:
    """A torch zip named ``.safetensors`` is the safetensors reader's to refuse, always."""
    torch.save({"w": torch.ones(2)}, tmp_path / "renamed.safetensors")
    code = (
        f"import ckptmigrate.formats.{first}\n"
        "from ckptmigrate import formats\n"
        "from ckptmigrate.errors import CheckpointError\n"
        "print([f.name for f in formats.formats()])\n"
        "try:\n"
        f"    formats.read_checkpoint({str(tmp_path / 'renamed.safetensors')!r})\n"
        "except CheckpointError as exc:\n"
        "    print(exc.message)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out[0] == str(BUILT_IN)
    assert "renamed.safetensors is not a valid safetensors file" in out[1]


def test_recognising_paths_imports_no_torch(tmp_path: Path) -> None:
    """The registry loads every built-in format to recognise a path: none may need torch."""
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    code = (
        "import sys\n"
        "from ckptmigrate import formats\n"
        "from ckptmigrate.errors import CheckpointError\n"
        "names = [f.name for f in formats.formats()]\n"
        "try:\n"
        f"    formats.read_checkpoint({str(tmp_path / 'notes.txt')!r})\n"
        "except CheckpointError as exc:\n"
        "    print(exc.message)\n"
        "print(names, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out[0].endswith("notes.txt is not a checkpoint (it looks like text)")
    assert out[1] == f"{BUILT_IN} False"


def test_a_sharded_folder_is_locked_at_its_index(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert lock_path(folder) == folder / "model.safetensors.index.json"
    assert lock_path(tmp_path / "model.pt") == tmp_path / "model.pt"  # need not exist
