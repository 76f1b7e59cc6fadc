"""Differential tests: our revision graph against Alembic's on the same graphs.

Every graph is built twice, as ``ckptmigrate.script.revision.RevisionMap`` and as
``alembic.script.revision.RevisionMap`` (same definitions, same insertion order),
and the two are asked the same questions: heads, bases, branch labels, symbol
resolution, upgrade/downgrade plans for every consistent current state and many
targets, the heads a checkpoint records after each step, ``stamp``, ``current``,
``history`` ranges and ``iterate_revisions`` with every flag combination.

Alembic's answers are taken from the code paths its commands use:
``ScriptDirectory._upgrade_revs`` / ``_downgrade_revs`` / ``_stamp_revs`` for the
plans, and ``HeadMaintainer.update_to_step`` (with the SQL replaced by a plain
set) for the version-table bookkeeping.

Where the two disagree on purpose, the rule is spelled out in ``_Checker``:

* Alembic *warns* and picks the first head for ``downgrade -N`` from several
  heads ("this usage will be disallowed in a future release"); we refuse.
* Alembic stops with an internal ``AssertionError``/``KeyError`` (a bug, not a
  user-facing error) in a few corners.  We never crash there: we either refuse
  with a ``RevisionError`` or give the answer those corners evidently mean, and
  the checker verifies that answer independently:
    - an upgrade target that walks down to below a base (``<base>-1``) is
      ``base``, so the plan is empty, as for ``upgrade base``;
    - a ``stamp`` naming one revision twice (``stamp heads <a head>``) stamps it
      once;
    - when a merge's parents are themselves related through ``depends_on``,
      Alembic's head bookkeeping tries to delete a version row that isn't there;
      we record the tips of what is applied (checked against that definition).
* A relative target with trailing garbage (``ae10+1xyz``) is read by Alembic as
  ``ae10+1`` (its pattern is matched at the start only); we refuse it.  Not
  exercised here beyond the unit test in test_graph.py.
* Duplicate revision ids and a down_revision/depends_on that names nothing are
  warnings followed by a ``KeyError`` in Alembic; we refuse them up front.

Messages are compared by kind only: ours are worded differently on purpose.
"""

from __future__ import annotations

import itertools
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
from alembic.runtime.migration import HeadMaintainer
from alembic.script import revision as arev
from alembic.script.base import ScriptDirectory
from alembic.util import CommandError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptmigrate.errors import (
    CycleDetected,
    DependencyCycleDetected,
    RevisionError,
)
from ckptmigrate.script.revision import Revision, RevisionMap

Ids = str | tuple[str, ...] | None
Def = tuple[str, Ids, Ids, Ids]  # (revision, down_revision, depends_on, branch_labels)


# --------------------------------------------------------------------------- Alembic side


class _AlembicScript(arev.Revision):
    """An Alembic ``Revision`` that ``RevisionStep`` accepts as a script."""

    module = types.SimpleNamespace(upgrade=lambda: None, downgrade=lambda: None)
    doc = None


class _AlembicScripts(ScriptDirectory):
    """Just enough of a ScriptDirectory to call its planning methods."""

    def __init__(self, revision_map: arev.RevisionMap) -> None:  # no super(): no files
        self.revision_map = revision_map


class _SetHeads(HeadMaintainer):
    """Alembic's HeadMaintainer with the version table replaced by a set."""

    def __init__(self, heads: Iterable[str]) -> None:  # no super(): no context
        self.heads = set(heads)

    def _insert_version(self, version: str) -> None:
        assert version not in self.heads
        self.heads.add(version)

    def _delete_version(self, version: str) -> None:
        self.heads.remove(version)

    def _update_version(self, from_: str, to_: str) -> None:
        assert to_ not in self.heads
        self.heads.remove(from_)
        self.heads.add(to_)


