"""PEFT adapter folders: ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).

The weights file is an ordinary safetensors or torch file, read and written
by its own format; the stamp lives in its metadata, as for a model. What an
adapter holds is described by :mod:`ckptmigrate.adapters` (``ckpt.adapter``),
so the commands migrate it along the base model's lineage rather than as a
model of its own.

The config and the weights must change together: PEFT reads the config to
build the adapter's modules and then loads the weights into them, so a new
config beside old weights (or the reverse) would load silently wrong. A
folder is therefore rewritten as a whole: the new folder is built beside it
(the other files hard-linked, not copied), checked, and swapped in with one
atomic exchange of the two names, so the folder is always the old one or the
new one. Killed meanwhile, the process leaves a hidden folder beside it that
the next write removes.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CheckpointError, CkptMigrateError, WriteError
from .atomic import TMP_SUFFIX, _exchange, _explain, clean_stale, temp_prefix
from .base import FileFormat, Format, ReadOptions, WriteOptions, register
from .checkpoint import Checkpoint
from .fileio import fsync_dir, fsync_file

if TYPE_CHECKING:
    from ..plan.state import PlanState

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# Which modules store their weight as [in, out] (Conv1D), where the adapter mixes
# storages: the config's one ``fan_in_fan_out`` cannot say it for square weights.
STORAGE_KEY = "ckptmigrate.fan_in_fan_out"


@dataclass(frozen=True)
class AdapterFiles:
    """What a migration writes beside the tensors: the config, and each module's storage."""

    config: Mapping[str, Any]
    storage: Mapping[str, bool]  # module -> fan_in_fan_out; empty where the config says it


def adapter_folder(path: Path) -> Path | None:
    """The adapter folder a path names: the folder itself, or one of its two files."""
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name not in (CONFIG_NAME, *WEIGHT_NAMES):
        return None
    if (folder / CONFIG_NAME).is_file() and any((folder / n).is_file() for n in WEIGHT_NAMES):
        return folder
    return None


@dataclass(kw_only=True)
class AdapterCheckpoint(Checkpoint):
    """An adapter folder: its weights file (as that file's own format reads it) and config."""

    weights: Checkpoint
    config: dict[str, Any]
    config_bytes: bytes = b""
    files: list[str] = field(default_factory=list)  # the folder's other entries

    def focus(self, prefix: str | None) -> Checkpoint:
        if prefix:
            raise CheckpointError(
                f"{self.path} is a PEFT adapter; --key-prefix / key_prefix does not apply to it",
                hint="the adapter's keys are its base model's, behind PEFT's own prefix",
            )
        return self


