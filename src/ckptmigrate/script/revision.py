"""The revision graph: pure data and algorithms, no I/O and no torch.

Semantics follow Alembic's ``RevisionMap`` so that an Alembic user's intuition
(heads, branch points, merges, ``depends_on``, relative targets, branch labels)
carries over unchanged; the differential tests in ``tests/test_graph_vs_alembic.py``
hold this module to Alembic's own answers on the same graphs.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

from ..errors import (
    CycleDetected,
    DependencyCycleDetected,
    MultipleHeads,
    RangeNotAncestorError,
    ResolutionError,
    RevisionError,
)

# "[label@][symbol](+|-)N", e.g. "-1", "+2", "ae10+1", "branch@head-2"
_RELATIVE = re.compile(r"(?:(.+?)@)?(\w+)?((?:\+|-)\d+)")
_ILLEGAL_ID_CHARS = frozenset("@-+:")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+")
_RESERVED_NAMES = frozenset({"head", "heads", "base", "current"})

RevisionIds = Union[str, Sequence[str], None]


def to_tuple(value: RevisionIds | Iterable[str]) -> tuple[str, ...]:
    """Normalise the many spellings of 'some revision ids' to a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def format_ids(ids: Iterable[str]) -> str:
    return ", ".join(ids)


def tuple_or_scalar(ids: Sequence[str]) -> str | tuple[str, ...] | None:
    """The form a revision file writes ``down_revision`` in."""
    if not ids:
        return None
    if len(ids) == 1:
        return ids[0]
    return tuple(ids)


class Revision:
    """One node of the graph: its id, its parents and its labels."""

    def __init__(
        self,
        revision: str,
        down_revision: RevisionIds = None,
        dependencies: RevisionIds = None,
        branch_labels: RevisionIds = None,
        replaces: RevisionIds = None,
    ) -> None:
        if not isinstance(revision, str) or not revision:
            raise RevisionError(f"revision id must be a non-empty string, not {revision!r}")
        verify_rev_id(revision)
        downs = to_tuple(down_revision)
        deps = to_tuple(dependencies)
        if revision in downs:
            raise CycleDetected([revision])
        if revision in deps:
            raise DependencyCycleDetected([revision])
        squashed = to_tuple(replaces)
        if revision in squashed or len(set(squashed)) != len(squashed):
            raise RevisionError(
                f"revision {revision} lists itself or one revision twice in 'replaces'",
                hint="replaces names each squashed revision once, oldest first",
            )
        self.revision = revision
        self.down_revisions: tuple[str, ...] = downs
        self.dependencies: tuple[str, ...] = deps
        self.declared_branch_labels: tuple[str, ...] = to_tuple(branch_labels)
        #: The revisions this one squashes, oldest first (see :meth:`RevisionMap.expand`).
        self.replaces: tuple[str, ...] = squashed
        self._reset_links()

    def _reset_links(self) -> None:
        """Forget what a RevisionMap derived (children, resolved dependencies, labels)."""
        self.branch_labels: set[str] = set(self.declared_branch_labels)
        self.nextrev: frozenset[str] = frozenset()
        self.all_nextrev: frozenset[str] = frozenset()
        self.resolved_dependencies: tuple[str, ...] = ()
        self.normalized_dependencies: tuple[str, ...] = ()
        self._all_down = self.down_revisions
        self._normalized_down = self.down_revisions

    def link_state(self) -> list[Any]:
        """What a map made of this revision, JSON-able: ``[id, parents, children, other]``.

        ``other`` holds only what differs from its default (a revision of a plain
        linear history has nothing there), so a long history's snapshot stays small.
        """
        other: dict[str, list[str]] = {}
        for name in _MOSTLY_EMPTY:
            value = getattr(self, name)
            if value:
                other[name] = list(value)
        if self.branch_labels != set(self.declared_branch_labels):
            other["branch_labels"] = sorted(self.branch_labels)
        if self.all_nextrev != self.nextrev:
            other["all_nextrev"] = sorted(self.all_nextrev)
        if self._all_down != self.down_revisions:
            other["all_down"] = list(self._all_down)
        if self._normalized_down != self._all_down:
            other["normalized_down"] = list(self._normalized_down)
        return [self.revision, list(self.down_revisions), sorted(self.nextrev), other]

    def restore_links(self, state: Sequence[Any]) -> None:
        """Take the state :meth:`link_state` recorded (on a bare object: no checks)."""
        rid, downs, nexts, other = state[:4]
        down = tuple(downs)
        self.revision = rid
        self.down_revisions = self._all_down = self._normalized_down = down
        self.nextrev = self.all_nextrev = frozenset(nexts)
        if not other:
            self.dependencies = self.declared_branch_labels = self.replaces = ()
            self.resolved_dependencies = self.normalized_dependencies = ()
            self.branch_labels = set()
            return
        get = other.get
        self.dependencies = tuple(get("dependencies", ()))
        self.declared_branch_labels = tuple(get("declared_branch_labels", ()))
        self.replaces = tuple(get("replaces", ()))
        self.resolved_dependencies = tuple(get("resolved_dependencies", ()))
        self.normalized_dependencies = tuple(get("normalized_dependencies", ()))
        self.branch_labels = set(get("branch_labels", self.declared_branch_labels))
        if "all_nextrev" in other:
            self.all_nextrev = frozenset(other["all_nextrev"])
        if "all_down" in other:
            self._all_down = self._normalized_down = tuple(other["all_down"])
        if "normalized_down" in other:
            self._normalized_down = tuple(other["normalized_down"])

    def unlinked_copy(self) -> Revision:
        """The same revision, free of any map's links: a node for another map."""
        twin = copy.copy(self)
        twin._reset_links()
        return twin

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.revision!r}, {self.down_revisions!r})"

    @property
    def down_revision(self) -> str | tuple[str, ...] | None:
        return tuple_or_scalar(self.down_revisions)

    @property
    def all_down_revisions(self) -> tuple[str, ...]:
        """Parents including every declared dependency."""
        return self._all_down

    @property
    def normalized_down_revisions(self) -> tuple[str, ...]:
        """Parents plus the dependencies no ancestor already brings in."""
        return self._normalized_down

    @property
    def is_head(self) -> bool:
        return not self.nextrev

    @property
    def is_real_head(self) -> bool:
        return not self.all_nextrev

    @property
    def is_base(self) -> bool:
        return not self.down_revisions

    @property
    def is_real_base(self) -> bool:
        return not self.down_revisions and not self.dependencies

    @property
    def is_branch_point(self) -> bool:
        return len(self.nextrev) > 1

    @property
    def is_real_branch_point(self) -> bool:
        return len(self.all_nextrev) > 1

    @property
    def is_merge_point(self) -> bool:
        return len(self.down_revisions) > 1


