"""PyTorch ``torch.save`` files (.pt/.pth/.bin/.ckpt).

Checkpoints are untrusted: they are loaded with ``weights_only=True`` (only
tensors and plain containers can come out of the pickle) and memory-mapped,
so reading a stamp or a schema touches no tensor data. Arbitrary pickles are
loaded only when the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import _compat_pickle
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
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _unsafe_global(message: str) -> str | None:
    """The global a refused pickle asked for, as Python 3 would resolve it.

    PyTorch names builtins without their module (``GLOBAL eval``), and a
    protocol-2 pickle spells some modules the Python 2 way (``commands.Popen``
    is what ``subprocess.Popen`` becomes), so both are mapped back.
    """
    match = _GLOBAL.search(message)
    if match is None:
        return None
    module, _, name = match.group(1).rpartition(".")
    if not module:
        return f"builtins.{name}"
    module, name = _compat_pickle.NAME_MAPPING.get(
        (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    )
    return f"{module}.{name}"


def load_object(
    path: Path, *, trust_pickle: bool = False, opaque: bool = False
) -> tuple[Any, bool, ZipSource | None]:
    """Load it safely: (object, is_legacy_format, the zip index when read lazily).

    ``opaque`` (zip files only) turns objects outside the allow-list into inert
    stand-ins instead of refusing them; nothing from the file runs.
    """
    try:
        legacy = not zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # a zip whose end records are damaged (is_zipfile can raise)
        legacy = False  # the zip reader says what is wrong with it
    if legacy:
        with open(path, "rb") as fh:
            # a zip that lost its end (truncated) is still a zip, not a legacy pickle
            legacy = fh.read(4) != b"PK\x03\x04"
    where = str(path)
    try:
        if not legacy:
            try:
                obj, source = torch_zip.load(path, trust_pickle=trust_pickle, opaque=opaque)
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
    except ModuleNotFoundError as exc:  # only a trusted pickle imports anything
        raise CheckpointError(
            f"{where}: its pickle needs the module {exc.name!r}, which cannot be imported",
            hint="add the folder that holds it to prepend_sys_path in the configuration, "
            "or install its package",
        ) from exc
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
    path: Path,
    *,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
    opaque: bool = False,
) -> Checkpoint:
    obj, legacy, source = load_object(path, trust_pickle=trust_pickle, opaque=opaque)
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


def check_carried(source: Checkpoint) -> None:
    """Verify the checksums of the input's records outside the state dict.

    The state dict's tensors are checked as the plan reads them. The rest of a
    training container (optimizer state, ...) is copied, or computed from: the
    training migration transposes Adam's moments along with their weights, and
    such a tensor would reach the output with a fresh, valid checksum. So its
    records are checked before anything is written (each record once).
    """
    zs = source.zip_source
    if zs is None or not source.state_path:
        return
    state_dict: Any = source.container
    for part in source.state_path:
        state_dict = state_dict[part]
    stack: list[Any] = [source.container]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is state_dict:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            zs.check_storage(obj.untyped_storage())
        elif isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)


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

    if source is not None:
        check_carried(source)
    sd: OrderedDict[str, Any] = OrderedDict((k, value(k, n)) for k, n in entries.items())
    sd._metadata = build_metadata(metadata)  # type: ignore[attr-defined]
    obj: Any = sd
    if source is not None and source.format == "torch":
        base = container if container is not None else source.container
        obj = replace_at(base, source.state_path, sd)
    torch_zip.write(target, obj, source.zip_source if source else None, produce, progress)
