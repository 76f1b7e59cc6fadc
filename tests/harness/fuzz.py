"""Damaged and lying checkpoints, by the thousand: always one ``Error:`` line, exit 1.

Run by tests/test_guarantee_fuzz.py as ``python -m tests.harness.fuzz WORKDIR``.
One process imports everything once, caps its address space (RLIMIT_AS)
and its CPU time (RLIMIT_CPU), and runs ``ckptmigrate upgrade CASE``
in-process (click's CliRunner) on every mutated file, each case under a
CPU-time alarm (ITIMER_PROF: a loaded machine does not make a case late).
Per case it checks: exit 1, stderr's last line is the only ``Error: `` line,
no traceback, no "internal error", no out-of-memory message, the input's
bytes unchanged, no temporary file left. A mutation that hits bytes no
reader gives meaning to (a zip field nothing reads, JSON whitespace) may
upgrade fine: then the output must be bit-identical to a clean run's output,
and the case is counted as "benign", by which field was hit. Prints a JSON
report as the last line of stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import resource
import signal
import struct
import sys
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from click.testing import CliRunner
from tests.harness.common import REV_A, leftovers, stamp_state_dict, write_project

from ckptmigrate.cli import cli

# The fuzz lineage: A -> B renames, computes and adds, and drops nothing, so
# every input record's bytes are used by the upgrade (and CRC-checked). What it
# adds is an integer buffer: no parameter is new, so the optimizer's order is
# known without a configured model.
FUZZ_UPGRADE = """\
    op.rename_key("fc1.weight", "layer1.weight")
    op.rename_key("fc1.bias", "layer1.bias")
    op.map_tensor("fc2.weight", lambda t: t * 2)
    op.reset_optimizer_state("fc2.weight")
    op.transpose("emb.weight", 0, 1)
    op.add_tensor("extra", shape=(4,), dtype=torch.int64, init="ones")"""
FUZZ_DOWNGRADE = """\
    op.drop_key("extra")
    op.transpose("emb.weight", 0, 1)
    op.map_tensor("fc2.weight", lambda t: t / 2)
    op.reset_optimizer_state("fc2.weight")
    op.rename_key("layer1.bias", "fc1.bias")
    op.rename_key("layer1.weight", "fc1.weight")"""


class CaseTimeout(BaseException):
    """Raised by the alarm: a case used more CPU time than its bound."""


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise CaseTimeout


def _out_of_cpu(_signum: int, _frame: FrameType | None) -> None:
    # fd 2 itself: sys.stderr may be a CliRunner's capture just now
    os.write(2, b"the fuzz run used up its CPU-time limit (RLIMIT_CPU)\n")
    os._exit(3)


def _bound(headroom_mb: int, cpu_seconds: int) -> dict[str, int]:
    """Cap this process's address space and CPU time from here on; the limits in force."""
    signal.signal(signal.SIGXCPU, _out_of_cpu)
    signal.signal(signal.SIGPROF, _alarm)
    address_space = _vm_size() + headroom_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    used = resource.getrusage(resource.RUSAGE_SELF)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    cpu = math.ceil(used.ru_utime + used.ru_stime) + cpu_seconds
    resource.setrlimit(resource.RLIMIT_CPU, (cpu if hard < 0 else min(cpu, hard), hard))
    return {  # as the kernel has them now
        "address_space_mb": resource.getrlimit(resource.RLIMIT_AS)[0] >> 20,
        "cpu_seconds": resource.getrlimit(resource.RLIMIT_CPU)[0],
    }


# --------------------------------------------------------------------------- bases


