"""The zip container under ``torch.save`` files: stored records, 64-byte aligned, zip64 when large.

Nothing here knows about torch or pickles, so the container can be read and
written (and tested) on plain bytes. Reading returns every record's data
offset, checked against the file: a lazy reader slices tensors straight out
of the file by those offsets, so a lying directory must be caught here.
Writing produces the layout PyTorch's own writer does (``FB`` padding so each
record's data starts on a 64-byte boundary, no timestamps, zip64 extra fields
only where a size or offset needs them), so the output is bit-identical from
run to run and readable by any zip reader.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import checksum, fileio
from .storage import BlobFile, write_payload

if TYPE_CHECKING:
    from .storage import Blob

ALIGN = 64
_PAD_ID = 0x4246  # the "FB" padding extra field PyTorch's writer uses
_ZIP64_LIMIT = 0xFFFFFFFF
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01: no timestamps, reproducible files


class BadZip(ValueError):
    """The bytes are no valid zip of stored records; the message says what is wrong."""


@dataclass(frozen=True)
class Record:
    name: str
    data_offset: int
    size: int
    crc: int


@dataclass(frozen=True)
class ZipIndex:
    """A zip's size and its records by name, in directory order."""

    size: int
    records: dict[str, Record]


def crc32(buffer: memoryview | bytes, chunk: int = 1 << 24) -> int:
    """The CRC-32 in chunks, so a multi-GiB buffer never needs one huge call."""
    view = memoryview(buffer)
    crc = 0
    for i in range(0, view.nbytes, chunk):
        crc = checksum.crc32(view[i : i + chunk], crc)
    return crc


