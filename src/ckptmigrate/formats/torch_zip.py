"""PyTorch's zip checkpoint format, read lazily and written as a stream.

A ``torch.save`` file is an uncompressed zip: ``data.pkl`` (the object, with
each tensor's storage replaced by a persistent id) and one ``data/<key>``
record of raw bytes per storage, 64-byte aligned. That layout makes the fast
path possible:

* reading memory-maps the whole file once and unpickles ``data.pkl`` with
  PyTorch's weights-only unpickler, every storage a slice of that map, so
  opening a checkpoint reads no tensor data;
* writing pickles the new object ourselves and then, for every storage that
  still lives in the input file, copies its record's bytes in the kernel
  (``copy_file_range``), checksum included; only tensors a migration really
  computes are materialised, one at a time.

The output is what ``torch.save`` writes (same records, same pickle), readable
by any PyTorch since 1.6, and bit-identical from run to run.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import pickle
import struct
import sys
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError
from ..plan.nodes import TensorSpec

ALIGN = 64
_PAD_ID = 0x4246  # the "FB" padding extra field PyTorch's writer uses
_ZIP64_LIMIT = 0xFFFFFFFF


@dataclass(frozen=True)
class Record:
    name: str
    data_offset: int
    size: int
    crc: int


@dataclass
class ZipSource:
    """An opened input file: its records, and the map its storages slice."""

    path: Path
    size: int
    prefix: str
    records: dict[str, Record]
    base: torch.UntypedStorage | None = None
    by_offset: dict[int, Record] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)

    @property
    def base_ptr(self) -> int:
        return self.base.data_ptr() if self.base is not None else 0

    def check(self, record: Record) -> None:
        """Verify a record's checksum the first time its bytes are used.

        A flipped bit on disk would otherwise be copied into the output (or
        computed into a new tensor with a fresh, valid checksum); reading the
        record from the page cache to check it costs a fraction of writing it.
        """
        if record.name in self.checked:
            return
        if self.base is None:
            return
        view = storage_bytes(self.base[record.data_offset : record.data_offset + record.size])
        if _crc(view) != record.crc:
            raise CheckpointError(
                f"{self.path} is damaged: record {record.name} fails its checksum",
                hint="the file was corrupted on disk or in transfer; restore or re-download it",
            )
        self.checked.add(record.name)

    def check_storage(self, storage: torch.UntypedStorage) -> None:
        """Check the record a storage was read from (also when it uses only its start)."""
        if self.base is None or storage.device.type != "cpu":
            return
        record = self.by_offset.get(storage.data_ptr() - self.base_ptr)
        if record is not None:
            self.check(record)

    def locate(self, storage: torch.UntypedStorage) -> Record | None:
        """The input record a storage is a view of, if any (then its bytes can be copied)."""
        if self.base is None or storage.device.type != "cpu":
            return None
        offset = storage.data_ptr() - self.base_ptr
        record = self.by_offset.get(offset)
        if record is not None and record.size == storage.nbytes():
            return record
        return None


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable PyTorch checkpoint ({what})",
        hint="the file may be truncated or damaged; check it was copied completely",
    )


def read_index(path: Path) -> ZipSource:
    """The zip's records with their data offsets, every one checked against the file size."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise _bad(path, f"damaged zip directory: {exc}") from None
    records: dict[str, Record] = {}
    with open(path, "rb") as fh:
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise _bad(path, f"record {info.filename!r} is compressed")
            if info.compress_size != info.file_size:
                raise _bad(path, f"record {info.filename!r} has two different sizes")
            if not 0 <= info.header_offset < size:
                raise _bad(path, f"record {info.filename!r} has no valid local header")
            fh.seek(info.header_offset)
            head = fh.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                raise _bad(path, f"record {info.filename!r} has no valid local header")
            flags, method = struct.unpack("<HH", head[6:10])
            crc, csize, usize = struct.unpack("<III", head[14:26])
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            name = fh.read(name_len)
            # Without a data descriptor (flag bit 3: what torch.save writes),
            # the local header repeats the checksum and sizes; they must agree.
            sizes_ok = (csize, usize) in (
                (info.file_size, info.file_size),
                (_ZIP64_LIMIT, _ZIP64_LIMIT),
            )
            if (
                method != 0
                or name != info.orig_filename.encode("utf-8", "replace")
                or (not flags & 0x08 and (crc != info.CRC or not sizes_ok))
            ):
                raise _bad(path, f"record {info.filename!r} disagrees with its local header")
            data_offset = info.header_offset + 30 + name_len + extra_len
            if data_offset + info.file_size > size:
                raise _bad(path, f"record {info.filename!r} runs past the end of the file")
            records[info.filename] = Record(info.filename, data_offset, info.file_size, info.CRC)
    pkl = [n for n in records if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise _bad(path, "no data.pkl record")
    prefix = pkl[0][: -len("data.pkl")]
    source = ZipSource(path, size, prefix, records)
    source.by_offset = {r.data_offset: r for r in records.values()}
    return source


def load(path: Path, *, trust_pickle: bool = False, opaque: bool = False) -> tuple[Any, ZipSource]:
    """Unpickle ``data.pkl`` with every storage a lazy slice of one memory map.

    ``opaque`` reads the structure of a pickle that needs globals outside the
    weights-only allow-list without running any of them: each becomes an inert
    stand-in (for checking a file this process wrote from a trusted input).
    """
    source = read_index(path)
    order = source.records.get(source.prefix + "byteorder")
    if order is not None:
        with open(path, "rb") as fh:
            fh.seek(order.data_offset)
            mark = fh.read(order.size)
        if zlib.crc32(mark) != order.crc:
            raise _bad(path, "the byteorder record fails its checksum")
        if mark.decode("ascii", "replace") != sys.byteorder:
            raise _NeedsTorchLoad  # byte-swapping is torch.load's business
    if source.size:
        source.base = torch.UntypedStorage.from_file(  # type: ignore[assignment]
            str(path), shared=False, nbytes=source.size
        )
    loaded: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5 or saved_id[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        _, storage_type, key, _location, numel = saved_id
        if key in loaded:
            return loaded[key]
        with warnings.catch_warnings():  # the legacy storage classes warn on .dtype
            warnings.simplefilter("ignore")
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = int(numel) * torch.empty((), dtype=dtype, device="meta").element_size()
        record = source.records.get(f"{source.prefix}data/{key}")
        if record is None or nbytes > record.size or nbytes < 0:
            raise pickle.UnpicklingError(f"storage {key!r} is missing or too short")
        assert source.base is not None
        untyped = source.base[record.data_offset : record.data_offset + nbytes]
        typed = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
            wrap_storage=untyped, dtype=dtype, _internal=True
        )
        loaded[key] = typed
        return typed

    pkl = source.records[source.prefix + "data.pkl"]
    with open(path, "rb") as fh:
        fh.seek(pkl.data_offset)
        data = fh.read(pkl.size)
    if zlib.crc32(data) != pkl.crc:
        raise _bad(path, "data.pkl fails its checksum")
    if trust_pickle:
        unpickler: Any = _TrustedUnpickler(io.BytesIO(data), encoding="utf-8")
    elif opaque:
        unpickler = _OpaqueUnpickler(io.BytesIO(data), encoding="utf-8")
    else:
        from torch import _weights_only_unpickler

        unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": errors say enough
            warnings.simplefilter("ignore")
            return unpickler.load(), source
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler knows GLOBAL only; a pickle importing
        # code another way (STACK_GLOBAL, INST, OBJ: protocol 4, hand-made)
        # fails as an "unsupported operand". Name what it asked for.
        name = None if trust_pickle else disallowed_global(data)
        if name is not None and "GLOBAL" not in str(exc):
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {name}") from exc
        raise


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}