def restore_node(row: Sequence[Any], make: Callable[[Any], Revision]) -> Revision:
    """One node of a :meth:`RevisionMap.snapshot`: ``make(payload)`` with its links on."""
    rev = make(row[4])
    rev.restore_links(row)
    return rev


#: Fields empty in most revisions: a snapshot records them only where they are not.
_MOSTLY_EMPTY = (
    "dependencies",
    "declared_branch_labels",
    "replaces",
    "resolved_dependencies",
    "normalized_dependencies",
)


def verify_rev_id(revision: str) -> None:
    """Alembic's rule for ids read from revision files: no target syntax in them."""
    bad = sorted(_ILLEGAL_ID_CHARS.intersection(revision))
    if bad:
        raise RevisionError(
            f"character(s) '{', '.join(bad)}' not allowed in revision identifier '{revision}'",
            hint="use letters, digits and underscores",
        )


def verify_new_name(kind: str, name: str) -> None:
    """The stricter rule for ids and labels this tool writes into new files.

    A new id becomes part of a file name and a label becomes part of target
    syntax (``label@head``), so both are plain names: no path separators, no
    dots, none of the target characters, and not a word targets reserve.
    """
    if not _PLAIN_NAME.fullmatch(name):
        raise RevisionError(
            f"{kind} {name!r} is not allowed",
            hint="use only letters, digits and underscores (ASCII); "
            "'-', '+', '@' and ':' are target syntax",
        )
    if name in _RESERVED_NAMES:
        raise RevisionError(
            f"{kind} {name!r} is not allowed: it means something in a target",
            hint="use another name made of letters, digits and underscores",
        )


_PARENTS: Callable[[Revision], tuple[str, ...]] = operator.attrgetter("down_revisions")
_ALL_PARENTS: Callable[[Revision], tuple[str, ...]] = operator.attrgetter("_all_down")
_NORMALIZED_PARENTS: Callable[[Revision], tuple[str, ...]] = operator.attrgetter("_normalized_down")
_CHILDREN: Callable[[Revision], frozenset[str]] = operator.attrgetter("nextrev")
_ALL_CHILDREN: Callable[[Revision], frozenset[str]] = operator.attrgetter("all_nextrev")

Target = Union[Revision, None]  # None stands for "base"
# The result of a relative walk: a revision, "base" (walked down to just
# below a base) or None (walked off the end of the graph).
Walked = Union[Revision, str, None]


