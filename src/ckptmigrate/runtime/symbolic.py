"""Migrations run on shapes alone: the schema at any revision, and round trips.

The lineage's base schema is pushed through the revision scripts with the
plan kept symbolic (and modules built on the meta device), so computing the
schema of every revision of a long history costs no tensor memory at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CkptMigrateError, ConfigError
from ..paths import display_path
from ..plan.discards import Discard, find_discards
from ..plan.state import PlanState
from ..schema import Entry, Schema, base_schema_path, read_base_schema
from ..script.directory import Script, ScriptDirectory
from .migration import MigrationStep, run_step, run_steps


def load_base_schema(script_dir: ScriptDirectory, *, hint: str | None = None) -> Schema:
    """The recorded base schema; ``hint`` says how to record it when it is missing."""
    base = read_base_schema(script_dir.dir)
    if base is None:
        raise ConfigError(
            "no base schema recorded for this lineage "
            f"({display_path(base_schema_path(script_dir.dir))})",
            hint=hint
            or "record it with 'ckptmigrate schema --record' (from the configured model) or "
            "'ckptmigrate schema --record CKPT --from REV' (from a checkpoint at revision REV)",
        )
    return base


def _initial_state(base: Schema) -> PlanState:
    return PlanState.from_schema(base.specs())


def schema_of(state: PlanState, base: Schema) -> Schema:
    """The schema a plan produces; kinds carried over from the base where known."""
    out = Schema()
    for key, node in state.entries.items():
        kind = "tensor" if node.spec is not None else "object"
        src = getattr(node, "key", None)
        if isinstance(src, str) and src in base:
            kind = base[src].kind
        out[key] = Entry(node.spec, kind)
    return out


def state_at(script_dir: ScriptDirectory, base: Schema, heads: Sequence[str]) -> PlanState:
    """The plan after upgrading the base schema to exactly ``heads``."""
    from .migration import upgrade_steps

    rmap = script_dir.revision_map
    state = _initial_state(base)
    current: tuple[str, ...] = ()
    for head in heads:
        steps = upgrade_steps(script_dir, current, head)
        current = run_steps(steps, state, current, rmap, symbolic=True)
    return state


def schema_at(script_dir: ScriptDirectory, base: Schema, heads: Sequence[str]) -> Schema:
    """The schema after upgrading ``base`` to ``heads``.

    Remembered for as long as ``script_dir`` lives (its revisions are read
    once too): a batch checks every checkpoint against the same few schemas.
    """
    memo = _memo(script_dir)
    key = (_content(base), tuple(heads))
    found = memo.get(key)
    if found is None:
        found = memo[key] = schema_of(state_at(script_dir, base, heads), base)
    return Schema(found)  # a copy: callers may change theirs


_MEMO: weakref.WeakKeyDictionary[ScriptDirectory, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _memo(script_dir: ScriptDirectory) -> dict[Any, Any]:
    return _MEMO.setdefault(script_dir, {})


def _content(schema: Schema) -> tuple[Any, ...]:
    return tuple((k, e.spec, e.kind) for k, e in schema.items())


def base_of(script_dir: ScriptDirectory, schema: Schema, heads: Sequence[str]) -> Schema:
    """The base schema implied by ``schema`` at ``heads``: every downgrade run to base.

    The inverse of :func:`schema_at`, for recording a lineage's base schema
    from a checkpoint or a model whose revision is known.
    """
    from .migration import downgrade_steps

    state = _initial_state(schema)
    if heads:
        steps = downgrade_steps(script_dir, heads, "base")
        run_steps(steps, state, heads, script_dir.revision_map, symbolic=True)
    return schema_of(state, schema)


@dataclass
class RevisionSchema:
    script: Script
    schema: Schema


def revision_schemas(script_dir: ScriptDirectory, base: Schema) -> list[RevisionSchema]:
    """:func:`iter_revision_schemas` as a list, remembered as :func:`schema_at` remembers."""
    memo = _memo(script_dir)
    key = ("every revision", _content(base))
    found = memo.get(key)
    if found is None:
        found = memo[key] = list(iter_revision_schemas(script_dir, base))
    return [RevisionSchema(item.script, Schema(item.schema)) for item in found]


def iter_revision_schemas(script_dir: ScriptDirectory, base: Schema) -> Iterator[RevisionSchema]:
    """The schema at every revision (that revision and its ancestors applied).

    Walks the graph oldest first, deriving each single-parent revision from
    its parent's state and freeing a state once all its children are done, so
    memory follows the width of the graph, not its length.
    """
    rmap = script_dir.revision_map
    order: list[Script] = list(reversed(rmap.walk()))  # type: ignore[arg-type]
    children_left = {s.revision: len(s.all_nextrev) for s in order}
    states: dict[str, PlanState] = {}
    for script in order:
        parents = script.normalized_down_revisions
        if len(parents) <= 1 and parents == script.down_revisions:
            start = states[parents[0]].copy() if parents else _initial_state(base)
            run_step(MigrationStep(script, True), start, symbolic=True)
            state = start
        else:
            state = state_at(script_dir, base, (script.revision,))
        for p in parents:
            if p in children_left:
                children_left[p] -= 1
                if children_left[p] <= 0:
                    states.pop(p, None)
        if children_left[script.revision] > 0:
            states[script.revision] = state
        yield RevisionSchema(script, schema_of(state, base))


@dataclass
class RevisionAudit:
    """What ``check`` learns about one revision from running it on shapes."""

    script: Script
    round_trip: str | None = None  # why downgrade() does not undo upgrade(), if it does not
    discards: list[Discard] = field(default_factory=list)  # trained values upgrade() loses


def audit_revisions(
    script_dir: ScriptDirectory, base: Schema, *, round_trips: bool = True
) -> list[RevisionAudit]:
    """Every revision, oldest first: what its upgrade() throws away, and its round trip.

    Each upgrade starts from the schema its parents produce, as fresh source
    tensors, so the plan tells which of *its* inputs no output keeps.
    """
    rmap = script_dir.revision_map
    audits: list[RevisionAudit] = []
    for script in reversed(rmap.walk()):
        assert isinstance(script, Script)
        audit = RevisionAudit(script)
        audits.append(audit)
        try:
            expected = schema_of(state_at(script_dir, base, script.normalized_down_revisions), base)
            state = PlanState.from_schema(expected.specs())
            run_step(MigrationStep(script, True), state, symbolic=True)
            audit.discards = find_discards(expected.specs(), state)
            if round_trips:
                run_step(MigrationStep(script, False), state, symbolic=True)
        except CkptMigrateError as exc:
            audit.round_trip = exc.one_line()
            continue
        got = schema_of(state, expected) if round_trips else expected
        if not got.same_layout(expected):
            audit.round_trip = _round_trip_difference(got, expected)
    return audits


def _round_trip_difference(got: Schema, expected: Schema) -> str:
    from ..schema import compare

    diff = compare(got, expected)
    detail = []
    if diff.missing:
        detail.append("downgrade loses " + ", ".join(diff.missing[:5]))
    if diff.unexpected:
        detail.append("downgrade leaves " + ", ".join(diff.unexpected[:5]))
    if diff.mismatched:
        detail.append(
            "downgrade changes "
            + ", ".join(f"{k} ({got[k]} != {expected[k]})" for k in diff.mismatched[:5])
        )
    return "; ".join(detail)
