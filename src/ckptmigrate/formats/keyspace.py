"""Keys and per-module metadata seen from under a prefix, and put back there.

A lineage whose model sits at ``encoder.`` inside a file, a wrapper's
``module.`` run, a versioned submodule at ``blocks.0.``: each sees the
entries under its prefix with the prefix taken off, and PyTorch's per-module
metadata (``_metadata``: ``""`` is the root module, ``"encoder"`` the module
at ``encoder.``) re-rooted the same way, so that the module at the prefix
becomes ``""``. Writing puts them back. Both directions are spelled here
once, so that every place that re-roots agrees on the edge cases (the module
at the prefix itself, a sibling such as ``encoder2`` that merely shares the
letters, an empty prefix).

A prefix is ``""`` or a string ending in ``.``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

V = TypeVar("V")


def normal(prefix: str | None) -> str:
    """``prefix`` with its dot (``"model"`` -> ``"model."``); ``""`` for none."""
    if not prefix:
        return ""
    return prefix if prefix.endswith(".") else prefix + "."


def keys_under(mapping: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The entries whose keys start with ``prefix``, the prefix taken off, in order."""
    if not prefix:
        return dict(mapping)
    n = len(prefix)
    return {k[n:]: v for k, v in mapping.items() if k.startswith(prefix)}


def keys_at(mapping: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The inverse of :func:`keys_under`: every key with ``prefix`` put in front."""
    if not prefix:
        return dict(mapping)
    return {prefix + k: v for k, v in mapping.items()}


def module_under(name: str, prefix: str) -> str | None:
    """A module name relative to ``prefix`` (``""`` for the module at it); None if outside."""
    if not prefix:
        return name
    if name == prefix[:-1]:
        return ""
    if name.startswith(prefix):
        return name[len(prefix) :]
    return None


def module_at(name: str, prefix: str) -> str:
    """The inverse of :func:`module_under`."""
    if not prefix:
        return name
    return prefix + name if name else prefix[:-1]


def metadata_under(metadata: Mapping[Any, Any] | None, prefix: str) -> dict[str, dict[str, Any]]:
    """The metadata of the modules at and under ``prefix``, re-rooted (copied).

    Entries that are not ``name -> mapping`` (a hand-made ``_metadata``) are skipped.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, meta in (metadata or {}).items():
        if not isinstance(name, str) or not isinstance(meta, Mapping):
            continue
        relative = module_under(name, prefix)
        if relative is not None:
            out[relative] = dict(meta)
    return out


def metadata_outside(
    metadata: Mapping[str, Mapping[str, Any]], prefix: str
) -> dict[str, dict[str, Any]]:
    """The metadata of every module that is neither at nor under ``prefix`` (copied)."""
    return {
        name: dict(meta) for name, meta in metadata.items() if module_under(name, prefix) is None
    }


def metadata_at(
    metadata: Mapping[str, Mapping[str, Any]], prefix: str
) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`metadata_under`: re-rooted under ``prefix`` (copied)."""
    return {module_at(name, prefix): dict(meta) for name, meta in metadata.items()}


def replace_under(
    metadata: dict[str, dict[str, Any]], prefix: str, inner: Mapping[str, Mapping[str, Any]]
) -> None:
    """Replace, in place, the metadata at and under ``prefix`` by ``inner`` (relative to it)."""
    for name in [n for n in metadata if module_under(n, prefix) is not None]:
        del metadata[name]
    metadata.update(metadata_at(inner, prefix))
