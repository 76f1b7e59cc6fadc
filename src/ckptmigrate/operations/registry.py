"""The operations registry: one first-class definition per op, found by discovery.

Everything ckptmigrate knows about an op lives in its :class:`Operation`: the
public signature ``op.<name>`` gets, how a call is checked and recorded in the
plan, the kernel that computes its result, how optimizer state follows it, and
how autogenerate writes it and its inverse. The plan, the optimizer-state pass,
``check`` and autogenerate all ask the definition instead of testing names, so
adding an op is one module in :mod:`ckptmigrate.operations.library` (which
registers its classes with :func:`register`) plus its tests.

This module imports no torch; ``ckptmigrate.op`` builds its functions from
the definitions only when a script first uses one.
"""

from __future__ import annotations

import importlib
import inspect
import keyword
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    import torch

    from ..plan.lowrank import LowRank
    from ..plan.nodes import TensorSpec
    from .checks import OpContext


@dataclass(frozen=True)
class OpCall:
    """An op call as autogenerate writes it: ``op.<name>(*args, **kwargs)``."""

    name: str
    args: tuple[object, ...] = ()
    kwargs: Mapping[str, object] = field(default_factory=dict)


class CannotFollowState(Exception):
    """Raised by :meth:`Operation.follow_state` when an op says nothing about optimizer state.

    ``reason`` completes "cannot follow <op>: ..."; the optimizer-state pass
    adds which tensor, which optimizer and the fix.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Which slice of its input a node keeps: (dim, start, length).
Part = tuple[int, int, int]
#: A key's shape and dtype before a call ran (None: not a tensor).
SpecOf = Callable[[str], "TensorSpec | None"]


class Operation:
    """One op a revision script can call, with everything about it in one place.

    A subclass sets ``name`` and defines ``record(self, ctx, ...)``: the
    parameters after ``ctx`` are the public signature of ``op.<name>``, and
    the class docstring is its help text. ``record`` checks the call's
    preconditions (failing through ``ctx.fail``), rewrites ``ctx.state`` and
    calls ``ctx.done``; the nodes it adds to the plan are ``Apply(self, ...)``
    and are computed by :meth:`kernel`.
    """

    name: ClassVar[str]
    #: False for ops that only move, remove or inspect entries: a plan made of them
    #: computes no tensor bytes, so a format that can (DCP) rewrites only metadata.
    touches_data: ClassVar[bool] = True
    #: How plan descriptions (errors, reports) name this op's nodes; default ``name``.
    label: ClassVar[str] = ""

    def record(self, ctx: OpContext, /, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ plan nodes

    # ``kernel`` and ``follow_state`` take the parameters ``record`` fixed in the node by
    # keyword; a subclass names the ones it has (``*_`` lets it, for type checkers).

    def kernel(self, args: Sequence[torch.Tensor], /, *_: Any, **params: Any) -> torch.Tensor:
        """The real computation of a node this op added, from its inputs' values."""
        raise NotImplementedError(f"{self.name} adds no nodes to compute")

    def follow_state(self, args: Sequence[torch.Tensor], /, *_: Any, **params: Any) -> torch.Tensor:
        """How a state tensor shaped like the parameter (Adam's moments) follows it.

        By default exactly as the weights do; an op whose new values are not a
        rearrangement of the old ones overrides this (or raises
        :class:`CannotFollowState`).
        """
        return self.kernel(args, **params)

    def part_kept(self, params: Mapping[str, Any]) -> Part | None:
        """The slice of its single input a node keeps, when it keeps only part of it.

        ``check`` adds up the parts of an input that some output keeps, to find
        values a migration throws away (a split whose parts are not all kept).
        """
        return None

    def cut(
        self, source: TensorSpec, result: TensorSpec, params: Mapping[str, Any]
    ) -> tuple[int, str] | None:
        """(values lost, how) when a node itself throws away part of its input (a shrink)."""
        return None

    def node_label(self) -> str:
        return self.label or self.name

    def low_rank(
        self,
        parts: Sequence[LowRank | None],
        inputs: Sequence[TensorSpec],
        result: TensorSpec,
        /,
        *_: Any,
        **params: Any,
    ) -> LowRank | None:
        """The exact counterpart of a node on a LoRA adapter's factors.

        ``parts`` are the low-rank deltas the adapter adds to the node's inputs
        (None: that input has no adapter; at least one is a delta), ``inputs``
        their shapes and ``result`` the node's. Returns the delta of the
        result (``scale * B @ A`` rearranged as the node rearranges the
        weight), or raises :class:`~ckptmigrate.plan.lowrank.NoExactCounterpart`
        saying why there is none; nothing is guessed.
        """
        from ..plan.lowrank import NoExactCounterpart

        raise NoExactCounterpart(
            f"{self.name} says nothing about how a low-rank delta of the weight changes"
        )

    # ------------------------------------------------------------------ autogenerate

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall] | None:
        """The calls that undo ``call``; ``before(key)`` is a key's spec before it ran.

        None when the values cannot come back (a drop) or the call alone does
        not say how; autogenerate then writes its own, marked for review.
        """
        return None

    def draws(self, call: OpCall) -> bool:
        """Whether ``call`` draws new values from the revision's seed (a random init, a module
        a script builds): ``squash`` writes such calls inside ``op.seeds_of``."""
        return False

    def render(self, call: OpCall, literal: Callable[[object], str]) -> str:
        """Python source of ``call``, checked against the public signature first."""
        try:
            self.signature.bind(*call.args, **call.kwargs)
        except TypeError as exc:
            raise ValueError(f"op.{self.name} cannot be called that way: {exc}") from None
        parts = [literal(a) for a in call.args]
        parts += [f"{k}={literal(v)}" for k, v in call.kwargs.items()]
        return f"op.{self.name}({', '.join(parts)})"

    # ------------------------------------------------------------------ the public face

    @cached_property
    def signature(self) -> inspect.Signature:
        """``record``'s signature without ``self`` and the context: what ``op.<name>`` takes."""
        sig = inspect.signature(self.record, eval_str=True)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    @property
    def doc(self) -> str:
        return inspect.cleandoc(type(self).__doc__ or "")

    def arguments(self, call: OpCall) -> dict[str, Any]:
        """``call``'s arguments by parameter name, defaults filled in."""
        bound = self.signature.bind(*call.args, **call.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def __repr__(self) -> str:
        return f"<operation {self.name}>"


_REGISTRY: dict[str, Operation] = {}
_discovered = False
_O = TypeVar("_O", bound=type[Operation])


def register(cls: _O) -> _O:
    """Class decorator: make ``cls``'s op known by its name (once)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise TypeError(f"{cls.__qualname__}.name must be a Python identifier, not {name!r}")
    if not inspect.cleandoc(cls.__dict__.get("__doc__") or ""):
        raise TypeError(f"{cls.__qualname__} needs a docstring: it is the help of op.{name}")
    if name in _REGISTRY:
        raise TypeError(f"two definitions of the op {name!r}: {_REGISTRY[name]!r} and {cls!r}")
    _REGISTRY[name] = cls()
    return cls


def _discover() -> None:
    """Import every module of the library package, so each registers its ops."""
    global _discovered
    if _discovered:
        return
    from . import library

    for found in sorted(pkgutil.iter_modules(library.__path__), key=lambda m: m.name):
        importlib.import_module(f"{library.__name__}.{found.name}")
    _discovered = True


def operations() -> Mapping[str, Operation]:
    """Every registered op by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def operation(name: str) -> Operation:
    """The definition of op ``name``; KeyError when there is none."""
    _discover()
    return _REGISTRY[name]
