"""The state a migration rewrites: key -> node, plus PyTorch's per-module metadata."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import CkptMigrateError, OperationError
from .nodes import Node, Source, TensorSpec, sources_of, walk


class PlanState:
    """An ordered state dict whose values are plan nodes instead of tensors."""

    def __init__(
        self,
        entries: Mapping[str, Node] | None = None,
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.entries: dict[str, Node] = dict(entries or {})
        self.metadata: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (metadata or {}).items()}
        # what a script dropped or cut on purpose (intended=True): not a silent loss
        self.intended: list[Node] = []

    @classmethod
    def from_schema(
        cls,
        schema: Mapping[str, TensorSpec | None],
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> PlanState:
        return cls({k: Source(k, spec) for k, spec in schema.items()}, metadata)

    def copy(self) -> PlanState:
        out = PlanState(self.entries, copy.deepcopy(self.metadata))
        out.intended = list(self.intended)
        return out

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def schema(self) -> dict[str, TensorSpec | None]:
        return {k: n.spec for k, n in self.entries.items()}

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.entries if k.startswith(prefix)]

    def replace_keys(self, mapping: Mapping[str, str]) -> None:
        """Rename several keys at once, keeping every key in its place."""
        entries = self.entries  # built without a Python step per key: a history renames often
        self.entries = dict(zip(map(mapping.get, entries, entries), entries.values()))

    def rename_metadata(self, rename: Callable[[str], str | None]) -> None:
        """Move per-module metadata along with a rename (None drops it).

        Metadata is keyed by module prefix without the trailing dot ("" is
        the root); ``rename`` sees the prefix with its dot, like keys. The
        root (which holds the stamp) stays put; a module moved onto a prefix
        whose metadata is left over from a dropped module replaces it.
        """
        target: dict[str, str | None] = {}
        for prefix in self.metadata:
            new = prefix if prefix == "" else rename(prefix + ".")
            target[prefix] = new[:-1] if new is not None and new.endswith(".") else new
        arrivals = {new for old, new in target.items() if new is not None and new != old}
        out: dict[str, dict[str, Any]] = {}
        if "" in self.metadata:
            out[""] = self.metadata[""]
        for prefix, meta in self.metadata.items():
            new = target[prefix]
            if new is None or new in out or (new == prefix and new in arrivals):
                continue
            out[new] = meta
        self.metadata = out

    def source_keys(self) -> set[str]:
        """Input keys some output still needs."""
        return {key for node in self.entries.values() for key in sources_of(node)}


class _ComputeFailed(Exception):
    """A transform or init function raised; the evaluator adds the key."""

    def __init__(self, node: Node, exc: Exception) -> None:
        super().__init__(f"{node.describe()} raised {type(exc).__name__}: {exc}")


class Evaluator:
    """Compute output tensors one key at a time, sharing common inputs.

    A node used by several outputs (a fused qkv being split in three) is kept
    only until its last consumer has been computed.
    """

    def __init__(self, outputs: Mapping[str, Node], read: Callable[[str], Any]) -> None:
        self._outputs = outputs
        self._read = read
        self._uses: dict[int, int] = {}
        self._cache: dict[int, Any] = {}
        counted: set[int] = set()
        for root in outputs.values():
            self._uses[id(root)] = self._uses.get(id(root), 0) + 1
            for node in walk(root):
                if id(node) in counted:
                    continue
                counted.add(id(node))
                for inp in node.inputs:
                    self._uses[id(inp)] = self._uses.get(id(inp), 0) + 1

    def __call__(self, key: str) -> Any:
        node = self._outputs[key]
        try:
            value = self._value(node)
        except _ComputeFailed as exc:
            # a user's map_tensor/init function failing on real data is a
            # mistake in the script, not a failure to write the file
            raise OperationError(
                f"{key}: computing it failed: {exc}",
                hint="fix the function in the revision script; nothing was written",
            ) from exc.__cause__
        if node.spec is not None:
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                raise OperationError(
                    f"{key}: the migration produced {type(value).__name__}, not a tensor",
                    hint="a map_tensor or init function must return a tensor",
                )
            got = (tuple(value.shape), value.dtype)
            want = (node.spec.shape, node.spec.dtype)
            if got != want:
                raise OperationError(
                    f"{key}: the migration produced {list(got[0])} {got[1]} "
                    f"but its plan said {list(want[0])} {want[1]}",
                    hint="a map_tensor function behaves differently on real and meta "
                    "tensors; pass shape=/dtype= to map_tensor",
                )
        return value

    def _value(self, node: Node) -> Any:
        nid = id(node)
        if nid in self._cache:
            value = self._cache[nid]
        else:
            if isinstance(node, Source):
                value = self._read(node.key)
            else:
                args = [self._value(i) for i in node.inputs]
                try:
                    value = node.compute(args)
                except (CkptMigrateError, _ComputeFailed):
                    raise
                except Exception as exc:
                    raise _ComputeFailed(node, exc) from exc
            if self._uses.get(nid, 0) > 1:
                self._cache[nid] = value
        self._uses[nid] = self._uses.get(nid, 1) - 1
        if self._uses[nid] <= 0:
            self._cache.pop(nid, None)
        return value
