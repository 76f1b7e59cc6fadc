"""What a Hugging Face model folder holds beside its weights.

``config.json`` (which ``from_pretrained`` needs to build the model, and which
also carries a ckptmigrate stamp under ``"ckptmigrate"``: ``save_pretrained``
of a versioned class writes it there), ``generation_config.json``, tokenizer
files, a model card. A folder output of a migration is a loadable model
folder: those files are copied into a new folder, and the stamp in
``config.json`` is kept equal to the weights' own.

Importing this module does not import torch.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, WriteError
from .stamp import flatten_stamps, is_stamp_key, stamp_entries

if TYPE_CHECKING:
    from .storage import CkptPath

CONFIG_NAME = "config.json"
#: The entry of ``config.json`` that holds the stamp (flat ``ckptmigrate.*`` entries).
CONFIG_STAMP = "ckptmigrate"
#: Files that are weights (of this or another layout), never copied beside new ones.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.index.json", "*.pt", "*.pth")


def _config(folder: CkptPath) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, CheckpointError):  # none (a store says so by an error)
        return None
    return data if isinstance(data, dict) else None


def config_stamps(folder: CkptPath) -> dict[str, dict[str, Any]]:
    """The stamps ``config.json`` records, by module (empty when it has none)."""
    data = _config(folder)
    entries = data.get(CONFIG_STAMP) if data is not None else None
    if not isinstance(entries, dict):
        return {}
    return stamp_entries({str(k): str(v) for k, v in entries.items()})


def with_config_stamps(
    metadata: Mapping[str, Mapping[str, Any]], folder: CkptPath
) -> dict[str, dict[str, Any]]:
    """The weights' metadata, with ``config.json``'s stamp for modules whose weights have none."""
    out = {k: dict(v) for k, v in metadata.items()}
    for module, entries in config_stamps(folder).items():
        if not any(is_stamp_key(k) for k in out.get(module, {})):
            out.setdefault(module, {}).update(entries)
    return out


def write_config_stamp(
    folder: Path, metadata: Mapping[str, Mapping[str, Any]], *, durable: bool
) -> None:
    """Make ``config.json``'s stamp the weights' (``metadata``'s); no config, nothing to do."""
    from .atomic import atomic_output

    data = _config(folder)
    if data is None:
        return
    stamps = flatten_stamps(metadata)
    if stamps:
        data[CONFIG_STAMP] = stamps
    elif CONFIG_STAMP in data:
        del data[CONFIG_STAMP]
    else:
        return
    with atomic_output(folder / CONFIG_NAME, durable=durable) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_weights(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_PATTERNS)


def companions(folder: Path, skip: Iterable[str] = ()) -> list[Path]:
    """The files beside the weights that a copy of the model folder needs."""
    skipped = set(skip)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in skipped
        and not is_weights(p.name)
    )


def copy_companions(source: Path, target: Path, skip: Iterable[str] = ()) -> None:
    """Copy ``source``'s non-weight files into the (new) folder ``target``."""
    if source.resolve() == target.resolve():
        return
    for path in companions(source, skip):
        try:
            shutil.copy2(path, target / path.name)
        except OSError as exc:
            raise WriteError(
                f"cannot copy {path.name} into {target}: {exc.strerror or exc}",
                hint="choose another place with -o; the input is unchanged",
            ) from exc


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(
            f"cannot create the folder {folder}: {exc.strerror or exc}",
            hint="choose another place with -o; the input is unchanged",
        ) from exc
