"""Simulated power cuts: every state of the disk a crash at any moment could leave.

A command runs once for real with ``fslog.c`` preloaded, which logs each
file-system operation it makes below a folder (writes with their bytes,
truncation, fsync of files and folders, creating, renaming and removing
names). The replay then walks the log and, after every operation, builds each
disk state a power cut at that moment could leave, under this model:

* a file's data is durable once the file was fsynced; writes since then may
  be lost: none, all, any prefix of them, or all but one (reordering);
* a folder's names (creations, renames, removals) are durable once the folder
  was fsynced; the operations since then persist as a prefix, in the order
  they were made (what journaling file systems such as ext4 and XFS give);
* nothing else is assumed (in particular no data is flushed by a rename).

Each state is checked by a verdict function: "old" or "new" when the
checkpoint under its name is intact, anything else is a loss.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

OP_OPEN, OP_WRITE, OP_TRUNC, OP_FSYNC, OP_RENAME, OP_UNLINK, OP_MKDIR, OP_CLOSE = range(1, 9)
NAMES = {1: "open", 2: "write", 3: "truncate", 4: "fsync", 5: "rename", 6: "unlink", 7: "mkdir"}
RENAME_EXCHANGE = 2
O_CREAT, O_TRUNC = os.O_CREAT, os.O_TRUNC
SHIM = Path(__file__).with_name("fslog.c")


@dataclass(frozen=True)
class Op:
    kind: int
    fd: int
    offset: int
    length: int
    flags: int
    path: str
    path2: str
    data: bytes = b""


def build_shim(folder: Path) -> Path:
    """Compile the recorder (once per folder)."""
    lib = folder / "fslog.so"
    if not lib.exists():
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(SHIM), "-ldl", "-lpthread"],
            check=True,
        )
    return lib


def read_log(path: Path) -> list[Op]:
    raw = path.read_bytes()
    ops: list[Op] = []
    pos = 0
    head = struct.Struct("<BiqqqI")
    while pos < len(raw):
        kind, fd, offset, length, flags, la = head.unpack_from(raw, pos)
        pos += head.size
        a = raw[pos : pos + la].decode()
        pos += la
        (lb,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        b = raw[pos : pos + lb].decode()
        pos += lb
        data = b""
        if kind == OP_WRITE:
            data = raw[pos : pos + length]
            pos += length
        ops.append(Op(kind, fd, offset, length, flags, a, b, data))
    return ops


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (absolute path -> bytes)."""
    out: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.resolve())] = p.read_bytes()
    return out


def record(
    argv: Sequence[str], root: Path, cwd: Path, shim: Path, env: Mapping[str, str] | None = None
) -> tuple[list[Op], subprocess.CompletedProcess[str]]:
    """Run ``argv`` with the recorder preloaded; the operations below ``root``."""
    log = root.parent / f".{root.name}.fslog"
    log.unlink(missing_ok=True)
    full = dict(os.environ if env is None else env)
    full.update(
        LD_PRELOAD=str(shim),
        FSLOG_ROOT=str(root),
        FSLOG_FILE=str(log),
        PYTHONDONTWRITEBYTECODE="1",
    )
    proc = subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=full, capture_output=True, text=True, timeout=300
    )
    ops = read_log(log) if log.exists() else []
    log.unlink(missing_ok=True)
    return ops, proc


# --------------------------------------------------------------------------- the model


@dataclass
class Inode:
    durable: bytes
    current: bytearray
    pending: list[tuple[str, int, bytes]] = field(default_factory=list)

    def apply(self, base: bytes, ops: Sequence[tuple[str, int, bytes]]) -> bytes:
        out = bytearray(base)
        for kind, n, data in ops:
            if kind == "trunc":
                del out[n:]
                out.extend(b"\0" * (n - len(out)))
            else:
                if len(out) < n:
                    out.extend(b"\0" * (n - len(out)))
                out[n : n + len(data)] = data
        return bytes(out)

    def variants(self) -> list[bytes]:
        """What a crash can leave of this file's data: see the module docstring."""
        ops = self.pending
        choices: list[list[tuple[str, int, bytes]]] = [ops[:i] for i in range(len(ops) + 1)]
        if 1 < len(ops) <= 24:
            choices += [ops[:i] + ops[i + 1 :] for i in range(len(ops) - 1)]
        seen: dict[bytes, None] = {}
        for chosen in choices:
            seen.setdefault(self.apply(self.durable, chosen), None)
        return list(seen)


