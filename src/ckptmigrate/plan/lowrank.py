"""Low-rank deltas: what a LoRA adapter adds to a base weight, as plan nodes.

A LoRA adapter does not hold its base model's weights; for a base weight ``W``
it holds two factors and a scale, and its module adds ``scale * B @ A`` to
what ``W`` computes (``A`` is ``[r, in]``, ``B`` is ``[out, r]``). When a
migration rearranges ``W`` (splits, fuses, transposes, grows it), the same
rearrangement of the delta is again a low-rank delta over rearranged factors:
split ``B`` and copy ``A``, make ``B`` block-diagonal and stack the ``A``\\ s,
pad with zeros. :class:`LowRank` is such a delta with its factors as plan
nodes, so nothing is computed until the adapter's new file is written, and
each op's definition says how its nodes carry one over
(``Operation.low_rank``); an op with no exact counterpart raises
:class:`NoExactCounterpart`.

The delta is described in the *storage* layout of the base weight, the
layout the op sees: ``[*batch, out, in]``, or ``[*batch, in, out]`` for a
``transposed`` one (transformers' ``Conv1D``, which PEFT handles with
``fan_in_fan_out``, and ``nn.Embedding``, whose ``[num, dim]`` weight gets
``(B @ A)^T``). A leading batch dim is a stack of experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import torch

from .nodes import Apply, Node
from .spec import TensorSpec

#: How an adapter module's delta is applied: a linear map (nn.Linear, Conv1D, an
#: expert parameter), an embedding lookup, or a convolution.
LINEAR, EMBEDDING, CONV = "linear", "embedding", "conv"
#: A scale kept exact where it can be (alpha / r), a float where it cannot (rsLoRA).
Scale = Fraction | float


class NoExactCounterpart(Exception):
    """An op's node has no exact counterpart on low-rank factors.

    ``reason`` says why, for a message that adds the op, the revision and the
    adapter module.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- factor nodes


class _FactorOp:
    """A computation on adapter factors; not an op a revision script can call."""

    def __init__(self, name: str) -> None:
        self.name = name

    def node_label(self) -> str:
        return self.name

    def kernel(self, args: Sequence[torch.Tensor], /, *_: Any, **params: Any) -> torch.Tensor:
        raise NotImplementedError

    def follow_state(self, args: Sequence[torch.Tensor], /, *_: Any, **params: Any) -> torch.Tensor:
        return self.kernel(args, **params)

    def part_kept(self, params: Mapping[str, Any]) -> tuple[int, int, int] | None:
        return None

    def cut(
        self, source: TensorSpec, result: TensorSpec, params: Mapping[str, Any]
    ) -> tuple[int, str] | None:
        return None

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        /,
        **params: Any,
    ) -> LowRank | None:
        raise NoExactCounterpart(f"{self.name} is internal")


class _Place(_FactorOp):
    """Zeros of ``shape``, each input copied in at its offsets (pads, blocks, joins)."""

    def kernel(
        self,
        args: Sequence[torch.Tensor],
        *,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        offsets: tuple[tuple[int, ...], ...],
    ) -> torch.Tensor:
        out = torch.zeros(shape, dtype=dtype)
        for arg, at in zip(args, offsets):
            out[tuple(slice(o, o + n) for o, n in zip(at, arg.shape))] = arg
        return out


class _Narrow(_FactorOp):
    def kernel(
        self, args: Sequence[torch.Tensor], *, dim: int, start: int, length: int
    ) -> torch.Tensor:
        return args[0].narrow(dim, start, length).clone(memory_format=torch.contiguous_format)


class _Select(_FactorOp):
    def kernel(self, args: Sequence[torch.Tensor], *, dim: int, index: int) -> torch.Tensor:
        return args[0].select(dim, index).clone(memory_format=torch.contiguous_format)


class _Stack(_FactorOp):
    def kernel(self, args: Sequence[torch.Tensor], *, dim: int) -> torch.Tensor:
        return torch.stack(list(args), dim=dim)


class _Permute(_FactorOp):
    def kernel(self, args: Sequence[torch.Tensor], *, dims: tuple[int, ...]) -> torch.Tensor:
        return args[0].permute(dims).contiguous()


class _Reshape(_FactorOp):
    def kernel(self, args: Sequence[torch.Tensor], *, shape: tuple[int, ...]) -> torch.Tensor:
        return args[0].reshape(shape).contiguous()