def _model_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    torch.manual_seed(7)
    emb, fc1, fc2 = torch.nn.Embedding(12, 6), torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
    model = torch.nn.Sequential()
    model.add_module("emb", emb)
    model.add_module("fc1", fc1)
    model.add_module("fc2", fc2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fc2(fc1(emb(torch.arange(12)))).sum().backward()
    opt.step()
    return model.state_dict(), opt.state_dict()


@dataclass
class ZipLayout:
    """Where each part of a zip file lies, to aim flips at it."""

    central: tuple[int, int]
    records: dict[str, tuple[int, int, int]]  # name -> (header offset, data offset, size)
    local: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each header

    @classmethod
    def of(cls, data: bytes) -> ZipLayout:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
        records: dict[str, tuple[int, int, int]] = {}
        local: list[tuple[int, int]] = []
        for info in infos:
            start = info.header_offset
            name_len, extra_len = struct.unpack("<HH", data[start + 26 : start + 30])
            data_offset = start + 30 + name_len + extra_len
            records[info.filename] = (start, data_offset, info.file_size)
            local.append((start, data_offset))
        eocd = data.rfind(b"PK\x05\x06")
        (cd_offset,) = struct.unpack("<I", data[eocd + 16 : eocd + 20])
        return cls((cd_offset, len(data)), records, local)


LOCAL_FIELDS = [
    (0, "signature"),
    (4, "version"),
    (6, "flags"),
    (8, "method"),
    (10, "time"),
    (12, "date"),
    (14, "crc"),
    (18, "compressed size"),
    (22, "size"),
    (26, "name length"),
    (28, "extra length"),
    (30, "name/extra"),
]


def _local_field(layout: ZipLayout, data: bytes, pos: int) -> str:
    for start, end in layout.local:
        if start <= pos < end:
            rel = pos - start
            (name_len,) = struct.unpack("<H", data[start + 26 : start + 28])
            record = data[start + 30 : start + 30 + name_len].decode("utf-8", "replace")
            record = record.split("/", 1)[-1]
            if rel >= 30:
                what = "name" if rel < 30 + name_len else "extra field (padding)"
            else:
                what = [n for off, n in LOCAL_FIELDS if off <= rel][-1]
            return f"{what} ({record})"
    return "?"


CENTRAL_FIELDS = [
    (0, "signature"),
    (4, "version made by"),
    (6, "version needed"),
    (8, "flags"),
    (10, "method"),
    (12, "time"),
    (14, "date"),
    (16, "crc"),
    (20, "compressed size"),
    (24, "size"),
    (28, "name length"),
    (30, "extra length"),
    (32, "comment length"),
    (34, "disk start"),
    (36, "internal attributes"),
    (38, "external attributes"),
    (42, "header offset"),
]


def _central_field(data: bytes, start: int, pos: int) -> str:
    """Which field of the central directory (or end records) ``pos`` falls in."""
    off = start
    while data[off : off + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[off + 28 : off + 34])
        end = off + 46 + name_len + extra_len + comment_len
        if pos < end:
            rel = pos - off
            record = data[off + 46 : off + 46 + name_len].decode("utf-8", "replace")
            record = record.split("/", 1)[-1]
            if rel >= 46:
                what = "name" if rel < 46 + name_len else "extra"
            else:
                what = [n for o, n in CENTRAL_FIELDS if o <= rel][-1]
            return f"entry {what} ({record})"
        off = end
    if data[off : off + 4] == b"PK\x06\x06":
        return "zip64 end record"
    rel = pos - off
    names = [
        (0, "signature"),
        (4, "disk"),
        (6, "cd disk"),
        (8, "entries on disk"),
        (10, "entries"),
        (12, "cd size"),
        (16, "cd offset"),
        (20, "comment length"),
    ]
    return "end record " + [n for o, n in names if o <= rel][-1]


# --------------------------------------------------------------------------- mutations


@dataclass
class Case:
    kind: str
    base: str  # which base file
    data: bytes
    detail: str
    may_migrate: bool = False  # a CRC-valid pickle may still be a valid (other) file


def _flip(data: bytes, pos: int, rng: random.Random) -> bytes:
    out = bytearray(data)
    out[pos] ^= rng.randrange(1, 256)
    return bytes(out)


def _fix_crc(data: bytes, layout: ZipLayout, name: str) -> bytes:
    """Give record ``name`` a valid CRC again (central directory and local header)."""
    out = bytearray(data)
    start, data_offset, size = layout.records[name]
    crc = zlib.crc32(out[data_offset : data_offset + size])
    (flags,) = struct.unpack("<H", out[start + 6 : start + 8])
    if not flags & 0x08:
        out[start + 14 : start + 18] = struct.pack("<I", crc)
    off = layout.central[0]
    while out[off : off + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", out[off + 28 : off + 34])
        if out[off + 46 : off + 46 + name_len].decode() == name:
            out[off + 16 : off + 20] = struct.pack("<I", crc)
        off += 46 + name_len + extra_len + comment_len
    return bytes(out)


#: The kinds of damage :func:`zip_cases` makes, each the key of its count.
ZIP_DAMAGE = (
    "truncate",
    "zip directory flip",
    "local header flip",
    "data.pkl flip",
    "tensor record flip",
    "small record flip",
    "data.pkl flip, CRC fixed",
)


def zip_cases(name: str, data: bytes, rng: random.Random, counts: dict[str, int]) -> list[Case]:
    layout = ZipLayout.of(data)
    cases: list[Case] = []
    pkl = next(n for n in layout.records if n.endswith("/data.pkl"))
    tensors = [n for n in layout.records if "/data/" in n]
    for _ in range(counts["truncate"]):
        cut = rng.randrange(0, len(data))
        cases.append(Case("truncate", name, data[:cut], f"{cut} of {len(data)} bytes"))
    lo, hi = layout.central
    for _ in range(counts["zip directory flip"]):
        pos = rng.randrange(lo, hi)
        cases.append(
            Case("zip directory flip", name, _flip(data, pos, rng), _central_field(data, lo, pos))
        )
    for _ in range(counts["local header flip"]):
        start, end = rng.choice(layout.local)
        pos = rng.randrange(start, end)
        cases.append(
            Case(
                "local header flip",
                name,
                _flip(data, pos, rng),
                _local_field(layout, data, pos),
            )
        )
    _, pkl_off, pkl_size = layout.records[pkl]
    for _ in range(counts["data.pkl flip"]):
        pos = rng.randrange(pkl_off, pkl_off + pkl_size)
        cases.append(Case("data.pkl flip", name, _flip(data, pos, rng), f"byte {pos - pkl_off}"))
    for _ in range(counts["tensor record flip"]):
        rec = rng.choice(tensors)
        _, off, size = layout.records[rec]
        pos = rng.randrange(off, off + size)
        cases.append(Case("tensor record flip", name, _flip(data, pos, rng), rec.split("/", 1)[1]))
    small = [n for n in layout.records if "/data" not in n]  # byteorder, version, ...
    for _ in range(counts["small record flip"]):
        rec = rng.choice(small)
        _, off, size = layout.records[rec]
        pos = rng.randrange(off, off + size)
        detail = f"({rec.split('/', 1)[1]})"
        cases.append(Case("small record flip", name, _flip(data, pos, rng), detail))
    for _ in range(counts["data.pkl flip, CRC fixed"]):
        mutated = data
        for _ in range(rng.choice((1, 1, 2, 4))):
            mutated = _flip(mutated, rng.randrange(pkl_off, pkl_off + pkl_size), rng)
        cases.append(
            Case(
                "data.pkl flip, CRC fixed",
                name,
                _fix_crc(mutated, layout, pkl),
                "valid CRC",
                may_migrate=True,
            )
        )
    return cases


def _st_file(
    header: Any, data: bytes, *, raw: bytes | None = None, length: int | None = None
) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def st_lies(data: bytes, rng: random.Random, n: int) -> list[Case]:
    """safetensors headers that lie, each built on purpose (with random parameters)."""
    (hlen,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + hlen])
    body = data[8 + hlen :]
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )

    def copy() -> dict[str, Any]:
        out: dict[str, Any] = json.loads(json.dumps(header))
        return out

    def past_end() -> tuple[str, bytes]:
        h = copy()
        k = rng.choice(names)
        begin, end = h[k]["data_offsets"]
        extra = rng.choice((1, 8, 1 << 20, 1 << 40, 2**63))
        h[k]["data_offsets"] = [begin + extra, end + extra]
        return f"{k} moved {extra} bytes past", _st_file(h, body)

    def end_past() -> tuple[str, bytes]:
        h = copy()
        k = names[-1]
        h[k]["data_offsets"][1] = len(body) + rng.randrange(1, 4096)
        return "last end past the data", _st_file(h, body)

    def overlap() -> tuple[str, bytes]:
        h = copy()
        i = rng.randrange(1, len(names))
        begin, end = h[names[i]]["data_offsets"]
        k = rng.randrange(1, begin + 1)
        h[names[i]]["data_offsets"] = [begin - k, end - k]
        return f"{names[i]} overlaps by {k}", _st_file(h, body)

    def gap() -> tuple[str, bytes]:
        h = copy()
        i = rng.randrange(0, len(names))
        k = rng.randrange(1, 64)
        begin = h[names[i]]["data_offsets"][0]
        for name in names[i:]:
            h[name]["data_offsets"] = [o + k for o in h[name]["data_offsets"]]
        return f"gap of {k} before {names[i]}", _st_file(h, body[:begin] + b"\0" * k + body[begin:])

    def trailing() -> tuple[str, bytes]:
        return "undescribed trailing bytes", _st_file(header, body + b"\0" * rng.randrange(1, 99))

    def huge_length() -> tuple[str, bytes]:
        value = rng.choice((2**63, 2**64 - 1, 2**32, 100 * 1024 * 1024 + 1, len(data)))
        raw = json.dumps(header).encode()
        return f"header length {value}", _st_file(header, body, raw=raw, length=value)

    def short_length() -> tuple[str, bytes]:
        raw = json.dumps(header).encode()
        return "header length too short", _st_file(
            header, body, raw=raw, length=rng.randrange(0, len(raw))
        )

    def shape_overflow() -> tuple[str, bytes]:
        h = copy()
        k = rng.choice(names)
        h[k]["shape"] = rng.choice(
            ([2**31] * 3, [2**61, 2**61], [2**62 - 1] * 4, [2**40, 2**40, 2**30], [2**63])
        )
        return f"{k} shape {h[k]['shape']}", _st_file(h, body)

    def shape_lie() -> tuple[str, bytes]:
        h = copy()
        k = rng.choice(names)
        shape = list(h[k]["shape"]) or [1]
        i = rng.randrange(len(shape))
        shape[i] = rng.choice(
            (shape[i] + 1, max(shape[i] - 1, 0), -1, -(2**62), 1.5, True, "3", None)
        )
        h[k]["shape"] = shape
        return f"{k} shape {shape}", _st_file(h, body)

    def bad_shape_type() -> tuple[str, bytes]:
        h = copy()
        k = rng.choice(names)
        h[k]["shape"] = rng.choice((None, 3, "3,4", {"a": 1}))
        return f"{k} shape {h[k]['shape']!r}", _st_file(h, body)

    def bad_dtype() -> tuple[str, bytes]:
        h = copy()
        k = rng.choice(names)
        h[k]["dtype"] = rng.choice(("F33", "f32", "", 5, None, ["F32"], "F64"))
        return f"{k} dtype {h[k]['dtype']!r}", _st_file(h, body)

    def bad_offsets() -> tuple[str, bytes]:
        h = copy()
        k = rng.choice(names)
        begin, end = h[k]["data_offsets"]
        h[k]["data_offsets"] = rng.choice(
            (
                [end, begin] if end != begin else [begin + 1, begin],
                [begin],
                [begin, end, end],
                [str(begin), str(end)],
                [float(begin) + 0.5, end],
                [-1, end - begin - 1],
                None,
                [True, end],
                10**30,
            )
        )
        return f"{k} offsets {h[k]['data_offsets']!r}", _st_file(h, body)

    def missing_field() -> tuple[str, bytes]:
        h = copy()
        k = rng.choice(names)
        dropped = rng.choice(("dtype", "shape", "data_offsets"))
        del h[k][dropped]
        return f"{k} without {dropped}", _st_file(h, body)

    def entry_not_object() -> tuple[str, bytes]:
        h = copy()
        k = rng.choice(names)
        h[k] = rng.choice(([1, 2], "F32", 3, None))
        return f"{k} = {h[k]!r}", _st_file(h, body)

    def bad_metadata() -> tuple[str, bytes]:
        h = copy()
        meta = dict(h.get("__metadata__", {}))
        value = rng.choice((5, 1.5, None, True, ["a"], {"nested": "x"}))
        key = rng.choice(("ckptmigrate.revision", "ckptmigrate.format", "note"))
        meta[key] = value
        h["__metadata__"] = rng.choice((meta, meta, ["ckptmigrate.revision"], "text", 7))
        return f"__metadata__ {h['__metadata__']!r}"[:80], _st_file(h, body)

    def not_object() -> tuple[str, bytes]:
        raw = rng.choice((b"[1, 2, 3]", b'"header"', b"42", b"null", b"true"))
        return f"header {raw!r}", _st_file(None, body, raw=raw)

    def bad_json() -> tuple[str, bytes]:
        raw = json.dumps(header).encode()
        cut = rng.randrange(1, len(raw))
        choice = rng.randrange(4)
        if choice == 0:
            raw = raw[:cut]
        elif choice == 1:
            raw = raw[:cut] + b"\xff\xfe" + raw[cut:]
        elif choice == 2:  # a value cut out: {"key": }
            colons = [i for i, c in enumerate(raw) if c == ord(":")]
            at = rng.choice(colons) + 1
            raw = raw[:at] + b"}" + raw[at:]
        else:
            raw = b"{" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        return f"broken JSON ({choice})", _st_file(None, body, raw=raw)

    def deep_json() -> tuple[str, bytes]:
        depth = rng.choice((10_000, 100_000, 1_000_000))
        raw = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
        return f"nesting depth {depth}", _st_file(None, body, raw=raw)

    def odd_numbers() -> tuple[str, bytes]:
        h = copy()
        k = rng.choice(names)
        raw = json.dumps(h).encode()
        begin, end = h[k]["data_offsets"]
        lit = rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 400))
        needle = json.dumps({k: h[k]}).encode()[1:-1]
        patched = needle.replace(f"[{begin}, {end}]".encode(), b"[" + lit + b", " + lit + b"]")
        return f"{k} offsets {lit[:12]!r}", _st_file(None, body, raw=raw.replace(needle, patched))

    def duplicate_key() -> tuple[str, bytes]:
        raw = json.dumps(header).encode()
        k = rng.choice(names)
        entry = json.dumps({k: header[k]}).encode()[1:-1]
        other = rng.choice([n for n in names if n != k])
        dup = json.dumps({k: header[other]}).encode()[1:-1]
        return f"{k} twice", _st_file(
            None, body, raw=raw[:-1] + b", " + dup + b"}" if dup != entry else raw[:-1] + b"}"
        )

    lies: list[Callable[[], tuple[str, bytes]]] = [
        past_end,
        end_past,
        overlap,
        gap,
        trailing,
        huge_length,
        short_length,
        shape_overflow,
        shape_lie,
        bad_shape_type,
        bad_dtype,
        bad_offsets,
        missing_field,
        entry_not_object,
        bad_metadata,
        not_object,
        bad_json,
        deep_json,
        odd_numbers,
        duplicate_key,
    ]
    cases = []
    for i in range(n):
        lie = lies[i % len(lies)]
        detail, mutated = lie()
        cases.append(
            Case(f"safetensors: {lie.__name__.replace('_', ' ')}", "safetensors", mutated, detail)
        )
    return cases


