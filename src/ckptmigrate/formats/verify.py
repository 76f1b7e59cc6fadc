"""Check a written checkpoint against the plan before trusting it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import WriteError
from .stamp import read_stamp

if TYPE_CHECKING:
    from ..plan.state import PlanState
    from .checkpoint import Checkpoint
    from .storage import CkptPath


def verify_written(
    written: Checkpoint,
    target: CkptPath,
    full: PlanState,
    metadata: Mapping[str, Mapping[str, Any]],
    key_prefix: str,
    wrapper_prefix: str = "",
) -> None:
    """The file just read back as ``written`` has exactly the planned keys, shapes, dtypes, stamp.

    Runs on the temporary file, before it replaces ``target`` (and closes it).
    Keys are compared as written, ``wrapper_prefix`` (kept on request)
    included; the stamp is the one ``metadata`` plans for the lineage at
    ``key_prefix``.
    """
    try:
        got = {written.wrapper_prefix + k: spec for k, spec in written.schema.items()}
        _same(target, got, {wrapper_prefix + k: spec for k, spec in full.schema().items()})
        root = key_prefix[:-1]
        planned = read_stamp(metadata.get(root), str(target))
        found = read_stamp(written.metadata.get(root), str(target))
        expected = planned.revisions if planned else None
        stamped = found.revisions if found else None
        if stamped != expected:
            raise WriteError(
                f"{target} records {stamped} after writing, expected {expected}",
                hint="this is a bug in ckptmigrate; please report it; the input is unchanged",
            )
    finally:
        written.close()


def _same(target: CkptPath, got: Mapping[str, object], want: Mapping[str, object]) -> None:
    if list(got) != list(want) or got != want:  # equal keys in order, then equal specs
        missing = [k for k in want if k not in got]
        extra = [k for k in got if k not in want]
        changed = [k for k in want if k in got and got[k] != want[k]]
        raise WriteError(
            f"{target} does not match the migration plan after writing "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, changed {changed[:3]})",
            hint="this is a bug in ckptmigrate; please report it; the input is unchanged",
        )