class _Cast(_FactorOp):
    def kernel(self, args: Sequence[torch.Tensor], *, dtype: torch.dtype) -> torch.Tensor:
        return args[0].to(dtype)


class _Scale(_FactorOp):
    """Multiply by a factor: a part's scale folded into its ``B`` where parts are joined."""

    def kernel(self, args: Sequence[torch.Tensor], *, factor: float) -> torch.Tensor:
        x = args[0]
        return (x.double() * factor).to(x.dtype)


_PLACE, _NARROW, _SELECT, _STACK = (
    _Place("place"),
    _Narrow("narrow"),
    _Select("select"),
    _Stack("stack"),
)
_PERMUTE, _RESHAPE, _CAST, _SCALE = (
    _Permute("permute"),
    _Reshape("reshape"),
    _Cast("cast"),
    _Scale("scale"),
)


def _spec(node: Node) -> TensorSpec:
    assert node.spec is not None
    return node.spec


def place(
    parts: Sequence[tuple[Node, Sequence[int]]], shape: Sequence[int], dtype: torch.dtype
) -> Node:
    """A ``shape`` tensor of zeros with each node copied in at its offsets."""
    params = {
        "shape": tuple(shape),
        "dtype": dtype,
        "offsets": tuple(tuple(at) for _, at in parts),
    }
    return Apply(_PLACE, tuple(n for n, _ in parts), params, TensorSpec(tuple(shape), dtype))


def zeros(shape: Sequence[int], dtype: torch.dtype) -> Node:
    return place([], shape, dtype)


def narrow(node: Node, dim: int, start: int, length: int) -> Node:
    spec = _spec(node)
    if start == 0 and length == spec.shape[dim]:
        return node
    shape = list(spec.shape)
    shape[dim] = length
    params = {"dim": dim, "start": start, "length": length}
    return Apply(_NARROW, (node,), params, TensorSpec(tuple(shape), spec.dtype))


def select(node: Node, dim: int, index: int) -> Node:
    spec = _spec(node)
    shape = spec.shape[:dim] + spec.shape[dim + 1 :]
    return Apply(_SELECT, (node,), {"dim": dim, "index": index}, TensorSpec(shape, spec.dtype))


def stack(nodes: Sequence[Node], dim: int) -> Node:
    spec = _spec(nodes[0])
    shape = (*spec.shape[:dim], len(nodes), *spec.shape[dim:])
    return Apply(_STACK, tuple(nodes), {"dim": dim}, TensorSpec(shape, spec.dtype))


def permute(node: Node, dims: Sequence[int]) -> Node:
    spec = _spec(node)
    if list(dims) == list(range(len(dims))):
        return node
    shape = tuple(spec.shape[d] for d in dims)
    return Apply(_PERMUTE, (node,), {"dims": tuple(dims)}, TensorSpec(shape, spec.dtype))


def swap_last(node: Node) -> Node:
    """The node with its last two dims swapped (a matrix transposed, batch dims kept)."""
    n = len(_spec(node).shape)
    return permute(node, [*range(n - 2), n - 1, n - 2])


def reshape(node: Node, shape: Sequence[int]) -> Node:
    spec = _spec(node)
    if tuple(shape) == spec.shape:
        return node
    return Apply(_RESHAPE, (node,), {"shape": tuple(shape)}, TensorSpec(tuple(shape), spec.dtype))


def cast(node: Node, dtype: torch.dtype) -> Node:
    spec = _spec(node)
    if spec.dtype == dtype:
        return node
    return Apply(_CAST, (node,), {"dtype": dtype}, TensorSpec(spec.shape, dtype))


def scaled(node: Node, factor: float) -> Node:
    if factor == 1:
        return node
    return Apply(_SCALE, (node,), {"factor": factor}, _spec(node))


def pad(node: Node, dim: int, size: int) -> Node:
    """``node`` grown to ``size`` along ``dim``, the new part zeros."""
    spec = _spec(node)
    if spec.shape[dim] == size:
        return node
    shape = list(spec.shape)
    shape[dim] = size
    return place([(node, [0] * len(shape))], shape, spec.dtype)