def disallowed_global(data: bytes) -> str | None:
    """The first global a pickle imports that PyTorch's weights-only load refuses.

    Found by parsing the opcodes (nothing is executed); None when there is no
    such import or the bytes stop parsing first.
    """
    import pickletools

    from torch import _weights_only_unpickler

    allowed: dict[str, Any] = getattr(_weights_only_unpickler, "_get_allowed_globals", dict)()
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = None
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                name = ".".join(arg.split(" ", 1))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            elif op.name in _STRING_OPS and isinstance(arg, (str, bytes)):
                strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            if name is not None and name not in allowed:
                return name
    except Exception:  # not parseable further: what was found so far is all there is
        return None
    return None


class _NeedsTorchLoad(Exception):
    """A valid file our lazy reader leaves to torch.load (e.g. another byte order)."""


class _TrustedUnpickler(pickle.Unpickler):
    """Any global (only with --trust-pickle); PyTorch's old module path mapped."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.tensor":
            module = "torch._tensor"
        return super().find_class(module, name)


class _Opaque(dict[Any, Any]):
    """An inert stand-in for an object whose class is outside the allow-list.

    A dict, so that a dict subclass's items (a training container of a custom
    class) stay visible; list items and attribute state are kept aside.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _OpaqueUnpickler(pickle.Unpickler):
    """Allow-listed globals as themselves, every other one as :class:`_Opaque`."""

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle

        from torch import _weights_only_unpickler

        # Python 2 spellings (protocol 2 pickles), mapped as pickle.Unpickler maps them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed: dict[str, Any] = getattr(_weights_only_unpickler, "_get_allowed_globals", dict)()
        found = allowed.get(f"{module}.{name}")
        return found if found is not None else _Opaque


