"""ckptmigrate inside a job that checkpoints with ``torch.distributed.checkpoint`` (DCP).

Loading: :func:`load` is ``dcp.load`` for an old checkpoint. Every rank reads
``.metadata`` and plans the migration to the current revision (symbolically,
as ``ckptmigrate upgrade --dry-run`` would); :class:`Reader` then presents
the checkpoint to ``dcp.load`` *as it would be after the migration*:

* an entry a migration only renames (or leaves alone) is the same chunks
  under its new key, so DCP's own planner gives each rank exactly the chunks
  that overlap its shards, and reads nothing else; no rank materialises the
  checkpoint for a rename;
* an entry a migration computes (a split, a concat, a resize, a cast, the
  optimizer state that follows them, a new ``params`` list) is computed on
  each rank that has a shard of it: from the whole source tensors (every
  chunk of each), one output at a time, then copied into the rank's shard
  and dropped. Memory is bounded by the tensors touched, not the checkpoint.

Optimizer state is keyed by parameter name, as ``get_state_dict`` gives it;
a parameter the migration adds has none in the checkpoint and keeps the
state the job's optimizer already holds for it (freshly initialised).

Saving: :class:`SavePlanner` (``dcp.save(..., planner=SavePlanner())``, or
:func:`save`) records the revision a ``@versioned`` model stamped into its
state dict in ``.metadata``, where ``ckptmigrate current`` finds it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.futures import Future

from ..config import Config
from ..errors import CkptMigrateError, LoadError
from ..formats import keyspace
from ..formats.dcp import folder_of
from ..formats.dcp.metadata import STAMP_KEY
from ..formats.dcp.output import Leaf, computing, plan_output, region
from ..formats.dcp.reading import DCPCheckpoint, flat_key, read_dcp
from ..formats.fileio import plain_tensor
from ..formats.stamp import flatten_stamps, is_stamped
from ..runtime.options import MigrationOptions
from ..runtime.report import MigrationResult
from ..runtime.session import MigrationSession
from .versioning import lineage_of

log = logging.getLogger("ckptmigrate")

PathLike = str | os.PathLike[str]

#: The read-side stand-ins of entries the view serves itself.
_COMPUTED, _FRESH = "computed", "fresh"


class _LogStream(io.TextIOBase):
    """A text stream whose lines go to the ``ckptmigrate`` logger (rank 0's notes)."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.info(line)
        return len(text)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _lineage(
    location: PathLike | None, model: torch.nn.Module | None, revision: str | None
) -> tuple[Config, str]:
    """The configuration to migrate with, and the revision to bring the checkpoint to."""
    quiet = _rank() != 0
    streams: dict[str, Any] = {"stderr": _LogStream()}
    if location is None and model is not None:
        found = lineage_of(type(model))
        if found is None:
            raise CkptMigrateError(
                f"{type(model).__name__} is not a @ckptmigrate.versioned class",
                hint="pass location= (the migrations folder or its ini file) and revision=",
            )
        config = Config.from_location(found.script_dir.dir, quiet=quiet, echo=False, **streams)
        return config, revision or found.revision
    if location is None:
        config = Config.discover(quiet=quiet, echo=False, **streams)
    else:
        config = Config.from_location(location, quiet=quiet, echo=False, **streams)
    return config, revision or "head"


class Reader(FileSystemReader):
    """A DCP storage reader that serves an old checkpoint in the current revision's layout.

    Pass it to ``dcp.load(state_dict, storage_reader=Reader(path, location=...))``;
    :func:`load` does that and first checks the state dict against the
    migrated layout (see the module docstring).
    """

    def __init__(
        self,
        checkpoint_id: PathLike,
        *,
        location: PathLike | None = None,
        model: torch.nn.Module | None = None,
        revision: str | None = None,
        from_revision: str | None = None,
        state_dict_key: str | None = None,
        key_prefix: str | None = None,
        trust_pickle: bool = False,
    ) -> None:
        folder = folder_of(Path(checkpoint_id))
        super().__init__(folder)
        config, target = _lineage(location, model, revision)
        options = MigrationOptions(
            trust_pickle=trust_pickle,
            state_dict_key=state_dict_key or config.get("state_dict_key"),
            key_prefix=key_prefix or config.get("key_prefix"),
            from_revision=from_revision,
        )
        self.ckpt = read_dcp(
            folder, trust_pickle=trust_pickle, state_dict_key=options.state_dict_key
        )
        focused = self.ckpt.focus(options.key_prefix)
        session = MigrationSession(config, options)
        self.result, state, container = session.plan(focused, target)  # logs each step
        leaves = plan_output(focused, focused.file_state(state).entries, container)
        self.view = _view(self.ckpt, leaves)
        self._serves = {leaf.key: _COMPUTED for leaf in leaves if leaf.ref is None}
        self._compute = computing([leaf for leaf in leaves if leaf.ref is None], focused.read)
        self._values = {leaf.key: leaf.value for leaf in leaves if leaf.node is None}

    # ------------------------------------------------------------------ fitting a state dict

    def fit(self, state_dict: Mapping[str, Any]) -> None:
        """Check ``state_dict`` against the migrated layout; keep the fresh optimizer state.

        Raises :class:`~ckptmigrate.errors.LoadError` naming the keys that are
        missing or differ in shape, before ``dcp.load`` starts.
        """
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )
        from torch.distributed.checkpoint.stateful import Stateful

        plain = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}
        flat, paths = flatten_state_dict(plain)
        entries = self.view.state_dict_metadata
        migrated = list(entries)
        missing, mismatched = [], []
        for key, value in flat.items():
            entry = entries.get(key)
            if entry is None:
                if isinstance(value, torch.Tensor) and _fresh(paths[key], migrated):
                    size = torch.Size(value.shape)
                    entries[key] = TensorStorageMetadata(
                        TensorProperties(dtype=value.dtype),
                        size,
                        [ChunkStorageMetadata(torch.Size([0] * len(size)), size)],
                    )
                    self.view.storage_data[MetadataIndex(key, [0] * len(size))] = _FRESH
                    self._serves[key] = _FRESH
                else:
                    missing.append(key)
            elif (
                isinstance(value, torch.Tensor)
                and isinstance(entry, TensorStorageMetadata)
                and tuple(entry.size) != tuple(value.shape)
            ):
                mismatched.append(f"{key} is {list(entry.size)} not {list(value.shape)}")
        if missing or mismatched:
            at = ", ".join(self.result.to_revisions) or "base"
            parts = []
            if missing:
                parts.append(
                    f"has no {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else "")
                )
            if mismatched:
                parts.append("; ".join(mismatched[:4]))
            raise LoadError(
                f"{self.ckpt.path}, migrated to {at}, does not fit the state dict: "
                + "; ".join(parts),
                hint="is the model at another revision? Pass revision= (or model= for a "
                "@ckptmigrate.versioned class); 'ckptmigrate diff CKPT' shows the difference",
            )

    # ------------------------------------------------------------------ the StorageReader side

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("rank") is not None:  # rank-local metadata: DCP's fallback, not ours
            raise FileNotFoundError("a migrated checkpoint has one global .metadata")
        return self.view

    def read_data(self, plan: Any, planner: Any) -> Future[None]:
        mine = [item for item in plan.items if item.storage_index.fqn in self._serves]
        theirs = [item for item in plan.items if item.storage_index.fqn not in self._serves]
        if theirs:
            super().read_data(dataclasses.replace(plan, items=theirs), planner).wait()
        left = Counter(item.storage_index.fqn for item in mine)
        done: dict[str, Any] = {}
        for item in mine:
            key = item.storage_index.fqn
            if self._serves[key] == _FRESH:
                continue  # the job's own (fresh) state stays
            if key not in done:
                done[key] = self._value(key)
            value = done[key]
            if isinstance(value, torch.Tensor):
                target = planner.resolve_tensor(item).detach()
                target.copy_(region(value, (item.storage_offsets, item.lengths)))
                planner.commit_tensor(item, target)
            else:
                buf = io.BytesIO()
                torch.save(value, buf)
                buf.seek(0)
                planner.load_bytes(item, buf)
            left[key] -= 1
            if not left[key]:
                del done[key]  # one computed tensor at a time
        self.ckpt.close()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _value(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        value = self._compute(key)
        return plain_tensor(value) if isinstance(value, torch.Tensor) else value


def _fresh(path: tuple[Any, ...], keys: list[str]) -> bool:
    """A parameter's optimizer state (``.../state/<fqn>/<name>``) the checkpoint has none of."""
    if len(path) < 4 or path[-3] != "state":
        return False
    param = flat_key(path[:-1]) + "."
    groups = flat_key((*path[:-3], "param_groups")) + "."
    return any(k.startswith(groups) for k in keys) and not any(k.startswith(param) for k in keys)


def _view(ckpt: DCPCheckpoint, leaves: list[Leaf]) -> Any:
    """The checkpoint's ``Metadata`` as the migration would write it (nothing is written)."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for leaf in leaves:
        if leaf.ref is not None:
            entries[leaf.key] = ckpt.entries[leaf.ref].md
            storage.update(ckpt.storage_of(leaf.ref, leaf.key))
        elif leaf.spec is not None:
            size = torch.Size(leaf.spec.shape)
            whole = ChunkStorageMetadata(torch.Size([0] * len(size)), size)
            entries[leaf.key] = TensorStorageMetadata(
                TensorProperties(dtype=leaf.spec.dtype), size, [whole]
            )
            storage[MetadataIndex(leaf.key, whole.offsets)] = _COMPUTED
        else:
            entries[leaf.key] = BytesStorageMetadata()
            storage[MetadataIndex(leaf.key)] = _COMPUTED
    meta = ckpt.md.storage_meta or StorageMeta()
    return Metadata(
        state_dict_metadata=entries,
        planner_data={leaf.key: leaf.path for leaf in leaves},
        storage_data=storage,
        storage_meta=dataclasses.replace(meta),
        version=ckpt.md.version,
    )


def load(
    state_dict: dict[str, Any],
    checkpoint_id: PathLike,
    *,
    location: PathLike | None = None,
    model: torch.nn.Module | None = None,
    revision: str | None = None,
    from_revision: str | None = None,
    state_dict_key: str | None = None,
    key_prefix: str | None = None,
    trust_pickle: bool = False,
    planner: Any = None,
    process_group: Any = None,
    no_dist: bool = False,
) -> MigrationResult:
    """``dcp.load`` of an old checkpoint into ``state_dict`` (today's layout), migrating it.

    ``location``: the migrations folder or its ini file (default: found as the
    command line finds it); ``model``: a ``@versioned`` model, whose lineage
    and revision are used; ``revision``: the revision the state dict is at
    (default: the class's, else the head). ``planner``, ``process_group`` and
    ``no_dist`` go to ``dcp.load``. Returns what was migrated (from and to
    revisions, steps); the checkpoint on disk is not changed.
    """
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    reader = Reader(
        checkpoint_id,
        location=location,
        model=model,
        revision=revision,
        from_revision=from_revision,
        state_dict_key=state_dict_key,
        key_prefix=key_prefix,
        trust_pickle=trust_pickle,
    )
    reader.fit(state_dict)
    dcp_load(
        state_dict,
        storage_reader=reader,
        planner=planner,
        process_group=process_group,
        no_dist=no_dist,
    )
    return reader.result


class SavePlanner(DefaultSavePlanner):
    """DCP's default save planner that also records the stamps of ``@versioned`` state dicts.

    A versioned model's ``state_dict()`` (and ``get_model_state_dict``) stamps
    its revision into the dict's ``_metadata``; DCP keeps only tensors and
    objects, so this planner puts the stamps into ``.metadata``'s
    ``planner_data``, where ``ckptmigrate current``, ``upgrade`` and
    :func:`load` find them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stamps: dict[str, str] = {}

    def set_up_planner(self, state_dict: Any, *args: Any, **kwargs: Any) -> None:
        self.stamps = stamps_of(state_dict)
        super().set_up_planner(state_dict, *args, **kwargs)

    def create_global_plan(self, all_plans: list[Any]) -> tuple[list[Any], Any]:
        plans, metadata = super().create_global_plan(all_plans)
        if self.stamps:
            if metadata.planner_data is None:
                metadata.planner_data = {}
            if isinstance(metadata.planner_data, dict):
                metadata.planner_data[STAMP_KEY] = dict(self.stamps)
        return plans, metadata


def stamps_of(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """The stamp entries of every state dict inside ``state_dict``, their modules as flat keys."""
    out: dict[str, str] = {}

    def visit(value: Any, path: tuple[str, ...]) -> None:
        if not isinstance(value, Mapping):
            return
        meta = getattr(value, "_metadata", None)
        if isinstance(meta, Mapping) and any(is_stamped(m) for m in meta.values()):
            stamped = {str(k): dict(v) for k, v in meta.items() if is_stamped(v)}
            out.update(
                flatten_stamps(keyspace.metadata_at(stamped, keyspace.normal(flat_key(path))))
            )
        for k, v in value.items():
            visit(v, (*path, str(k)))

    visit(state_dict, ())
    return out


def save(state_dict: dict[str, Any], checkpoint_id: PathLike, **kwargs: Any) -> Any:
    """``dcp.save`` with :class:`SavePlanner`: versioned models' revisions are recorded."""
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    kwargs.setdefault("planner", SavePlanner())
    return dcp_save(state_dict, checkpoint_id=checkpoint_id, **kwargs)
