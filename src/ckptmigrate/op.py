"""The operations a revision script calls: ``from ckptmigrate import op``.

Keys are relative to the state dict being migrated, after wrapper prefixes
(``module.``, ``_orig_mod.``) were stripped. A *prefix* is a plain string
prefix of keys, its dot included (``"encoder.layers."``). Each call checks its
preconditions and records a step in the plan; no tensor data is touched until
the output is written.

Every function here is generated from the op's definition in the registry
(:mod:`ckptmigrate.operations`), with its signature and docstring, so the two
cannot drift apart. They are built when a script first uses one: importing
this module imports no torch, so graph-only commands stay fast.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .operations.context import current
from .operations.registry import OpCall

if TYPE_CHECKING:
    from .operations.registry import Operation


def _frozen(value: Any) -> Any:
    """A value as it is now: a list the script changes after the call stays as it was."""
    if isinstance(value, list):
        return [_frozen(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _as_called(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> OpCall:
    return OpCall(name, _frozen(args), {k: _frozen(v) for k, v in kwargs.items()})


class _Default:
    """Stands for a parameter's default in generated source (the value is bound by name)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _forward(p: inspect.Parameter) -> str:
    if p.kind is p.VAR_POSITIONAL:
        return "*" + p.name
    if p.kind is p.KEYWORD_ONLY:
        return f"{p.name}={p.name}"
    if p.kind is p.VAR_KEYWORD:
        return "**" + p.name
    return p.name


def _op_function(definition: Operation) -> Callable[..., Any]:
    """``op.<name>``: a plain function with the definition's signature and docstring.

    It is generated as source (as :mod:`dataclasses` generates ``__init__``) so
    that a wrong call fails as a hand-written function's would, naming
    ``<name>()``, and a right one costs one extra call.
    """
    sig = definition.signature
    params = list(sig.parameters.values())
    if any(p.name.startswith("_") for p in params):
        raise TypeError(f"op {definition.name!r}: public parameter names may not start with '_'")
    defaults = {f"_default_{p.name}": p.default for p in params if p.default is not p.empty}
    bare = sig.replace(
        parameters=[
            p.replace(
                annotation=p.empty,
                default=_Default(f"_default_{p.name}") if p.default is not p.empty else p.empty,
            )
            for p in params
        ],
        return_annotation=sig.empty,
    )
    name = definition.name
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = [f"{p.name!r}: {p.name}" for p in params if p.kind is p.KEYWORD_ONLY]
    keywords += [f"**{p.name}" for p in params if p.kind is p.VAR_KEYWORD]
    star = [f"*{p.name}" for p in params if p.kind is p.VAR_POSITIONAL]
    given = ", ".join([*positional, *star]) + ("," if positional or star else "")
    as_called = f"_as_called({name!r}, ({given}), {{{', '.join(keywords)}}})"
    source = (
        f"def {name}{bare}:\n"
        f"    _ctx = _current({name!r})\n"
        f"    _ctx.calling({as_called})\n"
        f"    return _record(_ctx, {', '.join(map(_forward, params))})\n"
    )
    namespace: dict[str, Any] = {
        "_record": definition.record,
        "_current": current,
        "_as_called": _as_called,
        **defaults,
    }
    exec(compile(source, f"<op.{name}>", "exec"), namespace)
    fn: Callable[..., Any] = namespace[name]
    fn.__signature__ = sig  # type: ignore[attr-defined]
    fn.__doc__ = definition.doc
    fn.__module__ = "ckptmigrate.op"
    fn.__qualname__ = name
    fn.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
    if sig.return_annotation is not sig.empty:
        fn.__annotations__["return"] = sig.return_annotation
    return fn


_public: dict[str, Callable[..., Any]] = {}


def _functions() -> Mapping[str, Callable[..., Any]]:
    """Every op's function, built once and bound as a module attribute (later lookups are free)."""
    if not _public:
        from .operations.registry import operations

        _public.update({name: _op_function(d) for name, d in operations().items()})
        globals().update(_public)
    return _public


def __getattr__(name: str) -> Any:
    if name == "__all__":
        return sorted(_functions())
    if name.startswith("__"):  # tools probing for dunders must not import torch
        raise AttributeError(name)
    try:
        return _functions()[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    """The ops (and the module's dunders), not the helpers that build them."""
    return sorted({*(n for n in globals() if n.startswith("__")), *_functions()})
