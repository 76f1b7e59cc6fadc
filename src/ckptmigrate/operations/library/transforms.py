"""Single-tensor transforms: one tensor in, one out, under the same key.

Each kernel returns a new tensor or a view and never writes into its input,
so a user's tensors (and a memory-mapped input file) are never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ...errors import CkptMigrateError
from ...plan.init import check_init, draws_randomly, make_tensor
from ...plan.lowrank import LowRank, NoExactCounterpart
from ...plan.nodes import TensorSpec
from ..checks import OpContext
from ..registry import CannotFollowState, OpCall, Operation, SpecOf, register


def _restoring(op: Operation, call: OpCall, before: SpecOf, what: str) -> list[OpCall] | None:
    """``op`` again, giving the key back the ``what`` ("shape", "dtype") it had before ``call``."""
    key = op.arguments(call)["key"]
    was = before(key) if isinstance(key, str) else None
    return [OpCall(op.name, (key, getattr(was, what)))] if was is not None else None


@register
class Reshape(Operation):
    """Give a tensor a new shape with the same number of elements (one size may be -1)."""

    name = "reshape"

    def record(self, ctx: OpContext, key: str, shape: Sequence[int] | int) -> None:
        call = ctx.call(self, key, shape)
        spec = ctx.spec(call, key)
        dims = ctx.dims(call, shape)
        if sum(1 for d in dims if d == -1) > 1:
            raise ctx.fail(call, "only one dimension can be -1")
        known = 1
        for d in dims:
            if d != -1:
                known *= int(d)
        if -1 in dims:
            if known == 0 or spec.numel % known:
                raise ctx.fail(call, f"cannot infer -1: {spec.numel} elements, {dims}")
            dims[dims.index(-1)] = spec.numel // known
        target = ctx.shape(call, dims)
        if TensorSpec(target, spec.dtype).numel != spec.numel:
            raise ctx.fail(
                call,
                f"{key!r} has shape {list(spec.shape)} ({spec.numel} elements), "
                f"which cannot be reshaped to {list(target)}",
            )
        ctx.transform(self, call, key, TensorSpec(target, spec.dtype), shape=target)

    def kernel(self, args: Sequence[torch.Tensor], *, shape: tuple[int, ...]) -> torch.Tensor:
        return args[0].reshape(shape)

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        *,
        shape: tuple[int, ...],
    ) -> LowRank | None:
        if tuple(shape) == inputs[0].shape:
            return parts[0]
        raise NoExactCounterpart(
            f"reshaping {list(inputs[0].shape)} to {list(shape)} reorders the elements "
            "across the low-rank factors' product"
        )

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall] | None:
        return _restoring(self, call, before, "shape")


@register
class Transpose(Operation):
    """Swap two dimensions."""

    name = "transpose"

    def record(self, ctx: OpContext, key: str, dim0: int, dim1: int) -> None:
        call = ctx.call(self, key, dim0, dim1)
        spec = ctx.spec(call, key)
        d0, d1 = ctx.dim(call, dim0, len(spec.shape)), ctx.dim(call, dim1, len(spec.shape))
        shape = list(spec.shape)
        shape[d0], shape[d1] = shape[d1], shape[d0]
        ctx.transform(self, call, key, TensorSpec(tuple(shape), spec.dtype), dim0=d0, dim1=d1)

    def kernel(self, args: Sequence[torch.Tensor], *, dim0: int, dim1: int) -> torch.Tensor:
        return args[0].transpose(dim0, dim1).contiguous()

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        *,
        dim0: int,
        dim1: int,
    ) -> LowRank | None:
        """(B A)^T = A^T B^T: the factors swap and transpose.

        Stored the other way round, a weight is a Conv1D's ``[in, out]`` where
        it was a Linear's ``[out, in]`` (or back): PEFT's ``lora_A`` stays
        ``[r, in]`` and ``lora_B`` ``[out, r]`` for both, so the factors keep
        their values and the adapter's ``fan_in_fan_out`` flips.
        """
        part = parts[0]
        return part.transpose(dim0, dim1) if part is not None and dim0 != dim1 else part

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall]:
        return [call]  # a swap undoes itself


@register
class Permute(Operation):
    """Reorder dimensions."""

    name = "permute"

    def record(self, ctx: OpContext, key: str, dims: Sequence[int]) -> None:
        call = ctx.call(self, key, dims)
        spec = ctx.spec(call, key)
        n = len(spec.shape)
        if isinstance(dims, int) or not isinstance(dims, Iterable):
            raise ctx.fail(call, f"dims must be a sequence of dims, not {dims!r}")
        dims = list(dims)
        norm = tuple(ctx.dim(call, d, n) for d in dims)
        if sorted(norm) != list(range(n)):
            raise ctx.fail(call, f"{list(dims)} is not a permutation of the {n} dims of {key!r}")
        shape = tuple(spec.shape[d] for d in norm)
        ctx.transform(self, call, key, TensorSpec(shape, spec.dtype), dims=norm)

    def kernel(self, args: Sequence[torch.Tensor], *, dims: tuple[int, ...]) -> torch.Tensor:
        return args[0].permute(dims).contiguous()

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        *,
        dims: tuple[int, ...],
    ) -> LowRank | None:
        part = parts[0]
        return part.permute(dims) if part is not None else None

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall]:
        a = self.arguments(call)
        dims = [int(d) % len(a["dims"]) for d in a["dims"]]
        back = [dims.index(i) for i in range(len(dims))]
        return [OpCall(self.name, (a["key"], back))]


@register
class Cast(Operation):
    """Change a tensor's dtype (its optimizer state is cast the same way)."""

    name = "cast"

    def record(self, ctx: OpContext, key: str, dtype: torch.dtype | str) -> None:
        call = ctx.call(self, key, dtype)
        spec = ctx.spec(call, key)
        target = ctx.dtype(call, dtype)
        ctx.transform(self, call, key, TensorSpec(spec.shape, target), dtype=target)

    def kernel(self, args: Sequence[torch.Tensor], *, dtype: torch.dtype) -> torch.Tensor:
        return args[0].to(dtype)

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        *,
        dtype: torch.dtype,
    ) -> LowRank | None:
        """The factors are cast like the weight (a float dtype; an integer one is refused)."""
        part = parts[0]
        return part.cast(dtype) if part is not None else None

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall] | None:
        return _restoring(self, call, before, "dtype")


