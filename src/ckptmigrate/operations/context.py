"""Which migration an ``op`` call belongs to (no torch import here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ..errors import CkptMigrateError

if TYPE_CHECKING:
    from .checks import OpContext

_active: ContextVar[OpContext | None] = ContextVar("ckptmigrate_operations", default=None)


@contextmanager
def activate(ops: OpContext) -> Iterator[OpContext]:
    token = _active.set(ops)
    try:
        yield ops
    finally:
        _active.reset(token)


def current(name: str) -> OpContext:
    ops = _active.get()
    if ops is None:
        raise CkptMigrateError(
            f"op.{name}() was called outside a migration",
            hint="op functions work only inside a revision's upgrade()/downgrade() "
            "while ckptmigrate runs it",
        )
    return ops