@contextmanager
def _opened(source: Path | bytes | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            yield fh
    else:
        yield source


def read_index(source: Path | bytes | BinaryIO) -> ZipIndex:
    """Every record with its data offset, each checked against its local header and the size.

    ``source`` is a path, the zip's bytes, or a seekable binary file object.
    Raises :class:`BadZip` naming the first problem.
    """
    with _opened(source) as fh:
        plain = _plain_index(fh) if isinstance(source, (str, os.PathLike)) else None
        if plain is not None:
            return plain
        size, infos = read_directory(fh)
        records: dict[str, Record] = {}
        for info in infos:
            fh.seek(info.header_offset)
            head = fh.read(30)
            if len(head) == 30:
                head += fh.read(struct.unpack("<H", head[26:28])[0])
            records[info.filename] = local_record(info, head, size)
    return ZipIndex(size, records)


_EOCD = struct.Struct("<4sHHHHIIH")
#: a central directory entry: the version it needs, flags, method, crc, sizes,
#: name/extra/comment lengths, local header offset
_CENTRAL = struct.Struct("<4s2xBxHH4xIIIHHH8xI")
_MAX_EXTRACT_VERSION = 63  # what zipfile reads; a higher one is its error to give
_LOCAL_SLACK = 128  # FB padding (< 64 bytes) and a zip64 field, as header_guess allows


def _plain_index(fh: BinaryIO) -> ZipIndex | None:
    """The index of a local zip laid out plainly (no zip64, no comment), or None.

    That is every ``torch.save`` file under 4 GiB, read with a handful of
    ``pread`` calls instead of :mod:`zipfile`'s objects. Anything else, a
    damaged file included, returns None: :func:`read_directory` then reads
    it and names what is wrong.
    """
    fd = fh.fileno()
    size = os.fstat(fd).st_size
    if size < _EOCD.size:
        return None
    tail_len = min(size, 1 << 16)
    tail = os.pread(fd, tail_len, size - tail_len)
    sig, disk, cd_disk, here, total, cd_size, cd_offset, comment = _EOCD.unpack_from(
        tail, len(tail) - _EOCD.size
    )
    end = size - _EOCD.size
    if sig != b"PK\x05\x06" or disk or cd_disk or here != total or comment:
        return None
    if cd_offset + cd_size == end - _END64.size - _LOCATOR.size:  # PyTorch writes both
        end -= _END64.size + _LOCATOR.size
        at = len(tail) - (size - end)
        if at < 0 or not _zip64_end(tail, at, end, total, cd_size, cd_offset):
            return None
    if cd_offset + cd_size != end or cd_size > len(tail) - (size - end):
        return None
    cd = tail[len(tail) - (size - end) - cd_size : len(tail) - (size - end)]
    records: dict[str, Record] = {}
    pos = 0
    for _ in range(total):
        if pos + _CENTRAL.size > len(cd):
            return None
        sig, needs, flags, method, crc, csize, usize, nlen, elen, clen, offset = (
            _CENTRAL.unpack_from(cd, pos)
        )
        raw = cd[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen]
        pos += _CENTRAL.size + nlen + elen + clen
        if sig != b"PK\x01\x02" or needs > _MAX_EXTRACT_VERSION or method or elen:
            return None
        if csize != usize or _ZIP64_LIMIT in (usize, offset):
            return None
        try:
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            return None
        if "\x00" in name or name in records or not 0 <= offset < size or len(raw) != nlen:
            return None
        head = os.pread(fd, 30 + nlen + _LOCAL_SLACK, offset)
        if len(head) >= 30 and header_length(head) > len(head):
            return None
        try:
            records[name] = _local(name, raw, crc, usize, offset, head, size)
        except BadZip:
            return None
    if pos != cd_size:
        return None
    return ZipIndex(size, records)


_END64 = struct.Struct("<4sQHHIIQQQQ")
_LOCATOR = struct.Struct("<4sIQI")


def _zip64_end(tail: bytes, at: int, offset: int, total: int, cd_size: int, cd_at: int) -> bool:
    """Whether the zip64 end record at ``tail[at:]`` (file offset ``offset``) and its
    locator repeat what the plain end record says."""
    sig, length, _made, _needed, disk, cd_disk, here, entries, size64, at64 = _END64.unpack_from(
        tail, at
    )
    lsig, ldisk, where, disks = _LOCATOR.unpack_from(tail, at + _END64.size)
    return (
        sig == b"PK\x06\x06"
        and length == _END64.size - 12
        and (disk, cd_disk, here, entries, size64, at64) == (0, 0, total, total, cd_size, cd_at)
        and (lsig, ldisk, where, disks) == (b"PK\x06\x07", 0, offset, 1)
    )


def read_directory(fh: BinaryIO) -> tuple[int, list[zipfile.ZipInfo]]:
    """The zip's size and central directory, each entry a stored record inside the file.

    Only the end records and the directory are read: a reader that fetches by
    ranges resolves each record's local header (:func:`local_record`) when it
    needs that record's bytes.
    """
    size = fh.seek(0, io.SEEK_END)
    try:
        with zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise BadZip(f"damaged zip directory: {exc}") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise BadZip(f"record {info.filename!r} is compressed")
        if info.compress_size != info.file_size:
            raise BadZip(f"record {info.filename!r} has two different sizes")
        if not 0 <= info.header_offset < size:
            raise BadZip(f"record {info.filename!r} has no valid local header")
    return size, infos


def header_guess(info: zipfile.ZipInfo) -> int:
    """Bytes from a record's local header to its data, as PyTorch writes it (at most 64
    bytes of padding, a zip64 field); :func:`local_record` says when there are more."""
    return 30 + len(info.orig_filename.encode("utf-8", "replace")) + 128


def header_length(head: bytes) -> int:
    """Bytes from a local header (at least 30 of them in ``head``) to its record's data."""
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return 30 + int(name_len) + int(extra_len)


def local_record(info: zipfile.ZipInfo, head: bytes, size: int) -> Record:
    """A directory entry checked against its local header (``head``: the bytes it starts)."""
    raw = info.orig_filename.encode("utf-8", "replace")
    return _local(info.filename, raw, info.CRC, info.file_size, info.header_offset, head, size)


def _local(
    name: str, raw: bytes, crc: int, file_size: int, header_offset: int, head: bytes, size: int
) -> Record:
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise BadZip(f"record {name!r} has no valid local header")
    flags, method = struct.unpack("<HH", head[6:10])
    local_crc, csize, usize = struct.unpack("<III", head[14:26])
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    # Without a data descriptor (flag bit 3: what torch.save writes), the
    # local header repeats the checksum and sizes; they must agree.
    sizes_ok = (csize, usize) in ((file_size, file_size), (_ZIP64_LIMIT, _ZIP64_LIMIT))
    if (
        method != 0
        or head[30 : 30 + name_len] != raw
        or (not flags & 0x08 and (local_crc != crc or not sizes_ok))
    ):
        raise BadZip(f"record {name!r} disagrees with its local header")
    data_offset = header_offset + 30 + name_len + extra_len
    if data_offset + file_size > size:
        raise BadZip(f"record {name!r} runs past the end of the file")
    return Record(name, data_offset, file_size, crc)


@dataclass
class ZipReader:
    """A zip read by ranges (:class:`~.storage.Blob`): the directory first, records when asked.

    Opening reads the end records and the central directory; a record's
    local header is checked when its bytes are first read, together with
    them (one request). ``check_all`` checks every local header up front,
    as :func:`read_index` does, where that costs little (a local file).
    """

    blob: Blob
    size: int = 0
    infos: dict[str, zipfile.ZipInfo] = field(default_factory=dict)
    records: dict[str, Record] = field(default_factory=dict)
    _window: tuple[int, bytes] = (0, b"")

    @classmethod
    def open(cls, blob: Blob, *, check_all: bool = False) -> ZipReader:
        size, infos = read_directory(BlobFile(blob))  # type: ignore[arg-type]
        reader = cls(blob, size, {i.filename: i for i in infos})
        if check_all:
            for name in reader.infos:
                reader.record(name)
        return reader

    def _bytes(self, start: int, end: int) -> bytes:
        lo, data = self._window
        if lo <= start and end <= lo + len(data):
            return data[start - lo : end - lo]
        return self.blob.read(start, end)

    def prefetch(self, names: Iterable[str], limit: int = 1 << 20) -> None:
        """Read the span holding these small records in one request (if at most ``limit``)."""
        infos = [self.infos[n] for n in names if n in self.infos]
        if not infos:
            return
        lo = min(i.header_offset for i in infos)
        hi = min(self.size, max(i.header_offset + header_guess(i) + i.file_size for i in infos))
        if hi - lo <= limit:
            self._window = (lo, self.blob.read(lo, hi))

    def record(self, name: str) -> Record:
        """The record's data offset, its local header checked."""
        found = self.records.get(name)
        if found is None:
            info = self.infos[name]
            head = self._bytes(info.header_offset, info.header_offset + header_guess(info))
            found = self.records[name] = local_record(info, head, self.size)
        return found

    def read(self, name: str) -> bytes:
        """A record's bytes, checked against its CRC (header and data in one request)."""
        info = self.infos[name]
        if name in self.records:
            record = self.records[name]
            data = self._bytes(record.data_offset, record.data_offset + record.size)
        else:
            start = info.header_offset
            chunk = self._bytes(start, start + header_guess(info) + info.file_size)
            record = self.records[name] = local_record(info, chunk, self.size)
            skip = record.data_offset - start
            data = chunk[skip : skip + record.size]
            if len(data) < record.size:
                data = self._bytes(record.data_offset, record.data_offset + record.size)
        if checksum.crc32(data) != record.crc:
            raise BadZip(f"record {name} fails its checksum")
        return data

    def stream(self, name: str, chunk: int = 1 << 24) -> Iterator[bytes]:
        """A record's bytes in pieces, checked against its CRC after the last one."""
        record = self.record(name)
        crc = 0
        for start in range(record.data_offset, record.data_offset + record.size, chunk):
            data = self.blob.read(start, min(start + chunk, record.data_offset + record.size))
            crc = checksum.crc32(data, crc)
            yield data
        if crc != record.crc:
            raise BadZip(f"record {name} fails its checksum")


class ZipWriter:
    """Write stored records in PyTorch's layout to a binary file, then the directory."""

    def __init__(self, fh: BinaryIO, prefix: str = "archive/") -> None:
        self.fh = fh
        #: a local file, which records can be copied into in the kernel
        self.copies_files = isinstance(fh, (io.BufferedWriter, io.FileIO))
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
            _DOS_DATE,
            crc,
            _ZIP64_LIMIT if zip64 else size,
            _ZIP64_LIMIT if zip64 else size,
            len(raw),
            len(extra),
        )
        self.entries.append((raw, self.offset, size, crc))
        self.fh.write(header + raw + extra)
        self.offset += len(header) + len(raw) + len(extra)

    @property
    def last_crc(self) -> int:
        """The checksum of the record written last."""
        return self.entries[-1][3]

    def add_bytes(self, name: str, data: bytes) -> None:
        self._begin(name, len(data), checksum.crc32(data))
        self.fh.write(data)
        self.offset += len(data)

    def add_buffer(self, name: str, buffer: memoryview) -> None:
        self._begin(name, buffer.nbytes, crc32(buffer))
        write_payload(self.fh, buffer)
        self.offset += buffer.nbytes

    def add_known(self, name: str, record: Record, chunks: Iterable[bytes | memoryview]) -> None:
        """A record whose size and checksum are known, its bytes written as they arrive."""
        self._begin(name, record.size, record.crc)
        done = 0
        for chunk in chunks:
            write_payload(self.fh, chunk)
            done += len(chunk) if not isinstance(chunk, memoryview) else chunk.nbytes
        if done != record.size:
            raise OSError(f"short copy: {done} of {record.size} bytes")
        self.offset += record.size

    def add_copy(self, name: str, src_fd: int, record: Record) -> None:
        """A record whose bytes (checksum known) are copied from another file in the kernel."""
        self._begin(name, record.size, record.crc)
        self.fh.flush()
        fileio.copy_range(src_fd, self.fh.fileno(), record.data_offset, record.size)
        self.offset += record.size
        self.fh.seek(self.offset)

    def close(self) -> None:
        """Write the central directory (zip64 end records where sizes or counts need them)."""
        start = self.offset
        directory, big = self._directory()
        self.fh.write(directory)
        count = len(self.entries)
        if big or start >= _ZIP64_LIMIT or count >= 0xFFFF:
            end = start + len(directory)
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

    def _directory(self) -> tuple[bytes, bool]:
        """The central directory, and whether any entry needed zip64 fields."""
        central = io.BytesIO()
        any_big = False
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
                any_big = True
            version = 45 if big else 20
            stored = _ZIP64_LIMIT if size >= _ZIP64_LIMIT else size
            central.write(
                struct.pack(
                    "<4sHHHHHHIIIHHHHHII",
                    b"PK\x01\x02",
                    version,
                    version,
                    0x0800,
                    0,
                    0,
                    _DOS_DATE,
                    crc,
                    stored,
                    stored,
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
        return central.getvalue(), any_big