@register
class Resize(Operation):
    """Grow (new part initialised) or shrink (sliced) along any dimension.

    A shrink cuts trained values; ``check`` reports it unless ``intended=True``.
    """

    name = "resize"

    def record(
        self,
        ctx: OpContext,
        key: str,
        shape: Sequence[int] | int,
        *,
        init: str | Callable[..., Any] = "zeros",
        intended: bool = False,
        **init_args: Any,
    ) -> None:
        call = ctx.call(self, key, shape, init=init, intended=intended, **init_args)
        mark = ctx.intended(call, intended)
        spec = ctx.spec(call, key)
        target = ctx.shape(call, shape)
        if len(target) != len(spec.shape):
            raise ctx.fail(
                call,
                f"{key!r} has {len(spec.shape)} dims {list(spec.shape)}; resize keeps the "
                f"number of dims (use reshape to change it)",
            )
        new_spec = TensorSpec(target, spec.dtype)
        # checked even when only shrinking: a typo in init= should not wait for
        # the day the same script grows a tensor
        problem = check_init(init, init_args, new_spec)
        if problem:
            raise ctx.fail(call, problem)
        ctx.transform(
            self,
            call,
            key,
            new_spec,
            shape=target,
            init=init,
            init_args=dict(init_args),
            seed=ctx.seed(key, "resize"),
        )
        if mark:  # a shrink the script means: its cut is not a silent loss
            ctx.state.intended.append(ctx.state.entries[key])

    def kernel(
        self,
        args: Sequence[torch.Tensor],
        *,
        shape: tuple[int, ...],
        init: str | Callable[..., Any],
        init_args: dict[str, Any],
        seed: int,
    ) -> torch.Tensor:
        src = args[0]
        if any(n > o for n, o in zip(shape, src.shape)):
            out = make_tensor(TensorSpec(shape, src.dtype), init, init_args, seed).to(src.device)
        else:
            out = torch.empty(shape, dtype=src.dtype, device=src.device)
        return _overlay(out, src)

    def follow_state(
        self, args: Sequence[torch.Tensor], *, shape: tuple[int, ...], **_init: Any
    ) -> torch.Tensor:
        """New rows start at zeros, never at the weights' init: they have seen no gradient."""
        src = args[0]
        return _overlay(torch.zeros(shape, dtype=src.dtype, device=src.device), src)

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        *,
        shape: tuple[int, ...],
        **_init: Any,
    ) -> LowRank | None:
        """Growing pads the factors with zeros: the new rows or columns get no delta.

        A shrink would throw away part of what the adapter learnt; it is
        refused, as ``check`` reports the base weight's loss.
        """
        part = parts[0]
        assert part is not None
        for dim, (old, new) in enumerate(zip(inputs[0].shape, shape)):
            if new < old:
                raise NoExactCounterpart(
                    f"it shrinks dim {dim} from {old} to {new}, cutting away part of the "
                    "adapter's delta"
                )
            if new > old:
                part = part.grow(dim, new)
        return part

    def cut(
        self, source: TensorSpec, result: TensorSpec, params: Mapping[str, Any]
    ) -> tuple[int, str] | None:
        kept = 1
        for a, b in zip(source.shape, result.shape):
            kept *= min(a, b)
        if source.numel <= kept:
            return None
        return source.numel - kept, f"cut to [{', '.join(map(str, result.shape))}]"

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall] | None:
        return _restoring(self, call, before, "shape")

    def draws(self, call: OpCall) -> bool:
        return draws_randomly(self.arguments(call)["init"])


