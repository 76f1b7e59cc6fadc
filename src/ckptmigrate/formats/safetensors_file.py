"""``.safetensors`` files, read and written natively.

The format is an 8-byte little-endian header length, a JSON header
(``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``, strings
only), then the raw tensor bytes. Doing it here rather than through the
``safetensors`` package lets us validate hostile headers with our own errors,
memory-map tensors lazily, and stream the output tensor by tensor.

Importing this module does not import torch (the registry imports it to
recognise paths); reading and writing do.
"""

from __future__ import annotations

import functools
import json
import mmap
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CheckpointError
from . import fileio, readguard
from .base import FileFormat, ReadOptions, WriteOptions, register
from .checkpoint import Checkpoint, Header
from .probe import looks_like_safetensors
from .stamp import flatten_stamps, is_stamp_key, read_stamp, stamp_entries
from .storage import open_blob, version

if TYPE_CHECKING:
    import torch

    from ..plan.nodes import Node, TensorSpec
    from ..plan.state import PlanState
    from .remote import RemotePath
    from .storage import Blob, CkptPath, Output

MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's own limit
#: The header every shard of a PyTorch model carries (transformers checks it).
SHARD_HEADER = {"format": "pt"}
#: Bytes per element of every dtype a header may name (checked without torch).
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
#: The first read of a file on a store: the length and, for most files, the whole header.
_FIRST_READ = 1 << 16


@functools.cache
def dtypes() -> dict[str, torch.dtype]:
    """Header dtype names and the torch dtypes they stand for."""
    import torch

    table: dict[str, torch.dtype] = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "C64": torch.complex64,
    }
    for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
        if hasattr(torch, attr):
            table[name] = getattr(torch, attr)
    return table


@functools.cache
def dtype_names() -> dict[torch.dtype, str]:
    return {v: k for k, v in dtypes().items()}


@dataclass(kw_only=True)
class SafetensorsCheckpoint(Checkpoint):
    """A safetensors file: its header's other ``__metadata__`` entries are carried through."""

    header_metadata: dict[str, str] = field(default_factory=dict)