# --------------------------------------------------------------------------- writing


@dataclass(eq=False)
class PlannedTensor:
    """A tensor the migration computes: pickled now, its bytes produced when written."""

    key: str
    spec: TensorSpec


def _storage_type(dtype: torch.dtype) -> Any:
    name = torch.storage._dtype_to_storage_type_map().get(dtype)
    if name is None:
        raise CheckpointError(f"cannot save dtype {dtype} in a torch file")
    return getattr(torch, name)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


@dataclass
class _Storage:
    key: str
    copy_from: Record | None = None
    memory: torch.UntypedStorage | None = None
    planned: PlannedTensor | None = None

    @property
    def nbytes(self) -> int:
        if self.copy_from is not None:
            return self.copy_from.size
        if self.memory is not None:
            return int(self.memory.nbytes())
        assert self.planned is not None
        return self.planned.spec.nbytes


class _Pickler(pickle.Pickler):
    """torch.save's pickle, with planned tensors standing in for computed ones."""

    def __init__(self, file: BinaryIO, source: ZipSource | None) -> None:
        super().__init__(file, protocol=2)
        self.source = source
        self.storages: dict[object, _Storage] = {}
        self.dtypes: dict[int, torch.dtype] = {}

    def _key(self, ident: object, make: Callable[[str], _Storage]) -> str:
        found = self.storages.get(ident)
        if found is None:
            found = make(str(len(self.storages)))
            self.storages[ident] = found
        return found.key

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _PlannedStorage):
            key = self._key(id(obj.tensor), lambda k: _Storage(k, planned=obj.tensor))
            dtype = obj.tensor.spec.dtype
            return ("storage", _storage_type(dtype), key, "cpu", obj.tensor.spec.numel)
        if isinstance(obj, torch.storage.TypedStorage):
            untyped = obj._untyped_storage
            if untyped.device.type != "cpu":
                raise CheckpointError("only CPU tensors can be written; move the model to CPU")
            ptr = untyped.data_ptr()
            if ptr and self.dtypes.setdefault(ptr, obj.dtype) != obj.dtype:
                raise CheckpointError("two tensors view the same storage with different dtypes")

            def make(k: str) -> _Storage:
                record = self.source.locate(untyped) if self.source is not None else None
                if record is not None:
                    return _Storage(k, copy_from=record)
                return _Storage(k, memory=untyped)

            key = self._key(untyped._cdata, make)
            kind = getattr(torch, obj._pickle_storage_type())  # type: ignore[no-untyped-call]
            return ("storage", kind, key, "cpu", obj._size())  # type: ignore[no-untyped-call]
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, PlannedTensor):
            shape = obj.spec.shape
            return (
                torch._utils._rebuild_tensor_v2,
                (_PlannedStorage(obj), 0, shape, _contiguous_stride(shape), False, OrderedDict()),
            )
        return NotImplemented