def join(nodes: Sequence[Node | None], sizes: Sequence[int], dim: int, like: Node) -> Node:
    """Nodes side by side along ``dim``; a None part is ``sizes[i]`` zeros (else like ``like``)."""
    spec = _spec(like)
    shape = list(spec.shape)
    shape[dim] = sum(sizes)
    parts: list[tuple[Node, list[int]]] = []
    at = 0
    for node, size in zip(nodes, sizes):
        if node is not None:
            offset = [0] * len(shape)
            offset[dim] = at
            parts.append((node, offset))
        at += size
    present = [n for n in nodes if n is not None]
    if len(present) == len(nodes) == 1:
        return present[0]
    whole = _reassembled(present, dim, shape[dim]) if len(present) == len(nodes) else None
    return whole if whole is not None else place(parts, shape, spec.dtype)


def _reassembled(nodes: Sequence[Node], dim: int, size: int) -> Node | None:
    """The node that ``nodes`` are consecutive slices of along ``dim``, when they are all of it."""
    if not all(isinstance(n, Apply) and n.op is _NARROW and n.params["dim"] == dim for n in nodes):
        return None
    whole = nodes[0].inputs[0]
    at = 0
    for n in nodes:
        assert isinstance(n, Apply)
        if n.inputs[0] is not whole or n.params["start"] != at:
            return None
        at += n.params["length"]
    return whole if whole.spec is not None and whole.spec.shape[dim] == at == size else None


# --------------------------------------------------------------------------- the delta


