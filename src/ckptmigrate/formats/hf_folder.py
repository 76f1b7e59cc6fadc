"""A Hugging Face model folder with one weights file: ``model.safetensors`` (or ``.bin``), no index.

What ``save_pretrained`` writes for a model below its shard size. It upgrades
like a sharded folder: ``ckptmigrate upgrade DIR`` rewrites the weights file
in place (atomically, through its own format), ``-o NEWDIR`` writes a new
folder that loads with ``from_pretrained`` (``config.json`` and the other
files beside the weights are copied), and the stamp is the weights file's
own, kept in ``config.json`` too (``save_pretrained`` of a versioned class
records it only there). ``-o out.safetensors`` writes the weights alone.

Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..errors import CheckpointError, WriteError
from .base import FileFormat, Format, ReadOptions, WriteOptions, formats, register
from .checkpoint import Checkpoint
from .hub_layout import copy_companions, make_folder, with_config_stamps, write_config_stamp
from .probe import index_path
from .stamp import read_stamp
from .storage import local_only

if TYPE_CHECKING:
    from ..plan.state import PlanState
    from .remote import RemotePath
    from .storage import CkptPath

P = TypeVar("P", bound="Path | RemotePath")

#: The weights file of a model folder, in the order ``from_pretrained`` prefers them.
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")


def weights_file(folder: P) -> P | None:
    """The folder's single weights file; None for a file, a sharded folder, or no weights."""
    if not folder.is_dir() or index_path(folder) is not None:
        return None
    return next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)  # type: ignore[return-value]


@dataclass(kw_only=True)
class ModelFolderCheckpoint(Checkpoint):
    """The folder, read through its weights file (``weights``)."""

    weights: Checkpoint


class ModelFolderFormat:
    """A folder with ``config.json`` and one weights file; stays a folder wherever it goes."""

    name: ClassVar[str] = "Hugging Face model folder"
    suffixes: ClassVar[tuple[str, ...]] = ()
    holds_only_tensors: ClassVar[bool] = True
    keeps_wrapper_prefix: ClassVar[bool] = False

    def recognise(self, path: CkptPath, head: bytes) -> bool:
        if head:
            return False  # a file with content: no folder (and no request to a store)
        # config.json makes it a model folder; a folder that merely holds a weights file
        # (among others) is a directory of checkpoints, each its own
        return (path / "config.json").is_file() and weights_file(path) is not None

    def accepts_output(self, target: CkptPath, source: Format | None) -> bool:
        if source is not self:
            return False
        return not any(target.suffix.lower() in f.suffixes for f in formats() if f is not self)

    def open(self, path: CkptPath, options: ReadOptions) -> Checkpoint:
        from . import open_checkpoint

        found = weights_file(path)
        assert found is not None
        weights = open_checkpoint(found, options)
        metadata = with_config_stamps(weights.metadata, path)
        return ModelFolderCheckpoint(
            path=path,
            format=FORMAT,
            schema=weights.schema,
            metadata=metadata,
            stamp=read_stamp(metadata.get(""), str(path)),
            reader=weights.reader,
            close=weights.close,
            training=weights.training,
            wrapper_prefix=weights.wrapper_prefix,
            weights=weights,
        )

    def check_target(self, target: CkptPath) -> None:
        target = local_only(target, "Hugging Face model folders")
        if target.is_file():
            raise WriteError(
                f"cannot write a model folder to {target}: it is a file",
                hint="give a folder with -o (or a .safetensors path for the weights alone)",
            )
        if target.is_dir() and index_path(target) is not None:
            raise WriteError(
                f"cannot write a model folder into {target}: it holds a sharded checkpoint",
                hint="give a new folder with -o",
            )

    def write(
        self,
        target: CkptPath,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        """The weights file (atomically, verified), then the companions and config's stamp."""
        assert isinstance(source, ModelFolderCheckpoint)
        weights = source.weights
        fmt = weights.format
        if not isinstance(fmt, FileFormat):  # pragma: no cover - a folder holds one file
            raise CheckpointError(f"{weights.path}: its format cannot be written")
        target = local_only(target, "Hugging Face model folders")
        make_folder(target)
        focused = dataclasses.replace(weights, key_prefix=source.key_prefix)
        fmt.write(target / weights.path.name, focused, full, metadata, options)
        copy_companions(local_only(source.path, "Hugging Face model folders"), target)
        write_config_stamp(target, metadata, durable=options.durable)

    def lock_path(self, path: CkptPath) -> CkptPath:
        return weights_file(path) or path


FORMAT = register(ModelFolderFormat())
