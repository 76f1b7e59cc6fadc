"""Fuse and unfuse: one tensor cut into several keys along a dim, and several joined."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...plan.lowrank import LowRank
from ...plan.nodes import Apply, Node, TensorSpec
from ..checks import OpContext
from ..registry import OpCall, Operation, Part, SpecOf, register


@register
class Split(Operation):
    """Cut one tensor into several keys along ``dim`` (equal parts unless ``sizes``)."""

    name = "split"
    label = "narrow"

    def record(
        self,
        ctx: OpContext,
        key: str,
        into: Sequence[str],
        *,
        dim: int = 0,
        sizes: Sequence[int] | None = None,
    ) -> None:
        into = list(into) if not isinstance(into, str) else [into]
        call = ctx.call(self, key, into, dim=dim, sizes=list(sizes) if sizes is not None else None)
        node = ctx.need(call, key)
        spec = ctx.spec(call, key)
        if not spec.shape:
            raise ctx.fail(call, f"{key!r} is a 0-D tensor and cannot be split")
        ctx.distinct(call, into, "into=")
        for k in into:
            ctx.free(call, k, allowed=[key])
        d = ctx.dim(call, dim, len(spec.shape))
        parts = self._sizes(ctx, call, key, spec.shape[d], d, len(into), sizes)
        items: list[tuple[str, Node]] = []
        start = 0
        for k, size in zip(into, parts):
            shape = list(spec.shape)
            shape[d] = size
            params = {"dim": d, "start": start, "length": size}
            items.append((k, Apply(self, (node,), params, TensorSpec(tuple(shape), spec.dtype))))
            start += size
        ctx.splice(key, items, remove=())
        ctx.done(self, call, into, [key] if key not in into else [])

    @staticmethod
    def _sizes(
        ctx: OpContext,
        call: str,
        key: str,
        total: int,
        d: int,
        n: int,
        sizes: Sequence[int] | None,
    ) -> list[int]:
        if sizes is None:
            if total % n:
                raise ctx.fail(
                    call,
                    f"dim {d} of {key!r} has size {total}, which does not split into "
                    f"{n} equal parts; pass sizes=[...]",
                )
            return [total // n] * n
        try:
            parts = [operator.index(s) for s in sizes]
        except TypeError:
            raise ctx.fail(call, f"sizes must be a list of ints, not {sizes!r}") from None
        if len(parts) != n or sum(parts) != total or any(p < 0 for p in parts):
            raise ctx.fail(
                call,
                f"sizes {parts} must have one entry per key in into= and add up to "
                f"{total} (dim {d} of {key!r})",
            )
        return parts

    def kernel(
        self, args: Sequence[torch.Tensor], *, dim: int, start: int, length: int
    ) -> torch.Tensor:
        # A copy, not a view: torch.save writes a view's whole storage, so a part
        # kept after its siblings were dropped would carry the full fused tensor.
        return args[0].narrow(dim, start, length).clone(memory_format=torch.contiguous_format)

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        *,
        dim: int,
        start: int,
        length: int,
    ) -> LowRank | None:
        """Along the output dim ``B`` is cut and ``A`` copied; along the input dim the reverse."""
        part = parts[0]
        return part.narrow(dim, start, length) if part is not None else None

    def part_kept(self, params: Mapping[str, Any]) -> Part:
        return params["dim"], params["start"], params["length"]

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall]:
        a = self.arguments(call)
        into = [a["into"]] if isinstance(a["into"], str) else list(a["into"])
        join: dict[str, object] = {"into": a["key"]}
        if a["dim"]:
            join["dim"] = a["dim"]
        return [OpCall("concat", (into,), join)]


@register
class Concat(Operation):
    """Join several tensors into one key along ``dim``."""

    name = "concat"

    def record(self, ctx: OpContext, keys: Sequence[str], into: str, *, dim: int = 0) -> None:
        keys = list(keys) if not isinstance(keys, str) else [keys]
        call = ctx.call(self, keys, into=into, dim=dim)
        nodes = ctx.joined(call, keys, into, verb="concatenate")
        first = ctx.spec(call, keys[0])
        if not first.shape:
            raise ctx.fail(call, f"{keys[0]!r} is a 0-D tensor; reshape it to 1-D first")
        d = ctx.dim(call, dim, len(first.shape))
        size = 0
        for k in keys:
            s = ctx.spec(call, k)
            if s.dtype != first.dtype:
                raise ctx.fail(
                    call, f"{k!r} is {s.dtype} but {keys[0]!r} is {first.dtype}; cast first"
                )
            if len(s.shape) != len(first.shape) or any(
                a != b for i, (a, b) in enumerate(zip(s.shape, first.shape)) if i != d
            ):
                raise ctx.fail(
                    call,
                    f"{k!r} has shape {list(s.shape)}, which does not fit {keys[0]!r} "
                    f"{list(first.shape)} along dim {d}",
                )
            size += s.shape[d]
        shape = list(first.shape)
        shape[d] = size
        fused = Apply(self, tuple(nodes), {"dim": d}, TensorSpec(tuple(shape), first.dtype))
        ctx.splice(keys[0], [(into, fused)], remove=keys[1:])
        ctx.done(self, call, [into], [k for k in keys if k != into])

    def kernel(self, args: Sequence[torch.Tensor], *, dim: int) -> torch.Tensor:
        return torch.cat(list(args), dim=dim)

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        *,
        dim: int,
    ) -> LowRank | None:
        """Along the output dim: ``B`` block-diagonal, the ``A``\\ s stacked, at the summed rank.

        Parts at different scales have the ratio folded into their ``B``;
        parts cut from one delta (a split undone) join back at its rank.
        """
        return LowRank.concat(parts, inputs, dim)

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall] | None:
        a = self.arguments(call)
        keys = [a["keys"]] if isinstance(a["keys"], str) else list(a["keys"])
        specs = [before(k) for k in keys]
        if any(s is None for s in specs):
            return None
        d = int(a["dim"])
        sizes = [s.shape[d] for s in specs if s is not None]
        cut: dict[str, object] = {"into": keys}
        if d:
            cut["dim"] = d
        if len(set(sizes)) > 1:
            cut["sizes"] = sizes
        return [OpCall("split", (a["into"],), cut)]