@dataclass(eq=False)
class _PlannedStorage:
    tensor: PlannedTensor


class ZipWriter:
    """Write records in PyTorch's layout: stored, 64-byte aligned, zip64 when large."""

    def __init__(self, fh: BinaryIO, prefix: str = "archive/") -> None:
        self.fh = fh
        self.prefix = prefix
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, header offset, size, crc
        self.offset = 0

    def _begin(self, name: str, size: int, crc: int) -> None:
        raw = (self.prefix + name).encode("utf-8")
        zip64 = size >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 0x0001, 16, size, size) if zip64 else b""
        base = self.offset + 30 + len(raw) + len(extra) + 4
        pad = (-base) % ALIGN
        extra += struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
        header = struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            45 if zip64 else 20,
            0x0800,  # UTF-8 names; sizes and CRC in the header (no data descriptor)
            0,
            0,
            (0 << 9) | (1 << 5) | 1,  # 1980-01-01: no timestamps, reproducible files
            crc,
            _ZIP64_LIMIT if zip64 else size,
            _ZIP64_LIMIT if zip64 else size,
            len(raw),
            len(extra),
        )
        self.entries.append((raw, self.offset, size, crc))
        self.fh.write(header + raw + extra)
        self.offset += len(header) + len(raw) + len(extra)

    def add_bytes(self, name: str, data: bytes) -> None:
        self._begin(name, len(data), zlib.crc32(data))
        self.fh.write(data)
        self.offset += len(data)

    def add_buffer(self, name: str, buffer: memoryview) -> None:
        self._begin(name, buffer.nbytes, _crc(buffer))
        self.fh.write(buffer)
        self.offset += buffer.nbytes

    def add_copy(self, name: str, src_fd: int, record: Record) -> None:
        self._begin(name, record.size, record.crc)
        self.fh.flush()
        copy_range(src_fd, self.fh.fileno(), record.data_offset, record.size)
        self.offset += record.size
        self.fh.seek(self.offset)

    def close(self) -> None:
        central = io.BytesIO()
        start = self.offset
        need64 = start >= _ZIP64_LIMIT or len(self.entries) >= 0xFFFF
        for raw, offset, size, crc in self.entries:
            big = size >= _ZIP64_LIMIT or offset >= _ZIP64_LIMIT
            extra = b""
            if big:
                fields = b""
                if size >= _ZIP64_LIMIT:
                    fields += struct.pack("<QQ", size, size)
                if offset >= _ZIP64_LIMIT:
                    fields += struct.pack("<Q", offset)
                extra = struct.pack("<HH", 0x0001, len(fields)) + fields
                need64 = True
            central.write(
                struct.pack(
                    "<4sHHHHHHIIIHHHHHII",
                    b"PK\x01\x02",
                    45 if big else 20,
                    45 if big else 20,
                    0x0800,
                    0,
                    0,
                    (0 << 9) | (1 << 5) | 1,
                    crc,
                    _ZIP64_LIMIT if size >= _ZIP64_LIMIT else size,
                    _ZIP64_LIMIT if size >= _ZIP64_LIMIT else size,
                    len(raw),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    _ZIP64_LIMIT if offset >= _ZIP64_LIMIT else offset,
                )
                + raw
                + extra
            )
        directory = central.getvalue()
        self.fh.write(directory)
        end = start + len(directory)
        count = len(self.entries)
        if need64:
            self.fh.write(
                struct.pack(
                    "<4sQHHIIQQQQ",
                    b"PK\x06\x06",
                    44,
                    45,
                    45,
                    0,
                    0,
                    count,
                    count,
                    len(directory),
                    start,
                )
            )
            self.fh.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1))
        self.fh.write(
            struct.pack(
                "<4sHHHHIIH",
                b"PK\x05\x06",
                0,
                0,
                min(count, 0xFFFF),
                min(count, 0xFFFF),
                min(len(directory), _ZIP64_LIMIT),
                min(start, _ZIP64_LIMIT),
                0,
            )
        )