def _alembic_heads_after(steps: Sequence[Any], start: Iterable[str]) -> set[str]:
    maintainer = _SetHeads(start)
    for step in steps:
        maintainer.update_to_step(step)
    return maintainer.heads


def build_alembic_map(defs: Sequence[Def]) -> arev.RevisionMap:
    return arev.RevisionMap(
        lambda: [
            _AlembicScript(r, d, dependencies=deps, branch_labels=labels)
            for r, d, deps, labels in defs
        ]
    )


def build(defs: Sequence[Def]) -> tuple[RevisionMap, arev.RevisionMap]:
    ours = RevisionMap([Revision(r, d, deps, labels) for r, d, deps, labels in defs])
    theirs = build_alembic_map(defs)
    theirs.heads  # noqa: B018 - Alembic builds its map lazily; build it now
    return ours, theirs


# --------------------------------------------------------------------------- outcomes

# ("ok", value) | ("refused", error class name) | ("warned", value, [messages])
# | ("crashed", exception repr)
Outcome = tuple[Any, ...]

_ALEMBIC_INTERNAL = (AssertionError, KeyError, IndexError, TypeError, AttributeError)


def alembic_outcome(fn: Callable[[], Any]) -> Outcome:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = fn()
        except (arev.RevisionError, CommandError) as exc:
            return ("refused", type(exc).__name__)
        except _ALEMBIC_INTERNAL as exc:
            return ("crashed", repr(exc))
    if caught:
        return ("warned", value, [str(w.message) for w in caught])
    return ("ok", value)


def our_outcome(fn: Callable[[], Any]) -> Outcome:
    # Anything but a RevisionError propagates: we must never crash.
    try:
        return ("ok", fn())
    except RevisionError as exc:
        return ("refused", type(exc).__name__)


def ids(revs: Iterable[Any]) -> tuple[str | None, ...]:
    """Revisions as ids; Alembic's ``"base"`` walk result and None both read None."""
    return tuple(r.revision if isinstance(r, (Revision, arev.Revision)) else None for r in revs)


# --------------------------------------------------------------------------- the checker


def _labels(defs: Sequence[Def]) -> list[str]:
    out: list[str] = []
    for d in defs:
        labels = d[3]
        for label in (labels,) if isinstance(labels, str) else labels or ():
            out.append(label)
    return out


def consistent_states(ours: RevisionMap, max_size: int) -> list[tuple[str, ...]]:
    """Every set of up to ``max_size`` revisions no one of which is below another."""
    rids = [r.revision for r in ours]
    below = {r.revision: {a.revision for a in ours.ancestors([r])} - {r.revision} for r in ours}
    states: list[tuple[str, ...]] = [()]
    for k in range(1, max_size + 1):
        for combo in itertools.combinations(rids, k):
            if not any(a in below[b] for a in combo for b in combo):
                states.append(combo)
    return states


def tips_of_applied(
    ours: RevisionMap, start: Sequence[str], plan: Sequence[str], upgrade: bool
) -> set[str]:
    """What should be recorded after running ``plan`` from ``start``, by definition."""
    applied = {r.revision for r in ours.ancestors([ours.revision(h) for h in start])}
    if upgrade:
        applied |= set(plan)
    else:
        applied -= set(plan)
    tips = set(applied)
    for rid in applied:
        tips -= {r.revision for r in ours.ancestors([ours.revision(rid)])} - {rid}
    return tips


