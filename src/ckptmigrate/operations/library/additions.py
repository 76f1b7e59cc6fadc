"""Additions: new tensors, filled deterministically from the revision id and the key."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...plan.init import check_init, draws_randomly
from ...plan.nodes import Constant, Init, TensorSpec
from ..checks import OpContext
from ..registry import OpCall, Operation, SpecOf, register


@register
class AddTensor(Operation):
    """Add a new tensor, filled deterministically.

    Without ``dtype`` it is made in the checkpoint's floating dtype when all its
    floating tensors share one (an fp16 file gets an fp16 tensor), else float32.

    ``init``: ``zeros``, ``ones``, ``eye``, ``constant`` (``value=``),
    ``normal`` (``mean=``, ``std=``), ``uniform`` (``a=``, ``b=``),
    ``kaiming_uniform``, ``xavier_uniform``, or a callable filling a tensor.
    """

    name = "add_tensor"

    def record(
        self,
        ctx: OpContext,
        key: str,
        shape: Sequence[int] | int,
        *,
        dtype: torch.dtype | str | None = None,
        init: str | Callable[..., Any] = "zeros",
        **init_args: Any,
    ) -> None:
        call = ctx.call(self, key, shape, dtype=dtype, init=init, **init_args)
        ctx.free(call, key)
        made_in = ctx.dtype(call, dtype) if dtype is not None else ctx.new_float
        spec = TensorSpec(ctx.shape(call, shape), made_in)
        problem = check_init(init, init_args, spec)
        if problem:
            raise ctx.fail(call, problem)
        ctx.state.entries[key] = Init(spec, init, dict(init_args), ctx.seed(key))
        ctx.done(self, call, [key])

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall]:
        return [OpCall("drop_key", (self.arguments(call)["key"],))]

    def draws(self, call: OpCall) -> bool:
        return draws_randomly(self.arguments(call)["init"])


@register
class AddModule(Operation):
    """Add every entry of a freshly built module under ``prefix``.

    The module's own initialiser runs on an RNG seeded from the revision, so
    the result is the same on every upgrade. Its float32 tensors take the
    checkpoint's floating dtype (as ``add_tensor`` does); a module built in
    another dtype keeps it.
    """

    name = "add_module"

    def record(self, ctx: OpContext, prefix: str, module: torch.nn.Module) -> None:
        call = ctx.call(self, prefix, module)
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise ctx.fail(call, "the prefix is a module name such as 'fc3' or 'encoder.fc3'")
        if not isinstance(module, torch.nn.Module):
            raise ctx.fail(call, f"expected an nn.Module, got {type(module).__name__}")
        sd = module.state_dict(prefix=_dotted(prefix))
        if not sd:
            raise ctx.fail(call, f"{type(module).__name__} has no parameters or buffers")
        for key in sd:
            ctx.free(call, key)
        for key, value in sd.items():
            if isinstance(value, torch.Tensor):
                # float32 is what a module is built in unless told otherwise: it follows
                # the checkpoint; a module built in another dtype keeps it
                follow = value.dtype == torch.float32 and ctx.new_float != torch.float32
                tensor = value.detach()
                tensor = tensor.to(ctx.new_float) if follow else tensor.clone()
                ctx.state.entries[key] = Constant(tensor)
            else:
                ctx.state.entries[key] = Constant(value)
        # state_dict(prefix=...) already keys the module's metadata by full prefix
        for name, meta in getattr(sd, "_metadata", {}).items():
            ctx.state.metadata[name] = dict(meta)
        ctx.done(self, call, list(sd))

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall]:
        return [OpCall("drop_prefix", (_dotted(str(self.arguments(call)["prefix"])),))]

    def draws(self, call: OpCall) -> bool:
        return True  # the module's own initialiser ran on the revision's RNG


def _dotted(prefix: str) -> str:
    return prefix if prefix.endswith(".") else prefix + "."
