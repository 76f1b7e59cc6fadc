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
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import sys
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError
from ..plan.nodes import TensorSpec
from . import fileio, unpickle
from .zip64 import ALIGN, BadZip, Record, ZipWriter, crc32, read_index


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
        if zlib.crc32(data) != record.crc:
            raise _bad(self.path, f"{what} fails its checksum")
        return data


def _bad(path: Path, what: str) -> CheckpointError:
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
    pkl = [n for n in index.records if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise _bad(path, "no data.pkl record")
    source = ZipSource(path, index.size, pkl[0][: -len("data.pkl")], index.records)
    source.by_offset = {r.data_offset: r for r in index.records.values()}
    return source


def load(path: Path, *, trust_pickle: bool = False, opaque: bool = False) -> tuple[Any, ZipSource]:
    """Unpickle ``data.pkl`` with every storage a lazy slice of one memory map.

    ``opaque`` reads the structure of a pickle that needs globals outside the
    weights-only allow-list without running any of them (for checking a file
    this process wrote from a trusted input). Raises :class:`NeedsTorchLoad`
    for a valid file only ``torch.load`` can read.
    """
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


def _storage_loader(source: ZipSource) -> Callable[[Any], torch.storage.TypedStorage]:
    """The pickle's ``persistent_load``: each storage id becomes a slice of the file's map."""
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
        nbytes = int(numel) * dtype.itemsize
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
    src_fd = os.open(source.path, os.O_RDONLY) if source is not None else -1
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
    source: ZipSource | None,
    src_fd: int,
    produce: Callable[[str], Any],
) -> None:
    """One storage record: copied in the kernel (checked first), from memory, or computed."""
    name = f"data/{st.key}"
    if st.copy_from is not None:
        assert source is not None
        source.check(st.copy_from)
        writer.add_copy(name, src_fd, st.copy_from)
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
