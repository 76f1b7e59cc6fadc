"""Which state-dict entries are parameters, in which order, and which are one tensor.

An optimizer numbers its parameters in the order ``model.parameters()`` yields
them: the state dict's order with the buffers left out and a parameter that
sits under two keys (tied weights) counted once. To carry optimizer state we
need that list for the checkpoint as it is and as it will be.

Where each entry's kind comes from, most trusted first:

* ``param_names`` saved by the optimizer itself (PyTorch >= 2.6 records them
  when it is built from ``model.named_parameters()``);
* the configured model (``model =``), when its layout is the checkpoint's
  (old side) or the migration's result (new side);
* the base schema's kinds (``param``/``buffer`` when it was recorded from a
  model), pushed through the migrations to the checkpoint's revision;
* the same kinds carried across the plan: an output made of parameters is a
  parameter, and a parameter's sources were parameters;
* otherwise a guess: integer and bool tensors are buffers (they cannot be
  trained), so are the names PyTorch modules use for buffers
  (``running_mean``, ``running_var``, ``num_batches_tracked``, ...); every other
  floating-point tensor is taken for a parameter.

Guesses are checked against the optimizer's own count of parameters
(:func:`resolve_guesses`); when they disagree in a way that leaves more than
one answer, migrating the optimizer state is an error that says how to give
ckptmigrate the facts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan.nodes import Node, Source, TensorSpec

#: Last key components that are buffers in PyTorch's and common libraries' modules.
KNOWN_BUFFERS = frozenset(
    {
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "position_ids",
        "inv_freq",
        "relative_position_index",
    }
)


@dataclass
class Layout:
    """One side of a migration: every entry by file key, in state-dict order."""

    specs: dict[str, TensorSpec | None]
    kinds: dict[str, str] = field(default_factory=dict)  # "param", "buffer", "object"
    guessed: set[str] = field(default_factory=set)
    alias: dict[str, str] = field(default_factory=dict)  # tied key -> its group's first key

    def rep(self, key: str) -> str:
        """The key a tied parameter is counted under (itself when not tied)."""
        return self.alias.get(key, key)

    def is_param(self, key: str) -> bool:
        return self.kinds.get(key) == "param"

    @property
    def params(self) -> list[str]:
        """Parameters in optimizer order, each tied group once (under its first key)."""
        return [k for k, kind in self.kinds.items() if kind == "param" and self.rep(k) == k]

    def guessed_params(self) -> list[str]:
        return [k for k in self.params if k in self.guessed]

    def guessed_buffers(self) -> list[str]:
        return [k for k, kind in self.kinds.items() if kind == "buffer" and k in self.guessed]


def guess_kind(key: str, spec: TensorSpec | None) -> tuple[str, bool]:
    """(kind, sure) from the tensor alone; see the module docstring."""
    if spec is None:
        return "object", True
    if not (spec.dtype.is_floating_point or spec.dtype.is_complex):
        return "buffer", True
    if key.rsplit(".", 1)[-1] in KNOWN_BUFFERS:
        return "buffer", False
    return "param", False


def fill_kinds(layout: Layout, known: Mapping[str, str]) -> None:
    """Kinds from ``known`` where given (sure), guessed for the rest."""
    for key, spec in layout.specs.items():
        kind = known.get(key)
        if spec is None:
            layout.kinds[key] = "object"
        elif kind in ("param", "buffer"):
            layout.kinds[key] = kind
        else:
            guess, sure = guess_kind(key, spec)
            layout.kinds[key] = guess
            if not sure:
                layout.guessed.add(key)


def params_with(layout: Layout, flips: Mapping[str, str]) -> list[str]:
    """``layout.params`` as it would be with the kinds of some tie groups changed."""
    out = []
    for key, kind in layout.kinds.items():
        rep = layout.rep(key)
        if rep == key and flips.get(rep, kind) == "param":
            out.append(key)
    return out


#: Beyond this many ways to correct the guesses, none is tried.
MAX_TRIALS = 1024


def resolve_guesses(
    layout: Layout, count: int, lines_up: Callable[[list[str]], bool]
) -> str | None:
    """Make the parameter list ``count`` long by changing guesses; None when done, else why not.

    Sure kinds stay. Of the ways to turn guessed parameters into buffers (or
    guessed buffers into parameters) that give ``count`` parameters, the one
    whose optimizer state lines up with the parameters' shapes (``lines_up``) is
    taken, if it is the only one: a loss's class weights beside a parameter
    of another shape are told apart, two same-shaped candidates are not.
    """
    params = layout.params
    if len(params) == count:
        return None
    if len(params) > count:
        pool, kind, need = layout.guessed_params(), "buffer", len(params) - count
    else:
        pool = list(dict.fromkeys(layout.rep(k) for k in layout.guessed_buffers()))
        kind, need = "param", count - len(params)
    if need > len(pool):
        return "too few of the kinds are guesses to make up the difference"
    if math.comb(len(pool), need) > MAX_TRIALS:
        return "too many of the kinds are guesses to try every way to make up the difference"
    fits: list[tuple[str, ...]] = []
    for combo in itertools.combinations(pool, need):
        if lines_up(params_with(layout, dict.fromkeys(combo, kind))):
            fits.append(combo)
            if len(fits) > 1:
                return "several choices of parameters fit the optimizer state equally well"
    if not fits:
        return "no choice of parameters lines up with the optimizer state's shapes"
    chosen = set(fits[0])
    for key in list(layout.kinds):
        if layout.rep(key) in chosen:
            layout.kinds[key] = kind
    return None


def ties_by_storage(keys: Iterable[str], read: Callable[[str], Any]) -> dict[str, str]:
    """Keys whose tensors are one tensor (same storage, offset, shape, strides) -> first key.

    ``torch.save`` keeps tied parameters tied: both entries load as views of
    one storage. Only metadata is looked at; no tensor data is read.
    """
    first: dict[tuple[object, ...], str] = {}
    alias: dict[str, str] = {}
    for key in keys:
        try:
            value = read(key)
        except Exception:  # an unreadable entry is simply not known to be tied
            continue
        if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.is_meta:
            continue
        ident = (
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            value.stride(),
            value.dtype,
        )
        if ident in first:
            alias[key] = first[ident]
        else:
            first[ident] = key
    return alias


def ties_by_identity(module: torch.nn.Module, prefix: str = "") -> dict[str, str]:
    """State-dict keys of ``module`` that are the same Parameter object -> first key."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.nn.Parameter):
            continue
        if id(value) in first:
            alias[prefix + key] = prefix + first[id(value)]
        else:
            first[id(value)] = key
    return alias