class _Checker:
    def __init__(self, defs: Sequence[Def]) -> None:
        self.defs = list(defs)
        self.ours, self.theirs = build(defs)
        self.scripts = _AlembicScripts(self.theirs)
        self.rids = [d[0] for d in defs]
        self.labels = _labels(defs)
        self.mismatches: list[str] = []
        self.compared = 0

    # ------------------------------------------------------------ comparison rules

    def compare(
        self,
        what: str,
        alembic: Outcome,
        ours: Outcome,
        *,
        crash_ok: Callable[[Any], bool] | None = None,
    ) -> None:
        """Record a mismatch unless the outcomes agree (or differ as documented)."""
        self.compared += 1
        a_kind, o_kind = alembic[0], ours[0]
        if a_kind == "ok" and o_kind == "ok":
            if alembic[1] != ours[1]:
                self.mismatches.append(f"{what}: alembic {alembic[1]!r}, ours {ours[1]!r}")
            return
        if a_kind == "refused" and o_kind == "refused":
            return
        # Alembic: "downgrade -1 from multiple heads is ambiguous; this usage will
        # be disallowed in a future release". We disallow it now.
        if (
            a_kind == "warned"
            and o_kind == "refused"
            and all("multiple heads is ambiguous" in m for m in alembic[2])
        ):
            return
        if a_kind == "crashed":
            if o_kind == "refused":
                return
            if crash_ok is not None and crash_ok(ours[1]):
                return
        self.mismatches.append(f"{what}: alembic {alembic!r}, ours {ours!r}")

    # ------------------------------------------------------------ question sets

    def symbols(self) -> list[str]:
        r, labs = self.rids, self.labels
        syms = ["head", "heads", "base", "-1", "-2", "-3", "+1"]
        syms += r + [x[:4] for x in r] + [x[:5] for x in r] + ["zzzz", "abc"]
        syms += labs + [f"{lab}@{s}" for lab in labs for s in ("head", "heads", "base", "-1")]
        syms += [f"{lab}@{x}" for lab in labs for x in r[:4]]
        syms += ["nolabel@head", "nolabel@base", "nolabel@-1"]
        return list(dict.fromkeys(syms))

    def upgrade_targets(self) -> list[str]:
        r, labs = self.rids, self.labels
        t = ["head", "heads", "base", "+1", "+2", "+3", "-1", "+0"]
        t += r + [f"{x}+1" for x in r] + [f"{x}-1" for x in r] + [f"{x}+2" for x in r[:3]]
        t += labs + [f"{lab}@{s}" for lab in labs for s in ("head", "heads", "+1", "+2")]
        t += [f"{lab}@{x}" for lab in labs for x in r[:4]]
        return list(dict.fromkeys(t))

    def downgrade_targets(self) -> list[str]:
        r, labs = self.rids, self.labels
        t = ["base", "head", "heads", "-1", "-2", "-3", "+1"]
        t += r + [f"{x}-1" for x in r] + [f"{x}+1" for x in r]
        t += labs + [f"{lab}@{s}" for lab in labs for s in ("base", "head", "-1", "-2")]
        t += [f"{lab}@{x}" for lab in labs for x in r[:4]]
        return list(dict.fromkeys(t))

    # ------------------------------------------------------------ the questions

    def check_shape(self) -> None:
        o, a = self.ours, self.theirs
        self.compare(
            "heads/real_heads/bases/real_bases",
            ("ok", (a.heads, a._real_heads, a.bases, a._real_bases)),
            ("ok", (o.heads, o.real_heads, o.bases, o.real_bases)),
        )
        for rev in o:
            theirs = a.get_revision(rev.revision)
            assert theirs is not None
            self.compare(
                f"branch_labels of {rev.revision}",
                ("ok", sorted(theirs.branch_labels)),
                ("ok", sorted(rev.branch_labels)),
            )
            self.compare(
                f"flags of {rev.revision}",
                ("ok", (theirs.is_head, theirs.is_base, theirs.is_branch_point,
                        theirs.is_merge_point, theirs._normalized_down_revisions)),
                ("ok", (rev.is_head, rev.is_base, rev.is_branch_point,
                        rev.is_merge_point, rev.normalized_down_revisions)),
            )  # fmt: skip

    def check_symbols(self) -> None:
        o, a = self.ours, self.theirs
        for sym in self.symbols():
            self.compare(
                f"get_revisions({sym!r})",
                alembic_outcome(lambda sym=sym: ids(a.get_revisions(sym))),
                our_outcome(lambda sym=sym: ids(o.get_revisions(sym))),
            )
            self.compare(
                f"get_revision({sym!r})",
                alembic_outcome(lambda sym=sym: ids([a.get_revision(sym)])),
                our_outcome(lambda sym=sym: ids([o.get_revision(sym)])),
            )
        for label in [None, *self.labels, *self.rids[:3], "nolabel"]:
            self.compare(
                f"get_current_head({label!r})",
                alembic_outcome(lambda label=label: a.get_current_head(label)),
                our_outcome(lambda label=label: o.get_current_head(label)),
            )
        for against in [None, "heads", "base", *self.labels, *self.rids]:
            self.compare(
                f"filter_for_lineage(heads, {against!r})",
                alembic_outcome(lambda against=against: a.filter_for_lineage(a.heads, against)),
                our_outcome(
                    lambda against=against: ids(
                        o.filter_for_lineage([o.revision(h) for h in o.heads], against)
                    )
                ),
            )

    def check_upgrade(self, state: tuple[str, ...], target: str) -> None:
        o = self.ours
        alembic = alembic_outcome(
            lambda: [s.revision.revision for s in self.scripts._upgrade_revs(target, state)]
        )
        ours = our_outcome(lambda: [r.revision for r in o.upgrade_path(state, target)])
        self.compare(
            f"upgrade {state or '()'} -> {target}",
            alembic,
            ours,
            # <base>-N walks to "base": Alembic asserts, we treat it as `upgrade base`.
            crash_ok=lambda plan: plan == [] and target[-2:] in ("-1", "-2", "-3"),
        )
        if alembic[0] == ours[0] == "ok" and alembic[1] == ours[1]:
            self._check_heads(state, target, ours[1], upgrade=True)

    def check_downgrade(self, state: tuple[str, ...], target: str) -> None:
        o = self.ours
        alembic = alembic_outcome(
            lambda: [s.revision.revision for s in self.scripts._downgrade_revs(target, state)]
        )
        ours = our_outcome(lambda: [r.revision for r in o.downgrade_path(state, target)])
        self.compare(f"downgrade {state or '()'} -> {target}", alembic, ours)
        if alembic[0] == ours[0] == "ok" and alembic[1] == ours[1]:
            self._check_heads(state, target, ours[1], upgrade=False)

    def _check_heads(
        self, state: tuple[str, ...], target: str, plan: list[str], upgrade: bool
    ) -> None:
        o = self.ours
        if upgrade:
            steps = self.scripts._upgrade_revs(target, state)
        else:
            steps = self.scripts._downgrade_revs(target, state)
        heads: tuple[str, ...] = state
        for rid in plan:
            rev = o.revision(rid)
            heads = (
                o.heads_after_upgrade(heads, rev)
                if upgrade
                else o.heads_after_downgrade(heads, rev)
            )
        assert len(set(heads)) == len(heads), heads
        self.compare(
            f"heads after {'upgrade' if upgrade else 'downgrade'} {state or '()'} -> {target}",
            alembic_outcome(lambda: _alembic_heads_after(steps, state)),
            ("ok", set(heads)),
            # Alembic's bookkeeping trips over merges whose parents are related;
            # ours must then record exactly the tips of what is applied.
            crash_ok=lambda got: got == tips_of_applied(o, state, plan, upgrade),
        )

    def check_stamp(self, state: tuple[str, ...], dests: tuple[str, ...]) -> None:
        o, a = self.ours, self.theirs

        def named_twice(_: Any) -> bool:
            # Alembic asserts when a destination is named twice; we stamp it once.
            try:
                found = [r for r in ids(a.get_revisions(dests)) if r is not None]
            except arev.RevisionError:
                return False
            return len(found) != len(set(found))

        self.compare(
            f"stamp {state or '()'} -> {dests}",
            alembic_outcome(
                lambda: _alembic_heads_after(self.scripts._stamp_revs(dests, state), state)
            ),
            our_outcome(lambda: set(o.heads_after_stamp(state, list(dests)))),
            crash_ok=named_twice,
        )

    def check_history(self, base: str, head: str) -> None:
        o, a = self.ours, self.theirs
        self.compare(
            f"history {base}:{head}",
            alembic_outcome(
                lambda: [
                    r.revision
                    for r in a.iterate_revisions(
                        head, base, inclusive=True, assert_relative_length=False
                    )
                ]
            ),
            our_outcome(lambda: [r.revision for r in o.walk(base, head)]),
        )

    def check_iterate(self, upper: str | tuple[str, ...], lower: str | tuple[str, ...]) -> None:
        """``iterate_revisions`` with every flag combination (history, plans, ...)."""
        o, a = self.ours, self.theirs
        for inclusive, implicit_base, down in itertools.product((False, True), repeat=3):
            if down and isinstance(lower, tuple):
                continue  # a downgrade target is a single symbol
            kw = dict(inclusive=inclusive, implicit_base=implicit_base, select_for_downgrade=down)
            self.compare(
                f"iterate_revisions({upper!r}, {lower!r}, {kw})",
                alembic_outcome(
                    lambda kw=kw: [r.revision for r in a.iterate_revisions(upper, lower, **kw)]
                ),
                our_outcome(
                    lambda kw=kw: [r.revision for r in o.iterate_revisions(upper, lower, **kw)]
                ),
            )

    def check_current(self, state: tuple[str, ...]) -> None:
        o, a = self.ours, self.theirs
        self.compare(
            f"all_current {state}",
            alembic_outcome(lambda: {r.revision for r in a._get_all_current(state)}),
            our_outcome(lambda: {r.revision for r in o.all_current(state)}),
        )

    # ------------------------------------------------------------ sweeps

    def run(
        self,
        *,
        max_state_size: int = 3,
        max_targets: int | None = None,
        stamp_pairs: bool = True,
    ) -> _Checker:
        self.check_shape()
        self.check_symbols()
        up = self.upgrade_targets()[:max_targets]
        down = self.downgrade_targets()[:max_targets]
        stamp_single = ["base", "heads", "head", *self.rids]
        pairs = list(itertools.combinations(["base", "heads", *self.rids], 2))
        for state in consistent_states(self.ours, max_state_size):
            self.check_current(state)
            for target in up:
                self.check_upgrade(state, target)
            for target in down:
                self.check_downgrade(state, target)
            for dest in stamp_single:
                self.check_stamp(state, (dest,))
            if stamp_pairs:
                for pair in pairs:
                    self.check_stamp(state, pair)
        r, labs = self.rids, self.labels
        bases = ["base", "-1", "-2", "-5", "+1", *r, *[f"{x}-1" for x in r[:3]]]
        bases += [f"{lab}@{s}" for lab in labs for s in ("base", "-1")]
        heads = ["heads", "head", "+1", "+2", "-1", *r, *[f"{x}+1" for x in r[:3]]]
        heads += [f"{lab}@{s}" for lab in labs for s in ("head", "+1")]
        for base in bases:
            for head in heads:
                self.check_history(base, head)
        for upper in ["heads", *r[-3:], tuple(r[-2:])]:
            for lower in [*r[:3], "base", "-1", (), tuple(r[:1])]:
                self.check_iterate(upper, lower)
        return self

    def assert_agree(self) -> None:
        assert self.compared > 0
        shown = "\n  ".join(self.mismatches[:25])
        assert not self.mismatches, (
            f"{len(self.mismatches)} of {self.compared} answers differ from Alembic on "
            f"{self.defs!r}:\n  {shown}"
        )


