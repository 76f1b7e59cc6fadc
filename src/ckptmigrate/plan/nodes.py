"""What an output tensor is made of: a small expression graph per key.

Migration scripts never touch tensor data. Each ``op`` call rewrites the
mapping *key -> node*, where a node says how the tensor would be computed
(a source tensor of the input file, a freshly initialised tensor, or a
transform of other nodes) and what its shape and dtype will be. The same
graph then either stays symbolic (dry runs, schemas, identification) or is
evaluated one output key at a time while the output file is written, so a
rename costs nothing and memory is bounded by the tensors actually changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .init import make_tensor
from .spec import TensorSpec, dtype_name

if TYPE_CHECKING:
    from .lowrank import LowRank

# TensorSpec and dtype_name live in .spec (below the initialisers); most code reads them
# together with the nodes, so they are part of this module's interface too.
__all__ = [
    "Apply",
    "Constant",
    "Init",
    "Node",
    "NodeOp",
    "ResetOptimizerState",
    "Source",
    "TensorSpec",
    "dtype_name",
    "seed_for",
    "sources_of",
    "walk",
]


def seed_for(*parts: str) -> int:
    """A 63-bit seed from text: same revision and key, same numbers."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Node:
    """How one tensor is produced. Immutable once built.

    Subclasses provide ``spec`` (None for a non-tensor entry) and ``inputs``.
    """

    spec: TensorSpec | None
    inputs: tuple[Node, ...]

    def compute(self, args: Sequence[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(eq=False)
class Source(Node):
    """A tensor of the input checkpoint, read only when needed."""

    key: str
    spec: TensorSpec | None
    inputs: tuple[Node, ...] = ()

    def compute(self, args: Sequence[Any]) -> Any:  # pragma: no cover - evaluator reads sources
        raise RuntimeError("sources are read by the evaluator")

    def describe(self) -> str:
        return f"source {self.key!r}"


@dataclass(eq=False)
class Constant(Node):
    """A value fixed when the plan was made (e.g. a module built by a script)."""

    value: Any
    spec: TensorSpec | None = None
    inputs: tuple[Node, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.value, torch.Tensor):
            self.spec = TensorSpec.of(self.value)

    def compute(self, args: Sequence[Any]) -> Any:
        return self.value

    def describe(self) -> str:
        return "constant"


@dataclass(eq=False)
class Init(Node):
    """A new tensor, filled deterministically from ``seed``."""

    spec: TensorSpec | None
    init: str | Callable[..., Any]
    init_args: dict[str, Any]
    seed: int
    inputs: tuple[Node, ...] = ()

    def compute(self, args: Sequence[Any]) -> torch.Tensor:
        assert self.spec is not None
        return make_tensor(self.spec, self.init, self.init_args, self.seed)

    def describe(self) -> str:
        name = self.init if isinstance(self.init, str) else getattr(self.init, "__name__", "fn")
        return f"init={name}"


class NodeOp(Protocol):
    """What the plan asks of the op that made an :class:`Apply` node.

    An ``operations.registry.Operation`` is one; the plan names only this, so
    it stays below the operations that build it.
    """

    @property
    def name(self) -> str: ...

    def node_label(self) -> str: ...

    def kernel(self, args: Sequence[torch.Tensor], /, *_: Any, **params: Any) -> torch.Tensor:
        """The node's value from its inputs' values."""
        ...

    def follow_state(self, args: Sequence[torch.Tensor], /, *_: Any, **params: Any) -> torch.Tensor:
        """How optimizer state shaped like the node's parameter follows it."""
        ...

    def part_kept(self, params: Mapping[str, Any]) -> tuple[int, int, int] | None:
        """(dim, start, length): the slice of its single input the node keeps, if only part."""
        ...

    def cut(
        self, source: TensorSpec, result: TensorSpec, params: Mapping[str, Any]
    ) -> tuple[int, str] | None:
        """(values lost, how) when the node itself throws part of its input away."""
        ...

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        /,
        *_: Any,
        **params: Any,
    ) -> LowRank | None:
        """The node's exact counterpart on a LoRA adapter's factors (see ``plan.lowrank``)."""
        ...


@dataclass(eq=False)
class Apply(Node):
    """A transform of other nodes: the op that made it, and the parameters it fixed.

    The op's definition computes it (``op.kernel``), and says how optimizer
    state follows it and what of its input it keeps.
    """

    op: NodeOp
    inputs: tuple[Node, ...]
    params: dict[str, Any]
    spec: TensorSpec | None

    def compute(self, args: Sequence[Any]) -> torch.Tensor:
        return self.op.kernel(args, **self.params)

    def describe(self) -> str:
        shown = {k: v for k, v in self.params.items() if k not in ("fn", "init_args", "seed")}
        inner = ", ".join(f"{k}={_short(v)}" for k, v in shown.items())
        return f"{self.op.node_label()}({inner})"


def _short(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if callable(value):
        return getattr(value, "__name__", "fn")
    return repr(value)


@dataclass(eq=False)
class ResetOptimizerState(Node):
    """What ``op.reset_optimizer_state`` leaves: the tensor itself, its optimizer state dropped.

    It sits in the plan (not beside it) so that it follows its tensor through
    later renames, splits and concatenations like any other transform; only
    the optimizer-state pass reads it.
    """

    inputs: tuple[Node, ...]
    spec: TensorSpec | None

    def compute(self, args: Sequence[Any]) -> Any:
        return args[0]

    def describe(self) -> str:
        return "reset_optimizer_state"


def walk(node: Node) -> list[Node]:
    """``node`` and everything it depends on, each once, inputs first."""
    out: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        cur, expanded = stack.pop()
        if expanded:
            out.append(cur)
            continue
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        stack.append((cur, True))
        stack.extend((inp, False) for inp in cur.inputs)
    return out


def sources_of(node: Node) -> list[str]:
    return [n.key for n in walk(node) if isinstance(n, Source)]
