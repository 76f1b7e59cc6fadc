"""The revision record inside a checkpoint.

torch files keep it in the state dict's ``_metadata[""]`` (where PyTorch keeps
each module's ``version``), safetensors files in the header's
``__metadata__``; both as flat string entries, so the file stays an ordinary
checkpoint that loads without ckptmigrate.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from .._version import __version__
from ..errors import StampError

STAMP_PREFIX = "ckptmigrate."
REVISION_KEY = "ckptmigrate.revision"
VERSION_KEY = "ckptmigrate.version"
FORMAT_KEY = "ckptmigrate.format"
#: The stamp layout this release writes; a file with a newer major is refused.
STAMP_FORMAT = "1.0"
_KEYS = (REVISION_KEY, VERSION_KEY, FORMAT_KEY)


@dataclass(frozen=True)
class Stamp:
    revisions: tuple[str, ...]
    writer: str | None = None
    format: str | None = None


def is_stamped(meta: Mapping[str, Any] | None) -> bool:
    """Whether ``meta`` carries a stamp; :func:`read_stamp` says which, and checks its format."""
    return isinstance(meta, Mapping) and REVISION_KEY in meta


def read_stamp(meta: Mapping[str, Any] | None, where: str) -> Stamp | None:
    """The stamp in ``meta``, None when there is none."""
    if not meta or REVISION_KEY not in meta:
        return None
    raw, writer, fmt = meta.get(REVISION_KEY), meta.get(VERSION_KEY), meta.get(FORMAT_KEY)
    if fmt is not None:
        try:
            newer = Version(str(fmt)).major > Version(STAMP_FORMAT).major
        except InvalidVersion:
            raise StampError(
                f"{where} has a damaged ckptmigrate stamp (format {fmt!r})",
                hint="re-stamp it with 'ckptmigrate stamp --purge CKPT REV'",
            ) from None
        if newer:
            raise StampError(
                f"{where} was stamped by ckptmigrate {writer or '?'} in stamp format {fmt}, "
                f"newer than this ckptmigrate {__version__} understands (format {STAMP_FORMAT})",
                hint="upgrade ckptmigrate (pip install -U ckptmigrate)",
            )
    if not isinstance(raw, str):
        raise StampError(
            f"{where} has a damaged ckptmigrate stamp ({REVISION_KEY} = {raw!r})",
            hint="re-stamp it with 'ckptmigrate stamp --purge CKPT REV'",
        )
    revisions = tuple(r.strip() for r in raw.split(",") if r.strip())
    return Stamp(
        revisions,
        str(writer) if writer is not None else None,
        str(fmt) if fmt is not None else None,
    )


def write_stamp(meta: MutableMapping[str, Any], revisions: Sequence[str] | None) -> None:
    """Record ``revisions`` in ``meta``.

    ``()`` records "at base" (known to be before the first revision); None
    removes the stamp, leaving a file whose revision is unknown.
    """
    for key in _KEYS:
        meta.pop(key, None)
    if revisions is not None:
        meta[REVISION_KEY] = ",".join(revisions)
        meta[VERSION_KEY] = __version__
        meta[FORMAT_KEY] = STAMP_FORMAT


# Formats whose metadata is one flat ``str -> str`` map (a safetensors header's
# ``__metadata__``, a Hugging Face index's ``metadata``) keep the root's stamp
# as ``ckptmigrate.*`` entries and a module's as ``<module>:ckptmigrate.*``.


def is_stamp_key(key: str) -> bool:
    """A flat metadata entry that belongs to a stamp (of the root or of a module)."""
    return key.split(":", 1)[-1].startswith(STAMP_PREFIX)


def stamp_entries(meta: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Flat entries ``ckptmigrate.*`` (root) and ``<module>:ckptmigrate.*``, by module."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in meta.items():
        if not is_stamp_key(key):
            continue
        module, _, name = key.rpartition(":")
        out.setdefault(module, {})[name] = value
    return out


def flatten_stamps(metadata: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The inverse of :func:`stamp_entries`; other per-module metadata has no place there."""
    out: dict[str, str] = {}
    for module, meta in metadata.items():
        for name, value in meta.items():
            if name.startswith(STAMP_PREFIX):
                out[f"{module}:{name}" if module else name] = str(value)
    return out