# --------------------------------------------------------------------------- hand-made graphs

LINEAR: list[Def] = [
    ("a1a1a1", None, None, None),
    ("b2b2b2", "a1a1a1", None, None),
    ("c3c3c3", "b2b2b2", None, None),
    ("d4d4d4", "c3c3c3", None, None),
]

# aaaa01 - bbbb01 < cccc01 ............. > eeee01 - ffff01
#                 < dddd01 - dddd02 ... /
BRANCH_AND_MERGE: list[Def] = [
    ("aaaa01", None, None, None),
    ("bbbb01", "aaaa01", None, None),
    ("cccc01", "bbbb01", None, None),
    ("dddd01", "bbbb01", None, None),
    ("dddd02", "dddd01", None, None),
    ("eeee01", ("cccc01", "dddd02"), None, None),
    ("ffff01", "eeee01", None, None),
]

OPEN_BRANCHES: list[Def] = BRANCH_AND_MERGE[:5]

MULTIPLE_BASES: list[Def] = [
    ("r1aa11", None, None, None),
    ("r2aa22", None, None, None),
    ("r1bb11", "r1aa11", None, None),
    ("r3aa33", None, None, None),
    ("r2bb22", "r2aa22", None, None),
]

# "main" labels a root; "other" is a second root started like `revision --head=base`;
# "mid" is a label in the middle of a chain that forks off main's first revision.
BRANCH_LABELS: list[Def] = [
    ("m1m1m1", None, None, ("main",)),
    ("m2m2m2", "m1m1m1", None, None),
    ("o1o1o1", None, None, ("other",)),
    ("m3m3m3", "m2m2m2", None, None),
    ("o2o2o2", "o1o1o1", None, None),
    ("x2x2x2", "m1m1m1", None, None),
    ("x3x3x3", "x2x2x2", None, ("mid",)),
    ("x4x4x4", "x3x3x3", None, None),
]

