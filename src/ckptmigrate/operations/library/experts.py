"""Stack and unstack: a list of same-shaped tensors <-> one tensor with a new leading dim.

Mixture-of-experts models keep their experts either as a ``ModuleList``
(``experts.{i}.w1.weight``, one ``[out, in]`` tensor each) or as one
parameter ``experts.w1`` of shape ``[E, out, in]``; moving between the two is
what transformers' MergeModulelist / SplitModulelist do on load. Unlike
``concat``/``split``, the expert count is a dimension of its own.

Optimizer state follows by the default rule: Adam's moments of the experts
are stacked (or unstacked) like their weights, and a scalar such as ``step``
is kept (the largest where the parts differ, as for a concatenation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...plan.lowrank import LowRank
from ...plan.nodes import Apply, Node, TensorSpec
from ..checks import OpContext
from ..registry import OpCall, Operation, Part, SpecOf, register


def _key_list(keys: Sequence[str] | str) -> list[str]:
    return [keys] if isinstance(keys, str) else list(keys)


@register
class Stack(Operation):
    """Join same-shaped tensors into one key along a new dim ``dim`` (MoE experts -> [E, ...]).

    ``op.stack([f"experts.{i}.w1.weight" for i in range(8)], into="experts.w1")``
    turns eight ``[out, in]`` expert weights into one ``[8, out, in]`` tensor,
    placed where the first of them was.
    """

    name = "stack"

    def record(self, ctx: OpContext, keys: Sequence[str], into: str, *, dim: int = 0) -> None:
        keys = _key_list(keys)
        call = ctx.call(self, keys, into=into, dim=dim)
        nodes = ctx.joined(call, keys, into, verb="stack")
        first = ctx.spec(call, keys[0])
        for k in keys[1:]:
            s = ctx.spec(call, k)
            if s.dtype != first.dtype:
                raise ctx.fail(
                    call, f"{k!r} is {s.dtype} but {keys[0]!r} is {first.dtype}; cast first"
                )
            if s.shape != first.shape:
                raise ctx.fail(
                    call,
                    f"{k!r} has shape {list(s.shape)} but {keys[0]!r} has "
                    f"{list(first.shape)}; stack needs tensors of one shape",
                )
        n = len(first.shape)
        if not isinstance(dim, int) or not -(n + 1) <= dim <= n:
            raise ctx.fail(
                call,
                f"dim {dim!r} is out of range for stacking {n}-D tensors "
                f"(it can be {-(n + 1)} to {n})",
            )
        d = dim % (n + 1)
        shape = (*first.shape[:d], len(keys), *first.shape[d:])
        stacked = Apply(self, tuple(nodes), {"dim": d}, TensorSpec(shape, first.dtype))
        ctx.splice(keys[0], [(into, stacked)], remove=keys[1:])
        ctx.done(self, call, [into], [k for k in keys if k != into])

    def kernel(self, args: Sequence[torch.Tensor], *, dim: int) -> torch.Tensor:
        return torch.stack(list(args), dim=dim)

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        *,
        dim: int,
    ) -> LowRank | None:
        """The experts' factor pairs stacked (one rank for all, zero-padded; one scale)."""
        return LowRank.stack(parts, inputs, dim)

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall]:
        a = self.arguments(call)
        cut: dict[str, object] = {"into": _key_list(a["keys"])}
        if a["dim"]:
            cut["dim"] = a["dim"]
        return [OpCall("unstack", (a["into"],), cut)]


@register
class Unstack(Operation):
    """Cut a tensor into one key per entry along ``dim``, which goes ([E, ...] -> MoE experts).

    ``op.unstack("experts.w1", into=[f"experts.{i}.w1.weight" for i in range(8)])``
    is the inverse of the ``stack`` example; ``into`` names one key per entry.
    """

    name = "unstack"

    def record(self, ctx: OpContext, key: str, into: Sequence[str], *, dim: int = 0) -> None:
        into = _key_list(into)
        call = ctx.call(self, key, into=into, dim=dim)
        node = ctx.need(call, key)
        spec = ctx.spec(call, key)
        if not spec.shape:
            raise ctx.fail(call, f"{key!r} is a 0-D tensor and cannot be unstacked")
        ctx.distinct(call, into, "into=")
        d = ctx.dim(call, dim, len(spec.shape))
        if spec.shape[d] != len(into):
            raise ctx.fail(
                call,
                f"{key!r} has {spec.shape[d]} entries along dim {d}, but into= names "
                f"{len(into)} keys",
            )
        for k in into:
            ctx.free(call, k, allowed=[key])
        part = TensorSpec(spec.shape[:d] + spec.shape[d + 1 :], spec.dtype)
        items: list[tuple[str, Node]] = [
            (k, Apply(self, (node,), {"dim": d, "index": i}, part)) for i, k in enumerate(into)
        ]
        ctx.splice(key, items, remove=())
        ctx.done(self, call, into, [key] if key not in into else [])

    def kernel(self, args: Sequence[torch.Tensor], *, dim: int, index: int) -> torch.Tensor:
        # A copy, not a view: torch.save writes a view's whole storage, so an expert
        # kept after the others were dropped would carry all of them.
        return args[0].select(dim, index).clone(memory_format=torch.contiguous_format)

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        *,
        dim: int,
        index: int,
    ) -> LowRank | None:
        part = parts[0]
        return part.select(dim, index) if part is not None else None

    def part_kept(self, params: Mapping[str, Any]) -> Part:
        return params["dim"], params["index"], 1

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall]:
        a = self.arguments(call)
        join: dict[str, object] = {"into": a["key"]}
        if a["dim"]:
            join["dim"] = a["dim"]
        return [OpCall("stack", (_key_list(a["into"]),), join)]
