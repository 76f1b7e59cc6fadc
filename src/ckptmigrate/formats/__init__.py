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

__all__ = ["format_for", "read_checkpoint", "write_checkpoint"]

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
) -> None:
    """Write ``state`` (evaluated against ``source``) to ``target`` atomically.

    ``state`` holds the lineage's entries (relative to ``source.key_prefix``);
    the rest of the file is carried through (``container``, when given,
    replaces the training container the state dict is put back into).
    ``revisions`` is the stamp to record: ``()`` means at base, None removes it.
    """
    out = Path(target)
    fmt = format or format_for(out, source.format)
    if fmt == "safetensors" and source.format == "torch" and source.state_path:
        raise CheckpointError(
            f"{out}: a safetensors file holds only tensors, but {source.path} is a training "
            f"checkpoint with other entries ({', '.join(map(repr, _others(source)))})",
            hint="write a .pt output, or save the state dict alone first",
        )
    full = source.file_state(state)
    metadata = {k: dict(v) for k, v in full.metadata.items()}
    write_stamp(metadata.setdefault(source.key_prefix[:-1], {}), revisions)
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

    evaluator = Evaluator(full.entries, source.read)
    keys = list(full.entries)
    with atomic_output(out, durable=durable) as tmp:
        try:
            if fmt == "safetensors":
                from .safetensors_file import write_safetensors

                write_safetensors(
                    tmp, keys, full.schema(), evaluator, source.header_metadata, metadata
                )
            else:
                from .torch_file import write_torch

                write_torch(tmp, source, full.entries, evaluator, metadata, container, progress)
        except CkptMigrateError:
            raise
        except Exception as exc:
            raise write_error(out, exc) from exc
        if verify:
            from .verify import verify_written

            key = (
                "/".join(source.state_path) if fmt == "torch" and source.format == "torch" else None
            )
            verify_written(tmp, out, full, state, source.key_prefix, revisions, key or None)


def _others(source: Checkpoint) -> list[str]:
    container = source.container
    if isinstance(container, dict):
        return [str(k) for k in container if (k,) != source.state_path[:1]][:5]
    return []
