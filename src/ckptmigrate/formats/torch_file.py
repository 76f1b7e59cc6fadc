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
from ..plan.nodes import TensorSpec
from .checkpoint import (
    Checkpoint,
    locate_state_dict,
    replace_at,
    strip_metadata_prefix,
    wrapper_prefix,
)
from .stamp import read_stamp

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


def load_object(path: Path, *, trust_pickle: bool = False) -> tuple[Any, bool]:
    """``torch.load`` it safely; returns (object, is_legacy_format)."""
    legacy = not zipfile.is_zipfile(path)
    where = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(
                path,
                map_location="cpu",
                weights_only=not trust_pickle,
                mmap=not legacy,
            )
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
    except MemoryError as exc:
        raise _damaged(where, exc) from exc
    except Exception as exc:
        raise _damaged(where, exc) from exc
    return obj, legacy


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
    obj, legacy = load_object(path, trust_pickle=trust_pickle)
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
        return _sd[_p + key]

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
    )


def build_state_dict(
    keys: list[str],
    produce: Callable[[str], Any],
    metadata: Mapping[str, Mapping[str, Any]],
) -> OrderedDict[str, Any]:
    """An ordinary state dict whose ``_metadata`` carries module versions and stamps."""
    sd: OrderedDict[str, Any] = OrderedDict((k, produce(k)) for k in keys)
    meta: OrderedDict[str, dict[str, Any]] = OrderedDict(
        (name, dict(m)) for name, m in metadata.items() if m or name == ""
    )
    if "" in meta:
        meta.move_to_end("", last=False)
        if not meta[""] and len(meta) == 1:
            meta.clear()
    sd._metadata = meta  # type: ignore[attr-defined]
    return sd


def write_torch(
    target: Path,
    source: Checkpoint | None,
    keys: list[str],
    produce: Callable[[str], Any],
    metadata: Mapping[str, Mapping[str, Any]],
    container: Any = None,
) -> None:
    """Write the state dict (back into its container) to ``target``."""
    sd = build_state_dict(keys, produce, metadata)
    obj: Any = sd
    if source is not None and source.format == "torch":
        base = container if container is not None else source.container
        obj = replace_at(base, source.state_path, sd)
    torch.save(obj, str(target))