class PeftFormat:
    """A PEFT adapter folder; written only from an adapter, as a folder again."""

    name: ClassVar[str] = "peft"
    suffixes: ClassVar[tuple[str, ...]] = ()
    holds_only_tensors: ClassVar[bool] = True
    keeps_wrapper_prefix: ClassVar[bool] = False

    def recognise(self, path: Path, head: bytes) -> bool:
        return adapter_folder(path) is not None

    def accepts_output(self, target: Path, source: Format | None) -> bool:
        return source is self

    def open(self, path: Path, options: ReadOptions) -> Checkpoint:
        folder = adapter_folder(path)
        assert folder is not None
        return read_adapter(folder, options)

    def check_target(self, target: Path) -> None:
        out = _output_folder(target)
        if out.exists() and not out.is_dir():
            raise WriteError(
                f"cannot write a PEFT adapter to {target}: it is a file",
                hint="an adapter is a folder; give a folder path with -o",
            )
        if out.is_dir() and any(out.iterdir()) and adapter_folder(out) is None:
            raise WriteError(
                f"cannot write a PEFT adapter into {out}: the folder holds other files",
                hint="give a new or empty folder (or an adapter folder) with -o",
            )
        if not out.parent.is_dir():
            raise WriteError(
                f"cannot write {target}: folder {out.parent} does not exist",
                hint="create it first or choose another -o path",
            )

    def lock_path(self, path: Path) -> Path:
        folder = adapter_folder(path) if path.exists() else None
        return (folder or _output_folder(path)) / CONFIG_NAME

    def write(
        self,
        target: Path,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        assert isinstance(source, AdapterCheckpoint)
        files = options.container
        config = None
        if isinstance(files, AdapterFiles):
            config = dict(files.config)
            root = dict(metadata.get("", {}))
            root.pop(STORAGE_KEY, None)
            if files.storage:
                root[STORAGE_KEY] = json.dumps(dict(sorted(files.storage.items())))
            metadata = {**metadata, "": root}
        write_adapter(_output_folder(target), source, full, metadata, options, config)


def _output_folder(target: Path) -> Path:
    """``-o DIR`` and ``-o DIR/adapter_config.json`` (or its weights file) name the same folder."""
    return target.parent if target.name in (CONFIG_NAME, *WEIGHT_NAMES) else target


def _bad(folder: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{folder} is not a readable PEFT adapter: {what}",
        hint="it should hold adapter_config.json and adapter_model.safetensors as "
        "PeftModel.save_pretrained() writes them",
    )


def read_adapter(folder: Path, options: ReadOptions) -> AdapterCheckpoint:
    """Open the weights file lazily through its own format, and parse the config."""
    from ..adapters.layout import AdapterLayout

    config_path = folder / CONFIG_NAME
    try:
        raw = config_path.read_bytes()
        config = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(folder, f"{CONFIG_NAME} cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _bad(folder, f"{CONFIG_NAME} is not a JSON object")
    name = next(n for n in WEIGHT_NAMES if (folder / n).is_file())
    weights = _open_weights(folder / name, ReadOptions(trust_pickle=options.trust_pickle))
    try:
        if weights.training is not None or weights.wrapper_prefix:
            raise _bad(folder, f"{name} is not a plain state dict")
        storage = _storage(weights.metadata.get("", {}), folder, name)
        layout = AdapterLayout.parse(config, weights.schema, str(folder), storage)
    except BaseException:
        weights.close()
        raise
    files = sorted(p.name for p in folder.iterdir() if p.name not in (CONFIG_NAME, name))
    return AdapterCheckpoint(
        path=folder,
        format=FORMAT,
        schema=weights.schema,
        metadata=weights.metadata,
        stamp=weights.stamp,
        reader=weights.read,
        close=weights.close,
        adapter=layout,
        weights=weights,
        config=config,
        config_bytes=raw,
        files=files,
    )


def _storage(meta: Mapping[str, Any], folder: Path, name: str) -> dict[str, bool]:
    raw = meta.get(STORAGE_KEY)
    if raw is None:
        return {}
    try:
        storage = json.loads(str(raw))
    except ValueError:
        storage = None
    if not isinstance(storage, dict) or not all(isinstance(v, bool) for v in storage.values()):
        raise _bad(folder, f"{STORAGE_KEY} in {name}'s metadata is not a JSON map to booleans")
    return storage


def _open_weights(path: Path, options: ReadOptions) -> Checkpoint:
    """The weights file, opened by the format of its own kind (safetensors, torch)."""
    from . import probe
    from .base import formats

    head = probe.read_head(path)
    for fmt in formats():
        if fmt is not FORMAT and fmt.recognise(path, head):
            return fmt.open(path, options)
    raise probe.not_a_checkpoint(path, head)


# --------------------------------------------------------------------------- writing

_DIR_SUFFIX = ".ckptmigrate-dir" + TMP_SUFFIX


def write_adapter(
    folder: Path,
    source: AdapterCheckpoint,
    full: PlanState,
    metadata: Mapping[str, Mapping[str, Any]],
    options: WriteOptions,
    config: dict[str, Any] | None,
) -> None:
    """Build the new folder beside ``folder``, verify it, then swap it in atomically."""
    weights = source.weights
    fmt = weights.format
    assert isinstance(fmt, FileFormat)
    name = weights.path.name
    clean_stale(folder)
    try:
        prefix = temp_prefix(folder)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=_DIR_SUFFIX, dir=folder.parent))
    except OSError as exc:
        raise WriteError(
            f"cannot write in {folder.parent}: {_explain(exc)}",
            hint="choose a writable folder with -o; the input is unchanged",
        ) from exc
    try:
        try:
            os.chmod(tmp, _folder_mode(folder))
            in_place = folder.resolve() == source.path.resolve()
            _carry_others(source.path, source.files, tmp, link=in_place)
            inner = replace(options, container=None, progress=options.progress)
            fmt.write_file(tmp / name, weights, full, metadata, inner)
            text = source.config_bytes if config is None else _config_text(config)
            (tmp / CONFIG_NAME).write_bytes(text)
            if options.durable:
                fsync_file(tmp / name)
                fsync_file(tmp / CONFIG_NAME)
                fsync_dir(tmp)
        except CkptMigrateError:
            raise
        except OSError as exc:
            raise WriteError(
                f"cannot write {folder}: {_explain(exc)}",
                hint="free space or fix permissions; the input is unchanged",
            ) from exc
        if options.verify:
            _verify(tmp, name, fmt, full, metadata, folder)
        _switch(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if options.durable:
        fsync_dir(folder.parent)


def _folder_mode(folder: Path) -> int:
    """The mode the folder has, or a new folder's (mkdtemp's own is private to its owner)."""
    if folder.is_dir():
        return folder.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _config_text(config: Mapping[str, Any]) -> bytes:
    """JSON as PEFT's ``save_pretrained`` writes it (sorted keys, indented)."""
    return json.dumps(config, indent=2, sort_keys=True).encode("utf-8")


def _carry_others(folder: Path, names: list[str], into: Path, *, link: bool) -> None:
    """The folder's other files (model card, tokenizer, ...) in the new folder too.

    In place they are hard-linked (the old folder goes away); a copy elsewhere
    gets copies of its own.
    """
    copy = _link_or_copy if link else shutil.copy2
    for name in names:
        src = folder / name
        dst = into / name
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, copy_function=copy, symlinks=True)
        else:
            copy(str(src), str(dst))


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _verify(
    tmp: Path,
    name: str,
    fmt: FileFormat,
    full: PlanState,
    metadata: Mapping[str, Mapping[str, Any]],
    folder: Path,
) -> None:
    from .verify import verify_written

    written = fmt.open(tmp / name, ReadOptions())
    verify_written(written, folder, full, metadata, "")
    try:
        json.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # pragma: no cover - we just wrote it
        raise WriteError(f"{folder}: the new {CONFIG_NAME} cannot be read back ({exc})") from exc


def _switch(tmp: Path, folder: Path) -> None:
    """Put the folder ``tmp`` under ``folder``'s name in one step; the old one is removed."""
    try:
        if folder.exists():
            if not _exchange(tmp, folder):
                raise WriteError(
                    f"cannot replace {folder} atomically: this file system cannot exchange "
                    "two folders",
                    hint="write the migrated adapter to a new folder with -o",
                )
            shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now under tmp's name
        else:
            os.rename(tmp, folder)
    except OSError as exc:
        raise WriteError(
            f"cannot write {folder}: {_explain(exc)}",
            hint="free space or fix permissions; the input is unchanged",
        ) from exc


FORMAT = register(PeftFormat())