# Two labelled roots; feat depends on a main revision, and main depends on the
# "feat" label and on a feat revision.
DEPENDS_ON: list[Def] = [
    ("m1m1m1", None, None, ("main",)),
    ("f1f1f1", None, None, ("feat",)),
    ("m2m2m2", "m1m1m1", None, None),
    ("f2f2f2", "f1f1f1", "m2m2m2", None),
    ("m3m3m3", "m2m2m2", "feat", None),
    ("f3f3f3", "f2f2f2", None, None),
    ("m4m4m4", "m3m3m3", "f2f2f2", None),
]

MERGE_OF_THREE: list[Def] = [
    ("base01", None, None, None),
    ("b1b1b1", "base01", None, None),
    ("b2b2b2", "base01", None, None),
    ("b3b3b3", "base01", None, None),
    ("b2b2c2", "b2b2b2", None, None),
    ("mmmm01", ("b1b1b1", "b2b2c2", "b3b3b3"), None, None),
    ("after1", "mmmm01", None, None),
]

# Shared prefixes: "abcd" is ambiguous, "abce" is not.
PREFIXES: list[Def] = [
    ("abcd01", None, None, None),
    ("abcd02", "abcd01", None, None),
    ("abce03", "abcd02", None, None),
]

# A label whose line above it merges: Alembic labels the merge's lineage only
# above the labelled revision (not down into its parent).
LABEL_BELOW_MERGE: list[Def] = [
    ("a000", None, None, ("lab0",)),
    ("b001", "a000", None, ("lab1",)),
    ("c002", None, None, None),
    ("d003", ("c002", "b001"), None, None),
]