class SafetensorsFormat(FileFormat):
    """``.safetensors`` files: tensors only, the stamp in the header's ``__metadata__``."""

    name: ClassVar[str] = "safetensors"
    suffixes: ClassVar[tuple[str, ...]] = (".safetensors",)

    def recognise(self, path: CkptPath, head: bytes) -> bool:
        # the suffix wins: a damaged file named .safetensors gets this reader's errors
        return bool(head) and (path.suffix == ".safetensors" or looks_like_safetensors(head))

    def open(self, path: CkptPath, options: ReadOptions) -> Checkpoint:
        return read_safetensors(path)

    def peek(self, path: CkptPath, options: ReadOptions) -> Header | None:
        """The header alone, validated as :meth:`open` validates it, without torch."""
        try:
            _start, header, meta = read_header(path)
        except CheckpointError:
            return None  # open() says what is wrong
        return Header(path, tuple(header), stamp_entries(meta))

    def write_file(
        self,
        path: Output,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        from ..plan.state import Evaluator

        header = source.header_metadata if isinstance(source, SafetensorsCheckpoint) else {}
        evaluator = Evaluator(full.entries, source.read)
        write_safetensors(path, list(full.entries), full.schema(), evaluator, header, metadata)

    def write_part(
        self,
        path: Output,
        entries: Mapping[str, Node],
        produce: Callable[[str], Any],
        own: Checkpoint | None,
    ) -> None:
        specs = {k: node.spec for k, node in entries.items()}
        write_safetensors(path, list(entries), specs, produce, SHARD_HEADER, {})


def _bad(path: CkptPath, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file: {what}",
        hint="the file may be truncated or damaged; re-create or re-download it",
    )


def read_header(path: CkptPath) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(data start, tensor entries, __metadata__), every field validated.

    The header comes from an untrusted file and its offsets are used to slice
    a memory map, so every entry must describe exactly its bytes, and the
    entries together exactly the data, before anything is read.
    """
    blob = open_blob(path)
    try:
        size = blob.size
        n, header = _raw_header(path, blob)
    finally:
        blob.close()
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = sorted(_span(path, name, info, data_len) for name, info in header.items())
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            kind = "overlaps the previous entry" if begin < pos else "leaves a gap before it"
            raise _bad(path, f"entry {name!r} {kind} (offset {begin}, expected {pos})")
        pos = end
    if pos != data_len:
        raise _bad(
            path, f"{data_len - pos} bytes after the last tensor are not described by the header"
        )
    return 8 + n, header, meta


def _raw_header(path: CkptPath, blob: Blob) -> tuple[int, dict[str, Any]]:
    """The header's length and its JSON object, not yet validated."""
    size = blob.size
    first = blob.read(0, 8 if isinstance(path, Path) else _FIRST_READ)
    if len(first) < 8:
        raise _bad(path, f"only {size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER:
        raise _bad(path, f"header length {n} is larger than the {MAX_HEADER}-byte limit")
    if 8 + n > size:
        raise _bad(path, f"header length {n} runs past the end of the {size}-byte file")
    raw = first[8 : 8 + n]
    if len(raw) < n:
        raw += blob.read(8 + len(raw), 8 + n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"header is not JSON ({exc})") from None
    except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack
        raise _bad(path, "header is JSON nested too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    return n, header


def _span(path: CkptPath, name: str, info: Any, data_len: int) -> tuple[int, int, str]:
    """One entry's (begin, end, name), checked: known dtype, sane shape, exactly its bytes."""
    if not isinstance(info, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise _bad(path, f"entry {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape
    ):
        raise _bad(path, f"entry {name!r} has a bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _bad(path, f"entry {name!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
        if numel > data_len:
            break
    nbytes = numel * ITEMSIZE[dtype]
    if not 0 <= begin <= end <= data_len:
        raise _bad(path, f"entry {name!r} points past the end of the data ({offsets})")
    if end - begin != nbytes:
        raise _bad(
            path,
            f"entry {name!r} has {end - begin} bytes but shape {shape} {dtype} needs {nbytes}",
        )
    return begin, end, name


def read_safetensors(path: CkptPath) -> SafetensorsCheckpoint:
    """Open lazily: the header is validated now, the data memory-mapped on first read.

    A file on a store is read by ranges instead: each tensor when it is read.
    """
    from ..plan.nodes import TensorSpec

    start, header, meta = read_header(path)
    table = dtypes()
    schema: dict[str, TensorSpec | None] = {
        name: TensorSpec(tuple(info["shape"]), table[info["dtype"]])
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    }
    if isinstance(path, Path):
        reader, close = _mapped_reader(path, start, header, schema)
    else:
        reader, close = _ranged_reader(path, start, header, schema), lambda: None
    modules = stamp_entries(meta)
    return SafetensorsCheckpoint(
        path=path,
        format=FORMAT,
        schema=schema,
        metadata=modules,
        stamp=read_stamp(modules.get(""), str(path)),
        reader=reader,
        header_metadata={k: v for k, v in meta.items() if not is_stamp_key(k)},
        close=close,
        version=version(path),
    )


Reader = Callable[[str], "torch.Tensor"]


def _mapped_reader(
    path: Path, start: int, header: dict[str, Any], schema: dict[str, TensorSpec | None]
) -> tuple[Reader, Callable[[], None]]:
    """Tensors as views of one memory map of the file, made on the first read."""
    import torch

    state: dict[str, Any] = {"mm": None, "release": None}

    def mapping() -> mmap.mmap:
        if state["mm"] is None:
            state["release"] = readguard.hold(path)
            with open(path, "rb") as fh:
                state["mm"] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return state["mm"]  # type: ignore[no-any-return]

    def reader(key: str) -> torch.Tensor:
        info = header[key]
        spec = schema[key]
        assert spec is not None
        begin, end = info["data_offsets"]
        if end == begin:
            return torch.empty(spec.shape, dtype=spec.dtype)
        raw = torch.frombuffer(
            mapping(), dtype=torch.uint8, count=end - begin, offset=start + begin
        )
        if raw.data_ptr() % spec.dtype.itemsize:
            raw = raw.clone()  # unaligned: copy once so the dtype view is legal
        return raw.view(spec.dtype).reshape(spec.shape)

    def close() -> None:
        # Only the reference is dropped: every tensor read holds one too (torch.frombuffer,
        # which takes no buffer export, so mmap.close() would not refuse), and the map goes
        # when the last of them does. Closing it here would unmap memory that a tensor still
        # handed out (a model's parameter, after from_pretrained) points into.
        state["mm"] = None
        if state["release"] is not None:
            state["release"]()
            state["release"] = None

    return reader, close


def _ranged_reader(
    path: RemotePath, start: int, header: dict[str, Any], schema: dict[str, TensorSpec | None]
) -> Reader:
    """A file on a store: one ranged read per tensor, when it is read."""
    import torch

    blob = path.blob()

    def reader(key: str) -> torch.Tensor:
        spec = schema[key]
        assert spec is not None
        begin, end = header[key]["data_offsets"]
        if end == begin:
            return torch.empty(spec.shape, dtype=spec.dtype)
        data = bytearray(blob.read(start + begin, start + end))
        if len(data) != end - begin:
            raise _bad(path, f"the data of {key!r} ends early (the file is shorter than it was)")
        return torch.frombuffer(data, dtype=spec.dtype).reshape(spec.shape)

    return reader


def write_safetensors(
    target: Output,
    keys: list[str],
    specs: Mapping[str, TensorSpec | None],
    produce: Callable[[str], Any],
    header_metadata: Mapping[str, str],
    metadata: Mapping[str, Mapping[str, Any]],
) -> None:
    """Stream tensors into ``target``: the header first (specs are known), then data."""
    names = dtype_names()
    header: dict[str, Any] = {}
    meta = {**header_metadata, **flatten_stamps(metadata)}
    if meta:
        header["__metadata__"] = meta
    offset = 0
    for key in keys:
        spec = specs[key]
        if spec is None:
            raise CheckpointError(
                f"{key!r} is not a tensor and cannot be stored in a safetensors file",
                hint="write a .pt file instead",
            )
        if spec.dtype not in names:
            raise CheckpointError(f"safetensors cannot store dtype {spec.dtype} ({key!r})")
        nbytes = spec.nbytes
        header[key] = {
            "dtype": names[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with fileio.open_for_writing(target) as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for key in keys:
            fileio.write_tensor(fh, produce(key))


FORMAT = register(SafetensorsFormat())