def scale_of(alpha: float, rank: int, *, rslora: bool) -> Scale:
    """PEFT's scale for a module: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if rslora:
        return alpha / math.sqrt(rank)
    return Fraction(alpha) / rank


@dataclass(frozen=True)
class LowRank:
    """``scale * b @ a`` over the last two dims, in the base weight's storage layout.

    ``a`` is ``[*batch, r, in]`` and ``b`` ``[*batch, out, r]``; the base
    weight is ``[*batch, out, in]``, or ``[*batch, in, out]`` when
    ``transposed``. For a convolution (``kind == CONV``), ``a`` and ``b`` are
    the two conv weights and only casts follow. ``magnitude`` is DoRA's
    per-output-feature vector ``[*batch, out]``, ``bias`` the adapter's own
    output bias (``lora_bias=True``), ``[*batch, out]`` too. ``origin`` names
    the adapter modules it came from, for messages.
    """

    a: Node
    b: Node
    scale: Scale
    transposed: bool = False
    kind: str = LINEAR
    magnitude: Node | None = None
    bias: Node | None = None
    origin: tuple[str, ...] = ()

    # ------------------------------------------------------------------ shape

    @property
    def rank(self) -> int:
        return _spec(self.a).shape[0 if self.kind == CONV else -2]

    @property
    def batch(self) -> int:
        """How many leading batch (expert) dims the delta has."""
        return 0 if self.kind == CONV else len(_spec(self.a).shape) - 2

    @property
    def shape(self) -> tuple[int, ...]:
        """The base weight's shape this delta fits."""
        a, b = _spec(self.a).shape, _spec(self.b).shape
        if self.kind == CONV:
            return (b[0], a[1], *a[2:])
        out, inp = b[-2], a[-1]
        return (*a[:-2], inp, out) if self.transposed else (*a[:-2], out, inp)

    @property
    def dtype(self) -> torch.dtype:
        return _spec(self.a).dtype

    def side(self, dim: int) -> str:
        """Which factor a dim of the base weight belongs to: ``"batch"``, ``"out"`` or ``"in"``."""
        self._linear("this op")
        d = dim - self.batch
        if d < 0:
            return "batch"
        return ("in", "out")[d] if self.transposed else ("out", "in")[d]

    # the dims of a, b and the per-output vectors that the sides are
    def _rows(self) -> int:  # of b: the output features
        return self.batch

    def _cols(self) -> int:  # of a: the input features
        return self.batch + 1

    def _mapped(
        self,
        a: Callable[[Node], Node] | None = None,
        b: Callable[[Node], Node] | None = None,
        vectors: Callable[[Node], Node] | None = None,
        **changes: Any,
    ) -> LowRank:
        """This delta with ``a``, ``b`` and the per-output vectors transformed (None: kept)."""
        return replace(
            self,
            a=a(self.a) if a else self.a,
            b=b(self.b) if b else self.b,
            magnitude=_opt(self.magnitude, vectors) if vectors else self.magnitude,
            bias=_opt(self.bias, vectors) if vectors else self.bias,
            **changes,
        )

    def _linear(self, what: str) -> None:
        if self.kind == CONV:
            raise NoExactCounterpart(
                f"a convolution's adapter follows renames, drops and casts only, not {what}"
            )

    def _no_dora(self, what: str) -> None:
        if self.magnitude is not None:
            raise NoExactCounterpart(
                f"DoRA's magnitude is the norm of each output row, which {what} changes"
            )

    # ------------------------------------------------------------------ one delta

    def narrow(self, dim: int, start: int, length: int) -> LowRank:
        """The delta of a slice of the base weight (a part of a split)."""
        side = self.side(dim)
        if side == "batch":

            def cut(n: Node) -> Node:
                return narrow(n, dim, start, length)

            return self._mapped(cut, cut, cut)
        if side == "out":
            return self._mapped(
                b=lambda n: narrow(n, self._rows(), start, length),
                vectors=lambda n: narrow(n, self._rows(), start, length),
            )
        self._no_dora("a cut along its input dim")
        return self._mapped(a=lambda n: narrow(n, self._cols(), start, length))

    def select(self, dim: int, index: int) -> LowRank:
        """The delta of one entry along a batch dim (one expert of an unstack)."""
        if self.side(dim) != "batch":
            raise NoExactCounterpart(
                "unstacking along a dim of the weight matrix itself splits the factors' product"
            )

        def one(n: Node) -> Node:
            return select(n, dim, index)

        return self._mapped(one, one, one)

    def grow(self, dim: int, size: int) -> LowRank:
        """The delta of the base weight grown along ``dim``: the new part gets no delta (zeros)."""
        side = self.side(dim)
        if side == "batch":

            def grown(n: Node) -> Node:
                return pad(n, dim, size)

            return self._mapped(grown, grown, grown)
        self._no_dora("growing the weight (its new rows or columns change the norms)")
        if side == "out":
            return self._mapped(
                b=lambda n: pad(n, self._rows(), size), vectors=lambda n: pad(n, self._rows(), size)
            )
        return self._mapped(a=lambda n: pad(n, self._cols(), size))

    def transpose(self, dim0: int, dim1: int) -> LowRank:
        """The delta of the base weight with two dims swapped."""
        sides = {self.side(dim0), self.side(dim1)}
        if sides == {"batch"}:
            dims = list(range(self.batch + 2))
            dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
            return self._mapped(
                lambda n: permute(n, dims),
                lambda n: permute(n, dims),
                lambda n: permute(n, dims[:-1]),
            )
        if sides != {"out", "in"}:
            raise NoExactCounterpart(
                "swapping an expert dim with a dim of the weight matrix mixes the factors"
            )
        if self.kind == EMBEDDING:
            raise NoExactCounterpart(
                "an embedding's adapter (lora_embedding_A/B) stays an embedding's; a transposed "
                "embedding weight is no embedding"
            )
        # lora_A and lora_B are [r, in] and [out, r] whichever way the weight is stored:
        # a weight that moves between Linear [out, in] and Conv1D [in, out] storage keeps
        # its factors, and the adapter's fan_in_fan_out flips
        return replace(self, transposed=not self.transposed)

    def permute(self, dims: Sequence[int]) -> LowRank:
        """The delta of the base weight with its dims reordered."""
        n = self.batch
        head, tail = list(dims[:n]), list(dims[n:])
        if sorted(head) != list(range(n)) or sorted(tail) != [n, n + 1]:
            raise NoExactCounterpart(
                "moving a dim of the weight matrix among the expert dims mixes the factors"
            )
        out = self
        if head != list(range(n)):
            order = [*head, n, n + 1]
            out = out._mapped(
                lambda x: permute(x, order),
                lambda x: permute(x, order),
                lambda x: permute(x, [*head, n]),
            )
        if tail == [n + 1, n]:
            out = out.transpose(n, n + 1)
        return out

    def cast(self, dtype: torch.dtype) -> LowRank:
        if not dtype.is_floating_point:
            raise NoExactCounterpart(
                f"casting the base weight to {dtype} leaves no floating factors to add"
            )

        def to(n: Node) -> Node:
            return cast(n, dtype)

        return self._mapped(to, to, to)

    def rescaled(self, scale: Scale) -> LowRank:
        """The same delta with ``scale``: the ratio is folded into ``b`` (and the bias)."""
        if scale == self.scale:
            return self
        factor = float(Fraction(self.scale) / Fraction(scale))
        return replace(
            self,
            b=scaled(self.b, factor),
            bias=_opt(self.bias, lambda m: scaled(m, factor)),
            scale=scale,
        )

    def flipped(self) -> LowRank:
        """The same delta stored the other way: ``b' = a^T``, ``a' = b^T``, ``transposed`` flipped.

        Exact for the weight's values; the module it belongs to then has its
        input and output features swapped.
        """
        self._linear("a transpose")
        if self.kind == EMBEDDING:
            raise NoExactCounterpart("an embedding's factors cannot change places")
        if self.magnitude is not None or self.bias is not None:
            raise NoExactCounterpart(
                "DoRA's magnitude and the adapter's bias belong to the output features, "
                "which would become the input features"
            )
        return replace(
            self, a=swap_last(self.b), b=swap_last(self.a), transposed=not self.transposed
        )

    def padded_rank(self, rank: int) -> LowRank:
        """The same delta at a higher rank (zero rows in ``a``, zero columns in ``b``)."""
        if rank == self.rank:
            return self
        return self._mapped(
            a=lambda n: pad(n, self.batch, rank), b=lambda n: pad(n, self.batch + 1, rank)
        )

    def zero_like(self, weight: TensorSpec) -> LowRank:
        """A delta of zeros at this rank for another base weight of shape ``weight``."""
        batch, (d0, d1) = weight.shape[: self.batch], weight.shape[self.batch :]
        out, inp = (d1, d0) if self.transposed else (d0, d1)
        dtype = self.dtype
        return replace(
            self,
            a=zeros((*batch, self.rank, inp), dtype),
            b=zeros((*batch, out, self.rank), dtype),
            magnitude=None,
            bias=zeros((*batch, out), dtype) if self.bias is not None else None,
            origin=(),
        )

    # ------------------------------------------------------------------ several deltas

    @staticmethod
    def _aligned(parts: Sequence[LowRank | None]) -> tuple[list[LowRank | None], LowRank]:
        """The parts stored like the first one present, and that one."""
        first = next(p for p in parts if p is not None)
        kinds = sorted({p.kind for p in parts if p is not None})
        if len(kinds) > 1:
            raise NoExactCounterpart(
                f"it joins the adapters of different kinds of modules ({', '.join(kinds)})"
            )
        first._linear("a join")
        aligned = [
            p if p is None or p.transposed == first.transposed else p.flipped() for p in parts
        ]
        if len({p.batch for p in aligned if p is not None}) > 1:
            raise NoExactCounterpart("it joins adapters with different numbers of expert dims")
        return aligned, first

    @staticmethod
    def concat(parts: Sequence[LowRank | None], inputs: Sequence[TensorSpec], dim: int) -> LowRank:
        """The delta of base weights joined along ``dim``; a None part has no delta (zeros)."""
        aligned, first = LowRank._aligned(parts)
        side = first.side(dim)
        if side == "batch":
            return LowRank._experts(aligned, inputs, dim, new_dim=False)
        sizes = [spec.shape[dim] for spec in inputs]
        present = [p for p in aligned if p is not None]
        if len(present) == len(parts):
            shared = LowRank._shared(present, sizes, side)
            if shared is not None:
                return shared
        return LowRank._block(aligned, first, sizes, side)

    @staticmethod
    def _shared(present: list[LowRank], sizes: Sequence[int], side: str) -> LowRank | None:
        """Parts cut from one delta put back together: the other factor and the rank stay."""
        first = present[0]
        keep = "a" if side == "out" else "b"
        if any(getattr(p, keep) is not getattr(first, keep) for p in present):
            return None
        if any(p.scale != first.scale for p in present):
            return None
        origin = _origins(present)
        if side == "out":
            rows = first._rows()
            return replace(
                first,
                b=join([p.b for p in present], sizes, rows, first.b),
                magnitude=_join_vectors([p.magnitude for p in present], sizes, first),
                bias=_join_vectors([p.bias for p in present], sizes, first),
                origin=origin,
            )
        if any(p.bias is not first.bias for p in present):
            return None
        return replace(
            first, a=join([p.a for p in present], sizes, first._cols(), first.a), origin=origin
        )

    @staticmethod
    def _block(
        aligned: list[LowRank | None], first: LowRank, sizes: Sequence[int], side: str
    ) -> LowRank:
        """Independent deltas joined: the summed rank, one factor block-diagonal."""
        parts = [p.rescaled(first.scale) if p is not None else None for p in aligned]
        present = [p for p in parts if p is not None]
        a0, b0 = _spec(first.a), _spec(first.b)
        batch = list(a0.shape[:-2])
        lead = [0] * len(batch)
        blocks: list[tuple[Node, list[int]]] = []
        beside: list[tuple[Node, list[int]]] = []
        at = rank = 0  # offsets along the joined dim and along the rank
        for part, size in zip(parts, sizes):
            if part is not None:
                if side == "out":  # b block-diagonal [out, R], the a's stacked [R, in]
                    blocks.append((part.b, [*lead, at, rank]))
                    beside.append((part.a, [*lead, rank, 0]))
                else:  # a block-diagonal [R, in], the b's side by side [out, R]
                    blocks.append((part.a, [*lead, rank, at]))
                    beside.append((part.b, [*lead, 0, rank]))
                rank += part.rank
            at += size
        dtype = first.dtype
        if side == "out":
            return replace(
                first,
                b=place(blocks, [*batch, at, rank], dtype),
                a=place(beside, [*batch, rank, a0.shape[-1]], dtype),
                magnitude=_join_vectors(
                    [p.magnitude if p is not None else None for p in parts], sizes, first
                ),
                bias=_join_vectors(
                    [p.bias if p is not None else None for p in parts], sizes, first
                ),
                origin=_origins(present),
            )
        for p in present:
            p._no_dora("joining along the input dim")
        if any(p.bias is not None for p in present):
            raise NoExactCounterpart("the adapters' own biases would add up in one output")
        return replace(
            first,
            a=place(blocks, [*batch, rank, at], dtype),
            b=place(beside, [*batch, b0.shape[-2], rank], dtype),
            origin=_origins(present),
        )

    @staticmethod
    def stack(parts: Sequence[LowRank | None], inputs: Sequence[TensorSpec], dim: int) -> LowRank:
        """The delta of base weights stacked along a new dim ``dim`` (experts)."""
        aligned, first = LowRank._aligned(parts)
        if dim > first.batch:
            raise NoExactCounterpart(
                "stacking along a dim inside the weight matrix is not a stack of factor pairs"
            )
        return LowRank._experts(aligned, inputs, dim, new_dim=True)

    @staticmethod
    def _experts(
        aligned: list[LowRank | None], inputs: Sequence[TensorSpec], dim: int, *, new_dim: bool
    ) -> LowRank:
        """Deltas joined along an expert dim (a new one: stacked): one rank, one scale.

        A lower rank is padded with zeros, a weight without a delta gets zero
        factors; DoRA's magnitudes only join where every part has one.
        """
        first = next(p for p in aligned if p is not None)
        rank = max(p.rank for p in aligned if p is not None)
        like = first.padded_rank(rank)
        parts = [
            p.rescaled(first.scale).padded_rank(rank) if p is not None else like.zero_like(spec)
            for p, spec in zip(aligned, inputs)
        ]
        mags = [p.magnitude for p in parts]
        if any(m is not None for m in mags) and any(m is None for m in mags):
            raise NoExactCounterpart(
                "DoRA's magnitude of a weight without the adapter is the norm of base values "
                "the adapter does not hold"
            )

        def joined(nodes: list[Node]) -> Node:
            if new_dim:
                return stack(nodes, dim)
            return join(nodes, [s.shape[dim] for s in inputs], dim, nodes[0])

        def vector(nodes: list[Node | None]) -> Node | None:
            present = [n for n in nodes if n is not None]
            return joined(present) if len(present) == len(nodes) else None

        return replace(
            like,
            a=joined([p.a for p in parts]),
            b=joined([p.b for p in parts]),
            magnitude=vector(mags),
            bias=vector([p.bias for p in parts]),
            origin=_origins([p for p in aligned if p is not None]),
        )


def _opt(node: Node | None, fn: Any) -> Node | None:
    return fn(node) if node is not None else None


def _origins(parts: Sequence[LowRank]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(o for p in parts for o in p.origin))


def _join_vectors(
    nodes: Sequence[Node | None], sizes: Sequence[int], first: LowRank
) -> Node | None:
    """Per-output vectors (DoRA magnitudes, biases) side by side; a missing bias is zeros."""
    if all(n is None for n in nodes):
        return None
    if first.magnitude is not None and any(n is None for n in nodes):
        raise NoExactCounterpart(
            "DoRA's magnitude of the rows without the adapter is the norm of base values "
            "the adapter does not hold"
        )
    like = next(n for n in nodes if n is not None)
    return join(list(nodes), sizes, first.batch, like)
