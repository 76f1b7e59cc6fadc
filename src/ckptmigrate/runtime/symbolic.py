"""Migrations run on shapes alone: the schema at any revision, and round trips.

The lineage's base schema is pushed through the revision scripts with the
plan kept symbolic (and modules built on the meta device), so computing the
schema of every revision of a long history costs no tensor memory at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import CkptMigrateError, ConfigError
from ..paths import display_path
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
    return schema_of(state_at(script_dir, base, heads), base)


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
class RoundTripProblem:
    script: Script
    message: str


def check_round_trips(script_dir: ScriptDirectory, base: Schema) -> list[RoundTripProblem]:
    """Revisions whose downgrade does not give back the schema their upgrade started from."""
    rmap = script_dir.revision_map
    problems: list[RoundTripProblem] = []
    for script in reversed(rmap.walk()):
        assert isinstance(script, Script)
        try:
            before = state_at(script_dir, base, script.normalized_down_revisions)
            expected = schema_of(before, base)
            run_step(MigrationStep(script, True), before, symbolic=True)
            run_step(MigrationStep(script, False), before, symbolic=True)
        except CkptMigrateError as exc:
            problems.append(RoundTripProblem(script, exc.one_line()))
            continue
        got = schema_of(before, base)
        if not got.same_layout(expected):
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
            problems.append(RoundTripProblem(script, "; ".join(detail)))
    return problems
