"""The linear run of revisions a squash replaces, and the ops it runs, recorded.

A range ``A:B`` names revision files (a squash among them counts as the
revisions it replaced). It must be one line of history: no revision inside it
has a second parent, a second child or a ``depends_on``, so one step can stand
for all of them. Each step is run symbolically from the schema before it and
its ``op`` calls are recorded exactly as the script made them (loops over
``op.keys()`` come out as the calls they made at this lineage's schema).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import CommandError, ResolutionError
from ..operations.checks import OpRecord
from ..plan.state import PlanState
from ..runtime.migration import MigrationStep, run_step
from ..runtime.symbolic import schema_of, state_at
from ..schema import Schema
from ..script.directory import ReplacedStep, Script, ScriptDirectory
from ..script.revision import format_ids
from .calls import Call

_STEP_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass
class Position:
    """One revision of the range: what a checkpoint stamped with ``name`` runs from there."""

    name: str
    message: str
    step: Script | None  # None: the end of an earlier squash, where nothing runs
    before: Schema = field(default_factory=Schema)
    after: Schema = field(default_factory=Schema)
    up: list[Call] = field(default_factory=list)
    down: list[Call] = field(default_factory=list)


@dataclass
class Chain:
    """The range, oldest first, with the schema at each of its positions."""

    revisions: list[Script]  # the revision files (compact), oldest first
    positions: list[Position]
    parents: tuple[str, ...]  # where the squash starts: the first revision's parents
    up: list[Call]  # the whole range's upgrade, as it runs from ``parents``
    down: list[Call]  # and its downgrade, from the end
    labels: tuple[str, ...]
    down_steps: list[tuple[str, list[Call]]] = field(default_factory=list)  # ``down`` by revision

    @property
    def up_steps(self) -> list[tuple[str, list[Call]]]:
        """``up`` by revision, oldest first."""
        return [(p.name, p.up) for p in self.positions if p.step is not None]

    @property
    def start(self) -> Schema:
        return self.positions[0].before

    @property
    def end(self) -> Schema:
        return self.positions[-1].after

    @property
    def replaces(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.positions)


def resolve_range(script_dir: ScriptDirectory, rev_range: str) -> list[Script]:
    """The revision files ``A:B`` names, oldest first; one straight line or an error."""
    if ":" not in rev_range:
        raise CommandError(
            f"squash range {rev_range!r} needs a colon",
            hint="write FIRST:LAST, e.g. 1a0c:3c9d, base:head or :head",
        )
    lo, hi = (part.strip() for part in rev_range.split(":", 1))
    last = _one(script_dir, hi or "head")
    if last is None:
        raise CommandError("the squash range ends at base", hint="end it at a revision")
    chain = [last]
    first = None if lo in ("", "base") else _one(script_dir, lo)
    while first is None or chain[-1] is not first:
        rev = chain[-1]
        if rev.is_base:
            if first is None:
                break
            raise CommandError(
                f"{first.revision} is not below {last.revision} on one line of history",
                hint="name the older revision first: squash OLDER:NEWER "
                "(see 'ckptmigrate history')",
            )
        if rev.is_merge_point:
            raise CommandError(
                f"{rev.revision} is a merge of {format_ids(rev.down_revisions)}: a squash "
                "cannot cross it",
                hint=f"start the range at {rev.revision}, or squash the branches below it",
            )
        chain.append(script_dir.script(rev.down_revisions[0], compact=True))
    chain.reverse()
    for rev in chain[:-1]:
        if len(rev.all_nextrev) > 1:
            kids = format_ids(sorted(rev.all_nextrev))
            raise CommandError(
                f"{rev.revision} is a branch point ({kids} build on it): a squash cannot cross it",
                hint="squash the range up to it, or the ranges above it on each branch",
            )
    for rev in chain:
        if rev.dependencies:
            raise CommandError(
                f"{rev.revision} depends on {format_ids(rev.dependencies)}: a squash cannot "
                "stand for a revision with depends_on",
                hint="squash a range without it",
            )
    positions = sum(len(r.replaces) + 1 if r.replaces else 1 for r in chain)
    if positions < 2:
        raise CommandError(
            f"{rev_range} names only {chain[0].revision}: nothing to squash",
            hint="name a range of at least two revisions, e.g. FIRST:LAST",
        )
    return chain


def _one(script_dir: ScriptDirectory, symbol: str) -> Script | None:
    try:
        return script_dir.get_revision(symbol, compact=True)
    except ResolutionError as exc:
        raise CommandError(f"squash range: {exc.message}", hint=exc.hint) from exc


def record_chain(script_dir: ScriptDirectory, base: Schema, revisions: list[Script]) -> Chain:
    """Run every step of the range on shapes, recording its calls (up, and down)."""
    positions = _positions(script_dir, revisions)
    for p in positions:
        if not _STEP_NAME.fullmatch(p.name):
            raise CommandError(
                f"revision id {p.name!r} cannot name a function in the squashed file",
                hint="squash a range whose ids are letters, digits and underscores",
            )
    parents = revisions[0].down_revisions
    state = state_at(script_dir, base, parents)
    up: list[Call] = []
    for p in positions:
        p.before = schema_of(state, base)
        if p.step is not None:
            p.up = _run(p.step, state, upgrade=True)
            up += p.up
        p.after = schema_of(state, base)
    for p in positions:
        if p.step is not None:
            p.down = _run(p.step, PlanState.from_schema(p.after.specs()), upgrade=False)
    state = PlanState.from_schema(positions[-1].after.specs())
    down_steps = [
        (p.name, _run(p.step, state, upgrade=False))
        for p in reversed(positions)
        if p.step is not None
    ]
    down = [c for _, calls in down_steps for c in calls]
    labels = tuple(dict.fromkeys(lb for r in revisions for lb in r.declared_branch_labels))
    return Chain(revisions, positions, parents, up, down, labels, down_steps)


def _positions(script_dir: ScriptDirectory, revisions: list[Script]) -> list[Position]:
    """Every id a checkpoint in the range can be stamped with, in order, and its step.

    An earlier squash inside the range contributes the revisions it replaced,
    then its own id, where nothing more runs (a checkpoint stamped with it is
    where its last replaced revision was).
    """
    rmap = script_dir.revision_map
    out: list[Position] = []
    for rev in revisions:
        if not rev.replaces:
            out.append(Position(rev.revision, rev.doc, rev))
            continue
        for name in rev.replaces:
            node = rmap.revision(rev.revision if name == rev.replaces[-1] else name)
            assert isinstance(node, ReplacedStep)
            out.append(Position(name, node.doc, node))
        out.append(Position(rev.revision, rev.doc, None))
    return out


def _run(step: Script, state: PlanState, *, upgrade: bool) -> list[Call]:
    migration = MigrationStep(step, upgrade)
    run_step(migration, state, symbolic=True)
    return [_call(step, record) for record in migration.records]


def _call(step: Script, record: OpRecord) -> Call:
    if record.op_call is None:  # pragma: no cover - every op function records its call
        raise CommandError(
            f"revision {step.revision}: {record.call} was not made through 'op'",
            hint="call ops as op.<name>(...) in revision scripts",
        )
    return Call(record.op_call, record.seed_revision)
