"""``torch.save``'s file layout, read lazily and written as a stream.

A ``torch.save`` file is an uncompressed zip (:mod:`.zip64`): ``data.pkl``
(the object, with each tensor's storage replaced by a persistent id) and one
``data/<key>`` record of raw bytes per storage, 64-byte aligned. That layout
makes the fast path possible:

* reading memory-maps the whole file once and unpickles ``data.pkl`` under
  the safety policy (:mod:`.unpickle`), every storage a slice of that map, so
  opening a checkpoint reads no tensor data;
* writing pickles the new object ourselves and then, for every storage that
  still lives in the input file, copies its record's bytes in the kernel
  (``copy_file_range``), checksum included; only tensors a migration really
  computes are materialised, one at a time.

The output is what ``torch.save`` writes (same records, same pickle), readable
by any PyTorch since 1.6, and bit-identical from run to run.

A file on a store (:class:`RemoteZipSource`) is read by ranges instead: the
zip's directory and ``data.pkl``, with every storage a *meta* storage that
stands for its record; a tensor's bytes are fetched (and checked) when it is
read, and an unchanged one is streamed record to record when written.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
import struct
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from ..errors import CheckpointError
from ..plan.nodes import TensorSpec
from . import checksum, fileio, unpickle
from .torch_peek import pickle_record
from .zip64 import ALIGN, BadZip, Record, ZipReader, ZipWriter, crc32, read_index

if TYPE_CHECKING:
    from .remote import RemotePath
    from .storage import Output

_CHUNK = 1 << 24


class NeedsTorchLoad(Exception):
    """A valid file the lazy reader leaves to ``torch.load`` (e.g. another byte order)."""


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
        view = fileio.storage_bytes(
            self.base[record.data_offset : record.data_offset + record.size]
        )
        if crc32(view) != record.crc:
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

    def read_record(self, record: Record, what: str) -> bytes:
        """A small record's bytes, read from the file and checked."""
        with open(self.path, "rb") as fh:
            fh.seek(record.data_offset)
            data = fh.read(record.size)
        if checksum.crc32(data) != record.crc:
            raise _bad(self.path, f"{what} fails its checksum")
        return data

    def copy_into(self, writer: ZipWriter, name: str, record: Record, src_fd: int) -> None:
        """Write an input record unchanged: in the kernel into a local file, else from the map."""
        self.check(record)
        if src_fd >= 0 and writer.copies_files:
            writer.add_copy(name, src_fd, record)
            return
        assert self.base is not None
        view = fileio.storage_bytes(
            self.base[record.data_offset : record.data_offset + record.size]
        )
        writer.add_known(
            name, record, (view[i : i + _CHUNK] for i in range(0, view.nbytes, _CHUNK))
        )


@dataclass
class RemoteZipSource:
    """A torch file on a store: its records fetched by ranges, storages standing in as meta."""

    path: RemotePath
    zip: ZipReader
    prefix: str
    #: meta storage (its ``_cdata``) -> the record it stands for
    by_storage: dict[int, Record] = field(default_factory=dict)
    _last: tuple[str, torch.UntypedStorage] | None = None

    @property
    def size(self) -> int:
        return self.zip.size

    def read_record(self, name: str, what: str) -> bytes:
        try:
            return self.zip.read(name)
        except BadZip as exc:
            raise _damaged_record(self.path, what, exc) from None

    def locate(self, storage: torch.UntypedStorage) -> Record | None:
        if storage.device.type != "meta":
            return None
        record = self.by_storage.get(storage._cdata)
        return record if record is not None and record.size == storage.nbytes() else None

    def check_storage(self, storage: torch.UntypedStorage) -> None:
        """Fetched records are checked as they arrive."""

    def materialise(self, tensor: torch.Tensor) -> torch.Tensor:
        """A stand-in tensor with its bytes fetched (one ranged read per storage, checked)."""
        if tensor.device.type != "meta":
            return tensor
        record = self.by_storage.get(tensor.untyped_storage()._cdata)
        if record is None:
            return tensor
        if self._last is None or self._last[0] != record.name:
            data = bytearray(self.read_record(record.name, f"record {record.name}"))
            fetched = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0)
            self._last = (record.name, fetched.untyped_storage())
        out = torch.empty((0,), dtype=tensor.dtype)
        out.set_(self._last[1], tensor.storage_offset(), tensor.shape, tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=tensor.requires_grad)
        return out

    def materialise_all(self, obj: Any, skip: Any = None) -> Any:
        """``obj`` with every stand-in tensor fetched (``skip``: a subtree left as it is)."""
        memo: dict[int, Any] = {}

        def walk(node: Any) -> Any:
            if node is skip:
                return node
            if id(node) in memo:
                return memo[id(node)]
            out: Any = node
            if isinstance(node, torch.Tensor):
                out = self.materialise(node)
            elif isinstance(node, dict):
                out = copy.copy(node)
                for k, v in node.items():
                    out[k] = walk(v)
            elif isinstance(node, list):
                out = [walk(v) for v in node]
            elif isinstance(node, tuple) and type(node) is tuple:
                out = tuple(walk(v) for v in node)
            memo[id(node)] = out
            return out

        return walk(obj)

    def copy_into(self, writer: ZipWriter, name: str, record: Record, src_fd: int) -> None:
        """Stream an input record unchanged, checked against its CRC as it goes."""
        try:
            writer.add_known(name, record, self.zip.stream(record.name, _CHUNK))
        except BadZip as exc:
            raise _damaged_record(self.path, f"record {record.name}", exc) from None


