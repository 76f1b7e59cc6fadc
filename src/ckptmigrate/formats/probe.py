"""What a checkpoint path holds, told from the path and the file's first bytes.

This runs before torch is imported: a wrong path, a folder, an empty file or
a file that is no checkpoint at all (a Python script, a JSON config) gets its
answer at once, not after the seconds ``import torch`` takes, and the answer
says what the file looks like instead of quoting a failed unpickling.
"""

from __future__ import annotations

import codecs
import re
import struct
from pathlib import Path

from ..errors import CheckpointError

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HEAD_BYTES = 4096
_ACCEPTED = (
    "pass a checkpoint saved with torch.save or safetensors (.pt, .pth, .bin, .safetensors), "
    "a sharded checkpoint's folder or *.index.json, or a DCP checkpoint's folder"
)
# Formats people keep weights in that are not PyTorch checkpoints.
_MAGIC = (
    (b"\x1f\x8b", "a gzip file"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"GGUF", "a GGUF file"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
)
_PYTHON = re.compile(r"^(?:import |from \S+ import |def |class |if __name__)", re.MULTILINE)


def index_path(path: Path) -> Path | None:
    """The index file a path names (itself, or the one inside a folder)."""
    if path.is_dir():
        for name in INDEX_NAMES:
            if (path / name).exists():
                return path / name
        found = sorted(path.glob("*.index.json"))
        return found[0] if len(found) == 1 else None
    if path.name.endswith(".index.json"):
        return path
    return None


def looks_like_safetensors(head: bytes) -> bool:
    """An 8-byte length, then a JSON object.

    The length is not checked here: a file whose header length lies (2**63)
    is still recognised, so that the safetensors reader says what is wrong
    with it instead of a torch reader failing on it. No torch file has ``{``
    at offset 8 (zip files start ``PK``, legacy pickles ``\\x80``).
    """
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return n >= 2 and head[8:9] == b"{"


def read_head(path: Path) -> bytes:
    """The first bytes formats recognise a file by (``b""`` for a folder or an empty file).

    A path that is missing or unreadable is refused here, whatever format it
    was meant to be.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no such file", hint="check the checkpoint path")
    if path.is_dir():
        return b""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {path}: {exc.strerror}", hint="check permissions"
        ) from exc
    return head


def not_a_checkpoint(path: Path, head: bytes) -> CheckpointError:
    """What to tell a user whose path no format recognised."""
    if path.is_dir():
        return CheckpointError(
            f"{path} is a directory, not a checkpoint file", hint="pass the file itself"
        )
    if not head:
        return CheckpointError(
            f"{path} is empty (0 bytes)", hint="the save was probably interrupted"
        )
    looks_like = _looks_like(path, head)
    if looks_like is not None:
        hint = _ACCEPTED
        if looks_like == "JSON" and b'"weight_map"' in head:
            hint = "a sharded checkpoint's index must be named *.index.json; " + _ACCEPTED
        return CheckpointError(
            f"{path} is not a checkpoint (it looks like {looks_like})", hint=hint
        )
    shown = " ".join(f"{b:02x}" for b in head[:8])
    return CheckpointError(
        f"{path} is not a checkpoint, or it is damaged: it starts with {shown}, not like a "
        "torch zip, a pickle or a safetensors file",
        hint=_ACCEPTED + "; if it is one, check it was copied completely",
    )


def _looks_like(path: Path, head: bytes) -> str | None:
    """A name for what the file is, when it is recognisably something else."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    text = _as_text(head)
    if text is None:
        return None
    first = text.lstrip()
    if (
        path.suffix in (".py", ".pyi")
        or _PYTHON.search(text)
        or (first.startswith("#!") and "python" in first.split("\n", 1)[0])
    ):
        return "Python source"
    if first[:1] in ("{", "["):
        return "JSON"
    return "text"


def _as_text(head: bytes) -> str | None:
    """``head`` decoded as UTF-8 text, or None for binary data."""
    try:
        # final=False: the read may have cut a character in two at the end
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if any(ch < " " and ch not in "\t\n\r\f" for ch in text):
        return None
    return text