def _overlay(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out`` with the region it shares with ``src`` copied from ``src``."""
    common = tuple(slice(0, min(n, o)) for n, o in zip(out.shape, src.shape))
    out[common] = src[common]
    return out


@register
class MapTensor(Operation):
    """Replace a tensor by ``fn(tensor)``; the escape hatch.

    The result's shape and dtype are found by calling ``fn`` on a shape-only
    (meta) tensor; pass ``shape``/``dtype`` when ``fn`` needs real values.
    """

    name = "map_tensor"
    label = "map"

    def record(
        self,
        ctx: OpContext,
        key: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        call = ctx.call(self, key, fn, shape=shape, dtype=dtype)
        spec = ctx.spec(call, key)
        if not callable(fn):
            raise ctx.fail(call, "fn must be a function of one tensor")
        if shape is not None or dtype is not None:
            out = TensorSpec(
                ctx.shape(call, shape) if shape is not None else spec.shape,
                ctx.dtype(call, dtype) if dtype is not None else spec.dtype,
            )
        else:
            out = self._result_spec(ctx, call, fn, spec)
        # a function drawing random numbers gets its own seeded RNG, like an init
        ctx.transform(self, call, key, out, fn=fn, seed=ctx.seed(key, "map"))

    def _result_spec(
        self, ctx: OpContext, call: str, fn: Callable[[torch.Tensor], Any], spec: TensorSpec
    ) -> TensorSpec:
        try:
            result = fn(spec.meta())
        except CkptMigrateError:
            raise  # e.g. the input changing under the reader, not the function's fault
        except Exception as exc:
            raise ctx.fail(
                call,
                f"the function could not run on a shape-only tensor ({type(exc).__name__}: {exc})",
                hint="pass shape= and dtype= so the plan knows the result",
            ) from None
        if not isinstance(result, torch.Tensor):
            raise ctx.fail(call, f"the function returned {type(result).__name__}, not a tensor")
        return TensorSpec.of(result)

    def kernel(
        self,
        args: Sequence[torch.Tensor],
        *,
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

    def draws(self, call: OpCall) -> bool:
        return True  # the function runs on an RNG seeded from the revision

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        /,
        *_: Any,
        **params: Any,
    ) -> LowRank | None:
        raise NoExactCounterpart(
            "a function of the weight says nothing about what becomes of a low-rank delta of it"
        )

    def follow_state(self, args: Sequence[torch.Tensor], **params: Any) -> torch.Tensor:
        raise CannotFollowState(
            "a function of the weights says nothing about their optimizer state "
            "(momentum, Adam's moments)"
        )
