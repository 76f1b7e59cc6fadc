"""Checkpoint files: read lazily into a :class:`Checkpoint`, write atomically.

Importing this package does not import torch: paths are checked (``probe``)
before any reader that needs it is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, CkptMigrateError
from .atomic import atomic_output, write_error
from .probe import probe
from .stamp import write_stamp

if TYPE_CHECKING:
    from ..plan.state import PlanState
    from .checkpoint import Checkpoint

__all__ = ["check_output", "format_for", "read_checkpoint", "write_checkpoint"]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
) -> Checkpoint:
    """Open a checkpoint of any supported format without reading tensor data."""
    found = probe(Path(path))
    if found.kind == "sharded":
        from .sharded import read_sharded

        return read_sharded(found.path, trust_pickle=trust_pickle)
    if found.kind == "safetensors":
        from .safetensors_file import read_safetensors

        return read_safetensors(found.path)
    from .torch_file import read_torch

    return read_torch(found.path, trust_pickle=trust_pickle, state_dict_key=state_dict_key)


def format_for(target: Path, default: str) -> str:
    suffix = target.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    return default


def check_output(
    target: str | os.PathLike[str],
    source: Checkpoint,
    *,
    format: str | None = None,
    keep_wrapper_prefix: bool = False,
) -> None:
    """Refuse an output ``source`` cannot be written to, before any work is done on it."""
    out = Path(target)
    fmt = format or format_for(out, source.format)
    if fmt == "safetensors" and source.format == "torch" and source.state_path:
        raise CheckpointError(
            f"{out}: a safetensors file holds only tensors, but {source.path} is a training "
            f"checkpoint with other entries ({', '.join(map(repr, _others(source)))})",
            hint="write a .pt output, or save the state dict alone first",
        )
    if keep_wrapper_prefix and source.wrapper_prefix and fmt != "torch":
        raise CheckpointError(
            f"{out}: --keep-wrapper-prefix puts {source.wrapper_prefix!r} back only into torch "
            f"files, not into {fmt} output",
            hint="write a .pt output, or leave out --keep-wrapper-prefix",
        )


def write_checkpoint(
    target: str | os.PathLike[str],
    source: Checkpoint,
    state: PlanState,
    revisions: tuple[str, ...] | None,
    *,
    format: str | None = None,
    verify: bool = True,
    container: Any = None,
    progress: Callable[[int], None] | None = None,
    jobs: int = 1,
    durable: bool = True,
    keep_wrapper_prefix: bool = False,
) -> None:
    """Write ``state`` (evaluated against ``source``) to ``target`` atomically.

    ``state`` holds the lineage's entries (relative to ``source.key_prefix``);
    the rest of the file is carried through (``container``, when given,
    replaces the training container the state dict is put back into).
    ``revisions`` is the stamp to record: ``()`` means at base, None removes it.
    ``keep_wrapper_prefix`` puts the input's ``module.``/``_orig_mod.`` back
    in front of every key, so a wrapped model loads the result.
    """
    out = Path(target)
    fmt = format or format_for(out, source.format)
    check_output(out, source, format=fmt, keep_wrapper_prefix=keep_wrapper_prefix)
    full = source.file_state(state)
    metadata = {k: dict(v) for k, v in full.metadata.items()}
    write_stamp(metadata.setdefault(source.key_prefix[:-1], {}), revisions)
    wrapper = source.wrapper_prefix if keep_wrapper_prefix else ""
    if source.format == "sharded":
        from .sharded import write_sharded

        write_sharded(
            out,
            source,
            full,
            metadata,
            jobs=jobs,
            progress=progress,
            verify=verify,
            durable=durable,
        )
        return
    from ..plan.state import Evaluator

    entries = {wrapper + k: node for k, node in full.entries.items()}
    if wrapper:
        metadata = {(wrapper + name if name else wrapper[:-1]): m for name, m in metadata.items()}
    evaluator = Evaluator(entries, source.read)
    with atomic_output(out, durable=durable) as tmp:
        try:
            if fmt == "safetensors":
                from .safetensors_file import write_safetensors

                write_safetensors(
                    tmp, list(entries), full.schema(), evaluator, source.header_metadata, metadata
                )
            else:
                from .torch_file import write_torch

                write_torch(tmp, source, entries, evaluator, metadata, container, progress)
        except CkptMigrateError:
            raise
        except Exception as exc:
            raise write_error(out, exc) from exc
        if verify:
            from .verify import verify_written

            key = (
                "/".join(source.state_path) if fmt == "torch" and source.format == "torch" else None
            )
            verify_written(
                tmp, out, full, state, source.key_prefix, revisions, key or None, wrapper
            )


def _others(source: Checkpoint) -> list[str]:
    container = source.container
    if isinstance(container, dict):
        return [str(k) for k in container if (k,) != source.state_path[:1]][:5]
    return []