def _damaged_record(path: object, what: str, exc: BadZip) -> CheckpointError:
    if "checksum" in str(exc):
        return CheckpointError(
            f"{path} is damaged: {what} fails its checksum",
            hint="the file was corrupted on disk or in transfer; restore or re-download it",
        )
    return _bad(path, str(exc))


def _bad(path: object, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable PyTorch checkpoint ({what})",
        hint="the file may be truncated or damaged; check it was copied completely",
    )


def read_zip(path: Path) -> ZipSource:
    """The zip's records (every one checked against the file) and where ``data.pkl`` sits."""
    try:
        index = read_index(path)
    except BadZip as exc:
        raise _bad(path, str(exc)) from None
    pkl = pickle_record(index.records, path)
    source = ZipSource(path, index.size, pkl[: -len("data.pkl")], index.records)
    source.by_offset = {r.data_offset: r for r in index.records.values()}
    return source


def load(
    path: Path | RemotePath, *, trust_pickle: bool = False, opaque: bool = False
) -> tuple[Any, ZipSource | RemoteZipSource]:
    """Unpickle ``data.pkl`` with every storage a lazy slice of one memory map.

    ``opaque`` reads the structure of a pickle that needs globals outside the
    weights-only allow-list without running any of them (for checking a file
    this process wrote from a trusted input). Raises :class:`NeedsTorchLoad`
    for a valid file only ``torch.load`` can read.
    """
    if not isinstance(path, Path):
        return load_remote(path, trust_pickle=trust_pickle)
    source = read_zip(path)
    order = source.records.get(source.prefix + "byteorder")
    if order is not None:
        mark = source.read_record(order, "the byteorder record")
        if mark.decode("ascii", "replace") != sys.byteorder:
            raise NeedsTorchLoad  # byte-swapping is torch.load's business
    if source.size:
        source.base = torch.UntypedStorage.from_file(  # type: ignore[assignment]
            str(path), shared=False, nbytes=source.size
        )
    data = source.read_record(source.records[source.prefix + "data.pkl"], "data.pkl")
    load_storage = _storage_loader(source)
    return unpickle.unpickle(data, load_storage, trust_pickle=trust_pickle, opaque=opaque), source


def load_remote(path: RemotePath, *, trust_pickle: bool = False) -> tuple[Any, RemoteZipSource]:
    """Unpickle ``data.pkl`` read by ranges; every storage a meta stand-in for its record."""
    try:
        reader = ZipReader.open(path.blob())
    except BadZip as exc:
        raise _bad(path, str(exc)) from None
    pkl = pickle_record(list(reader.infos), path)
    prefix = pkl[: -len("data.pkl")]
    source = RemoteZipSource(path, reader, prefix)
    reader.prefetch([pkl, prefix + "byteorder", prefix + ".format_version"])
    if prefix + "byteorder" in reader.infos:
        mark = source.read_record(prefix + "byteorder", "the byteorder record")
        if mark.decode("ascii", "replace") != sys.byteorder:
            raise NeedsTorchLoad
    data = source.read_record(pkl, "data.pkl")

    loaded: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        key, dtype, nbytes = _storage_id(saved_id)
        if key in loaded:
            return loaded[key]
        name = f"{prefix}data/{key}"
        info = reader.infos.get(name)
        if info is None or nbytes > info.file_size or nbytes < 0:
            raise pickle.UnpicklingError(f"storage {key!r} is missing or too short")
        untyped = torch.UntypedStorage(nbytes, device="meta")  # type: ignore[no-untyped-call]
        source.by_storage[untyped._cdata] = Record(name, -1, info.file_size, info.CRC)
        typed = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
            wrap_storage=untyped, dtype=dtype, _internal=True
        )
        loaded[key] = typed
        return typed

    return unpickle.unpickle(data, persistent_load, trust_pickle=trust_pickle), source