# A dependency on a revision that is also reachable through down_revision, a
# dependency that an ancestor already brings in, and a merge whose parents are
# related through depends_on.
REDUNDANT_DEPENDENCIES: list[Def] = [
    ("a000", None, None, ("lab0",)),
    ("b001", "a000", None, None),
    ("c002", "b001", None, None),
    ("d003", "a000", "c002", None),
    ("e004", "a000", None, None),
    ("f005", "d003", "c002", None),
    ("g006", ("d003", "e004"), "b001", None),
]

HAND_MADE = {
    "linear": LINEAR,
    "branch_and_merge": BRANCH_AND_MERGE,
    "open_branches": OPEN_BRANCHES,
    "multiple_bases": MULTIPLE_BASES,
    "branch_labels": BRANCH_LABELS,
    "depends_on": DEPENDS_ON,
    "merge_of_three": MERGE_OF_THREE,
    "prefixes": PREFIXES,
    "label_below_merge": LABEL_BELOW_MERGE,
    "redundant_dependencies": REDUNDANT_DEPENDENCIES,
}


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_hand_made_graph_matches_alembic(name: str) -> None:
    _Checker(HAND_MADE[name]).run().assert_agree()


def test_the_sweep_reaches_every_kind_of_answer() -> None:
    """Guard against a vacuous sweep: plans, refusals and bookkeeping all occur."""
    checker = _Checker(BRANCH_LABELS)
    seen: dict[str, int] = {}

    def counting(what: str, alembic: Outcome, ours: Outcome, **kw: Any) -> None:
        key = f"{what.split(' ')[0]}:{alembic[0]}"
        seen[key] = seen.get(key, 0) + 1
        _Checker.compare(checker, what, alembic, ours, **kw)

    checker.compare = counting  # type: ignore[method-assign]
    checker.run(max_state_size=2, stamp_pairs=False).assert_agree()
    for key in ("upgrade:ok", "upgrade:refused", "downgrade:ok", "downgrade:refused",
                "heads:ok", "stamp:ok", "history:ok", "history:refused",
                "get_revisions('-1'):ok"):  # fmt: skip
        assert seen.get(key, 0) > 0, (key, seen)