def sources(node: Node) -> list[str]:
    """The input keys ``node`` is made of (through every transform), each once, in input order."""
    out: list[str] = []
    seen: set[int] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, Source) and cur.key not in out:
            out.append(cur.key)
        stack.extend(reversed(cur.inputs))
    return out


def kinds_forward(
    entries: Mapping[str, Node], old: Layout, known: Mapping[str, str]
) -> dict[str, tuple[str, bool]]:
    """New entries' kinds from their sources': made of a parameter -> a parameter.

    ``known`` (e.g. the model's kinds) wins. Entries with no source are left out.
    """
    out: dict[str, tuple[str, bool]] = {}
    for key, node in entries.items():
        if key in known:
            out[key] = (known[key], True)
            continue
        srcs = [s for s in sources(node) if s in old.kinds]
        if not srcs or node.spec is None:
            continue
        kinds = [old.kinds[s] for s in srcs]
        sure = not any(s in old.guessed for s in srcs)
        if "param" in kinds:
            out[key] = ("param", sure)
        elif all(k == "buffer" for k in kinds):
            out[key] = ("buffer", sure)
    return out


def kinds_backward(entries: Mapping[str, Node], new_kinds: Mapping[str, str]) -> dict[str, str]:
    """Old keys' kinds from the outputs made of them (a parameter's sources were parameters)."""
    out: dict[str, str] = {}
    for key, node in entries.items():
        kind = new_kinds.get(key)
        if kind not in ("param", "buffer"):
            continue
        for src in sources(node):
            if out.get(src) != "param":
                out[src] = kind
    return out