def _storage_id(saved_id: Any) -> tuple[str, torch.dtype, int]:
    """(record key, dtype, byte count) of a pickle's storage reference."""
    if not isinstance(saved_id, tuple) or len(saved_id) != 5 or saved_id[0] != "storage":
        raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
    _, storage_type, key, _location, numel = saved_id
    if isinstance(storage_type, torch.serialization.StorageType):  # a marker of one load
        return str(key), storage_type.dtype, int(numel) * storage_type.dtype.itemsize
    dtype = _STORAGE_DTYPES.get(storage_type)
    if dtype is None:
        with warnings.catch_warnings():  # the legacy storage classes warn on .dtype
            warnings.simplefilter("ignore")
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        _STORAGE_DTYPES[storage_type] = dtype
    return str(key), dtype, int(numel) * dtype.itemsize


#: A pickle's storage class -> its dtype (asking the legacy classes warns each time).
_STORAGE_DTYPES: dict[Any, torch.dtype] = {}


def _storage_loader(source: ZipSource) -> Callable[[Any], torch.storage.TypedStorage]:
    """The pickle's ``persistent_load``: each storage id becomes a slice of the file's map."""
    loaded: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        key, dtype, nbytes = _storage_id(saved_id)
        if key in loaded:
            return loaded[key]
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

    return persistent_load


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
    """One storage record of the output: copied from the input, in memory, or computed."""

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


@dataclass(eq=False)
class _PlannedStorage:
    tensor: PlannedTensor


@dataclass(eq=False)
class _StoredStorage:
    """An input record a remote stand-in tensor views: written by copying the record."""

    record: Record
    dtype: torch.dtype
    nbytes: int


Source = ZipSource | RemoteZipSource


class _Pickler(pickle.Pickler):
    """torch.save's pickle, with planned tensors standing in for computed ones."""

    def __init__(self, file: BinaryIO, source: Source | None) -> None:
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
        if isinstance(obj, _StoredStorage):
            record = obj.record
            key = self._key(("input", record.name), lambda k: _Storage(k, copy_from=record))
            numel = obj.nbytes // obj.dtype.itemsize
            return ("storage", _storage_type(obj.dtype), key, "cpu", numel)
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
        if isinstance(obj, torch.Tensor) and obj.device.type == "meta":
            return self._stored(obj)
        return NotImplemented

    def _stored(self, tensor: torch.Tensor) -> Any:
        """A remote input's stand-in tensor, pickled as ``torch.save`` pickles the real one."""
        untyped = tensor.untyped_storage()
        record = self.source.locate(untyped) if self.source is not None else None
        if record is None:
            raise CheckpointError("a meta tensor has no data to write; pass real tensors")
        if isinstance(tensor, torch.nn.Parameter):
            return (
                torch._utils._rebuild_parameter,
                (tensor.detach(), tensor.requires_grad, OrderedDict()),
            )
        storage = _StoredStorage(record, tensor.dtype, int(untyped.nbytes()))
        args = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        return (torch._utils._rebuild_tensor_v2, (*args, tensor.requires_grad, OrderedDict()))


def write(
    target: Output,
    obj: Any,
    source: Source | None,
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
    src_fd = os.open(source.path, os.O_RDONLY) if isinstance(source, ZipSource) else -1
    try:
        with fileio.open_for_writing(target) as fh:
            writer = ZipWriter(fh)
            writer.add_bytes("data.pkl", data)
            writer.add_bytes(".format_version", b"1")
            writer.add_bytes(".storage_alignment", str(ALIGN).encode())
            writer.add_bytes("byteorder", sys.byteorder.encode())
            digest = hashlib.sha256(data)
            for st in pickler.storages.values():
                _write_storage(writer, st, source, src_fd, produce)
                digest.update(struct.pack("<QI", st.nbytes, writer.last_crc))
                if progress is not None:
                    progress(st.nbytes)
            writer.add_bytes("version", b"3\n")
            serial = str(int.from_bytes(digest.digest()[:16], "little")).zfill(40)[:40]
            writer.add_bytes(".data/serialization_id", serial.encode())
            writer.close()
    finally:
        if src_fd >= 0:
            os.close(src_fd)


def _write_storage(
    writer: ZipWriter,
    st: _Storage,
    source: Source | None,
    src_fd: int,
    produce: Callable[[str], Any],
) -> None:
    """One storage record: copied from the input (checked first), from memory, or computed."""
    name = f"data/{st.key}"
    if st.copy_from is not None:
        assert source is not None
        source.copy_into(writer, name, st.copy_from, src_fd)
    elif st.memory is not None:
        writer.add_buffer(name, fileio.storage_bytes(st.memory))
    else:
        assert st.planned is not None
        tensor = _materialise(st.planned, produce)
        writer.add_buffer(name, fileio.tensor_bytes(tensor))
        del tensor


def _materialise(planned: PlannedTensor, produce: Callable[[str], Any]) -> torch.Tensor:
    value = produce(planned.key)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{planned.key!r} was planned as a tensor but is {type(value)}")
    return fileio.plain_tensor(value)
