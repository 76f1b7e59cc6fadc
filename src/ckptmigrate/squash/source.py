"""The squashed revision as Python: its calls, written by each op's own ``render``.

Every argument must come out as source that rebuilds exactly the value the
call was made with. Plain values, dtypes and sizes do; a ``torch.nn`` module
does when its constructor call rebuilds it (autogenerate's ``module_expr``);
a function does when it can be imported by name from a module that is not a
revision script. Anything else (a lambda, a function defined in the revision
file, a custom module, a tensor) cannot be written down faithfully, and the
squash is refused naming the revision and the call, instead of writing
something that would compute other values.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..autogenerate.compare import module_expr
from ..autogenerate.render import literal as plain_literal
from ..errors import CommandError
from ..operations.registry import OpCall, operation
from .calls import Call
from .floats import CONVERTED_FROM

_REVISION_MODULES = "ckptmigrate_rev_"  # what revision files are imported as


class Unwritable(Exception):
    """An argument that no source text rebuilds; ``what`` completes "cannot write ..."."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class Source:
    """Renders calls, remembering the imports they need."""

    def __init__(self) -> None:
        self.imports: dict[str, None] = {}

    def literal(self, value: Any) -> str:
        if isinstance(value, bool) or value is None or isinstance(value, int):
            return repr(value)
        if isinstance(value, float):
            return _float(value)
        if isinstance(value, str):
            return plain_literal(value)
        if isinstance(value, torch.dtype):
            self.imports["import torch"] = None
            return plain_literal(value)
        if isinstance(value, torch.Size):
            return self.literal(tuple(value))
        if isinstance(value, tuple):
            inner = ", ".join(self.literal(v) for v in value)
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        if isinstance(value, list):
            return "[" + ", ".join(self.literal(v) for v in value) + "]"
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return (
                "{"
                + ", ".join(f"{plain_literal(k)}: {self.literal(v)}" for k, v in value.items())
                + "}"
            )
        if isinstance(value, torch.nn.Module):
            return self._module(value)
        if isinstance(value, torch.Tensor):
            raise Unwritable(f"a tensor argument ({list(value.shape)} {value.dtype})")
        if callable(value):
            return self._function(value)
        raise Unwritable(f"an argument of type {type(value).__name__}")

    def _module(self, module: torch.nn.Module) -> str:
        original = getattr(module, CONVERTED_FROM, None)
        if isinstance(original, torch.nn.Module):  # pinned to a dtype (see .floats)
            dtypes = {v.dtype for v in module.state_dict().values() if isinstance(v, torch.Tensor)}
            return f"{self._module(original)}.to({self.literal(dtypes.pop())})"
        expr = module_expr(module)
        if expr is None:
            raise Unwritable(
                f"the {type(module).__qualname__} module: only torch.nn modules whose "
                "constructor call rebuilds them can be written as source"
            )
        self.imports["import torch"] = None
        return expr

    def _function(self, fn: Any) -> str:
        module = getattr(fn, "__module__", None)
        shown = getattr(fn, "__name__", type(fn).__name__)
        if (
            not isinstance(module, str)
            or module.startswith(_REVISION_MODULES)
            or module == "__main__"
        ):
            raise Unwritable(
                f"the function {shown!r}: a lambda or a function defined in a revision "
                "script cannot be imported by name"
            )
        # a builtin's qualified name may be an implementation detail (torch.neg is
        # torch._VariableFunctionsClass.neg): the plain name in its module counts too
        for name in (getattr(fn, "__qualname__", None), getattr(fn, "__name__", None)):
            if isinstance(name, str) and "<" not in name and _imported(module, name) is fn:
                self.imports[f"import {module}"] = None
                return f"{module}.{name}"
        raise Unwritable(
            f"the function {shown!r}: a lambda, a local function or one defined in a revision "
            "script cannot be imported by name"
        )

    def call(self, call: OpCall) -> str:
        """``op.<name>(...)`` with arguments left at their defaults left out."""
        sig = operation(call.name).signature
        shown = {
            k: v
            for k, v in call.kwargs.items()
            if k not in sig.parameters or not _is_default(sig.parameters[k], v)
        }
        return operation(call.name).render(OpCall(call.name, call.args, shown), self.literal)

    def body(self, calls: Sequence[Call], *, blocks: bool) -> list[str]:
        """Lines of a function body; with ``blocks``, calls that draw new values sit in
        ``with op.seeds_of(<their revision>):``."""
        lines: list[str] = []
        current: str | None = None
        for c in calls:
            drawn = blocks and operation(c.name).draws(c.op)
            if drawn and c.seeds != current:
                lines.append(f"with op.seeds_of({plain_literal(c.seeds)}):")
                current = c.seeds
            elif not drawn:
                current = None
            lines.append(("    " if drawn else "") + self.call(c.op))
        return lines


def writable(source: Source, calls: Sequence[Call], where: str) -> None:
    """Refuse (naming the revision and call) when some call cannot be written as source."""
    for c in calls:
        try:
            source.call(c.op)
        except Unwritable as exc:
            raise CommandError(
                f"cannot squash {where}: revision {c.seeds} calls op.{c.name} with {exc.what}, "
                "which cannot be written into a squashed revision",
                hint=f"squash the ranges before and after {c.seeds}, or give op.{c.name} a "
                "function importable by name (e.g. from your package)",
            ) from None


def _imported(module: str, name: str) -> Any:
    try:
        found: Any = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return found


def _float(value: float) -> str:
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(value)


def _is_default(param: inspect.Parameter, value: object) -> bool:
    if param.default is param.empty:
        return False
    if type(value) is not type(param.default):
        return False
    try:
        return bool(value == param.default)
    except Exception:  # a value whose == is not a plain truth
        return False
