"""New tensors without a dtype keep the dtype their own revision gave them.

A call that names no dtype (``add_tensor(..., dtype=None)``, the float32
tensors of ``add_module``) makes its tensor in the uniform floating dtype of
the state at the start of its step, else float32. A squashed step starts where
the range starts, so each such call is checked against the checkpoint's floats
as its revision saw them: the range is run on the start schema as recorded and
with every float in float16, bfloat16, float32 and float64.

* Its revision's dtype is the range start's on every trial: the call is kept
  as it is.
* Its revision's dtype is one constant on every trial: an ``add_tensor`` gets
  that ``dtype=`` written out, an ``add_module`` its module as ``<module>.to(dtype)``
  (float32 excepted: a float32 module follows the step).
* Otherwise one step cannot stand for it, and the squash is refused.

The trials are checkpoints whose floats share one dtype (and the recorded
schema): a checkpoint of mixed floats where the keys a range drops before the
call were the only ones in another dtype is not among them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import CkptMigrateError, CommandError
from ..operations.checks import OpContext
from ..operations.registry import operation
from ..plan.nodes import TensorSpec
from ..plan.state import PlanState
from .calls import Call

#: Where a converted module keeps the module it was converted from (see ``converted``).
CONVERTED_FROM = "_ckptmigrate_converted_from"
#: The floating dtypes a checkpoint is tried in, besides the recorded schema.
TRIAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Step = tuple[str, Sequence[Call]]  # a revision and the calls it made, in order


@dataclass
class _Seen:
    """What one call's new tensors were made in, on one trial."""

    made_in: torch.dtype  # the new_float of its own revision
    squashed: torch.dtype  # the new_float of the range's start


def pin_new_floats(
    steps: Sequence[Step],
    start: Mapping[str, TensorSpec | None],
    *,
    direction: str,
    where: str,
) -> list[Call]:
    """The calls of ``steps``, flattened, each dtype-less new tensor in the dtype its revision
    gave it (or a refusal naming the revision and call)."""
    calls = [(rev, c) for rev, step in steps for c in step]
    if not any(_follows(c) for _, c in calls):
        return [c for _, c in calls]
    trials = [start, *(_in_dtype(start, d) for d in TRIAL_DTYPES)]
    seen: dict[int, list[_Seen]] = {}
    for specs in trials:
        found = _trial(steps, specs, direction=direction)
        if found is None:
            continue  # the range itself fails on such a checkpoint
        for i, s in found.items():
            seen.setdefault(i, []).append(s)
    out: list[Call] = []
    for i, (rev, c) in enumerate(calls):
        kept = _pinned(c, seen.get(i, []))
        if kept is None:
            raise _refusal(where, rev, c, direction)
        out.append(kept)
    return out


def _pinned(call: Call, seen: Sequence[_Seen]) -> Call | None:
    """``call`` as the squashed step must make it, or None when no call does."""
    if not seen or not _follows(call):
        return call
    if all(s.made_in == s.squashed for s in seen):
        return call
    made = {s.made_in for s in seen}
    if len(made) != 1:
        return None
    dtype = made.pop()
    if call.name == "add_tensor":
        return call.with_arguments(dtype=dtype)
    if dtype == torch.float32:
        return None  # a module built in float32 follows the step, whatever it is
    return call.with_arguments(module=converted(call.argument("module"), dtype))


def converted(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` in ``dtype``, written back as ``<module>.to(dtype)``: the same
    values as converting the float32 tensors the original built."""
    out = copy.deepcopy(module).to(dtype)
    object.__setattr__(out, CONVERTED_FROM, module)  # not a submodule: no keys of its own
    return out


def _refusal(where: str, rev: str, call: Call, direction: str) -> CommandError:
    if call.name == "add_module":
        shown = f"op.add_module({call.argument('prefix')!r}, ...)"
        fix = "start the range at it, or end it before it"
    else:
        shown = f"op.add_tensor({call.argument('key')!r}, ...)"
        fix = "give the call a dtype= there, or start the range at it, or end it before it"
    return CommandError(
        f"cannot squash {where}: revision {rev}'s {direction}() calls {shown} without a dtype, "
        "so its new tensor takes the checkpoint's floating dtype as that revision finds it, "
        "which one step from the start of the range cannot reproduce for every checkpoint",
        hint=fix,
    )


def _follows(call: Call) -> bool:
    """Whether the call's new tensors take the floating dtype of its step."""
    if call.name == "add_tensor":
        return call.argument("dtype") is None
    if call.name == "add_module":
        module = call.argument("module")
        if not isinstance(module, torch.nn.Module):
            return False
        return any(
            isinstance(v, torch.Tensor) and v.dtype == torch.float32
            for v in module.state_dict().values()
        )
    return False


def _in_dtype(
    specs: Mapping[str, TensorSpec | None], dtype: torch.dtype
) -> dict[str, TensorSpec | None]:
    return {
        k: TensorSpec(s.shape, dtype) if s is not None and s.dtype.is_floating_point else s
        for k, s in specs.items()
    }


def _trial(
    steps: Sequence[Step],
    specs: Mapping[str, TensorSpec | None],
    *,
    direction: str,
) -> dict[int, _Seen] | None:
    """Run ``steps`` from ``specs``, each in a step of its own as its revision runs."""
    state = PlanState.from_schema(specs)
    squashed = OpContext(state, revision="squash", direction=direction).new_float
    out: dict[int, _Seen] = {}
    i = 0
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            for rev, calls in steps:
                ctx = OpContext(state, revision=rev, direction=direction)
                for c in calls:
                    ctx.seed_revision = c.seeds
                    operation(c.name).record(ctx, *c.op.args, **c.op.kwargs)
                    if _follows(c):
                        out[i] = _Seen(ctx.new_float, squashed)
                    i += 1
    except CkptMigrateError:
        return None
    return out