# --------------------------------------------------------------------------- malformed graphs


def _error_kind(exc: BaseException) -> str:
    # Alembic's self-loop errors are subclasses of its cycle errors.
    if isinstance(exc, (DependencyCycleDetected, arev.DependencyCycleDetected)):
        return "dependency cycle"
    if isinstance(exc, (CycleDetected, arev.CycleDetected)):
        return "cycle"
    return type(exc).__name__


def _build_outcome(build_fn: Callable[[], Any]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            build_fn()
        except (RevisionError, arev.RevisionError) as exc:
            return _error_kind(exc)
    return "ok"


def _construction(defs: Sequence[Def]) -> tuple[str, str]:
    def alembic() -> None:
        build_alembic_map(defs).heads  # noqa: B018 - building is lazy; this builds it

    def ours() -> None:
        RevisionMap([Revision(r, d, deps, labels) for r, d, deps, labels in defs])

    return _build_outcome(alembic), _build_outcome(ours)


@pytest.mark.parametrize(
    "defs",
    [
        pytest.param([("aaaa", "aaaa", None, None)], id="self-loop"),
        pytest.param([("aaaa", None, "aaaa", None)], id="dependency-self-loop"),
        pytest.param(
            [
                ("aaaa", None, None, None),
                ("bbbb", "cccc", None, None),
                ("cccc", "bbbb", None, None),
            ],
            id="cycle-beside-a-root",
        ),
        pytest.param([("aaaa", "bbbb", None, None), ("bbbb", "aaaa", None, None)], id="cycle-only"),
        pytest.param(
            [
                ("aaaa", None, None, None),
                ("bbbb", "aaaa", "cccc", None),
                ("cccc", "aaaa", "bbbb", None),
            ],
            id="dependency-cycle",
        ),
        pytest.param(
            [("aaaa", None, None, ("x",)), ("bbbb", "aaaa", None, ("x",))], id="label-twice"
        ),
        pytest.param(
            [("aaaa", None, None, None), ("bbbb", "aaaa", None, ("aaaa",))],
            id="label-is-a-revision-id",
        ),
        pytest.param([("ab-c", None, None, None)], id="illegal-character"),
        pytest.param([("ab@c", None, None, None)], id="illegal-at"),
    ],
)
def test_malformed_graph_is_refused_like_alembic(defs: list[Def]) -> None:
    alembic, ours = _construction(defs)
    assert alembic != "ok"
    assert ours == alembic


@pytest.mark.parametrize(
    "defs",
    [
        pytest.param([("aaaa", "zzzz", None, None)], id="missing-down-revision"),
        pytest.param([("aaaa", None, "zzzz", None)], id="missing-depends-on"),
        pytest.param([("aaaa", None, None, None), ("aaaa", None, None, None)], id="duplicate-id"),
    ],
)
def test_we_refuse_what_alembic_only_warns_about(defs: list[Def]) -> None:
    # Alembic warns and then fails with KeyError (or silently keeps the later
    # duplicate); a checkpoint tool should stop with a clear message instead.
    with pytest.raises(RevisionError):
        RevisionMap([Revision(r, d, deps, labels) for r, d, deps, labels in defs])


# --------------------------------------------------------------------------- random graphs


@st.composite
def dags(draw: st.DrawFn, max_size: int = 9) -> list[Def]:
    """Random revision graphs: roots, linear steps, 2-parent merges, depends_on, labels.

    At most one dependency per revision: with several, Alembic orders them by
    set iteration, which makes its own plan order vary between runs.
    """
    n = draw(st.integers(1, max_size))
    defs: list[Def] = []
    owners: dict[str, str] = {}
    for i in range(n):
        rid = f"{chr(ord('a') + i)}{i:03d}f"
        earlier = [d[0] for d in defs]
        kind = draw(st.sampled_from(["root", "step", "step", "step", "merge"]))
        down: Ids
        if not earlier or kind == "root":
            down = None
        elif kind == "merge" and len(earlier) >= 2:
            down = tuple(draw(st.permutations(earlier))[:2])
        else:
            down = draw(st.sampled_from(earlier))
        parents = {down} if isinstance(down, str) else set(down or ())
        others = [e for e in earlier if e not in parents]
        deps: Ids = None
        if others and draw(st.integers(0, 4)) == 0:
            dep = draw(st.sampled_from(others))
            labelled = [lab for lab, owner in owners.items() if owner == dep]
            deps = labelled[0] if labelled and draw(st.booleans()) else dep
        labels: Ids = None
        if draw(st.integers(0, 4)) == 0:
            labels = (f"lab{len(owners)}",)
            owners[labels[0]] = rid
        defs.append((rid, down, deps, labels))
    return defs


_FAST = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


@_FAST
@given(dags())
def test_random_graph_matches_alembic(defs: list[Def]) -> None:
    _Checker(defs).run(max_state_size=2, max_targets=40, stamp_pairs=False).assert_agree()


@st.composite
def any_links(draw: st.DrawFn) -> list[Def]:
    """Graphs whose links may point anywhere, self and later revisions included."""
    n = draw(st.integers(1, 6))
    rids = [f"r{i:03d}" for i in range(n)]
    defs: list[Def] = []
    for rid in rids:
        downs = draw(st.lists(st.sampled_from(rids), max_size=2, unique=True))
        deps = draw(st.lists(st.sampled_from(rids), max_size=1))
        defs.append((rid, tuple(downs) or None, tuple(deps) or None, None))
    return defs


@settings(max_examples=150, deadline=None, derandomize=True)
@given(any_links())
def test_random_links_build_or_fail_like_alembic(defs: list[Def]) -> None:
    alembic, ours = _construction(defs)
    assert ours == alembic, defs
    if ours == "ok":
        mine, theirs = build(defs)
        assert (mine.heads, mine.real_heads, mine.bases, mine.real_bases) == (
            theirs.heads,
            theirs._real_heads,
            theirs.bases,
            theirs._real_bases,
        )
