"""PyTorch Distributed Checkpoint (DCP) folders: ``.metadata`` and ``*.distcp`` data files.

A folder ``dcp.save`` wrote is recognised by its ``.metadata`` (the folder,
or the ``.metadata`` file itself, may be given). Reading (:mod:`.reading`)
unpickles ``.metadata`` under an allow-list (:mod:`.metadata`) and reads no
data; tensors are assembled from their chunks only when a migration
computes from them (:mod:`.store`). Writing (:mod:`.writing`) keeps every
entry a migration does not change where it is, writes the changed tensors
into new data files beside the old ones with their chunk layout, and then
replaces ``.metadata`` in one atomic step: a chain of renames and drops
rewrites ``.metadata`` alone. Data files nothing references any more are
removed after that switch. A folder on a store (an fsspec URL) works the
same way: ranged reads, data files as uploads, ``.metadata`` switched by one
conditional write.

Also recognised, to be refused with what to do instead: folders saved
without collectives (one ``__<rank>.metadata`` per rank) and Hugging Face
safetensors folders saved per rank (``HuggingFaceStorageWriter(
save_distributed=True)``) without an index. A rank-0 ``HuggingFaceStorageWriter``
folder has ``model.safetensors.index.json`` and is a sharded checkpoint.

Importing this package does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ...errors import CheckpointError, WriteError
from ..base import Format, ReadOptions, WriteOptions, formats, register
from .metadata import METADATA_NAME

if TYPE_CHECKING:
    from ...plan.state import PlanState
    from ..checkpoint import Checkpoint
    from ..remote import RemotePath
    from ..storage import CkptPath

P = TypeVar("P", bound="Path | RemotePath")

#: Data files this package writes (``ckptmigrate-<tag>-<n>.distcp``); others keep DCP's names.
OWN_PREFIX = "ckptmigrate-"
DATA_SUFFIX = ".distcp"


def folder_of(path: P) -> P:
    """The checkpoint folder a path names (the folder itself, or its ``.metadata``)."""
    return path.parent if path.name == METADATA_NAME else path  # type: ignore[return-value]


def _refusal(folder: CkptPath) -> CheckpointError | None:
    """A DCP layout ckptmigrate does not migrate, and what to do instead (None: not one)."""
    if not folder.is_dir() or (folder / METADATA_NAME).exists():
        return None
    if any(folder.glob("__*.metadata")):
        return CheckpointError(
            f"{folder} is a DCP checkpoint saved without collectives (one __<rank>.metadata "
            "per rank, no global .metadata)",
            hint="save it with the default dcp.save (collectives on), which writes one "
            ".metadata for every rank's data; ckptmigrate migrates that",
        )
    if any(folder.glob("shard-*-model-*.safetensors")):
        return CheckpointError(
            f"{folder} is a DCP safetensors checkpoint saved per rank "
            "(HuggingFaceStorageWriter(save_distributed=True)) without an index",
            hint="consolidate it first (HuggingFaceStorageWriter(..., enable_consolidation=True), "
            "or torch.distributed.checkpoint._consolidate_hf_safetensors."
            "consolidate_safetensors_files): the consolidated folder has "
            "model.safetensors.index.json, and ckptmigrate migrates it as a sharded checkpoint",
        )
    return None


def _is_output_folder(target: CkptPath) -> bool:
    """An existing folder a DCP checkpoint may be written into (new, empty, or one already)."""
    if not target.is_dir():
        return False
    return (target / METADATA_NAME).exists() or all(_leftover(p.name) for p in target.iterdir())


def _leftover(name: str) -> bool:
    """A file an interrupted ckptmigrate write into the folder left (removed on the next write)."""
    return (name.startswith(OWN_PREFIX) and name.endswith(DATA_SUFFIX)) or name.endswith(
        ".ckptmigrate-tmp"
    )


class DCPFormat:
    """A ``torch.distributed.checkpoint`` folder; the output of a DCP input unless a suffix says."""

    name: ClassVar[str] = "DCP"
    suffixes: ClassVar[tuple[str, ...]] = ()
    holds_only_tensors: ClassVar[bool] = False
    keeps_wrapper_prefix: ClassVar[bool] = False

    def recognise(self, path: CkptPath, head: bytes) -> bool:
        if head and path.name != METADATA_NAME:
            return False  # a file with content: no folder (and no request to a store)
        folder = folder_of(path)
        if not isinstance(folder, Path):  # on a store: recognised, then refused on open
            return (folder / METADATA_NAME).is_file()
        return (folder / METADATA_NAME).is_file() or _refusal(folder) is not None

    def accepts_output(self, target: CkptPath, source: Format | None) -> bool:
        suffix = target.suffix.lower()
        if any(suffix in f.suffixes for f in formats() if f is not self):
            return False  # -o names a file format (an existing folder of that name is an error)
        if source is self:  # a DCP checkpoint stays one
            return True
        # another checkpoint converted into a folder that is empty (or a DCP checkpoint)
        return source is not None and _is_output_folder(folder_of(target))

    def open(self, path: CkptPath, options: ReadOptions) -> Checkpoint:
        from .reading import read_dcp

        folder = folder_of(path)
        refused = _refusal(folder)
        if refused is not None:
            raise refused
        return read_dcp(
            folder, trust_pickle=options.trust_pickle, state_dict_key=options.state_dict_key
        )

    def check_target(self, target: CkptPath) -> None:
        folder = folder_of(target)
        if folder.exists() and not folder.is_dir():
            raise WriteError(
                f"cannot write a DCP checkpoint to {folder}: it is a file",
                hint="give a folder with -o (or a file name with .pt or .safetensors to convert)",
            )
        if folder.is_dir() and not _is_output_folder(folder):
            raise WriteError(
                f"cannot write a DCP checkpoint into {folder}: the folder holds other files",
                hint="give a new or empty folder with -o, or an existing DCP checkpoint's folder",
            )
        if not isinstance(folder, Path):
            return  # a store has no folders to create first
        parent = folder.parent if str(folder.parent) else Path(".")
        if not folder.exists() and not parent.is_dir():
            raise WriteError(
                f"cannot write {folder}: folder {parent} does not exist",
                hint="create it first or choose another -o path",
            )

    def write(
        self,
        target: CkptPath,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        from .writing import write_dcp

        write_dcp(folder_of(target), source, full, metadata, options)

    def lock_path(self, path: CkptPath) -> CkptPath:
        return folder_of(path) / METADATA_NAME

    def recover(self, path: CkptPath) -> list[str]:
        """Remove the data files interrupted writes left (the lock on .metadata is held)."""
        from .writing import remove_leftovers

        return remove_leftovers(folder_of(path))


FORMAT = register(DCPFormat())
