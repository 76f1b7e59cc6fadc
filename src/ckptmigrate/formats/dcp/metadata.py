"""A DCP checkpoint's ``.metadata``: unpickled under an allow-list, checked, written back.

``.metadata`` is a pickle of ``torch.distributed.checkpoint.metadata.Metadata``:
``state_dict_metadata`` (flat key -> tensor chunks or a bytes entry),
``storage_data`` (``MetadataIndex(fqn, offset)`` -> ``_StorageInfo(relative_path,
offset, length)``), ``planner_data`` (the default planner's flat key -> path in
the nested state dict), ``storage_meta`` and ``version``. A checkpoint is
untrusted data, so the pickle may name only DCP's own metadata classes,
``torch.Size``, dtypes, layouts, memory formats and paths; anything else is
refused before it runs (``--trust-pickle`` lifts that, for metadata a custom
planner or storage wrote).

Writing pickles the same classes, so ``dcp.load`` reads the result as its
own. Small byte entries a migration rewrites (the optimizer's ``params``
lists of parameter names) are stored after the pickle, in ``.metadata``
itself, and referenced from ``storage_data`` like any other blob: the layout,
the names, the stamp and those lists change in one atomic switch of one
file, and a rename chain writes no data file at all.

The stamp lives in ``planner_data`` under :data:`STAMP_KEY`, a flat
``str -> str`` map as in a safetensors header (``ckptmigrate.revision``,
``<module>:ckptmigrate.revision``); :data:`REPLACED_KEY` lists the data files
the write that produced it replaced, so that they are removed even if that
write was killed before it could. DCP's loaders look ``planner_data`` up only
by the keys of ``state_dict_metadata``, so both entries are invisible to
``dcp.load``, ``dcp_to_torch_save`` and ``set_state_dict``.
"""

from __future__ import annotations

import functools
import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import CheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    from ..storage import CkptPath

METADATA_NAME = ".metadata"
#: The key in ``planner_data`` that holds the stamp entries.
STAMP_KEY = "__ckptmigrate__"
#: The data files a write replaced, removed after its switch (or by the next writer).
REPLACED_KEY = "__ckptmigrate_replaced__"
#: ``storage_data`` keyed by ``(fqn, offsets)`` tuples (``None`` for an object), made by
#: :func:`check`: the lookups DCP's readers make, without a ``MetadataIndex`` (which
#: hashes and compares through Python-level dataclass methods) built for every chunk.
#: An index's ``index`` hint takes no part in a lookup, so none is lost.
ChunkTable = dict[tuple[str, tuple[int, ...] | None], Any]
#: The version DCP's FileSystemWriter records.
DCP_VERSION = "1.0.0"

_METADATA_CLASSES = (
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "MetadataIndex",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
)
_PATH_MODULES = ("pathlib", "pathlib._local")
_PATH_CLASSES = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")