def st_flips(data: bytes, rng: random.Random, counts: dict[str, int]) -> list[Case]:
    cases = []
    for _ in range(counts["truncate"]):
        cut = rng.randrange(0, len(data))
        cases.append(Case("truncate", "safetensors", data[:cut], f"{cut} of {len(data)} bytes"))
    for _ in range(counts["safetensors length flip"]):
        pos = rng.randrange(0, 8)
        cases.append(
            Case("safetensors length flip", "safetensors", _flip(data, pos, rng), f"byte {pos}")
        )
    return cases


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    total: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    benign: Counter[str] = field(default_factory=Counter)
    messages: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the case counts")
    parser.add_argument("--case-cpu-seconds", type=float, default=10.0)
    parser.add_argument("--cpu-seconds", type=int, default=600, help="RLIMIT_CPU for all cases")
    parser.add_argument("--headroom-mb", type=int, default=1536, help="RLIMIT_AS above start")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    root = Path(args.workdir).resolve()
    ini = write_project(
        root,
        [
            ("aaaa00000001", None, "    pass", "    pass"),
            ("bbbb00000002", REV_A, FUZZ_UPGRADE, FUZZ_DOWNGRADE),
        ],
    )
    os.chdir(root)
    runner = CliRunner()
    base_args = ["-c", str(ini), "upgrade"]

    def invoke(path: Path) -> tuple[int, str]:
        result = runner.invoke(cli, [*base_args, str(path)], catch_exceptions=False)
        return result.exit_code, result.stderr

    # Bases: a torch.save container (data descriptors, as PyTorch writes),
    # the same written by ckptmigrate (sizes in local headers), a safetensors file.
    sd, opt = _model_state()
    stamp_state_dict(sd, REV_A)
    bases: dict[str, bytes] = {}
    container = {"model": sd, "optimizer": opt, "epoch": 3}
    torch.save(container, root / "torch_save.pth")
    bases["torch.save container"] = (root / "torch_save.pth").read_bytes()
    code, err = invoke(root / "torch_save.pth")  # -> at B, written by ckptmigrate
    assert code == 0, err
    torch.save({k: v.clone() for k, v in sd.items()}, root / "plain.safetensors.pth")
    code, err = (
        runner.invoke(
            cli,
            [
                "-c",
                str(ini),
                "stamp",
                str(root / "plain.safetensors.pth"),
                REV_A,
                "-o",
                str(root / "st.safetensors"),
            ],
        ).exit_code,
        "",
    )
    assert code == 0
    bases["safetensors"] = (root / "st.safetensors").read_bytes()
    code = runner.invoke(
        cli, ["-c", str(ini), "downgrade", str(root / "torch_save.pth"), REV_A]
    ).exit_code
    assert code == 0
    bases["ckptmigrate-written container"] = (root / "torch_save.pth").read_bytes()
    for p in (root / "torch_save.pth", root / "plain.safetensors.pth", root / "st.safetensors"):
        p.unlink()

    suffix = {"safetensors": ".safetensors"}
    clean: dict[str, bytes] = {}
    for name, data in bases.items():
        path = root / f"clean{suffix.get(name, '.pth')}"
        path.write_bytes(data)
        code, err = invoke(path)
        assert code == 0, err
        clean[name] = path.read_bytes()
        assert clean[name] != data
        path.unlink()

    rng = random.Random(args.seed)

    scale: float = args.scale

    def scaled(n: int) -> int:
        return max(1, round(n * scale))

    zip_counts = {
        "truncate": scaled(60),
        "zip directory flip": scaled(90),
        "local header flip": scaled(80),
        "data.pkl flip": scaled(40),
        "tensor record flip": scaled(80),
        "small record flip": scaled(20),
        "data.pkl flip, CRC fixed": scaled(60),
    }
    cases: list[Case] = []
    for name in ("torch.save container", "ckptmigrate-written container"):
        cases += zip_cases(name, bases[name], rng, zip_counts)
    cases += st_flips(
        bases["safetensors"], rng, {"truncate": scaled(60), "safetensors length flip": scaled(40)}
    )
    cases += st_lies(bases["safetensors"], rng, scaled(260))

    # From here on: bounded memory, bounded CPU time in all and per case.
    limits = _bound(args.headroom_mb, args.cpu_seconds)
    limits["case_cpu_seconds"] = args.case_cpu_seconds
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fds_start = len(os.listdir("/proc/self/fd"))

    outcomes: dict[str, Outcome] = defaultdict(Outcome)
    slowest = (0.0, "")
    started = time.perf_counter()
    for i, case in enumerate(cases):
        out = outcomes[case.kind]
        out.total += 1
        path = root / f"case{suffix.get(case.base, '.pth')}"
        path.write_bytes(case.data)
        label = f"case {i} [{case.kind} / {case.base} / {case.detail}]"
        t0 = time.process_time()
        signal.setitimer(signal.ITIMER_PROF, args.case_cpu_seconds)
        try:
            code, err = invoke(path)
        except CaseTimeout:
            out.failures.append(f"{label}: no result after {args.case_cpu_seconds}s of CPU time")
            path.write_bytes(case.data)
            continue
        except BaseException as exc:  # anything escaping the CLI is a failure
            out.failures.append(f"{label}: escaped the CLI: {type(exc).__name__}: {exc}")
            continue
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        took = time.process_time() - t0
        slowest = max(slowest, (took, label))
        problems = []
        left = leftovers(root)
        if left:
            problems.append(f"temporary files left: {left}")
            for name in left:
                (root / name).unlink()
        now = path.read_bytes()
        lines = err.strip().splitlines()
        if code == 0:
            if now == clean[case.base]:
                out.counts["benign: output identical to a clean run"] += 1
                out.benign[f"{case.base}: {case.detail}"] += 1
            elif case.may_migrate:
                out.counts["accepted: a valid file with other contents"] += 1
                try:
                    torch.load(path, weights_only=True)
                except Exception as exc:
                    problems.append(f"upgraded, but the result does not load: {exc}")
            else:
                problems.append("exit 0 and an output that differs from a clean run's")
        elif code == 1:
            out.counts["refused: exit 1, one Error line"] += 1
            if not lines or not lines[-1].startswith("Error: "):
                problems.append(f"stderr does not end with an Error line: {err[-300:]!r}")
            if sum(line.startswith("Error:") for line in lines) != 1:
                problems.append(f"not exactly one Error line: {err[-300:]!r}")
            if "Traceback" in err or "internal error" in err:
                problems.append(f"a bug, not a clean refusal: {err[-300:]!r}")
            if any(
                w in err for w in ("MemoryError", "bad_alloc", "can't allocate", "Cannot allocate")
            ):
                problems.append(f"ran out of memory: {err[-300:]!r}")
            if now != case.data:
                problems.append("the input file was changed")
            if lines:
                shape = re.sub(r"\d+", "N", lines[-1].replace(str(path), "CASE"))[:100]
                out.messages.setdefault(shape, lines[-1][:240])
        else:
            problems.append(f"exit {code}: {err[-300:]!r}")
        if problems:
            out.failures.extend(f"{label}: {p}" for p in problems)
    elapsed = time.perf_counter() - started
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))  # the cases are done: exit in peace
    rss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {
        "seed": args.seed,
        "cases": len(cases),
        "seconds": round(elapsed, 2),
        "slowest_case_cpu_seconds": round(slowest[0], 3),
        "slowest_case": slowest[1],
        "limits": limits,
        "peak_rss_mb_before": rss_start >> 10,
        "peak_rss_mb_after": rss_end >> 10,
        "open_fds_before": fds_start,
        "open_fds_after": len(os.listdir("/proc/self/fd")),
        "bases": {k: len(v) for k, v in bases.items()},
        "kinds": {
            kind: {
                "cases": o.total,
                "outcomes": dict(o.counts),
                "benign_fields": dict(o.benign),
                "distinct_errors": len(o.messages),
                "sample_errors": sorted(o.messages.values())[:8],
                "failures": o.failures[:20],
                "failure_count": len(o.failures),
            }
            for kind, o in sorted(outcomes.items())
        },
    }
    for kind, o in sorted(outcomes.items()):
        print(
            f"{kind}: {dict(o.counts)}" + (f" benign fields {dict(o.benign)}" if o.benign else ""),
            file=sys.stderr,
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
