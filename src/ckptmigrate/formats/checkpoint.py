"""A checkpoint as migrations see it: a flat state dict in its model's key space.

Whatever the file looked like (a bare state dict, a training container with
the weights under ``state_dict``/``model``/``model_state_dict``, keys behind
``module.`` or ``_orig_mod.``), reading it yields one :class:`Checkpoint`:
plain keys with shapes and dtypes, PyTorch's per-module metadata, the stamp,
and a lazy reader. Writing puts everything else back untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..plan.nodes import Node, Source, TensorSpec
from ..plan.state import PlanState
from .stamp import Stamp, read_stamp

#: Where training containers usually keep the weights, in lookup order.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
#: Prefixes wrappers add: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = {
    "module.": "DataParallel/DistributedDataParallel",
    "_orig_mod.": "torch.compile",
}


@dataclass
class Checkpoint:
    """One checkpoint file, read lazily."""

    path: Path
    format: str  # "torch" or "safetensors"
    schema: dict[str, TensorSpec | None]
    metadata: dict[str, dict[str, Any]]
    stamp: Stamp | None
    reader: Callable[[str], Any]
    container: Any = None
    state_path: tuple[str, ...] = ()
    wrapper_prefix: str = ""
    legacy: bool = False
    header_metadata: dict[str, str] = field(default_factory=dict)
    close: Callable[[], None] = field(default=lambda: None)
    # When focused on a lineage under a key prefix: the whole file's view.
    key_prefix: str = ""
    zip_source: Any = None  # torch_zip.ZipSource when the input was read lazily
    parts: Any = None  # sharded.ShardSet for a sharded checkpoint
    file_schema: dict[str, TensorSpec | None] | None = None
    file_metadata: dict[str, dict[str, Any]] | None = None

    def read(self, key: str) -> Any:
        """A tensor by its key in the file (prefix included)."""
        return self.reader(key)

    def focus(self, prefix: str | None) -> Checkpoint:
        """The same file seen by a lineage whose keys sit under ``prefix`` (e.g. ``model.``).

        Schema, metadata and stamp become relative to the prefix; everything
        outside it is carried through untouched when the file is written.
        """
        if not prefix:
            return self
        p = prefix if prefix.endswith(".") else prefix + "."
        schema = {k[len(p) :]: s for k, s in self.schema.items() if k.startswith(p)}
        if not schema:
            first = ", ".join(list(self.schema)[:5])
            raise CheckpointError(
                f"{self.path} has no keys under the prefix {p!r} (keys start like: {first})",
                hint="fix --key-prefix / key_prefix in the configuration",
            )
        root = p[:-1]
        metadata = {
            ("" if name == root else name[len(root) + 1 :]): dict(meta)
            for name, meta in self.metadata.items()
            if name == root or name.startswith(root + ".")
        }
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
        p = self.key_prefix
        return PlanState({k: Source(p + k, spec) for k, spec in self.schema.items()}, self.metadata)

    def file_state(self, state: PlanState) -> PlanState:
        """``state`` (this lineage's entries) put back among the file's other entries."""
        if not self.key_prefix:
            return state
        assert self.file_schema is not None and self.file_metadata is not None
        p, root = self.key_prefix, self.key_prefix[:-1]
        entries: dict[str, Node] = {}
        placed = False
        for key, spec in self.file_schema.items():
            if key.startswith(p):
                if not placed:
                    entries.update((p + k, node) for k, node in state.entries.items())
                    placed = True
            else:
                entries[key] = Source(key, spec)
        metadata = {
            name: dict(meta)
            for name, meta in self.file_metadata.items()
            if not (name == root or name.startswith(root + "."))
        }
        for name, meta in state.metadata.items():
            metadata[(root + "." + name) if name else root] = dict(meta)
        return PlanState(entries, metadata)

    @property
    def location(self) -> str:
        """Where the state dict sits, for messages."""
        return "/".join(self.state_path) if self.state_path else "top level"

    def notes(self, *, keep_wrapper_prefix: bool | None = None) -> list[str]:
        """What a user should know about how the file was read.

        ``keep_wrapper_prefix`` is None for commands that write nothing, else
        whether the output keeps the wrapper prefix.
        """
        out: list[str] = []
        if self.state_path:
            out.append(f"state dict found under {'/'.join(repr(p) for p in self.state_path)}")
        if self.wrapper_prefix:
            what = " + ".join(
                WRAPPER_PREFIXES[p + "."]
                for p in self.wrapper_prefix.rstrip(".").split(".")
                if p + "." in WRAPPER_PREFIXES
            )
            output = {
                None: "",
                True: "; output keys are written back with it",
                False: "; output keys are written without it (--keep-wrapper-prefix keeps it)",
            }[keep_wrapper_prefix]
            out.append(
                f"stripped wrapper prefix {self.wrapper_prefix!r} ({what}) from "
                f"{len(self.schema)} keys{output}"
            )
        if self.legacy:
            out.append("input is in PyTorch's legacy (pre-1.6) format; output uses the zip format")
        return out


def is_state_dict(value: Any) -> bool:
    """A mapping of string keys to tensors (plus ``*_extra_state`` objects)."""
    if not isinstance(value, Mapping) or not value:
        return False
    saw_tensor = False
    for k, v in value.items():
        if not isinstance(k, str):
            return False
        if isinstance(v, torch.Tensor):
            saw_tensor = True
        elif not k.endswith("_extra_state"):
            return False
    return saw_tensor


def locate_state_dict(
    obj: Any, key: str | None, where: str
) -> tuple[tuple[str, ...], Mapping[str, Any]]:
    """Find the state dict inside a loaded object; say clearly when we can't."""
    if key:
        if isinstance(obj, Mapping) and key in obj:
            path: tuple[str, ...] = (key,)
        elif "/" in key:
            path = tuple(p for p in key.split("/") if p)
        else:
            path = tuple(key.split("."))
        node = obj
        for i, part in enumerate(path):
            if not isinstance(node, Mapping) or part not in node:
                have = (
                    ", ".join(map(repr, list(node)[:10]))
                    if isinstance(node, Mapping)
                    else type(node).__name__
                )
                raise CheckpointError(
                    f"{where} has no entry {'/'.join(path[: i + 1])!r} (found: {have})",
                    hint="fix --state-dict-key",
                )
            node = node[part]
        if not (isinstance(node, Mapping) and (is_state_dict(node) or not node)):
            raise CheckpointError(
                f"{where}: entry {key!r} is not a state dict (a mapping of names to tensors)",
                hint="point --state-dict-key at the weights",
            )
        return path, node
    if isinstance(obj, Mapping) and (is_state_dict(obj) or not obj):
        return (), obj
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where} holds a {type(obj).__name__}, not a state dict or a dict containing one",
            hint="save model.state_dict() rather than the model object",
        )
    for candidate in CONTAINER_KEYS:
        if candidate in obj and is_state_dict(obj[candidate]):
            return (candidate,), obj[candidate]
    found = [k for k, v in obj.items() if isinstance(k, str) and is_state_dict(v)]
    if len(found) == 1:
        return (found[0],), obj[found[0]]
    keys = ", ".join(repr(k) for k in list(obj)[:12])
    if found:
        raise CheckpointError(
            f"{where} holds several state dicts ({', '.join(map(repr, found))})",
            hint="choose one with --state-dict-key KEY (or state_dict_key in the config)",
        )
    raise CheckpointError(
        f"{where} has no state dict: top-level keys are {keys}",
        hint="choose the weights' entry with --state-dict-key KEY",
    )