@dataclass
class Disk:
    """The model after some prefix of the log: durable and pending state."""

    inodes: dict[int, Inode]
    durable_names: dict[str, int]
    names: dict[str, int]
    pending_names: dict[str, list[tuple[str, str, str]]]  # folder -> ops in order
    dirs: set[str]
    fds: dict[int, str | int] = field(default_factory=dict)  # fd -> inode id, or "dir:<path>"
    next_id: int = 0

    @classmethod
    def start(cls, files: Mapping[str, bytes], root: Path) -> Disk:
        inodes = {i: Inode(data, bytearray(data)) for i, data in enumerate(files.values())}
        names = {path: i for i, path in enumerate(files)}
        dirs = {str(root.resolve())} | {str(p.resolve()) for p in root.rglob("*") if p.is_dir()}
        return cls(inodes, dict(names), dict(names), {}, dirs, next_id=len(inodes))

    def _pend(self, path: str, op: tuple[str, str, str]) -> None:
        self.pending_names.setdefault(os.path.dirname(path), []).append(op)

    def step(self, op: Op) -> None:
        if op.kind == OP_OPEN:
            self._open(op)
        elif op.kind in (OP_WRITE, OP_TRUNC):
            ino = self.fds.get(op.fd)
            if isinstance(ino, int):
                node = self.inodes[ino]
                entry = (
                    ("write", op.offset, op.data)
                    if op.kind == OP_WRITE
                    else ("trunc", op.length, b"")
                )
                node.pending.append(entry)
                node.current = bytearray(node.apply(bytes(node.current), [entry]))
        elif op.kind == OP_FSYNC:
            self._fsync(op)
        elif op.kind == OP_RENAME:
            self._rename(op)
        elif op.kind == OP_UNLINK and op.path in self.names:
            del self.names[op.path]
            self._pend(op.path, ("unlink", op.path, ""))
        elif op.kind == OP_MKDIR:
            self.dirs.add(op.path)
        elif op.kind == OP_CLOSE:
            self.fds.pop(op.fd, None)

    def _open(self, op: Op) -> None:
        if op.path in self.dirs:
            self.fds[op.fd] = "dir:" + op.path
            return
        ino = self.names.get(op.path)
        if ino is None:
            if not op.flags & O_CREAT:
                return  # a read of something outside the model
            ino = self.next_id
            self.next_id += 1
            self.inodes[ino] = Inode(b"", bytearray())
            self.names[op.path] = ino
            self._pend(op.path, ("link", op.path, str(ino)))
        elif op.flags & O_TRUNC:
            node = self.inodes[ino]
            node.pending.append(("trunc", 0, b""))
            node.current = bytearray()
        self.fds[op.fd] = ino

    def _fsync(self, op: Op) -> None:
        target = self.fds.get(op.fd)
        if isinstance(target, int):
            node = self.inodes[target]
            node.durable = bytes(node.current)
            node.pending.clear()
        elif isinstance(target, str):
            folder = target[4:]
            for entry in self.pending_names.pop(folder, []):
                _apply_name(self.durable_names, entry, self.names)

    def _rename(self, op: Op) -> None:
        a, b = op.path, op.path2
        if op.flags & RENAME_EXCHANGE:
            self.names[a], self.names[b] = self.names[b], self.names[a]
            self._pend(a, ("exchange", a, b))
        elif a in self.names:
            self.names[b] = self.names.pop(a)
            self._pend(a, ("rename", a, b))

    def crash_states(self) -> Iterator[tuple[dict[str, int], int]]:
        """(namespace, how many folder operations persisted) for every crash outcome."""
        folders = sorted(self.pending_names)
        ranges = [range(len(self.pending_names[f]) + 1) for f in folders]
        for counts in itertools.product(*ranges):
            names = dict(self.durable_names)
            for folder, n in zip(folders, counts):
                for entry in self.pending_names[folder][:n]:
                    _apply_name(names, entry, None)
            yield names, sum(counts)


def _apply_name(
    names: dict[str, int], entry: tuple[str, str, str], live: Mapping[str, int] | None
) -> None:
    kind, a, b = entry
    if kind == "link":
        names[a] = int(b)
    elif kind == "unlink":
        names.pop(a, None)
    elif kind == "rename" and a in names:
        names[b] = names.pop(a)
    elif kind == "exchange" and a in names and b in names:
        names[a], names[b] = names[b], names[a]


Verdict = Callable[[Callable[[str], bytes | None]], str]


@dataclass
class Exploration:
    operations: int
    states: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    losses: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.verdicts.items()))
        return f"{self.operations} file-system operations, {self.states} crash states: {counts}"


def explore(
    ops: Sequence[Op],
    files: Mapping[str, bytes],
    root: Path,
    verdict: Verdict,
    *,
    max_combinations: int = 4096,
) -> Exploration:
    """Check every crash state after every operation (every file present is varied)."""
    disk = Disk.start(files, root)
    result = Exploration(len(ops))
    seen: set[bytes] = set()
    for point in range(len(ops) + 1):
        if point:
            disk.step(ops[point - 1])
        for names, persisted in disk.crash_states():
            watched = sorted(names)
            options = [disk.inodes[names[p]].variants() for p in watched]
            combos = itertools.islice(itertools.product(*options), max_combinations)
            for contents in combos:
                state = dict(zip(watched, contents))
                key = hashlib.sha256(
                    b"".join(
                        p.encode() + b"\0" + hashlib.sha256(c).digest() for p, c in state.items()
                    )
                ).digest()
                if key in seen:
                    continue
                seen.add(key)
                result.states += 1
                found = verdict(state.get)
                result.verdicts[found] = result.verdicts.get(found, 0) + 1
                if found not in ("old", "new") and len(result.losses) < 5:
                    op = NAMES.get(ops[point - 1].kind, "?") if point else "start"
                    result.losses.append(
                        f"after operation {point} ({op}), {persisted} folder operations "
                        f"persisted: {found}"
                    )
    return result
