"""Which input values a plan throws away, read from the plan itself.

A migration loses trained values in three ways: an input tensor no output
depends on (dropped, or renamed and then dropped), a node that cuts part of its
input (a ``resize`` that shrinks), and an input kept only in parts that do not
cover it (a ``split`` whose parts are not all kept); each op's
definition says which of its nodes keep part of their input, or cut it. All three are visible in the
symbolic plan, so ``check`` and autogenerate find them without reading the
script's text. A drop or resize the script marks ``intended=True`` is still
found, and reported as intended.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .nodes import Apply, Node, Source, TensorSpec, sources_of, walk
from .state import PlanState


@dataclass(frozen=True)
class Discard:
    """Values of one input tensor that no output keeps."""

    key: str
    spec: TensorSpec | None  # None: a non-tensor entry
    lost: int  # elements
    detail: str | None = None  # how: "cut to [100, 16]", "part not kept"; None: all of it
    intended: bool = False

    def __str__(self) -> str:
        if self.spec is None:
            return f"{self.key} (not a tensor)"
        shape = _shape(self.spec.shape)
        how = f"{self.detail}: " if self.detail else ""
        return f"{self.key} {shape} ({how}{count(self.lost)} values)"


def count(n: int) -> str:
    return f"{n:,}"


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def summary(discards: list[Discard]) -> str:
    """``4 tensors (1,088 values)``: how much a list of discards amounts to."""
    keys = {d.key for d in discards}
    noun = "tensor" if len(keys) == 1 else "tensors"
    return f"{len(keys)} {noun} ({count(sum(d.lost for d in discards))} values)"


def find_discards(inputs: Mapping[str, TensorSpec | None], state: PlanState) -> list[Discard]:
    """What the plan in ``state``, started from ``inputs`` as sources, throws away."""
    outputs = list(state.entries.values())
    place = {k: i for i, k in enumerate(inputs)}
    every = sorted(
        _losses(inputs, outputs, exempt=set()),
        key=lambda d: place.get(d.key.split(" + ")[0], len(place)),
    )
    if not state.intended:
        return every
    # the same analysis with the intended drops kept and intended cuts allowed:
    # what is still lost then was lost by accident
    unintended = {
        (d.key, d.detail): d
        for d in _losses(inputs, outputs + state.intended, {id(n) for n in state.intended})
    }
    out = []
    for d in every:
        accident = unintended.get((d.key, d.detail))
        out.append(accident if accident is not None else _marked(d))
    return out


def _marked(d: Discard) -> Discard:
    return Discard(d.key, d.spec, d.lost, d.detail, intended=True)


def _losses(
    inputs: Mapping[str, TensorSpec | None], roots: list[Node], exempt: set[int]
) -> list[Discard]:
    nodes: dict[int, Node] = {}
    for root in roots:
        for node in walk(root):
            nodes.setdefault(id(node), node)
    used = {n.key for n in nodes.values() if isinstance(n, Source)}
    out = [
        Discard(key, spec, spec.numel if spec is not None else 0)
        for key, spec in inputs.items()
        if key not in used
    ]
    # parts of a tensor: the pieces (a split's, say) that are kept, when nothing uses it whole
    pieces: dict[int, list[tuple[int, int, int]]] = {}
    whole = {id(r) for r in roots}
    for node in nodes.values():
        part = node.op.part_kept(node.params) if isinstance(node, Apply) else None
        for inp in node.inputs:
            if part is not None:
                pieces.setdefault(id(inp), []).append(part)
            else:
                whole.add(id(inp))
    for nid, taken in pieces.items():
        node = nodes[nid]
        if nid in whole or node.spec is None or len({d for d, _, _ in taken}) != 1:
            continue
        dim = taken[0][0]
        size = node.spec.shape[dim]
        kept = _covered([(s, s + n) for _, s, n in taken])
        if kept < size:
            per_row = node.spec.numel // size
            out += _attributed(node, node.spec, (size - kept) * per_row, "part not kept")
    # values a node itself cuts away (a shrinking resize), unless the script meant it
    for node in nodes.values():
        if not isinstance(node, Apply) or id(node) in exempt or len(node.inputs) != 1:
            continue
        src = node.inputs[0].spec
        if src is None or node.spec is None:
            continue
        cut = node.op.cut(src, node.spec, node.params)
        if cut is not None:
            out += _attributed(node.inputs[0], src, *cut)
    return out


def _attributed(node: Node, spec: TensorSpec, lost: int, detail: str) -> list[Discard]:
    """A loss inside the plan, named after the input key(s) it came from (none: nothing trained)."""
    keys = sorted(set(sources_of(node)))
    return [Discard(" + ".join(keys), spec, lost, detail)] if keys else []


def _covered(ranges: list[tuple[int, int]]) -> int:
    total, end = 0, 0
    for a, b in sorted(ranges):
        start = max(a, end)
        if b > start:
            total += b - start
            end = b
    return total
