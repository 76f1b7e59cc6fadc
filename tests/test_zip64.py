"""The zip container under torch files, on plain bytes (and small files): no torch.

What ``ZipWriter`` writes must be an ordinary zip (``zipfile`` reads it and
its checksums agree), laid out the way PyTorch's reader needs (stored, each
record's data 64-byte aligned); ``read_index`` must find every record's data
and refuse a container whose directory and local headers disagree. A local
file is read by a shorter path where its layout is plain; it must find what
the general reader finds in the same bytes, and refuse what it refuses.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptmigrate.formats.zip64 import ALIGN, BadZip, ZipWriter, _plain_index, read_index

RECORDS = {"data.pkl": b"\x80\x02}q\x00.", "data/0": bytes(range(256)) * 5, "version": b"3\n"}


def build(records: dict[str, bytes], prefix: str = "archive/") -> bytes:
    buf = io.BytesIO()
    writer = ZipWriter(buf, prefix)
    for name, data in records.items():
        if name.startswith("data/"):
            writer.add_buffer(name, memoryview(data))
        else:
            writer.add_bytes(name, data)
    writer.close()
    return buf.getvalue()


def test_written_zip_reads_back_with_zipfile() -> None:
    data = build(RECORDS)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None  # every CRC agrees
        assert zf.namelist() == [f"archive/{n}" for n in RECORDS]
        assert all(zf.read(f"archive/{n}") == v for n, v in RECORDS.items())
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_read_index_finds_aligned_data_from_bytes_and_file_objects() -> None:
    data = build(RECORDS)
    index = read_index(data)
    assert read_index(io.BytesIO(data)) == index
    assert index.size == len(data)
    for name, value in RECORDS.items():
        record = index.records[f"archive/{name}"]
        assert record.data_offset % ALIGN == 0
        assert data[record.data_offset : record.data_offset + record.size] == value
        assert record.crc == zlib.crc32(value)


def test_same_records_same_bytes() -> None:
    assert build(RECORDS) == build(dict(RECORDS))


def test_many_records_use_the_zip64_end_records() -> None:
    """65535 records do not fit the classic end record's count: zip64 ones carry it."""
    many = {f"data/{i}": i.to_bytes(2, "little") for i in range(0xFFFF + 1)}
    data = build(many, prefix="m/")
    assert b"PK\x06\x06" in data[-200:] and b"PK\x06\x07" in data[-200:]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert len(zf.infolist()) == len(many)
        assert zf.read("m/data/65535") == (65535).to_bytes(2, "little")
    assert len(read_index(data).records) == len(many)


def test_a_stdlib_zip_of_stored_records_is_read() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a/data.pkl", b"abc")
    record = read_index(buf.getvalue()).records["a/data.pkl"]
    assert buf.getvalue()[record.data_offset : record.data_offset + 3] == b"abc"


def _local_crc_flipped(data: bytes) -> bytes:
    out = bytearray(data)
    out[data.find(b"PK\x03\x04", 1) + 14] ^= 0x5A  # the second record's local CRC
    return bytes(out)


def _compressed() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/data.pkl", b"abc" * 100)
    return buf.getvalue()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[: len(d) // 2], "damaged zip directory"),
        (_local_crc_flipped, "record 'archive/data/0' disagrees with its local header"),
        (lambda d: b"not a zip at all", "damaged zip directory"),
        (lambda d: _compressed(), "record 'a/data.pkl' is compressed"),
    ],
)
def test_damaged_containers_are_refused(damage: object, message: str) -> None:
    with pytest.raises(BadZip, match=message):
        read_index(damage(build(RECORDS)))  # type: ignore[operator]


def test_the_container_needs_no_torch() -> None:
    code = (
        "import io, sys, zipfile\n"
        "from ckptmigrate.formats.zip64 import ZipWriter, read_index\n"
        "buf = io.BytesIO()\n"
        "w = ZipWriter(buf)\n"
        "w.add_bytes('data.pkl', b'x')\n"
        "w.close()\n"
        "assert zipfile.ZipFile(buf).read('archive/data.pkl') == b'x'\n"
        "print(list(read_index(buf.getvalue()).records), 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "['archive/data.pkl'] False"


def test_the_fast_checksum_is_zlibs_crc32() -> None:
    """The CRC-32 records are checked with (ISA-L's where installed) agrees with zlib's."""
    import random

    import torch

    from ckptmigrate.formats import checksum, fileio
    from ckptmigrate.formats.zip64 import crc32

    rng = random.Random(0)
    for size in (0, 1, 7, 64, 4095, 4096, 1 << 20, (1 << 20) + 3):
        data = rng.randbytes(size)
        assert checksum.crc32(data) == zlib.crc32(data)
        assert crc32(data, chunk=1000) == zlib.crc32(data)  # in pieces, continued
        head, tail = data[: size // 3], data[size // 3 :]
        assert checksum.crc32(tail, checksum.crc32(head)) == zlib.crc32(data)
    tensor = torch.arange(1000, dtype=torch.float32)  # a tensor's bytes, as records are checked
    view = fileio.storage_bytes(tensor.untyped_storage())
    assert crc32(view) == zlib.crc32(tensor.numpy().tobytes())
    assert checksum.IMPLEMENTATION in ("isal", "zlib")


def test_records_are_checked_with_isal_where_it_is_installed() -> None:
    """Installed with ckptmigrate on the platforms it has wheels for (this suite's included)."""
    import importlib.util

    from ckptmigrate.formats import checksum

    if importlib.util.find_spec("isal") is not None:
        assert checksum.IMPLEMENTATION == "isal"
    else:
        assert checksum.IMPLEMENTATION == "zlib"


def _stdlib_zip(comment: bytes = b"", prepend: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a/data.pkl", b"abc")
        zf.writestr("a/data/0", bytes(100))
        zf.comment = comment
    return prepend + buf.getvalue()


@pytest.mark.parametrize(
    "make, plain",
    [
        (lambda: build(RECORDS), True),
        (lambda: build({f"data/{i}": bytes([i]) for i in range(40)}), True),
        (lambda: _stdlib_zip(), True),
        (lambda: _stdlib_zip(comment=b"a comment"), False),
        (lambda: _stdlib_zip(prepend=b"#!/bin/sh\n"), False),
    ],
)
def test_a_local_file_reads_as_the_general_reader_reads_its_bytes(
    tmp_path: Path, make: Callable[[], bytes], plain: bool
) -> None:
    data = make()
    path = tmp_path / "f.zip"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        assert (_plain_index(fh) is not None) == plain  # else it leaves the file to zipfile
    assert read_index(path) == read_index(data)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],
        _local_crc_flipped,
        lambda d: _compressed(),
        lambda d: d[:-30] + bytes(8) + d[-22:],  # the directory's tail zeroed
    ],
)
def test_a_damaged_local_file_is_refused_as_its_bytes_are(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    data = damage(build(RECORDS))
    path = tmp_path / "f.zip"
    path.write_bytes(data)
    with pytest.raises(BadZip) as from_bytes:
        read_index(data)
    with pytest.raises(BadZip) as from_file:
        read_index(path)
    assert str(from_file.value) == str(from_bytes.value)
