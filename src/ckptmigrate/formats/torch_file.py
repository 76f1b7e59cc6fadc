"""PyTorch ``torch.save`` files (.pt/.pth/.bin/.ckpt).

Checkpoints are untrusted: they are loaded with ``weights_only=True`` (only
tensors and plain containers can come out of the pickle) and memory-mapped,
so reading a stamp or a schema touches no tensor data. Arbitrary pickles are
loaded only when the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from ..plan.nodes import Node, Source, TensorSpec
from . import torch_zip
from .checkpoint import (
    Checkpoint,
    locate_state_dict,
    replace_at,
    strip_metadata_prefix,
    wrapper_prefix,
)
from .stamp import read_stamp
from .torch_zip import ZipSource

# What the weights-only unpickler says when a pickle asks for code (as
# opposed to bytes that are not a pickle at all).
_UNSAFE_MARKERS = ("Unsupported global", "GLOBAL ", "unrecognized function", "Unsupported class")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|global[^\w]+([\w.]+)", re.IGNORECASE)


def _unsafe_global(message: str) -> str | None:
    for match in _GLOBAL.finditer(message):
        name = match.group(1) or match.group(2)
        if name and "." in name:
            return name
    return None


def load_object(path: Path, *, trust_pickle: bool = False) -> tuple[Any, bool, ZipSource | None]:
    """Load it safely: (object, is_legacy_format, the zip index when read lazily)."""
    legacy = not zipfile.is_zipfile(path)
    where = str(path)
    try:
        if not legacy:
            try:
                obj, source = torch_zip.load(path, trust_pickle=trust_pickle)
                return obj, False, source
            except torch_zip._NeedsTorchLoad:
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(
                path, map_location="cpu", weights_only=not trust_pickle, mmap=not legacy
            )
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if any(marker in text for marker in _UNSAFE_MARKERS):
            name = _unsafe_global(text)
            what = f"the global {name}" if name else "objects outside the weights-only allow-list"
            raise UnsafeCheckpointError(
                f"refusing to load {where}: its pickle needs {what}, which could run "
                "arbitrary code",
                hint="if you trust the file's origin, pass --trust-pickle",
            ) from exc
        raise _damaged(where, exc) from exc
    except RecursionError as exc:
        raise _damaged(where, exc) from exc
    except Exception as exc:  # MemoryError, RuntimeError, EOFError, ... from a damaged file
        raise _damaged(where, exc) from exc
    return obj, legacy, None


def _damaged(where: str, exc: BaseException) -> CheckpointError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"\s+", " ", first)[:200]
    return CheckpointError(
        f"{where} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first})",
        hint="the file may be truncated or damaged; check it was copied completely",
    )


def read_torch(
    path: Path, *, trust_pickle: bool = False, state_dict_key: str | None = None
) -> Checkpoint:
    obj, legacy, source = load_object(path, trust_pickle=trust_pickle)
    state_path, sd = locate_state_dict(obj, state_dict_key, str(path))
    prefix = wrapper_prefix(list(sd))
    metadata = strip_metadata_prefix(getattr(sd, "_metadata", None), prefix)
    schema: dict[str, TensorSpec | None] = {}
    for raw_key, value in sd.items():
        schema[raw_key[len(prefix) :]] = (
            TensorSpec.of(value) if isinstance(value, torch.Tensor) else None
        )
    stamp = read_stamp(metadata.get(""), str(path))

    def reader(key: str, _sd: Mapping[str, Any] = sd, _p: str = prefix) -> Any:
        value = _sd[_p + key]
        if source is not None and isinstance(value, torch.Tensor):
            source.check_storage(value.untyped_storage())  # damaged bytes never flow on
        return value

    return Checkpoint(
        path=path,
        format="torch",
        schema=schema,
        metadata=metadata,
        stamp=stamp,
        reader=reader,
        container=obj,
        state_path=state_path,
        wrapper_prefix=prefix,
        legacy=legacy,
        zip_source=source,
    )


def build_metadata(metadata: Mapping[str, Mapping[str, Any]]) -> OrderedDict[str, dict[str, Any]]:
    """``_metadata`` as PyTorch writes it: module versions and stamps, root first."""
    meta: OrderedDict[str, dict[str, Any]] = OrderedDict(
        (name, dict(m)) for name, m in metadata.items() if m or name == ""
    )
    if "" in meta:
        meta.move_to_end("", last=False)
        if not meta[""] and len(meta) == 1:
            meta.clear()
    return meta


def write_torch(
    target: Path,
    source: Checkpoint | None,
    entries: Mapping[str, Node],
    produce: Callable[[str], Any],
    metadata: Mapping[str, Mapping[str, Any]],
    container: Any = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the state dict (back into its container) to ``target``, streaming.

    Entries that are input tensors are written by copying their bytes from the
    input file; the others are computed one at a time by ``produce``.
    """

    def value(key: str, node: Node) -> Any:
        if isinstance(node, Source) and source is not None:
            return source.read(node.key)
        if node.spec is None:
            return produce(key)
        return torch_zip.PlannedTensor(key, node.spec)

    sd: OrderedDict[str, Any] = OrderedDict((k, value(k, n)) for k, n in entries.items())
    sd._metadata = build_metadata(metadata)  # type: ignore[attr-defined]
    obj: Any = sd
    if source is not None and source.format == "torch":
        base = container if container is not None else source.container
        obj = replace_at(base, source.state_path, sd)
    torch_zip.write(target, obj, source.zip_source if source else None, produce, progress)
