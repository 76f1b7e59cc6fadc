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

from collections.abc import Callable, Mapping
from typing import Any


def _functions() -> Mapping[str, Callable[..., Any]]:
    """Every op's function, also bound as a module attribute (later lookups cost nothing)."""
    from .operations.registry import public_functions

    functions = public_functions()
    globals().update(functions)
    return functions


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
    return sorted({*globals(), *_functions()})
