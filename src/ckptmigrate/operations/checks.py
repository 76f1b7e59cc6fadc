"""What every op's ``record`` shares: the plan it rewrites and the precondition checks.

Nothing here reads or writes tensor data. Every check failure names the
revision, the script's file and line, the key, and the nearest keys that do
exist, because the usual cause is a checkpoint that is not at the revision
the user believes, or a typo in a key.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import operator
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import OperationError
from ..paths import display_path
from ..plan.nodes import Apply, Node, TensorSpec, dtype_name, seed_for
from ..plan.state import PlanState

if TYPE_CHECKING:
    from .registry import OpCall, Operation


@dataclass
class OpRecord:
    """One op as it ran, for ``--dry-run`` and reports; ``name`` is the registered op.

    ``op_call`` is the call exactly as the script made it (what ``squash`` writes
    out again); ``seed_revision`` the revision its new values were drawn for.
    """

    name: str
    call: str
    results: list[tuple[str, TensorSpec | None]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    op_call: OpCall | None = None
    seed_revision: str = ""


def parse_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        candidate = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    raise TypeError(f"not a dtype: {dtype!r} (use e.g. torch.float16 or 'float16')")


def format_value(value: Any) -> str:
    """An argument as a call in a message shows it (short: a module is ``Linear(...)``)."""
    if isinstance(value, torch.dtype):
        return f"torch.{dtype_name(value)}"
    if isinstance(value, torch.nn.Module):
        return type(value).__name__ + "(...)"
    if callable(value):
        return getattr(value, "__name__", "fn")
    if isinstance(value, tuple):
        inner = ", ".join(map(format_value, value))
        return "(" + inner + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(map(format_value, value)) + "]"
    return repr(value)


def _uniform_floating_dtype(nodes: Iterable[Node]) -> torch.dtype | None:
    """The dtype all floating tensors among ``nodes`` share; None when none or several."""
    found: torch.dtype | None = None
    for node in nodes:
        spec = node.spec
        if spec is None or not spec.dtype.is_floating_point:
            continue
        if found is not None and spec.dtype != found:
            return None
        found = spec.dtype
    return found


def _is_default(param: inspect.Parameter, value: object) -> bool:
    if param.default is param.empty:
        return False
    try:
        return value is param.default or bool(value == param.default)
    except Exception:  # a value whose == is not a plain truth (a tensor, say)
        return False


class OpContext:
    """One revision's run over one plan: what ``op`` calls rewrite, and their checks."""

    def __init__(
        self,
        state: PlanState,
        *,
        revision: str,
        direction: str = "upgrade",
        path: Path | None = None,
        records: list[OpRecord] | None = None,
    ) -> None:
        self.state = state
        self.revision = revision
        #: Whose random numbers new values get: the revision, or inside ``op.seeds_of``
        #: (a squashed revision) the revision that drew them originally.
        self.seed_revision = revision
        self.rng_states: dict[str, torch.Tensor] = {}
        self._calling: OpCall | None = None
        self.direction = direction
        self.path = path
        self.records = records if records is not None else []
        self._at_start = list(state.entries.values())

    @functools.cached_property
    def new_float(self) -> torch.dtype:
        """The dtype of new tensors for which a script names none: the checkpoint's own
        floating dtype as the step found it, so an fp16 file stays fp16 (looked up only
        by steps that make tensors)."""
        return _uniform_floating_dtype(self._at_start) or torch.float32

    def calling(self, call: OpCall) -> None:
        """The op about to record, as the script called it (see :class:`OpRecord`)."""
        self._calling = call

    # ------------------------------------------------------------------ failing

    def call(self, op: Operation, *args: Any, **kwargs: Any) -> str:
        """A call of ``op`` as messages and ``--dry-run`` show it: ``rename_key('a', 'b')``.

        Keyword arguments left at their default are not shown, as a person
        would not write them.
        """
        parts = [format_value(a) for a in args]
        if kwargs:
            params = op.signature.parameters
            parts += [
                f"{k}={format_value(v)}"
                for k, v in kwargs.items()
                if k not in params or not _is_default(params[k], v)
            ]
        return f"{op.name}({', '.join(parts)})"

    def location(self) -> str | None:
        """The script's file and the line running now (the innermost frame in it)."""
        if self.path is None:
            return None
        target = str(self.path)
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename == target:
                return f"{display_path(self.path)}, line {frame.f_lineno}"
            frame = frame.f_back  # type: ignore[assignment]
        return display_path(self.path)

    def nearest(self, key: str, pool: Iterable[str] | None = None) -> list[str]:
        keys = list(self.state.entries if pool is None else pool)
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        if close:
            return close

        def common(k: str) -> int:
            n = 0
            for a, b in zip(k, key):
                if a != b:
                    break
                n += 1
            return n

        return sorted(keys, key=lambda k: (-common(k), k))[:3]

    def fail(
        self, call: str, problem: str, *, near: str | None = None, hint: str | None = None
    ) -> OperationError:
        nearest = self.nearest(near) if near is not None else []
        if near is not None and not self.state.entries:
            problem += " (the state dict has no keys left)"
        return OperationError(
            f"{call}: {problem}",
            revision=self.revision,
            location=self.location(),
            nearest=nearest,
            hint=hint,
        )

    # ------------------------------------------------------------------ preconditions

    def need(self, call: str, key: Any, *, tensor: bool = True) -> Node:
        """The node at ``key``, which must exist (and be a tensor unless told otherwise)."""
        if not isinstance(key, str):
            raise self.fail(call, f"keys are strings, not {type(key).__name__}")
        node = self.state.entries.get(key)
        if node is None:
            raise self.fail(call, f"key {key!r} does not exist", near=key)
        if tensor and node.spec is None:
            raise self.fail(call, f"{key!r} is not a tensor")
        return node

    def spec(self, call: str, key: Any) -> TensorSpec:
        """The shape and dtype of the tensor at ``key``, which must exist."""
        spec = self.need(call, key).spec
        assert spec is not None
        return spec

    def free(self, call: str, key: Any, *, allowed: Iterable[str] = ()) -> None:
        """``key`` must be a name no entry has (except those in ``allowed``)."""
        if not isinstance(key, str) or not key:
            raise self.fail(call, f"a key must be a non-empty string, not {key!r}")
        if key in self.state.entries and key not in set(allowed):
            raise self.fail(
                call,
                f"key {key!r} already exists",
                hint="drop or rename it first, or choose another name",
            )

    def joined(self, call: str, keys: Sequence[str], into: Any, *, verb: str) -> list[Node]:
        """The nodes of ``keys``, which ``verb`` joins into ``into`` (free, or one of them)."""
        if not keys:
            raise self.fail(call, f"give at least one key to {verb}")
        if len(set(keys)) != len(keys):
            raise self.fail(call, "a key is listed twice")
        nodes = [self.need(call, k) for k in keys]
        self.free(call, into, allowed=keys)
        return nodes

    def distinct(self, call: str, keys: Sequence[str], what: str) -> None:
        """``keys`` (named ``what`` in messages, e.g. ``into=``) are at least one, none twice."""
        if len(keys) < 1:
            raise self.fail(call, f"{what} needs at least one key")
        if len(set(keys)) != len(keys):
            raise self.fail(call, f"{what} names a key twice")

    def dims(self, call: str, shape: Any) -> list[int]:
        """Sizes as ints; a float such as 2.5 is refused rather than silently truncated."""
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        try:
            if isinstance(shape, (str, bytes)) or any(isinstance(d, bool) for d in shape):
                raise TypeError
            return [operator.index(d) for d in shape]
        except TypeError:
            raise self.fail(call, f"shape must be a tuple of ints, not {shape!r}") from None

    def shape(self, call: str, shape: Any) -> tuple[int, ...]:
        dims = tuple(self.dims(call, shape))
        if any(d < 0 for d in dims):
            raise self.fail(call, f"shape {list(dims)} has a negative size")
        return dims

    def dtype(self, call: str, dtype: Any) -> torch.dtype:
        try:
            return parse_dtype(dtype)
        except TypeError as exc:
            raise self.fail(call, str(exc)) from None

    def dim(self, call: str, dim: Any, ndim: int) -> int:
        """``dim`` normalised to 0..ndim-1 (negative dims count from the end)."""
        if not isinstance(dim, int) or not -ndim <= dim < max(ndim, 1):
            raise self.fail(call, f"dim {dim!r} is out of range for a {ndim}-D tensor")
        return dim % ndim if ndim else 0

    def intended(self, call: str, intended: Any) -> bool:
        if not isinstance(intended, bool):
            raise self.fail(call, f"intended= is True or False, not {intended!r}")
        return intended

    # ------------------------------------------------------------------ rewriting the plan

    def done(
        self, op: Operation, call: str, results: Iterable[str] = (), removed: Iterable[str] = ()
    ) -> None:
        """Record that ``op`` ran: the keys it produced (with their specs) and removed."""
        as_called = self._calling if self._calling and self._calling.name == op.name else None
        entries = self.state.entries
        self.records.append(
            OpRecord(
                op.name,
                call,
                [(k, entries[k].spec) for k in results],
                list(removed),
                as_called,
                self.seed_revision,
            )
        )
        self._calling = None

    def transform(
        self, op: Operation, call: str, key: str, spec: TensorSpec, **params: Any
    ) -> None:
        """Replace the tensor at ``key`` by ``op``'s node over it, and record the call."""
        node = self.need(call, key)
        self.state.entries[key] = Apply(op, (node,), params, spec)
        self.done(op, call, [key])

    def splice(self, at: str, items: Sequence[tuple[str, Node]], remove: Iterable[str]) -> None:
        """Replace ``at`` by ``items`` in place; drop ``remove`` (and ``at``)."""
        gone = set(remove) | {at}
        out: dict[str, Node] = {}
        for k, v in self.state.entries.items():
            if k == at:
                out.update(items)
            elif k not in gone:
                out[k] = v
        self.state.entries = out

    def seed(self, key: str, purpose: str = "") -> int:
        """A seed for ``key``'s new values: same revision, direction and key, same numbers."""
        return seed_for(self.seed_revision, self.direction, key, purpose)