def _crc(buffer: memoryview, chunk: int = 1 << 24) -> int:
    crc = 0
    for i in range(0, buffer.nbytes, chunk):
        crc = zlib.crc32(buffer[i : i + chunk], crc)
    return crc


def open_for_writing(path: Path) -> BinaryIO:
    """Open (creating) a file to write from its start, without O_TRUNC on an empty file.

    ext4 starts writeback of the whole file when a file opened with O_TRUNC is
    closed (its protection for replace-via-truncate); our temporary files are
    fresh and empty, and the caller decides about fsync itself.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    if os.fstat(fd).st_size:
        os.ftruncate(fd, 0)
    return os.fdopen(fd, "wb")


def copy_range(src_fd: int, dst_fd: int, offset: int, size: int) -> None:
    """Copy bytes between files in the kernel where the platform allows."""
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while done < size:
        n = 0
        if copy is not None:
            try:
                n = copy(src_fd, dst_fd, size - done, offset + done)
            except OSError:
                copy = None
                continue
        else:
            data = os.pread(src_fd, min(size - done, 1 << 24), offset + done)
            n = os.write(dst_fd, data) if data else 0
        if n <= 0:
            raise OSError(f"short copy: {done} of {size} bytes")
        done += n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's contiguous bytes without numpy (the tensor must stay alive meanwhile)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def storage_bytes(storage: torch.UntypedStorage) -> memoryview:
    nbytes = int(storage.nbytes())
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(storage.data_ptr())).cast("B")


def write(
    target: Path,
    obj: Any,
    source: ZipSource | None,
    produce: Callable[[str], Any],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write ``obj`` as ``torch.save`` would, copying input storages raw.

    ``PlannedTensor`` values inside ``obj`` are computed by ``produce(key)``
    when their record is written.
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf, source)
    pickler.dump(obj)
    data = buf.getvalue()
    storages = list(pickler.storages.values())
    src_fd = os.open(source.path, os.O_RDONLY) if source is not None else -1
    try:
        with open_for_writing(target) as fh:
            writer = ZipWriter(fh)
            writer.add_bytes("data.pkl", data)
            writer.add_bytes(".format_version", b"1")
            writer.add_bytes(".storage_alignment", str(ALIGN).encode())
            writer.add_bytes("byteorder", sys.byteorder.encode())
            digest = hashlib.sha256(data)
            for st in storages:
                name = f"data/{st.key}"
                if st.copy_from is not None:
                    assert source is not None
                    source.check(st.copy_from)
                    writer.add_copy(name, src_fd, st.copy_from)
                elif st.memory is not None:
                    writer.add_buffer(name, storage_bytes(st.memory))
                else:
                    assert st.planned is not None
                    tensor = _materialise(st.planned, produce)
                    writer.add_buffer(name, tensor_bytes(tensor))
                    del tensor
                digest.update(struct.pack("<QI", st.nbytes, writer.entries[-1][3]))
                if progress is not None:
                    progress(st.nbytes)
            writer.add_bytes("version", b"3\n")
            serial = str(int.from_bytes(digest.digest()[:16], "little")).zfill(40)[:40]
            writer.add_bytes(".data/serialization_id", serial.encode())
            writer.close()
    finally:
        if src_fd >= 0:
            os.close(src_fd)


def _materialise(planned: PlannedTensor, produce: Callable[[str], Any]) -> torch.Tensor:
    value = produce(planned.key)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{planned.key!r} was planned as a tensor but is {type(value)}")
    tensor = value.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.contiguous()


def planned_values(
    keys: list[str],
    is_source: Callable[[str], bool],
    read: Callable[[str], Any],
    specs: Callable[[str], TensorSpec | None],
) -> Iterator[tuple[str, Any]]:
    """State-dict values to pickle: input tensors as they are, the rest planned."""
    for key in keys:
        spec = specs(key)
        if is_source(key) or spec is None:
            yield key, read(key)
        else:
            yield key, PlannedTensor(key, spec)
