"""PyTorch ``torch.save`` files (.pt/.pth/.bin/.ckpt/.tar, and legacy pre-1.6 pickles).

Checkpoints are untrusted: they are loaded under the unpickling policy
(:mod:`.unpickle`: only tensors and plain containers come out of the pickle
unless the caller passes ``trust_pickle=True``) and memory-mapped
(:mod:`.torch_save`), so reading a stamp or a schema touches no tensor data.
A torch file may be a training container; the weights are found in it
(:mod:`.container`) and everything else is written back untouched.

Importing this module does not import torch (the registry imports it to
recognise paths); reading and writing do.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CheckpointError
from . import keyspace, readguard, unpickle
from .base import FileFormat, ReadOptions, WriteOptions, register
from .checkpoint import Checkpoint, TrainingContainer
from .container import locate_state_dict, replace_at, wrapper_prefix
from .stamp import read_stamp
from .views import check_view

if TYPE_CHECKING:
    from ..plan.nodes import Node, TensorSpec
    from ..plan.state import PlanState
    from .torch_save import ZipSource

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"  # a pickle: torch's legacy (pre-zip) format


@dataclass(kw_only=True)
class TorchCheckpoint(Checkpoint):
    """A torch file: its zip index when read lazily (so untouched storages are copied raw)."""

    zip_source: ZipSource | None = None
    legacy: bool = False

    def notes(self, *, keep_wrapper_prefix: bool | None = None) -> list[str]:
        out = super().notes(keep_wrapper_prefix=keep_wrapper_prefix)
        if self.legacy:
            out.append("input is in PyTorch's legacy (pre-1.6) format; output uses the zip format")
        return out


class TorchFormat(FileFormat):
    """``torch.save`` files: the one format that holds a whole training container."""

    name: ClassVar[str] = "torch"
    suffixes: ClassVar[tuple[str, ...]] = (".pt", ".pth", ".bin", ".ckpt", ".tar")
    holds_only_tensors: ClassVar[bool] = False
    keeps_wrapper_prefix: ClassVar[bool] = True

    def recognise(self, path: Path, head: bytes) -> bool:
        return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)

    def open(self, path: Path, options: ReadOptions) -> Checkpoint:
        return read_torch(
            path, trust_pickle=options.trust_pickle, state_dict_key=options.state_dict_key
        )

    def open_written(self, path: Path, source: Checkpoint) -> Checkpoint:
        """Read back what was written: the state dict where the input had it.

        The pickle is this process's own, so its structure is read with the
        C unpickler, allow-listed globals as themselves and nothing else run
        (an input read with --trust-pickle may hold objects outside the
        allow-list, and then so does the output: they become inert stand-ins).
        """
        key = "/".join(source.training.state_path) if source.training is not None else None
        return read_torch(path, state_dict_key=key, opaque=True)

    def write_file(
        self,
        path: Path,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        from ..plan.state import Evaluator

        wrapper = source.wrapper_prefix if options.keep_wrapper_prefix else ""
        entries = keyspace.keys_at(full.entries, wrapper)
        evaluator = Evaluator(entries, source.read)
        meta = keyspace.metadata_at(metadata, wrapper)
        write_torch(path, source, entries, evaluator, meta, options.container, options.progress)

    def write_part(
        self,
        path: Path,
        entries: Mapping[str, Node],
        produce: Callable[[str], Any],
        own: Checkpoint | None,
    ) -> None:
        write_torch(path, own, entries, produce, {}, None, None)


def _is_legacy(path: Path) -> bool:
    """A pre-1.6 pickle rather than a zip (also a zip that lost its end is still a zip)."""
    with open(path, "rb") as fh:
        if fh.read(4) == _ZIP_MAGIC:
            return False
    try:
        return not zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # a zip whose end records are damaged (is_zipfile can raise)
        return False  # the zip reader says what is wrong with it


def load_object(
    path: Path, *, trust_pickle: bool = False, opaque: bool = False
) -> tuple[Any, bool, ZipSource | None]:
    """Load it safely: (object, is_legacy_format, the zip index when read lazily).

    ``opaque`` (zip files only) turns objects outside the allow-list into inert
    stand-ins instead of refusing them; nothing from the file runs.
    """
    import torch

    from . import torch_save

    legacy = _is_legacy(path)
    where = str(path)
    try:
        if not legacy:
            try:
                obj, source = torch_save.load(path, trust_pickle=trust_pickle, opaque=opaque)
                return obj, False, source
            except torch_save.NeedsTorchLoad:
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(
                path, map_location="cpu", weights_only=not trust_pickle, mmap=not legacy
            )
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        raise unpickle.refusal(exc, where) or _damaged(where, exc) from exc
    except ModuleNotFoundError as exc:  # only a trusted pickle imports anything
        raise CheckpointError(
            f"{where}: its pickle needs the module {exc.name!r}, which cannot be imported",
            hint="add the folder that holds it to prepend_sys_path in the configuration, "
            "or install its package",
        ) from exc
    except Exception as exc:  # RecursionError, MemoryError, EOFError, ... from a damaged file
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
) -> TorchCheckpoint:
    """Open lazily: the weights found in the loaded object, keys without a wrapper's prefix."""
    import torch

    from ..plan.nodes import TensorSpec

    release = readguard.hold(path)  # the file is memory-mapped from here on
    try:
        obj, legacy, source = load_object(path, trust_pickle=trust_pickle, opaque=opaque)
    except BaseException:
        release()
        raise
    state_path, sd = locate_state_dict(obj, state_dict_key, str(path))
    prefix = wrapper_prefix(list(sd))
    metadata = keyspace.metadata_under(getattr(sd, "_metadata", None), prefix)
    schema: dict[str, TensorSpec | None] = {}
    for raw_key, value in sd.items():
        schema[raw_key[len(prefix) :]] = (
            TensorSpec.of(value) if isinstance(value, torch.Tensor) else None
        )

    def reader(key: str, _sd: Mapping[str, Any] = sd, _p: str = prefix) -> Any:
        value = _sd[_p + key]
        if isinstance(value, torch.Tensor):
            if source is not None:
                source.check_storage(value.untyped_storage())  # damaged bytes never flow on
            check_view(str(path), key, value)
        return value

    return TorchCheckpoint(
        path=path,
        format=FORMAT,
        schema=schema,
        metadata=metadata,
        stamp=read_stamp(metadata.get(""), str(path)),
        reader=reader,
        training=TrainingContainer(obj, state_path) if state_path else None,
        wrapper_prefix=prefix,
        legacy=legacy,
        zip_source=source,
        close=release,
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
    import torch

    if not isinstance(source, TorchCheckpoint) or source.training is None:
        return
    zs = source.zip_source
    if zs is None:
        return
    state_dict = source.training.state_dict
    stack: list[Any] = [source.training.container]
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
    from ..plan.nodes import Source
    from . import torch_save

    # views of a memory-mapped file cost nothing to hold; a source whose reads load
    # data (a DCP folder) has each tensor read only when its record is written
    views = source is not None and source.views_share_storage

    def value(key: str, node: Node) -> Any:
        if isinstance(node, Source) and source is not None and (views or node.spec is None):
            return source.read(node.key)
        if node.spec is None:
            return produce(key)
        return torch_save.PlannedTensor(key, node.spec)

    if source is not None:
        check_carried(source)
    sd: OrderedDict[str, Any] = OrderedDict((k, value(k, n)) for k, n in entries.items())
    sd._metadata = build_metadata(metadata)  # type: ignore[attr-defined]
    obj: Any = sd
    if source is not None and source.training is not None:
        base = container if container is not None else source.training.container
        if source.training.lazy:
            base, produce = _planned_values(base, produce, source.read)
        obj = replace_at(base, source.training.state_path, sd)
    zs = source.zip_source if isinstance(source, TorchCheckpoint) else None
    torch_save.write(target, obj, zs, produce, progress)


def _planned_values(
    container: Any, produce: Callable[[str], Any], read: Callable[[str], Any]
) -> tuple[Any, Callable[[str], Any]]:
    """A lazy container's plan nodes as tensors computed when written (objects: now).

    A DCP checkpoint's optimizer state is such a container: each tensor is read
    (or computed along the migration) only when its record is written.
    """
    import copy

    from ..plan.nodes import Node
    from ..plan.state import Evaluator
    from . import torch_save

    nodes: dict[str, Node] = {}

    def visit(value: Any) -> Any:
        if isinstance(value, Node):
            if value.spec is None:
                return Evaluator({"": value}, read)("")
            key = f"\0container:{len(nodes)}"
            nodes[key] = value
            return torch_save.PlannedTensor(key, value.spec)
        if isinstance(value, Mapping):
            out = copy.copy(value)
            for k, v in value.items():
                out[k] = visit(v)  # type: ignore[index]
            return out
        if isinstance(value, (list, tuple)):
            items = [visit(v) for v in value]
            return type(value)(items) if type(value) in (list, tuple) else value
        return value

    planned = visit(container)
    computed = Evaluator(nodes, read)

    def produce_all(key: str) -> Any:
        return computed(key) if key in nodes else produce(key)

    return planned, produce_all


FORMAT = register(TorchFormat())
