"""Deterministic initialisers for tensors a migration creates.

Every new tensor is filled from its own generator, seeded from the revision
id and the key, so upgrading the same checkpoint twice gives bit-identical
files and the caller's global RNG is never touched.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch

from .rng import seeded_global_rng
from .spec import TensorSpec

# init name -> the keyword arguments it takes (with defaults)
INITS: dict[str, dict[str, Any]] = {
    "zeros": {},
    "ones": {},
    "eye": {},
    "constant": {"value": None},
    "normal": {"mean": 0.0, "std": 1.0},
    "uniform": {"a": 0.0, "b": 1.0},
    "kaiming_uniform": {"a": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu"},
    "xavier_uniform": {"gain": 1.0},
}
_RANDOM = {"normal", "uniform", "kaiming_uniform", "xavier_uniform"}


def draws_randomly(init: str | Callable[..., Any]) -> bool:
    """Whether ``init`` draws from its seed (a function might: it gets a seeded RNG)."""
    return callable(init) or init in _RANDOM


def check_init(
    init: str | Callable[..., Any], init_args: dict[str, Any], spec: TensorSpec
) -> str | None:
    """Why this init cannot fill this tensor, or None when it can."""
    if callable(init):
        return None if not init_args else "a callable init takes no extra keyword arguments"
    if init not in INITS:
        return f"unknown init {init!r}; choose one of {', '.join(INITS)} or pass a callable"
    allowed = INITS[init]
    unknown = sorted(set(init_args) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) or "no arguments"
        return f"init={init!r} does not take {', '.join(unknown)} (it takes {takes})"
    if init == "constant" and "value" not in init_args:
        return "init='constant' needs value=..."
    if init == "eye" and len(spec.shape) != 2:
        return f"init='eye' needs a 2-D shape, not {list(spec.shape)}"
    if init in ("kaiming_uniform", "xavier_uniform") and len(spec.shape) < 2:
        return f"init={init!r} needs at least 2 dimensions (fan-in/fan-out), not {list(spec.shape)}"
    if init in _RANDOM and not spec.dtype.is_floating_point:
        return f"init={init!r} needs a floating-point dtype, not {spec.dtype}"
    return _check_values(init, {**allowed, **init_args})


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_values(init: str, args: dict[str, Any]) -> str | None:
    """Bad argument values, caught while planning rather than while writing."""
    value = args.get("value")
    if init == "constant" and not (
        isinstance(value, (numbers.Number, bool))
        or (isinstance(value, torch.Tensor) and value.numel() == 1)
    ):
        return f"init='constant' needs a number for value=, not {value!r}"
    numeric = {"normal": ("mean", "std"), "uniform": ("a", "b"), "kaiming_uniform": ("a",)}
    for name in (*numeric.get(init, ()), *(("gain",) if init == "xavier_uniform" else ())):
        if not _is_number(args[name]):
            return f"init={init!r} needs a number for {name}=, not {args[name]!r}"
    if init == "normal" and args["std"] < 0:
        return f"init='normal' needs std >= 0, not {args['std']!r}"
    if init == "uniform" and args["a"] > args["b"]:
        return f"init='uniform' needs a <= b, not a={args['a']!r}, b={args['b']!r}"
    if init == "kaiming_uniform":
        if args["mode"] not in ("fan_in", "fan_out"):
            return f"init='kaiming_uniform' takes mode='fan_in' or 'fan_out', not {args['mode']!r}"
        try:
            torch.nn.init.calculate_gain(args["nonlinearity"], args["a"])
        except ValueError as exc:
            return f"init='kaiming_uniform': {exc}"
    return None


def make_tensor(
    spec: TensorSpec, init: str | Callable[..., Any], init_args: dict[str, Any], seed: int
) -> torch.Tensor:
    out = torch.empty(spec.shape, dtype=spec.dtype, device="cpu")
    if callable(init):
        with seeded_global_rng(seed), torch.no_grad():
            result = init(out)
        if isinstance(result, torch.Tensor) and result is not out:
            result = result.detach().to(spec.dtype)
            if tuple(result.shape) != spec.shape:
                got, want = list(result.shape), list(spec.shape)
                raise ValueError(f"init function returned shape {got}, expected {want}")
            return result.contiguous()
        return out
    if out.numel() == 0 and init in _RANDOM:
        return out  # nothing to fill; xavier would divide by a zero fan
    if init in _RANDOM and spec.dtype.itemsize < 4:
        # Draw in float32, then round: a half-precision checkpoint gets exactly the
        # float32 upgrade's values, rounded (and float8 has no random kernels at all).
        wide = make_tensor(TensorSpec(spec.shape, torch.float32), init, init_args, seed)
        return wide.to(spec.dtype)
    gen = torch.Generator().manual_seed(seed)
    args = {**INITS[init], **init_args}
    with torch.no_grad():
        if init == "zeros":
            out.zero_()
        elif init == "ones":
            out.fill_(1)
        elif init == "eye":
            torch.nn.init.eye_(out)
        elif init == "constant":
            out.fill_(args["value"])
        elif init == "normal":
            out.normal_(args["mean"], args["std"], generator=gen)
        elif init == "uniform":
            out.uniform_(args["a"], args["b"], generator=gen)
        elif init == "kaiming_uniform":
            torch.nn.init.kaiming_uniform_(
                out,
                a=args["a"],
                mode=args["mode"],
                nonlinearity=args["nonlinearity"],
                generator=gen,
            )
        elif init == "xavier_uniform":
            torch.nn.init.xavier_uniform_(out, gain=args["gain"], generator=gen)
    return out