class RevisionMap:
    """All revisions of one lineage, with Alembic's traversal semantics."""

    def __init__(self, revisions: Iterable[Revision]) -> None:
        self._index(list(revisions))
        self._link()
        self._detect_cycles()
        self._propagate_labels()
        revs = self._by_id.values()
        self.heads: tuple[str, ...] = tuple(r.revision for r in revs if r.is_head)
        self.real_heads: tuple[str, ...] = tuple(r.revision for r in revs if r.is_real_head)
        self.bases: tuple[str, ...] = tuple(r.revision for r in revs if r.is_base)
        self.real_bases: tuple[str, ...] = tuple(r.revision for r in revs if r.is_real_base)
        self._walked: tuple[str, ...] | None = None  # walk(), once asked for

    def snapshot(self, payload: Callable[[Revision], Any]) -> dict[str, Any]:
        """All that building this map worked out, JSON-able, for :meth:`restore`.

        ``payload(rev)`` is what a revision's own class adds (a file, a docstring).
        The order of :meth:`walk` is worked out here too: ``history`` needs it.
        """
        try:
            walked: list[str] | None = [r.revision for r in self.walk()]
        except RevisionError:  # pragma: no cover - a built map always walks
            walked = None
        nodes = [*self._by_id.values(), *self.dormant]
        return {
            "nodes": [[*rev.link_state(), payload(rev)] for rev in nodes],
            "heads": list(self.heads),
            "real_heads": list(self.real_heads),
            "bases": list(self.bases),
            "real_bases": list(self.real_bases),
            "walk": walked,
        }

    @classmethod
    def restore(cls, state: Mapping[str, Any], make: Callable[[Any], Revision]) -> RevisionMap:
        """The map a :meth:`snapshot` recorded, neither linked nor checked again.

        Only for a snapshot of a map built from the very same revisions: what
        building it checked (cycles, missing parents) still holds. ``make(payload)``
        returns the bare revision object that the recorded links are put on.
        """
        rmap = cls.__new__(cls)
        rmap._index([restore_node(row, make) for row in state["nodes"]])
        rmap.heads = tuple(state["heads"])
        rmap.real_heads = tuple(state["real_heads"])
        rmap.bases = tuple(state["bases"])
        rmap.real_bases = tuple(state["real_bases"])
        walked = state["walk"]
        rmap._walked = None if walked is None else tuple(walked)
        ids = rmap._by_id.keys()
        tips = {*rmap.heads, *rmap.real_heads, *rmap.bases, *rmap.real_bases}
        if not ids >= tips or (walked is not None and set(walked) != ids):
            raise ValueError("the snapshot's heads, bases or order name other revisions")
        return rmap

    # ------------------------------------------------------------------ building

    def _index(self, given: list[Revision]) -> None:
        """Look-ups by id, label and squash; refuses ids and labels used twice."""
        # A revision another one squashed (its file kept with 'squash --keep') is
        # no node of the graph: the squashed revision stands for it.
        listed = {rid for rev in given for rid in rev.replaces}
        self.dormant: tuple[Revision, ...] = tuple(r for r in given if r.revision in listed)
        self._by_id: dict[str, Revision] = {}
        for rev in given:
            if rev.revision in listed:
                continue
            if rev.revision in self._by_id:
                raise RevisionError(
                    f"revision {rev.revision} is present more than once",
                    hint="give each revision file a unique 'revision' id",
                )
            self._by_id[rev.revision] = rev
        self._order = {rid: i for i, rid in enumerate(self._by_id)}
        self._squashed_into: dict[str, Revision] = {}
        for rev in self._by_id.values():
            for rid in rev.replaces:
                claimed = self._squashed_into.setdefault(rid, rev)
                if claimed is not rev:
                    raise RevisionError(
                        f"revision {rid} is replaced by both {claimed.revision} and {rev.revision}",
                        hint="keep one of the two squashed revisions",
                    )
        # a squash ends exactly where its last revision did: that id names the squash
        self._aliases = {r.replaces[-1]: r for r in self._by_id.values() if r.replaces}
        self._labels: dict[str, Revision] = {}
        for rev in self._by_id.values():
            for label in rev.declared_branch_labels:
                owner = self._labels.get(label) or self._by_id.get(label)
                if owner is not None:
                    raise RevisionError(
                        f"branch name '{label}' in revision {rev.revision} "
                        f"is already used by revision {owner.revision}",
                        hint="choose another branch label",
                    )
                self._labels[label] = rev

    def _lookup_symbol(self, name: str) -> Revision | None:
        found = self._by_id.get(name) or self._labels.get(name) or self._aliases.get(name)
        if found is None and name in self._squashed_into:
            owner = self._squashed_into[name]
            raise ResolutionError(
                f"revision {name} was squashed into {owner.revision}, and lies inside it",
                name,
                hint=f"name {owner.revision} (or a revision outside the squash); checkpoints "
                f"at {name} still migrate",
            )
        return found

    def _parent_id(self, rev: Revision, name: str) -> str:
        """The node a ``down_revision`` of ``rev`` names: a squashed one's is its squash."""
        if name in self._by_id:
            return name
        if name in self._aliases:
            return self._aliases[name].revision
        owner = self._squashed_into.get(name)
        if owner is None:
            raise RevisionError(
                f"revision {name} referenced from {rev.revision} is not present",
                hint="fix its down_revision or restore the missing revision file",
            )
        raise RevisionError(
            f"revision {rev.revision} revises {name}, which lies inside the squashed "
            f"revision {owner.revision}",
            hint=f"make its down_revision {owner.revision!r} (where the squash ends), or "
            "restore the squashed files",
        )

    def _link(self) -> None:
        by_id = self._by_id
        for rev in by_id.values():
            if any(d not in by_id for d in rev.down_revisions):
                # a parent that was squashed: the child now follows the squash
                rev.down_revisions = tuple(self._parent_id(rev, d) for d in rev.down_revisions)
            if not rev.dependencies:
                continue
            resolved = []
            for dep in rev.dependencies:
                try:
                    target = self._lookup_symbol(dep)
                except ResolutionError as exc:
                    raise RevisionError(
                        f"revision {rev.revision} depends on {dep}: {exc.message}", hint=exc.hint
                    ) from None
                if target is None:
                    raise RevisionError(
                        f"revision {rev.revision} depends on '{dep}', which is not present",
                        hint="fix its depends_on or restore the missing revision file",
                    )
                resolved.append(target.revision)
            rev.resolved_dependencies = tuple(resolved)
            rev._all_down = _dedupe(rev.down_revisions + rev.resolved_dependencies)
        for rev in by_id.values():
            rev._normalized_down = rev._all_down = (
                rev._all_down if rev.resolved_dependencies else rev.down_revisions
            )
            for down in rev._all_down:
                parent = by_id.get(down)
                if parent is None:
                    raise RevisionError(
                        f"revision {down} referenced from {rev.revision} is not present",
                        hint="fix its down_revision or restore the missing revision file",
                    )
                parent.all_nextrev = parent.all_nextrev | {rev.revision}
                if down in rev.down_revisions:
                    parent.nextrev = parent.nextrev | {rev.revision}
        # A dependency already implied by an ancestor's dependency adds nothing.
        for rev in by_id.values():
            if not rev.resolved_dependencies:
                continue
            needed = set(rev.resolved_dependencies)
            for anc in self._closure([rev], _PARENTS):
                if anc is not rev:
                    needed.difference_update(anc.resolved_dependencies)
            rev.normalized_dependencies = tuple(d for d in rev.resolved_dependencies if d in needed)
            rev._normalized_down = _dedupe(rev.down_revisions + rev.normalized_dependencies)

    def _detect_cycles(self) -> None:
        """Every revision must lie on a path from a base to a head."""
        if not self._by_id:
            return
        revs = list(self._by_id.values())
        self._check_reachable(
            CycleDetected,
            [r for r in revs if r.is_head],
            [r for r in revs if r.is_base],
            _PARENTS,
            _CHILDREN,
        )
        if any(r.dependencies for r in revs):  # else the same graph as above
            self._check_reachable(
                DependencyCycleDetected,
                [r for r in revs if r.is_real_head],
                [r for r in revs if r.is_real_base],
                _ALL_PARENTS,
                _ALL_CHILDREN,
            )

    def _check_reachable(
        self,
        kind: type[CycleDetected],
        heads: list[Revision],
        bases: list[Revision],
        down: Callable[[Revision], Iterable[str]],
        up: Callable[[Revision], Iterable[str]],
    ) -> None:
        if not heads or not bases:
            raise kind(sorted(self._by_id))
        from_heads = self._closure_ids(heads, down)
        from_bases = self._closure_ids(bases, up)
        if len(from_heads) == len(from_bases) == len(self._by_id):
            return
        stuck = set(self._by_id) - (from_heads & from_bases)
        if stuck:
            raise kind(sorted(stuck))

    def _propagate_labels(self) -> None:
        # A label names a whole line of history: every descendant of the
        # labelled revision, and, when the line above it runs straight (no
        # fork, no merge, nothing depending on it from the side), also its
        # ancestors down to the nearest fork or merge.
        for rev in self._by_id.values():
            labels = rev.declared_branch_labels
            if not labels:
                continue
            above = list(self.descendants([rev], include_dependencies=False))
            for node in above:
                node.branch_labels.update(labels)
            if any(n.is_real_branch_point or n.is_merge_point for n in above):
                continue
            parent: Revision | None = rev
            while (
                parent is not None and not parent.is_real_branch_point and not parent.is_merge_point
            ):
                parent.branch_labels.update(labels)
                parent = self._by_id[parent.down_revisions[0]] if parent.down_revisions else None

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Revision]:
        return iter(self._by_id.values())

    def __contains__(self, rev_id: object) -> bool:
        return rev_id in self._by_id

    def revision(self, rev_id: str) -> Revision:
        """Exact lookup by full id (no symbols, no prefixes)."""
        return self._by_id[rev_id]

    # ------------------------------------------------------------------ squashed revisions

    def knows(self, rev_id: str) -> bool:
        """Whether ``rev_id`` is a revision here, or one a squash here replaced."""
        return rev_id in self._by_id or rev_id in self._aliases or rev_id in self._squashed_into

    def squashed_into(self, rev_id: str) -> Revision | None:
        """The revision that squashed ``rev_id`` (None when nothing did)."""
        return self._squashed_into.get(rev_id)

    def canonical(self, ids: Iterable[str]) -> tuple[str, ...]:
        """``ids`` with each squashed revision's id replaced by the node it is now.

        The last revision a squash replaced is the squash itself; one inside it
        is no node here (a ResolutionError says so).
        """
        out = []
        for rid in ids:
            if rid not in self._by_id and self.knows(rid):
                found = self._lookup_symbol(rid)
                assert found is not None
                rid = found.revision
            out.append(rid)
        return tuple(out)

    def expand(
        self, part: Callable[[Revision, str, str, tuple[str, ...]], Revision]
    ) -> RevisionMap:
        """The graph a checkpoint moves on: every squash as the chain of revisions it replaced.

        A revision ``s`` with parent ``p`` and ``replaces = (a, b, c)`` becomes
        ``p -> a -> b -> s``. ``part(s, name, node_id, down)`` makes each node:
        ``node_id`` is ``name`` inside the chain and ``s`` for the last one (a
        checkpoint at ``c`` is at ``s``; ``c`` stays an alias of ``s``), ``down``
        its parent. Every other revision is copied, so this map is left as it is.
        """
        if not self._squashed_into:
            return self
        nodes: list[Revision] = []
        for rev in self._by_id.values():
            if not rev.replaces:
                nodes.append(rev.unlinked_copy())
                continue
            down = rev.down_revisions
            for i, name in enumerate(rev.replaces):
                node = part(rev, name, rev.revision if i == len(rev.replaces) - 1 else name, down)
                nodes.append(node)
                down = (node.revision,)
        expanded = RevisionMap(nodes)
        expanded._aliases = {name: expanded._by_id[r.revision] for name, r in self._aliases.items()}
        return expanded

    @property
    def branch_labels(self) -> dict[str, Revision]:
        return dict(self._labels)

    # ------------------------------------------------------------------ traversal

    def ancestors(
        self, targets: Iterable[Revision], include_dependencies: bool = True
    ) -> Iterator[Revision]:
        """``targets`` and everything below them."""
        return self._closure(targets, _NORMALIZED_PARENTS if include_dependencies else _PARENTS)

    def descendants(
        self, targets: Iterable[Revision], include_dependencies: bool = True
    ) -> Iterator[Revision]:
        """``targets`` and everything above them."""
        return self._closure(targets, _ALL_CHILDREN if include_dependencies else _CHILDREN)

    def _closure(
        self, targets: Iterable[Revision], step: Callable[[Revision], Iterable[str]]
    ) -> Iterator[Revision]:
        by_id = self._by_id
        seen: set[str] = set()
        stack = list(targets)
        while stack:
            rev = stack.pop()
            if rev.revision in seen:
                continue
            seen.add(rev.revision)
            yield rev
            stack.extend(map(by_id.__getitem__, step(rev)))

    def _closure_ids(
        self, targets: Iterable[Revision], step: Callable[[Revision], Iterable[str]]
    ) -> set[str]:
        """The ids :meth:`_closure` reaches (without making a generator of revisions)."""
        by_id = self._by_id
        seen: set[str] = set()
        stack = [t.revision for t in targets]
        while stack:
            rid = stack.pop()
            if rid not in seen:
                seen.add(rid)
                stack.extend(step(by_id[rid]))
        return seen

    def _check_overlap(self, targets: Sequence[Revision]) -> None:
        """Refuse target sets where one target is an ancestor of another."""
        ids = {t.revision for t in targets}
        if len(ids) < 2:
            return
        for t in targets:
            below = self._closure_ids([t], _NORMALIZED_PARENTS) - {t.revision}
            overlap = below & ids
            if overlap:
                raise RevisionError(
                    f"requested revision {t.revision} overlaps with other "
                    f"requested revisions {format_ids(sorted(overlap))}",
                    hint="name only the newest revision of each branch",
                )

    def shares_lineage(
        self,
        target: Revision,
        against: Sequence[Revision],
        include_dependencies: bool = False,
    ) -> bool:
        if not against:
            return True
        related = {r.revision for r in self.descendants([target], include_dependencies)}
        related |= {r.revision for r in self.ancestors([target], include_dependencies)}
        return any(a.revision in related for a in against)

    def filter_for_lineage(
        self,
        targets: Iterable[Revision],
        check_against: str | None,
        include_dependencies: bool = False,
    ) -> tuple[Revision, ...]:
        ids, label = self._split_symbol(check_against)
        against: list[Revision] = []
        if label:
            branch = self._resolve_branch(label)
            if branch is not None:
                against.append(branch)
        against.extend(self._ident(i) for i in ids)
        return tuple(t for t in targets if self.shares_lineage(t, against, include_dependencies))

    # ------------------------------------------------------------------ resolution

    def _split_symbol(self, symbol: str | None) -> tuple[tuple[str, ...], str | None]:
        """``[label@]name`` -> (ids it stands for, label)."""
        label: str | None = None
        if symbol is not None and "@" in symbol:
            label, symbol = symbol.split("@", 1)
        if symbol == "heads":
            if label:
                return (
                    tuple(
                        r.revision
                        for r in self.filter_for_lineage(
                            [self._by_id[h] for h in self.heads], label
                        )
                    ),
                    label,
                )
            return self.real_heads, label
        if symbol == "head":
            head = self.get_current_head(label)
            return ((head,) if head else ()), label
        if symbol is None or symbol == "base":
            return (), label
        return (symbol,), label

    def get_current_head(self, branch_label: str | None = None) -> str | None:
        heads = [self._by_id[h] for h in self.heads]
        if branch_label:
            heads = list(self.filter_for_lineage(heads, branch_label))
        if len(heads) > 1:
            raise MultipleHeads(
                [h.revision for h in heads], f"{branch_label}@head" if branch_label else "head"
            )
        return heads[0].revision if heads else None

    def _resolve_branch(self, label: str) -> Revision | None:
        found = self._labels.get(label)
        if found is not None:
            return found
        try:
            return self._ident(label)
        except ResolutionError:
            raise ResolutionError(
                f"no such branch: '{label}'",
                label,
                hint="run 'ckptmigrate branches' or 'ckptmigrate heads' to see branch labels",
            ) from None

    def _ident(self, ident: str, branch_label: str | None = None) -> Revision:
        """A full id, a branch label, or a unique prefix of 4+ characters."""
        branch = self._resolve_branch(branch_label) if branch_label else None
        rev = self._lookup_symbol(ident)
        if rev is None:
            keys = list(self._by_id) + list(self._labels)
            matches = [k for k in keys if len(k) > 3 and k.startswith(ident)]
            if branch is not None:
                matches = [k for k in matches if self.shares_lineage(self._lookup(k), [branch])]
            if not matches:
                short = "; give at least four characters of a revision id" if len(ident) < 4 else ""
                raise ResolutionError(
                    f"no such revision or branch '{ident}'{short}",
                    ident,
                    hint="run 'ckptmigrate history' to list revisions",
                )
            if len(matches) > 1:
                shown = ", ".join(f"'{m}'" for m in matches[:3])
                raise ResolutionError(
                    f"multiple revisions start with '{ident}': {shown}"
                    + ("..." if len(matches) > 3 else ""),
                    ident,
                    hint="give more characters of the revision id",
                )
            rev = self._lookup(matches[0])
        if branch is not None and not self.shares_lineage(rev, [branch]):
            raise ResolutionError(
                f"revision {rev.revision} is not a member of branch '{branch_label}'",
                ident,
            )
        return rev

    def _lookup(self, key: str) -> Revision:
        rev = self._lookup_symbol(key)
        assert rev is not None
        return rev

    def get_revisions(self, symbol: RevisionIds) -> tuple[Target, ...]:
        """Revisions a symbol stands for; ``()`` for base.

        Accepts ids, unique prefixes, branch labels, ``head``, ``heads``,
        ``base``, ``label@...`` and ``[label@]-N`` (walk down from the heads).
        A ``-N`` that reaches or passes the bottom of the graph gives None.
        """
        return tuple(r if isinstance(r, Revision) else None for r in self._resolve(symbol))

    def _resolve(self, symbol: RevisionIds) -> tuple[Walked, ...]:
        """``get_revisions`` keeping a walk that ends exactly below a base
        (``"base"``) apart from one that runs off the graph (None)."""
        if not isinstance(symbol, str) and symbol is not None:
            out: tuple[Walked, ...] = ()
            for s in symbol:
                out += self._resolve(s)
            return out
        ids, label = self._split_symbol(symbol)
        if len(ids) == 1:
            try:
                steps = int(ids[0])
            except ValueError:
                steps = 0
            if steps < 0:
                heads = [self._by_id[h] for h in self.real_heads]
                if label is not None:
                    heads = [h for h in heads if label in h.branch_labels]
                return tuple(self._walk_from(h, steps) for h in heads)
        return tuple(self._ident(i, label) for i in ids)

    def get_revision(self, symbol: str | None) -> Revision | None:
        """Exactly one revision (or None for base); several is an error."""
        ids, label = self._split_symbol(symbol)
        if len(ids) > 1:
            raise MultipleHeads(ids, symbol or "heads")
        if not ids:
            if label:
                self._resolve_branch(label)  # "nosuchbranch@base" is still an error
            return None
        return self._ident(ids[0], label)

    # ------------------------------------------------------------------ walking

    _BASE = "base"

    def _walk_from(
        self,
        start: Revision | str | None,
        steps: int,
        branch_label: str | None = None,
        no_overwalk: bool = True,
    ) -> Revision | str | None:
        """Move ``steps`` up (positive) or down (negative) one line of history.

        ``None`` as start means "below the bases"; the string ``"base"`` is
        the result of walking down past a base. Returns None when the walk
        runs out of history and ``no_overwalk`` is set.
        """
        node: Revision | str | None = start
        for _ in range(abs(steps)):
            choices: Sequence[Revision | str]
            if steps > 0:
                assert not isinstance(node, str)
                up_ids = (
                    self.bases
                    if node is None
                    else sorted(node.nextrev, key=self._order.__getitem__)
                )
                ups = [self._by_id[i] for i in up_ids]
                if branch_label:
                    ups = list(self.filter_for_lineage(ups, branch_label))
                choices = ups
            else:
                if node == self._BASE:
                    choices = ()
                else:
                    down_ids = (
                        self.heads if node is None else node.down_revisions  # type: ignore[union-attr]
                    )
                    choices = [self._by_id[i] for i in down_ids] or [self._BASE]
            if not choices:
                return None if no_overwalk else node
            if len(choices) > 1:
                raise RevisionError(
                    "ambiguous walk: more than one revision is "
                    + ("above" if steps > 0 else "below")
                    + (f" {node.revision}" if isinstance(node, Revision) else " here"),
                    hint="name the target revision explicitly, or use '<branch>@+N'",
                )
            node = choices[0]
        return node

    def parse_upgrade_target(
        self,
        current: Sequence[str],
        target: str | Sequence[str],
        assert_relative_length: bool = True,
    ) -> tuple[Target, ...]:
        match = _RELATIVE.fullmatch(target) if isinstance(target, str) else None
        if not match:
            return self.get_revisions(target)
        label, symbol, rel = match.groups()
        n = int(rel)
        if n <= 0:
            if symbol is None:
                raise RevisionError(
                    f"relative revision {rel} didn't produce {abs(n)} migrations",
                    hint="upgrade takes +N; use 'downgrade' to go back",
                )
            start = self.get_revision(f"{label}@{symbol}" if label else symbol)
            walked = self._walk_from(start, n, no_overwalk=assert_relative_length)
            return (self._as_target(walked),)
        if symbol is not None:
            walked = self._walk_from(
                self.get_revision(symbol), n, label, no_overwalk=assert_relative_length
            )
            return (self._as_target(walked),)
        # Walk up from "where we are now": the current revisions (as given,
        # so a symbol there is resolved like any other), or below the bases.
        starts: list[Revision | str | None] = list(current) or [None]
        if label:
            applied = self._revisions_only(self._resolve(tuple(current)), current)
            on_branch = self.filter_for_lineage(applied, label)
            if on_branch:
                starts = list(on_branch)
            else:
                # The branch has no current head: start from its newest
                # applied ancestor, or from base.
                active = self.filter_for_lineage(self.ancestors(applied), label)
                below = {d for r in active for d in r.normalized_down_revisions}
                tips = [r for r in active if r.revision not in below]
                starts = list(tips) or [None]
        if len(starts) > 1:
            raise RevisionError(
                "ambiguous upgrade from multiple current revisions",
                hint="use '<branch>@+N' or name the target revision",
            )
        origin = self.get_revision(starts[0]) if isinstance(starts[0], str) else starts[0]
        walked = self._walk_from(origin, n, label, no_overwalk=assert_relative_length)
        if walked is None:
            raise RevisionError(
                f"relative revision {rel} didn't produce {n} migrations",
                hint="there are fewer revisions above the current one; use 'heads'",
            )
        return (self._as_target(walked),)

    def _revisions_only(self, resolved: Iterable[Walked], symbols: Sequence[str]) -> list[Revision]:
        """``resolved`` as revisions; a relative symbol that walked to or past
        base cannot stand for a current revision."""
        out: list[Revision] = []
        for rev in resolved:
            if not isinstance(rev, Revision):
                raise RevisionError(
                    f"{format_ids(symbols)} does not name revisions that can be a starting point",
                    hint="name the current revision(s) explicitly",
                )
            out.append(rev)
        return out

    def _as_target(self, walked: Revision | str | None) -> Target:
        if walked is None:
            raise RevisionError("walked too far", hint="use a smaller relative step")
        if isinstance(walked, str):
            return None
        return walked

    def parse_downgrade_target(
        self, current: Sequence[str], target: str | None, assert_relative_length: bool = True
    ) -> tuple[str | None, Target]:
        """(branch label, revision to stop at); revision None means base."""
        if target is None:
            return None, None
        match = _RELATIVE.fullmatch(target)
        if match:
            label, symbol, rel = match.groups()
            n = int(rel)
            if n >= 0:
                if symbol is None:
                    raise RevisionError(
                        f"relative revision {rel} didn't produce {abs(n)} migrations",
                        hint="downgrade takes -N; use 'upgrade' to go forward",
                    )
                walked = self._walk_from(
                    self.get_revision(symbol), n, label, no_overwalk=assert_relative_length
                )
                return label, self._as_target(walked)
            relative_to_current = symbol is None
            if relative_to_current:
                if label:
                    on_branch = self.filter_for_lineage([self._ident(c) for c in current], label)
                    if not on_branch:
                        on_branch = self.filter_for_lineage(self._all_current(current), label)
                    if len(on_branch) != 1:
                        raise RevisionError(
                            f"branch '{label}' has no single current revision",
                            hint="name the target revision explicitly",
                        )
                    symbol = on_branch[0].revision
                else:
                    if not current:
                        raise RevisionError(
                            f"relative revision {rel} didn't produce {abs(n)} migrations",
                            hint="the checkpoint is at base already",
                        )
                    if len(set(current)) > 1:
                        raise RevisionError(
                            f"downgrade {rel} from multiple heads "
                            f"({format_ids(current)}) is ambiguous",
                            hint="use '<branch>@-N' or name the target revision",
                        )
                    symbol = current[0]
                    label = symbol
            start = self.get_revision(f"{label}@{symbol}" if label else symbol)
            walked = self._walk_from(start, n, no_overwalk=assert_relative_length)
            if walked is None:
                if relative_to_current:
                    raise RevisionError(
                        f"relative revision {rel} didn't produce {abs(n)} migrations",
                        hint="there are fewer revisions below the current one; use 'base'",
                    )
                raise RevisionError("walked too far", hint="use a smaller relative step")
            return label, (None if isinstance(walked, str) else walked)
        label_part, _, symbol_part = target.rpartition("@")
        return (label_part or None), self.get_revision(symbol_part)

    def _all_current(self, current: Sequence[str]) -> tuple[Revision, ...]:
        """``current`` and its ancestors, less those with a descendant (not counting
        ``depends_on``) among them, as Alembic folds them."""
        tops = {r for r in self.get_revisions(tuple(current)) if r is not None}
        within = {r.revision for r in self.ancestors(list(tops))}
        # ``within`` holds every parent of its members, so a revision with a
        # descendant in it has a child in it: one look per revision, not a walk
        tips = [r for r in within if not (self._by_id[r].nextrev & within)]
        return tuple(self._by_id[r] for r in sorted(tips, key=self._order.__getitem__))

    def all_current(self, current: Sequence[str]) -> tuple[Revision, ...]:
        """What ``current`` shows: the stored heads, ancestors folded away."""
        return self._all_current(current)

    # ------------------------------------------------------------------ plans

    def upgrade_revisions(
        self,
        target: str | Sequence[str],
        current: Sequence[str],
        *,
        inclusive: bool = False,
        implicit_base: bool = False,
        assert_relative_length: bool = True,
    ) -> tuple[set[Revision], tuple[Revision, ...]]:
        """Revisions needed to bring ``current`` up to ``target``, and the tips."""
        targets: list[Revision] = [
            t
            for t in self.parse_upgrade_target(current, target, assert_relative_length)
            if t is not None
        ]
        if len(current) == 1 and "@" in current[0]:
            # "label@..." as the lower bound keeps the walk on that branch.
            branch, _, _ = current[0].partition("@")
            branch_rev = self.get_revision(branch)
            if branch_rev is not None and branch_rev.revision == branch:
                # A revision id used where a label goes stands for its branch.
                if len(branch_rev.branch_labels) != 1:
                    raise RevisionError(
                        f"revision {branch} is not on exactly one labelled branch, "
                        f"so '{current[0]}' does not name a branch",
                        hint="put a branch label before the '@'",
                    )
                (branch,) = branch_rev.branch_labels
            targets = [t for t in targets if branch in t.branch_labels]
        self._check_overlap(targets)
        required = set(self.ancestors(targets)) | set(targets)
        resolved = self._resolve(tuple(current))
        if not implicit_base:
            # A relative lower bound that walked to base is never an ancestor.
            for rev in resolved:
                if rev is not None and rev not in required:
                    raise RangeNotAncestorError(
                        format_ids(current) or None, format_ids(to_tuple(target)) or None
                    )
        lower: list[Revision] = []
        if resolved and resolved[0] is None:
            # A relative lower bound that runs off the graph when walked from
            # the heads is read relative to the upper bound instead.
            if len(current) != 1:
                raise RevisionError(
                    f"relative revision in {format_ids(current)} walked off the graph",
                    hint="use a smaller relative step or name the revision",
                )
            _, rev = self.parse_downgrade_target(
                to_tuple(target), current[0], assert_relative_length
            )
            if rev is not None:
                lower.append(rev)
        else:
            lower = self._revisions_only(resolved, current)
        self._check_overlap(lower)
        have = set(self.ancestors(lower)) | set(lower)
        needs = required - have
        if inclusive:
            needs.update(lower)
        if lower and not implicit_base:
            needs &= set(self.descendants(lower, include_dependencies=False))
        return needs, tuple(targets)

    def downgrade_revisions(
        self,
        current: Sequence[str],
        target: str | None,
        *,
        inclusive: bool = False,
        implicit_base: bool = False,
        assert_relative_length: bool = True,
    ) -> tuple[set[Revision], tuple[Revision, ...]]:
        """Applied revisions that must be undone to get from ``current`` to ``target``."""
        label, stop = self.parse_downgrade_target(current, target, assert_relative_length)
        if stop is None:
            roots = [r for r in self._by_id.values() if not r.down_revisions]
        elif inclusive:
            roots = [stop]
        else:
            roots = [self._by_id[i] for i in sorted(stop.nextrev, key=self._order.__getitem__)]
        if label and len(roots) > 1:
            branch = self._resolve_branch(label)
            on_branch = {
                r.revision
                for r in self.ancestors([branch] if branch else [], include_dependencies=False)
            }
            roots = [r for r in roots if r.revision in on_branch]
            if not roots:
                raise RevisionError(
                    "not a valid downgrade target from current heads",
                    hint="check 'ckptmigrate current' and 'ckptmigrate history'",
                )
        heads = tuple(r for r in self.get_revisions(tuple(current)) if r is not None)
        drop = set(self.descendants(roots))
        active = set(self.ancestors(heads))
        drop &= active
        if implicit_base:
            drop |= active - set(self.ancestors(roots))
        if stop is not None and not drop and stop not in heads:
            raise RangeNotAncestorError(target, format_ids(current) or None, "nothing to drop")
        return drop, heads

    def topological_order(
        self, revisions: Collection[Revision], tips: Iterable[Revision]
    ) -> list[Revision]:
        """Newest first, parents after children, one branch kept together.

        Walks down from each tip, switching to another tip whenever the
        current candidate is still needed below it (Alembic's ordering).
        """
        todo = {r.revision for r in revisions}
        active = sorted(
            {t.revision for t in tips if t.revision in todo}, key=self._order.__getitem__
        )

        def below(rid: str) -> set[str]:
            return self._closure_ids([self._by_id[rid]], _NORMALIZED_PARENTS)

        ancestry = [below(a) for a in active]
        out: list[Revision] = []
        i = 0
        while active:
            cand = active[i]
            blocker = next((j for j, anc in enumerate(ancestry) if j != i and cand in anc), None)
            if blocker is not None:
                i = blocker
                continue
            if cand in todo:
                out.append(self._by_id[cand])
                todo.discard(cand)
            rev = self._by_id[cand]
            downs = [d for d in rev.normalized_down_revisions if d in todo and d not in active]
            if not downs:
                del active[i]
                del ancestry[i]
                i = max(i - 1, 0)
            elif not rev.normalized_dependencies and len(rev.down_revisions) == 1:
                active[i] = downs[0]
                ancestry[i].discard(cand)
            else:
                active[i] = downs[0]
                ancestry[i] = below(downs[0])
                for d in downs[1:]:
                    active.append(d)
                    ancestry.append(below(d))
        if todo:  # pragma: no cover - guarded by the callers' set construction
            raise RevisionError(f"could not order revisions {format_ids(sorted(todo))}")
        return out

    def iterate_revisions(
        self,
        upper: str | Sequence[str],
        lower: str | Sequence[str] | None,
        *,
        inclusive: bool = False,
        implicit_base: bool = False,
        assert_relative_length: bool = True,
        select_for_downgrade: bool = False,
    ) -> list[Revision]:
        """Revisions between ``lower`` and ``upper``, newest first."""
        if select_for_downgrade:
            cur = to_tuple(upper)
            revs, tips = self.downgrade_revisions(
                cur,
                lower if isinstance(lower, str) or lower is None else ",".join(lower),
                inclusive=inclusive,
                implicit_base=implicit_base,
                assert_relative_length=assert_relative_length,
            )
        else:
            revs, tips = self.upgrade_revisions(
                upper,
                to_tuple(lower),
                inclusive=inclusive,
                implicit_base=implicit_base,
                assert_relative_length=assert_relative_length,
            )
        return self.topological_order(revs, tips)

    def upgrade_path(self, current: Sequence[str], target: str) -> list[Revision]:
        """Steps of ``upgrade``, in the order they run (oldest first)."""
        return list(reversed(self.iterate_revisions(target, current, implicit_base=True)))

    def downgrade_path(self, current: Sequence[str], target: str) -> list[Revision]:
        """Steps of ``downgrade``, in the order they run (newest first)."""
        return self.iterate_revisions(current, target, select_for_downgrade=True)

    def walk(self, base: str = "base", head: str = "heads") -> list[Revision]:
        """All revisions between base and head, newest first (for history)."""
        lower = base if base != "base" else None
        if lower is not None or head != "heads":
            return self.iterate_revisions(head, lower, inclusive=True, assert_relative_length=False)
        if self._walked is None:  # the whole history: kept, and kept in snapshots
            everything = self.iterate_revisions(
                head, None, inclusive=True, assert_relative_length=False
            )
            self._walked = tuple(r.revision for r in everything)
        by_id = self._by_id
        return [by_id[rid] for rid in self._walked]

    # ------------------------------------------------------------------ heads bookkeeping

    def heads_after_upgrade(self, heads: Collection[str], rev: Revision) -> tuple[str, ...]:
        """What a checkpoint records after running ``rev``'s upgrade."""
        downs = set(rev.normalized_down_revisions)
        kept = [h for h in heads if h not in downs]
        return self._ordered([*kept, rev.revision])

    def heads_after_downgrade(self, heads: Collection[str], rev: Revision) -> tuple[str, ...]:
        """What a checkpoint records after running ``rev``'s downgrade."""
        others = [h for h in heads if h != rev.revision]
        downs = rev.normalized_down_revisions
        if others:
            covered = {r.revision for r in self.ancestors([self._by_id[h] for h in others])}
            back = [d for d in downs if d not in covered]
        else:
            covered = set()
            for d in downs:
                covered |= {r.revision for r in self.ancestors([self._by_id[d]])} - {d}
            back = [d for d in downs if d not in covered]
        return self._ordered(others + back)

    def heads_after_stamp(
        self, heads: Sequence[str], destinations: Sequence[str]
    ) -> tuple[str, ...]:
        """Alembic's ``stamp``: move the recorded heads without running anything.

        Every destination is placed relative to the recorded heads that share
        its lineage (all of them, for ``base`` and ``heads``): it replaces them
        when it lies above or below them, and starts a new branch otherwise.
        ``base`` alone removes them. A ``base`` next to other destinations
        only widens which recorded heads those may replace.
        """
        symbols = list(destinations) or ["base"]
        recorded = self._revisions_only(self._resolve(tuple(heads)), heads)
        related: list[Revision] = []
        for symbol in symbols:
            if symbol:
                for rev in self.filter_for_lineage(recorded, symbol, include_dependencies=True):
                    if rev not in related:
                        related.append(rev)
        dests: list[Revision | None] = []
        for found in self._resolve(tuple(symbols)):
            dest = found if isinstance(found, Revision) else None
            if dest not in dests:
                dests.append(dest)
        if not dests:
            dests.append(None)
        result = [r.revision for r in recorded]
        moved = [r.revision for r in related]

        def conflict(what: str) -> RevisionError:
            return RevisionError(
                f"cannot stamp {format_ids(symbols)}: {what}",
                hint="stamp one revision per branch",
            )

        for dest in dests:
            if dest is None:
                # Down to base: forget every related head.
                for rid in moved:
                    if rid not in result:
                        raise conflict(f"{rid} is moved by more than one destination")
                    result.remove(rid)
                continue
            if dest in related:
                continue
            target = dest.revision
            above = set(self.descendants([dest])) & set(related)
            below = set(self.ancestors([dest])) & set(related)
            if not above and not below:
                # A lineage the recorded heads don't cover: a new branch.
                if target in result:
                    raise conflict(f"{target} is recorded already")
                result.append(target)
                continue
            if not above and set(moved) - set(result) and target not in result:
                # Above heads some of which another destination moved already:
                # it becomes a head of its own.
                result.append(target)
                continue
            # Replace every related head with the destination.
            for rid in moved:
                if rid not in result:
                    raise conflict(f"{rid} is moved by more than one destination")
                result.remove(rid)
            if target in result:
                raise conflict(f"{target} is recorded already")
            result.append(target)
        return self._ordered(result)

    def _ordered(self, ids: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted(dict.fromkeys(ids), key=self._order.__getitem__))
