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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype: everything a schema knows about a tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_itemsize(self.dtype)

    def __str__(self) -> str:
        return f"[{', '.join(map(str, self.shape))}] {dtype_name(self.dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


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
        from .init import make_tensor

        assert self.spec is not None
        return make_tensor(self.spec, self.init, self.init_args, self.seed)

    def describe(self) -> str:
        name = self.init if isinstance(self.init, str) else getattr(self.init, "__name__", "fn")
        return f"init={name}"


@dataclass(eq=False)
class Apply(Node):
    """A transform of other nodes; ``kind`` and ``params`` say which."""

    kind: str
    inputs: tuple[Node, ...]
    params: dict[str, Any]
    spec: TensorSpec | None

    def compute(self, args: Sequence[Any]) -> torch.Tensor:
        return KERNELS[self.kind](args, **self.params)

    def describe(self) -> str:
        shown = {k: v for k, v in self.params.items() if k not in ("fn", "init_args", "seed")}
        inner = ", ".join(f"{k}={_short(v)}" for k, v in shown.items())
        return f"{self.kind}({inner})"


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


# --------------------------------------------------------------------- kernels
# Each kernel returns a new tensor or a view; none writes into its inputs.


def _reshape(args: Sequence[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return args[0].reshape(shape)


def _transpose(args: Sequence[torch.Tensor], dim0: int, dim1: int) -> torch.Tensor:
    return args[0].transpose(dim0, dim1).contiguous()


def _permute(args: Sequence[torch.Tensor], dims: tuple[int, ...]) -> torch.Tensor:
    return args[0].permute(dims).contiguous()


def _cast(args: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return args[0].to(dtype)


def _resize(
    args: Sequence[torch.Tensor],
    shape: tuple[int, ...],
    init: str | Callable[..., Any],
    init_args: dict[str, Any],
    seed: int,
) -> torch.Tensor:
    from .init import make_tensor

    src = args[0]
    if any(n > o for n, o in zip(shape, src.shape)):
        out = make_tensor(TensorSpec(shape, src.dtype), init, init_args, seed).to(src.device)
    else:
        out = torch.empty(shape, dtype=src.dtype, device=src.device)
    common = tuple(slice(0, min(n, o)) for n, o in zip(shape, src.shape))
    out[common] = src[common]
    return out


def _narrow(args: Sequence[torch.Tensor], dim: int, start: int, length: int) -> torch.Tensor:
    # A copy, not a view: torch.save writes a view's whole storage, so a part
    # kept after its siblings were dropped would carry the full fused tensor.
    return args[0].narrow(dim, start, length).clone(memory_format=torch.contiguous_format)


def _concat(args: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(list(args), dim=dim)


def _map(
    args: Sequence[torch.Tensor],
    fn: Callable[[torch.Tensor], torch.Tensor],
    seed: int | None = None,
) -> torch.Tensor:
    # The function gets its own copy: an in-place function must not be able
    # to change the caller's tensor (or a memory-mapped input). Random numbers
    # it draws come from a private generator, so the result is reproducible
    # and the caller's RNG is left alone.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        out = fn(args[0].clone())
    strided = isinstance(out, torch.Tensor) and out.layout == torch.strided
    if strided and out.untyped_storage().nbytes() > out.nbytes:
        out = out.clone(memory_format=torch.contiguous_format)  # a slice: drop the rest
    return out


KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "reshape": _reshape,
    "transpose": _transpose,
    "permute": _permute,
    "cast": _cast,
    "resize": _resize,
    "narrow": _narrow,
    "concat": _concat,
    "map": _map,
}


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