def wrapper_prefix(keys: list[str]) -> str:
    """The run of wrapper prefixes every key starts with ("" if none)."""
    prefix = ""
    if not keys:
        return prefix
    while True:
        for candidate in WRAPPER_PREFIXES:
            full = prefix + candidate
            if all(k.startswith(full) for k in keys):
                prefix = full
                break
        else:
            return prefix


def strip_metadata_prefix(
    metadata: Mapping[str, Any] | None, prefix: str
) -> dict[str, dict[str, Any]]:
    """Re-key PyTorch's ``_metadata`` into the plain key space."""
    out: dict[str, dict[str, Any]] = {}
    if not metadata:
        return out
    root = prefix[:-1] if prefix else ""
    for name, meta in metadata.items():
        if not isinstance(name, str) or not isinstance(meta, Mapping):
            continue
        if not prefix:
            out[name] = dict(meta)
        elif name == root:
            out[""] = dict(meta)
        elif name.startswith(prefix):
            out[name[len(prefix) :]] = dict(meta)
    return out


def replace_at(container: Any, path: tuple[str, ...], value: Any) -> Any:
    """A shallow copy of ``container`` with ``value`` at ``path``."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    shallow = copy.copy(container)  # keeps a dict subclass (and its attributes) as it was
    shallow[head] = replace_at(container[head], rest, value)
    return shallow
