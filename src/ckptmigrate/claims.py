"""A revision claimed for a checkpoint is checked against its schema, not trusted.

Claims are ``--from REV``, the revision ``stamp`` is asked to record, the stamp
a file carries (a stamp can lie: written by hand, by an old script, or with
``--force``), and the stamp a migration is about to write on its result. Each
is compared with the schema at that revision, computed from the lineage's base
schema, with the matching of ``identify.py`` (so an fp16 copy fits its
revision). A mismatch is a :class:`ClaimError` that names the difference and
the revision the file does match; ``force`` turns it into a warning. Without
a base schema nothing can be checked; that is said only where it matters,
when an unstamped file needs identifying.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .config import Config
from .errors import ClaimError
from .formats.checkpoint import Checkpoint
from .identify import Fit, Observed, fit_at, matches
from .paths import display_path
from .plan.state import PlanState
from .script.directory import ScriptDirectory
from .script.revision import format_ids

#: Who made the claim that a checkpoint is at some revision.
FROM, STAMP, STAMPED = "--from", "stamp", "its stamp"


def check_start(
    config: Config,
    script_dir: ScriptDirectory,
    ckpt: Checkpoint,
    heads: Sequence[str],
    *,
    claimed_by: str,
    force: bool = False,
) -> None:
    """The checkpoint is at ``heads``, as ``claimed_by`` (FROM, STAMP or STAMPED) says."""
    where = display_path(ckpt.path)
    ids = format_ids(heads) or "base"
    have = Observed(ckpt.schema, ckpt.metadata)
    fit = fit_at(script_dir, have, heads)
    if fit is None or fit.exact:
        return  # no base schema: nothing to check against, and nothing asked for one
    what = (
        f"{where} is stamped at {ids}, but it is not at {ids}"
        if claimed_by == STAMPED
        else f"{where} is not at {ids}"
    )

    def fix(rev: str) -> str:
        if claimed_by == STAMP:
            return f"stamp it with 'ckptmigrate stamp {where} {rev}'"
        return f"pass --from {rev}"

    _refuse(config, what, ids, fit, where, _matching(script_dir, have), fix, force)


def check_result(
    config: Config,
    script_dir: ScriptDirectory,
    state: PlanState,
    heads: Sequence[str],
    *,
    where: str,
    start: Sequence[str],
    force: bool = False,
) -> None:
    """What a migration is about to write fits the schema at ``heads``, the stamp it gets."""
    fit = fit_at(script_dir, Observed(state.schema(), state.metadata), heads)
    if fit is None or fit.exact:
        return
    ids = format_ids(heads) or "base"
    message = (
        f"the result for {where} would be stamped at {ids}, but its keys, shapes and dtypes "
        f"differ from the schema at {ids} ({fit.detail})"
    )
    if force:
        config.log(f"Warning: --force: {message}; writing it anyway")
        return
    raise ClaimError(
        message,
        hint="nothing was written: a revision script between "
        f"{format_ids(start) or 'base'} and {ids} made something else from the real tensors "
        "than from their shapes (does it depend on more than keys, shapes and dtypes?); "
        "--force writes it anyway",
    )


def _matching(script_dir: ScriptDirectory, have: Observed) -> list[tuple[str, str]]:
    """(revision, how it matched) for each revision the checkpoint's schema is."""
    found = matches(script_dir, have) or []
    return [(c.name, c.name + c.fit.as_dtype) for c in found]


def _refuse(
    config: Config,
    what: str,
    ids: str,
    fit: Fit,
    where: str,
    found: list[tuple[str, str]],
    fix: Callable[[str], str],
    force: bool,
) -> None:
    message = f"{what}: its keys, shapes and dtypes differ from the schema at {ids} ({fit.detail})"
    if len(found) == 1:
        message += f"; it matches {found[0][1]}"
        hint = f"{fix(found[0][0])} (or --force if you are sure)"
    elif found:
        message += f"; it matches {', '.join(f for _, f in found)} (same schema)"
        hint = f"{fix('REV')} with the right one (or --force if you are sure)"
    else:
        message += "; it matches no revision's schema"
        hint = f"see 'ckptmigrate diff {where}' (or --force if you are sure)"
    if force:
        config.log(f"Warning: --force: {message}; going ahead")
        return
    raise ClaimError(message, hint=hint)
