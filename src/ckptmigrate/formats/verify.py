"""Check a written checkpoint against the plan before trusting it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import UnsafeCheckpointError, WriteError
from ..plan.state import PlanState


def verify_written(
    path: Path,
    target: Path,
    full: PlanState,
    lineage: PlanState,
    key_prefix: str,
    revisions: tuple[str, ...] | None,
    state_dict_key: str | None,
    wrapper_prefix: str = "",
) -> None:
    """The file at ``path`` has exactly the planned keys, shapes, dtypes and stamp.

    Runs on the temporary file, before it replaces ``target``. Keys are
    compared as written, ``wrapper_prefix`` (kept on request) included.
    """
    from . import read_checkpoint

    try:
        ckpt = read_checkpoint(path, state_dict_key=state_dict_key)
    except UnsafeCheckpointError:
        # The input was read with --trust-pickle and holds objects outside the
        # allow-list, so the output does too: check its structure without
        # running any of them (they become inert stand-ins).
        from .torch_file import read_torch

        ckpt = read_torch(path, state_dict_key=state_dict_key, opaque=True)
    try:
        got = {ckpt.wrapper_prefix + k: spec for k, spec in ckpt.schema.items()}
        _same(target, got, {wrapper_prefix + k: spec for k, spec in full.schema().items()})
        focused = ckpt.focus(key_prefix) if lineage.entries else ckpt
        stamped = focused.stamp.revisions if focused.stamp else None
        if stamped != revisions:
            raise WriteError(
                f"{target} records {stamped} after writing, expected {revisions}",
                hint="this is a bug in ckptmigrate; please report it; the input is unchanged",
            )
    finally:
        ckpt.close()


def _same(target: Path, got: Mapping[str, object], want: Mapping[str, object]) -> None:
    if list(got) != list(want) or any(got[k] != want[k] for k in want):
        missing = [k for k in want if k not in got]
        extra = [k for k in got if k not in want]
        changed = [k for k in want if k in got and got[k] != want[k]]
        raise WriteError(
            f"{target} does not match the migration plan after writing "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, changed {changed[:3]})",
            hint="this is a bug in ckptmigrate; please report it; the input is unchanged",
        )
