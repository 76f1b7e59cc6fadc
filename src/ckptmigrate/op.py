"""The operations a revision script calls: ``from ckptmigrate import op``.

Keys are relative to the state dict being migrated, after wrapper prefixes
(``module.``, ``_orig_mod.``) were stripped. A *prefix* is a plain string
prefix of keys, its dot included (``"encoder.layers."``). Each call checks its
preconditions and records a step in the plan; no tensor data is touched until
the output is written.

This module imports no torch, so graph-only commands stay fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .operations.context import current

if TYPE_CHECKING:
    import torch

__all__ = [
    "add_module",
    "add_tensor",
    "cast",
    "concat",
    "drop_key",
    "drop_prefix",
    "dtype",
    "keys",
    "map_tensor",
    "permute",
    "rename_key",
    "rename_prefix",
    "rename_regex",
    "reset_optimizer_state",
    "reshape",
    "resize",
    "shape",
    "split",
    "transpose",
]


def rename_key(old: str, new: str) -> None:
    """Move the tensor at ``old`` to ``new`` (no data is copied)."""
    current("rename_key").rename_key(old, new)


def rename_prefix(old: str, new: str) -> None:
    """Rename every key starting with ``old`` (e.g. ``"encoder."`` -> ``"enc."``)."""
    current("rename_prefix").rename_prefix(old, new)


def rename_regex(pattern: str, repl: str) -> None:
    """Rename every key through ``re.sub(pattern, repl, key)``."""
    current("rename_regex").rename_regex(pattern, repl)


def drop_key(key: str, *, intended: bool = False) -> None:
    """Remove one entry.

    Dropping a tensor of the input throws its trained values away; ``check``
    reports that unless ``intended=True`` says it is meant.
    """
    current("drop_key").drop_key(key, intended=intended)


def drop_prefix(prefix: str, *, intended: bool = False) -> None:
    """Remove every entry whose key starts with ``prefix`` (``intended`` as for drop_key)."""
    current("drop_prefix").drop_prefix(prefix, intended=intended)


def add_tensor(
    key: str,
    shape: Sequence[int] | int,
    *,
    dtype: torch.dtype | str | None = None,
    init: str | Callable[..., Any] = "zeros",
    **init_args: Any,
) -> None:
    """Add a new tensor, filled deterministically.

    Without ``dtype`` it is made in the checkpoint's floating dtype when all its
    floating tensors share one (an fp16 file gets an fp16 tensor), else float32.

    ``init``: ``zeros``, ``ones``, ``eye``, ``constant`` (``value=``),
    ``normal`` (``mean=``, ``std=``), ``uniform`` (``a=``, ``b=``),
    ``kaiming_uniform``, ``xavier_uniform``, or a callable filling a tensor.
    """
    current("add_tensor").add_tensor(key, shape, dtype=dtype, init=init, **init_args)


def add_module(prefix: str, module: torch.nn.Module) -> None:
    """Add every entry of a freshly built module under ``prefix``.

    The module's own initialiser runs on an RNG seeded from the revision, so
    the result is the same on every upgrade. Its float32 tensors take the
    checkpoint's floating dtype (as ``add_tensor`` does); a module built in
    another dtype keeps it.
    """
    current("add_module").add_module(prefix, module)


def reshape(key: str, shape: Sequence[int] | int) -> None:
    """Give a tensor a new shape with the same number of elements."""
    current("reshape").reshape(key, shape)


def transpose(key: str, dim0: int, dim1: int) -> None:
    """Swap two dimensions."""
    current("transpose").transpose(key, dim0, dim1)


def permute(key: str, dims: Sequence[int]) -> None:
    """Reorder dimensions."""
    current("permute").permute(key, dims)


def cast(key: str, dtype: torch.dtype | str) -> None:
    """Change a tensor's dtype."""
    current("cast").cast(key, dtype)


def resize(
    key: str,
    shape: Sequence[int] | int,
    *,
    init: str | Callable[..., Any] = "zeros",
    intended: bool = False,
    **init_args: Any,
) -> None:
    """Grow (new part initialised) or shrink (sliced) along any dimension.

    A shrink cuts trained values; ``check`` reports it unless ``intended=True``.
    """
    current("resize").resize(key, shape, init=init, intended=intended, **init_args)


def split(
    key: str, into: Sequence[str], *, dim: int = 0, sizes: Sequence[int] | None = None
) -> None:
    """Cut one tensor into several keys along ``dim`` (equal parts unless ``sizes``)."""
    current("split").split(key, into, dim=dim, sizes=sizes)


def concat(keys: Sequence[str], into: str, *, dim: int = 0) -> None:
    """Join several tensors into one key along ``dim``."""
    current("concat").concat(keys, into, dim=dim)


def map_tensor(
    key: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype | str | None = None,
) -> None:
    """Replace a tensor by ``fn(tensor)``; the escape hatch.

    The result's shape and dtype are found by calling ``fn`` on a shape-only
    (meta) tensor; pass ``shape``/``dtype`` when ``fn`` needs real values.
    """
    current("map_tensor").map_tensor(key, fn, shape=shape, dtype=dtype)


def reset_optimizer_state(key: str) -> None:
    """Start ``key``'s optimizer state afresh when a training checkpoint is migrated.

    The tensor is unchanged. Its momentum/moments are dropped (zeros for its
    part of a later concat), e.g. after ``map_tensor``, whose function says
    nothing about them.
    """
    current("reset_optimizer_state").reset_optimizer_state(key)


def keys(prefix: str = "") -> list[str]:
    """Current keys (starting with ``prefix``), in order."""
    return current("keys").keys(prefix)


def shape(key: str) -> torch.Size:
    """The shape a key has at this point of the migration."""
    return current("shape").shape(key)


def dtype(key: str) -> torch.dtype:
    """The dtype a key has at this point of the migration."""
    return current("dtype").dtype(key)
