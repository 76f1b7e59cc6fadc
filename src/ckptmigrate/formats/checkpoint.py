"""A checkpoint as migrations see it: a flat state dict in its model's key space.

Whatever the file looked like (a bare state dict, a training container with
the weights under ``state_dict``/``model``/``model_state_dict``, keys behind
``module.`` or ``_orig_mod.``, one file or a folder of shards), opening it
yields a :class:`Checkpoint`: plain keys with shapes and dtypes, PyTorch's
per-module metadata, the stamp, and a lazy reader. Each format subclasses it
for what only it needs to write the file back (its zip index, its shards);
everything else is generic, so a migration never asks which format it has.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from . import keyspace
from .container import describe_wrapper
from .stamp import Stamp, read_stamp

if TYPE_CHECKING:
    from ..adapters.layout import AdapterLayout
    from ..plan.nodes import Node, TensorSpec
    from ..plan.state import PlanState
    from .base import Format


@dataclass(frozen=True)
class TrainingContainer:
    """The object a file holds when the weights are one entry of it (next to optimizer state...).

    ``state_path`` leads from ``container`` to the state dict.
    """

    container: Any
    state_path: tuple[str, ...]
    #: The container's values may be plan nodes, computed only when written: a DCP
    #: checkpoint's optimizer state is read only where a migration changes it.
    lazy: bool = False

    @property
    def state_dict(self) -> Any:
        node = self.container
        for part in self.state_path:
            node = node[part]
        return node

    def others(self, limit: int = 5) -> list[str]:
        """The container's other top-level entries, for messages."""
        if not isinstance(self.container, dict):
            return []
        return [str(k) for k in self.container if (k,) != self.state_path[:1]][:limit]


@dataclass
class Checkpoint:
    """One checkpoint, read lazily."""

    path: Path
    format: Format
    schema: dict[str, TensorSpec | None]
    metadata: dict[str, dict[str, Any]]
    stamp: Stamp | None
    reader: Callable[[str], Any]
    close: Callable[[], None] = field(default=lambda: None)
    #: None when the state dict is all the file holds.
    training: TrainingContainer | None = None
    wrapper_prefix: str = ""
    # When focused on a lineage under a key prefix: the whole file's view.
    key_prefix: str = ""
    file_schema: dict[str, TensorSpec | None] | None = None
    file_metadata: dict[str, dict[str, Any]] | None = None
    #: ``read`` returns views of the file's storages (memory-mapped): reading costs
    #: nothing and tied tensors show as one storage. False where a read loads data.
    views_share_storage: bool = True
    #: Set when the file holds a PEFT adapter of the lineage's model, not the model's weights.
    adapter: AdapterLayout | None = None

    def read(self, key: str) -> Any:
        """A tensor by its key in the file (prefix included)."""
        return self.reader(key)

    def focus(self, prefix: str | None) -> Checkpoint:
        """The same file seen by a lineage whose keys sit under ``prefix`` (e.g. ``model.``).

        Schema, metadata and stamp become relative to the prefix; everything
        outside it is carried through untouched when the file is written.
        """
        p = keyspace.normal(prefix)
        if not p:
            return self
        schema = keyspace.keys_under(self.schema, p)
        if not schema:
            first = ", ".join(list(self.schema)[:5])
            raise CheckpointError(
                f"{self.path} has no keys under the prefix {p!r} (keys start like: {first})",
                hint="fix --key-prefix / key_prefix in the configuration",
            )
        metadata = keyspace.metadata_under(self.metadata, p)
        return replace(
            self,
            schema=schema,
            metadata=metadata,
            stamp=read_stamp(metadata.get(""), f"{self.path} (under {p!r})"),
            key_prefix=p,
            file_schema=self.schema,
            file_metadata=self.metadata,
        )

    def initial_state(self) -> PlanState:
        """The plan before any migration: every entry is itself (read by its file key)."""
        from ..plan.nodes import Source
        from ..plan.state import PlanState

        p = self.key_prefix
        return PlanState({k: Source(p + k, spec) for k, spec in self.schema.items()}, self.metadata)

    def file_state(self, state: PlanState) -> PlanState:
        """``state`` (this lineage's entries) put back among the file's other entries.

        The lineage's entries take the place of the first key under the prefix;
        the file's other keys keep theirs.
        """
        from ..plan.nodes import Source
        from ..plan.state import PlanState

        if not self.key_prefix:
            return state
        assert self.file_schema is not None and self.file_metadata is not None
        p = self.key_prefix
        entries: dict[str, Node] = {}
        placed = False
        for key, spec in self.file_schema.items():
            if not key.startswith(p):
                entries[key] = Source(key, spec)
            elif not placed:
                entries.update(keyspace.keys_at(state.entries, p))
                placed = True
        metadata = keyspace.metadata_outside(self.file_metadata, p)
        metadata.update(keyspace.metadata_at(state.metadata, p))
        return PlanState(entries, metadata)

    def notes(self, *, keep_wrapper_prefix: bool | None = None) -> list[str]:
        """What a user should know about how the file was read.

        ``keep_wrapper_prefix`` is None for commands that write nothing, else
        whether the output keeps the wrapper prefix.
        """
        out: list[str] = []
        if self.training is not None:
            where = "/".join(repr(p) for p in self.training.state_path)
            out.append(f"state dict found under {where}")
        if self.wrapper_prefix:
            output = {
                None: "",
                True: "; output keys are written back with it",
                False: "; output keys are written without it (--keep-wrapper-prefix keeps it)",
            }[keep_wrapper_prefix]
            out.append(
                f"stripped wrapper prefix {self.wrapper_prefix!r} "
                f"({describe_wrapper(self.wrapper_prefix)}) from {len(self.schema)} keys{output}"
            )
        return out
