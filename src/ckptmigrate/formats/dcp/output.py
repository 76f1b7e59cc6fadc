"""What a migrated DCP checkpoint holds: every entry, and whether it is new data or not.

The migrated state (the lineage's plan, put back at its place in the
training container, whose values may be plan nodes) is walked the way DCP's
planner flattens a state dict, giving each value its path and flat key. Each
becomes a :class:`Leaf`:

* a *reference*: an entry of the input DCP checkpoint, unchanged, now under
  this key (a rename, or nothing happened to it). Its chunks stay where they
  are; only ``.metadata`` names them anew;
* a *tensor* to compute (a transform, a new tensor, optimizer state carried
  along a transform), written as new chunks: with its source's chunk layout
  when the shape is the same, else cut along the dim its source was sharded
  along into as many chunks (dim 0, as FSDP does, when it has no DCP source);
* an *object* to store (an optimizer's new ``params`` list), pickled by
  ``torch.save`` as DCP does.

The offline writer writes the tensors and objects; the in-job reader
computes them while ``dcp.load`` reads the references.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...plan.nodes import Constant, Node, Source, TensorSpec, walk
from ..checkpoint import Checkpoint
from ..container import replace_at
from .reading import DCPCheckpoint, PathItem, Stored, flat_key

#: A chunk: (offsets, sizes).
Box = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass
class Leaf:
    """One entry of the output: where it goes, and what it is."""

    path: tuple[PathItem, ...]
    key: str
    ref: str | None = None  # the input entry it is (by flat key), unchanged
    node: Node | None = None  # a tensor to compute
    value: Any = None  # an object to store
    boxes: list[Box] | None = None  # a computed tensor's chunks

    @property
    def spec(self) -> TensorSpec | None:
        return self.node.spec if self.node is not None else None


def _is_leaf_value(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, Node))


def _terminal(value: Any) -> bool:
    """DCP's rule: a list is flattened only when it holds tensors (or containers that do)."""
    if isinstance(value, Mapping):
        return False
    if not isinstance(value, list):
        return True
    return not any(
        _is_leaf_value(v) or (isinstance(v, (Mapping, list)) and not _terminal(v)) for v in value
    )


def flatten(tree: Any) -> list[tuple[tuple[PathItem, ...], Any]]:
    """(path, value) of every leaf, in DCP's order and with DCP's rules (dict keys as strings)."""
    out: list[tuple[tuple[PathItem, ...], Any]] = []

    def visit(path: tuple[PathItem, ...], value: Any) -> None:
        if _is_leaf_value(value):  # most of them: asked first, as it is cheaper to ask
            out.append((path, value))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit((*path, str(k)), v)
        elif _terminal(value):
            out.append((path, value))
        else:
            for i, v in enumerate(value):
                visit((*path, i), v)

    for key, value in tree.items():
        if _is_leaf_value(value):  # a state dict's entries: no step down
            out.append(((str(key),), value))
        else:
            visit((str(key),), value)
    return out


def plan_output(source: Checkpoint, entries: Mapping[str, Node], container: Any) -> list[Leaf]:
    """Every entry the output holds: ``entries`` (the state dict) at their place in ``container``.

    ``container`` is the training container to write (None: the source's own,
    or none); its values may be plan nodes.
    """
    training = source.training
    lineage = dict(entries)
    if training is None:
        tree: Any = lineage
    else:
        base = container if container is not None else training.container
        tree = replace_at(base, training.state_path, lineage)
    dcp = source if isinstance(source, DCPCheckpoint) else None
    leaves: list[Leaf] = []
    for path, value in flatten(tree):
        leaves.append(_leaf(path, value, dcp))
    layout = Layout(dcp)
    for leaf in leaves:
        if leaf.node is not None and leaf.node.spec is not None:
            leaf.boxes = layout.boxes(leaf.node)
    return leaves


def _leaf(path: tuple[PathItem, ...], value: Any, dcp: DCPCheckpoint | None) -> Leaf:
    key = flat_key(path)
    if dcp is not None:
        if isinstance(value, Stored) and dcp.owns(value):
            return Leaf(path, key, ref=value.key)
        if isinstance(value, Source) and value.key in dcp.flat_of:
            return Leaf(path, key, ref=dcp.flat_of[value.key])
        if key in dcp.objects and not _is_leaf_value(value) and _same(dcp.objects[key], value):
            return Leaf(path, key, ref=key)  # an object read, and found unchanged
    if isinstance(value, torch.Tensor):
        return Leaf(path, key, node=Constant(value))
    if isinstance(value, Node):
        return Leaf(path, key, node=value)  # a tensor (or an object) computed while writing
    return Leaf(path, key, value=value)


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


class Layout:
    """The chunks a tensor written anew is cut into (see the module docstring)."""

    def __init__(self, dcp: DCPCheckpoint | None) -> None:
        self.dcp = dcp

    @functools.cached_property
    def default(self) -> int:
        """How many chunks a tensor with no source is cut into: as many as the most any has."""
        counts = [e.chunks for e in self.dcp.entries.values()] if self.dcp is not None else []
        return max(counts, default=1) or 1

    def _primary(self, node: Node) -> Any | None:
        """The first input entry the tensor is made of, as ``.metadata`` describes it."""
        if self.dcp is None:
            return None
        for n in walk(node):
            key = None
            if isinstance(n, Source):
                key = self.dcp.flat_of.get(n.key)
            elif isinstance(n, Stored) and self.dcp.owns(n):
                key = n.key
            entry = self.dcp.entries.get(key) if key is not None else None
            if entry is not None and entry.spec is not None:
                return entry.md
        return None

    def boxes(self, node: Node) -> list[Box]:
        spec = node.spec
        assert spec is not None
        shape = spec.shape
        primary = self._primary(node)
        if primary is not None and tuple(primary.size) == shape:
            return [(tuple(c.offsets), tuple(c.sizes)) for c in primary.chunks]
        dim, n = _sharding(primary) if primary is not None else (0, self.default)
        return grid(shape, dim, n)


def _sharding(md: Any) -> tuple[int, int]:
    """(dim, parts) a tensor's chunks cut it along; (0, 1) when they are not one cut."""
    chunks = md.chunks
    if len(chunks) < 2:
        return 0, 1
    varying = [d for d in range(len(md.size)) if len({c.offsets[d] for c in chunks}) > 1]
    if len(varying) != 1:
        return 0, 1
    return varying[0], len(chunks)


def grid(shape: Sequence[int], dim: int, parts: int) -> list[Box]:
    """``shape`` cut along ``dim`` into ``parts`` pieces as ``torch.chunk`` does."""
    full: Box = (tuple(0 for _ in shape), tuple(shape))
    if parts <= 1 or dim >= len(shape) or shape[dim] < 2:
        return [full]
    step = -(-shape[dim] // parts)
    out: list[Box] = []
    for start in range(0, shape[dim], step):
        offsets = [0] * len(shape)
        sizes = list(shape)
        offsets[dim] = start
        sizes[dim] = min(step, shape[dim] - start)
        out.append((tuple(offsets), tuple(sizes)))
    return out


def region(value: torch.Tensor, box: Box) -> torch.Tensor:
    """The part of ``value`` a chunk covers (a view)."""
    offsets, sizes = box
    return value[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]


def computing(leaves: Sequence[Leaf], read: Callable[[str], Any]) -> Any:
    """An evaluator over the leaves to compute (by flat key), sharing common inputs."""
    from ...plan.state import Evaluator

    return Evaluator({leaf.key: leaf.node for leaf in leaves if leaf.node is not None}, read)