@functools.cache
def _allowed() -> Mapping[tuple[str, str], Any]:
    """Every global a DCP ``.metadata`` pickle may name, by (module, name); built once."""
    import pathlib

    import torch
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint import metadata as dcp_metadata

    allowed: dict[tuple[str, str], Any] = {
        (dcp_metadata.__name__, name): getattr(dcp_metadata, name) for name in _METADATA_CLASSES
    }
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    layouts: dict[str, Any] = {}
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
        if isinstance(value, torch.layout):
            layouts[str(value)] = value

    def layout(name: str) -> Any:  # torch pickles a layout as _get_layout("torch.strided")
        if name not in layouts:
            raise pickle.UnpicklingError(f"unknown layout {name!r}")
        return layouts[name]

    allowed[("torch.serialization", "_get_layout")] = layout
    for module in _PATH_MODULES:
        for name in _PATH_CLASSES:
            allowed[(module, name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata classes and the plain values they hold."""

    def __init__(self, file: Any, allowed: Mapping[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name}")
        return found


def _invalid(path: CkptPath, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid DCP checkpoint's metadata: {what}",
        hint="check that the folder holds a complete torch.distributed.checkpoint save "
        "(its .metadata is written last; an interrupted save has none or a damaged one)",
    )


def load(path: CkptPath, *, trust_pickle: bool = False) -> tuple[Any, ChunkTable]:
    """The ``Metadata`` in ``path``, unpickled under the allow-list and checked, and its
    :data:`chunk table <ChunkTable>`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {path}: {exc.strerror}", hint="check permissions"
        ) from exc
    if not data:
        raise _invalid(path, "the file is empty")
    try:
        if trust_pickle:
            md = pickle.loads(data)
        else:
            md = _MetadataUnpickler(io.BytesIO(data), _allowed()).load()
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if text.startswith("global "):
            raise UnsafeCheckpointError(
                f"refusing to load {path}: its pickle needs the {text}, which is not one of "
                "torch.distributed.checkpoint's metadata classes and could run arbitrary code",
                hint="a checkpoint saved by DCP's own FileSystemWriter needs none; if a custom "
                "planner or storage wrote it and you trust its origin, pass --trust-pickle",
            ) from None
        raise _invalid(path, f"its pickle is damaged ({text or type(exc).__name__})") from None
    except Exception as exc:  # EOFError, RecursionError, ValueError ... from damaged bytes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise _invalid(path, f"its pickle is damaged ({type(exc).__name__}: {first})") from None
    return md, check(md, path)


def lists_replaced(data: bytes) -> bool:
    """Whether ``.metadata``'s bytes may list replaced data files (no unpickling).

    A pickle holds each string once as it is (the later ones refer back to it),
    so without :data:`REPLACED_KEY` among the bytes, ``planner_data`` has no such entry.
    """
    return REPLACED_KEY.encode() in data


def check(md: Any, path: CkptPath) -> ChunkTable:
    """Every field DCP's readers (and ours) rely on, before anything trusts it; the chunk
    table the check looked chunks up in.

    A folder holds few files for many chunks, and most tensors are one chunk
    (what one process saves): each such entry passes on a short path of
    type checks; anything else gets the full check, which says what is wrong.
    A lie no check foresaw (an attribute missing, a value of an odd type) is
    still an error about the file, never a crash.
    """
    try:
        return _check(md, path)
    except CheckpointError:
        raise
    except Exception as exc:  # AttributeError, TypeError ... from objects built by a lying pickle
        raise _invalid(path, f"its contents are malformed ({type(exc).__name__}: {exc})") from None


def _check(md: Any, path: CkptPath) -> ChunkTable:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    if not isinstance(md, Metadata):
        raise _invalid(path, f"it holds a {type(md).__name__}, not a Metadata object")
    entries = md.state_dict_metadata
    if not isinstance(entries, dict):
        raise _invalid(path, "state_dict_metadata is not a dict")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise _invalid(path, f"storage_data is a {type(storage).__name__}, not a dict")
    files: set[str] = set()  # the names found valid
    recorded: ChunkTable = {}  # what each chunk's lookup finds, without building indexes
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise _invalid(path, "storage_data maps something other than chunks to file ranges")
        fqn: Any = getattr(index, "fqn", None)
        offset = getattr(index, "offset", None)
        recorded[(fqn, None if offset is None else tuple(offset))] = info
        name = getattr(info, "relative_path", None)
        start, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (
            type(name) is str
            and name in files
            and type(start) is int
            and type(length) is int
            and start >= 0
            and length > 0
        ):
            _check_info(path, fqn, info, files)
    size_cls, dtype_cls = torch.Size, torch.dtype
    for key, entry in entries.items():
        if type(entry) is TensorStorageMetadata and type(key) is str:
            size, chunks = entry.size, entry.chunks
            if type(size) is size_cls and type(chunks) is list and len(chunks) == 1:
                chunk = chunks[0]
                if (
                    type(chunk) is ChunkStorageMetadata
                    and type(chunk.offsets) is size_cls
                    and chunk.sizes == size
                    and type(chunk.sizes) is size_cls
                    and len(chunk.offsets) == len(size)
                    and not any(chunk.offsets)
                    and min(size, default=0) >= 0
                    and type(entry.properties) is TensorProperties
                    and isinstance(entry.properties.dtype, dtype_cls)
                    and (key, tuple(chunk.offsets)) in recorded
                ):
                    continue  # one chunk, the whole tensor: as one process saves
        if not isinstance(key, str):
            raise _invalid(path, f"the key {key!r} is not a string")
        if isinstance(entry, BytesStorageMetadata):
            if (key, None) not in recorded:
                raise _invalid(path, f"no data is recorded for {key!r}")
            continue
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(
            entry.properties, TensorProperties
        ):
            raise _invalid(path, f"{key!r} is described by a {type(entry).__name__}")
        _check_tensor(path, key, entry, recorded, ChunkStorageMetadata)
    if md.planner_data is not None and not isinstance(md.planner_data, dict):
        return recorded  # a custom planner's data: kept as it is; no stamp can go there
    for key, where in (md.planner_data or {}).items():
        if type(where) is tuple and all(type(p) is str for p in where):
            continue
        if key == STAMP_KEY:
            if not isinstance(where, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in where.items()
            ):
                raise _invalid(path, "its ckptmigrate stamp is not a map of strings")
        elif key == REPLACED_KEY:
            if not isinstance(where, list) or not all(isinstance(n, str) for n in where):
                raise _invalid(path, "its list of replaced data files is not a list of names")
        elif not isinstance(where, tuple) or not all(isinstance(p, (str, int)) for p in where):
            raise _invalid(path, f"planner_data holds {where!r} as the path of {key!r}")
    return recorded


def _check_info(path: CkptPath, key: str, info: Any, files: set[str]) -> None:
    name = getattr(info, "relative_path", None)
    if isinstance(name, str) and name in files:
        pass
    elif (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or len(name.encode("utf-8", "replace")) > 255
    ):
        raise _invalid(path, f"{key!r} is stored in {_short(name)}, not a file of the folder")
    elif name.startswith(".") and name != METADATA_NAME:
        raise _invalid(path, f"{key!r} is stored in the hidden file {name!r}")
    else:
        files.add(name)
    for field in (getattr(info, "offset", None), getattr(info, "length", None)):
        if not isinstance(field, int) or isinstance(field, bool) or field < 0:
            raise _invalid(path, f"{key!r} has an invalid byte range in {name}")
    if info.length == 0:  # a torch.save blob is never empty
        raise _invalid(path, f"{key!r} has an empty byte range in {name}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dims(value: object) -> bool:
    """A shape or an offset: a sequence of non-negative ints."""
    return isinstance(value, (tuple, list)) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    )


def _check_tensor(
    path: CkptPath,
    key: str,
    entry: Any,
    recorded: ChunkTable,
    chunk_cls: Any,
) -> None:
    import torch

    size = entry.size
    if not isinstance(entry.properties.dtype, torch.dtype):
        raise _invalid(path, f"{key!r} has no dtype")
    if not isinstance(size, torch.Size) or any(d < 0 for d in size):
        raise _invalid(path, f"{key!r} has an invalid size {size!r}")
    chunks = entry.chunks
    if not isinstance(chunks, list) or (not chunks and _numel(size)):
        raise _invalid(path, f"{key!r} has no chunks")
    if len(chunks) == 1 and _whole(chunks[0], size, chunk_cls, torch.Size):  # as one process saves
        if (key, tuple(chunks[0].offsets)) not in recorded:
            raise _invalid(path, f"no data is recorded for a chunk of {key!r}")
        return
    covered = 0
    boxes: list[tuple[Sequence[int], Sequence[int]]] = []
    for chunk in chunks:
        if not isinstance(chunk, chunk_cls):
            raise _invalid(path, f"{key!r} has a chunk that is a {type(chunk).__name__}")
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not _dims(offsets) or not _dims(sizes):
            raise _invalid(path, f"a chunk of {key!r} has no valid offsets and sizes")
        assert isinstance(offsets, (tuple, list)) and isinstance(sizes, (tuple, list))
        if len(offsets) != len(size) or len(sizes) != len(size):
            raise _invalid(path, f"a chunk of {key!r} has the wrong number of dims")
        if any(o + s > d for o, s, d in zip(offsets, sizes, size)):
            raise _invalid(path, f"a chunk of {key!r} lies outside its size {list(size)}")
        if (key, tuple(offsets)) not in recorded:
            raise _invalid(path, f"no data is recorded for a chunk of {key!r}")
        boxes.append((offsets, sizes))
        covered += _numel(sizes)
    # a single chunk overlaps nothing
    if len(boxes) > 1 and _overlapping(boxes):
        raise _invalid(path, f"two chunks of {key!r} overlap")
    if covered != _numel(size):
        raise _invalid(path, f"the chunks of {key!r} do not cover its size {list(size)}")


def _whole(chunk: Any, size: Any, chunk_cls: Any, size_cls: Any) -> bool:
    """A chunk that is the whole tensor: at offset 0 in every dim, of its (valid) size."""
    if type(chunk) is not chunk_cls:
        return False
    offsets: Any = getattr(chunk, "offsets", None)
    sizes: Any = getattr(chunk, "sizes", None)
    return (
        type(offsets) is size_cls
        and type(sizes) is size_cls
        and sizes == size
        and len(offsets) == len(size)
        and not any(offsets)
    )


def _overlapping(boxes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> bool:
    """Whether two chunks share an element: a sweep along the first dim, so the
    usual layouts (chunks along one dim, one per rank) cost n log n, not n**2."""
    solid = sorted((b for b in boxes if b[1] and all(b[1])), key=lambda b: tuple(b[0]))
    if not solid or not solid[0][0]:
        return len(solid) > 1  # scalars: two chunks of one element overlap
    active: list[tuple[Sequence[int], Sequence[int]]] = []
    for at, size in solid:
        active = [b for b in active if b[0][0] + b[1][0] > at[0]]
        for b_at, b_size in active:
            if all(a < b + m and b < a + n for a, n, b, m in zip(at, size, b_at, b_size)):
                return True
        active.append((at, size))
    return False


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class Shared:
    """Equal sizes, offsets and tensor properties as one object each, which a pickle stores once.

    DCP's writer gives every chunk its own ``torch.Size`` objects and every
    entry its own ``TensorProperties``. Shared, the pickle refers back to the
    first of each, so ``.metadata`` is smaller, and both pickling it and
    unpickling it (by any reader, DCP's own included) take about half the
    time at a few hundred entries. Both kinds are plain values no reader
    changes; the objects passed in get equal, shared parts.
    """

    def __init__(self) -> None:
        import torch
        from torch.distributed.checkpoint.metadata import MetadataIndex

        self._size_cls = torch.Size
        self._index_cls = MetadataIndex
        self._sizes: dict[Any, Any] = {}
        self._properties: dict[tuple[Any, ...], Any] = {}

    def size(self, size: Any) -> Any:
        """The one object of ``size``'s value (anything but a ``torch.Size`` as it is)."""
        if type(size) is not self._size_cls:
            return size
        return self._sizes.setdefault(size, size)

    def entry(self, entry: Any) -> Any:
        """``entry`` (a ``TensorStorageMetadata``; anything else as it is), its parts shared."""
        properties = getattr(entry, "properties", None)
        if properties is None:
            return entry
        key = (
            properties.dtype,
            properties.layout,
            properties.requires_grad,
            properties.memory_format,
            properties.pin_memory,
        )
        entry.properties = self._properties.setdefault(key, properties)
        entry.size = self.size(entry.size)
        for chunk in entry.chunks:
            chunk.offsets = self.size(chunk.offsets)
            chunk.sizes = self.size(chunk.sizes)
        return entry

    def index(self, fqn: str, offset: Any = None, index: int | None = None) -> Any:
        """``MetadataIndex(fqn, offset, index)``, its offset shared.

        Its fields are set as its ``__init__`` sets them (in the frozen
        dataclass's ``__dict__``), without the ``torch.Size`` it would make of
        an offset that is one already: a rename chain makes one index per chunk.
        """
        made = object.__new__(self._index_cls)
        fields = made.__dict__
        fields["fqn"] = fqn
        fields["index"] = index
        if offset is not None:  # one object for equal offsets
            fields["offset"] = self.size(
                offset if type(offset) is self._size_cls else self._size_cls(offset)
            )
        return made


@dataclass
class Blob:
    """Bytes to store after the pickle, and the ``storage_data`` entry that points at them."""

    data: bytes
    info: Any  # a _StorageInfo whose offset is filled in by :func:`encode`


def encode(md: Any, blobs: Sequence[Blob]) -> bytes:
    """``md`` pickled, then every blob; each blob's ``info`` points at its bytes.

    The offsets are part of the pickle, whose length depends on them; pickling
    again until the length no longer changes settles that in a step or two.
    """
    for blob in blobs:
        blob.info.relative_path = METADATA_NAME
        blob.info.length = len(blob.data)
    if not blobs:  # no offsets to settle
        return pickle.dumps(md, protocol=pickle.DEFAULT_PROTOCOL)
    data = b""
    for _ in range(16):
        offset = len(data)
        for blob in blobs:
            blob.info.offset = offset
            offset += len(blob.data)
        again = pickle.dumps(md, protocol=pickle.DEFAULT_PROTOCOL)
        if len(again) == len(data):
            return again + b"".join(blob.data for blob in blobs)
        data = again
    raise AssertionError("the metadata's length did not settle")  # pragma: no cover
