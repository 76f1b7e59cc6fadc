"""A revision graph restored from its snapshot answers exactly as the graph it was taken of.

The snapshot goes through JSON, as the graph cache stores it; the restored map
is then held to Alembic's answers by the same sweep as a built one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from tests.test_graph_vs_alembic import _FAST, HAND_MADE, Def, _Checker, dags

from ckptmigrate.script.revision import Revision, RevisionMap


def _bare(payload: Any) -> Revision:
    assert payload == ["payload"]
    return Revision.__new__(Revision)


def restored(rmap: RevisionMap) -> RevisionMap:
    stored = json.loads(json.dumps(rmap.snapshot(lambda rev: ["payload"])))
    return RevisionMap.restore(stored, _bare)


def assert_same(built: RevisionMap, again: RevisionMap) -> None:
    assert [r.link_state() for r in again] == [r.link_state() for r in built]
    assert [r.link_state() for r in again.dormant] == [r.link_state() for r in built.dormant]
    for name in ("heads", "real_heads", "bases", "real_bases"):
        assert getattr(again, name) == getattr(built, name)
    assert [r.revision for r in again.walk()] == [r.revision for r in built.walk()]
    assert again.branch_labels.keys() == built.branch_labels.keys()
    for rev in built:
        twin = again.revision(rev.revision)
        for attr in ("branch_labels", "nextrev", "all_nextrev", "normalized_down_revisions"):
            assert getattr(twin, attr) == getattr(rev, attr), (rev.revision, attr)
            assert type(getattr(twin, attr)) is type(getattr(rev, attr)), (rev.revision, attr)


class _RestoredChecker(_Checker):
    """The differential sweep, asked of the restored map instead of the built one."""

    def __init__(self, defs: list[Def]) -> None:
        super().__init__(defs)
        built = self.ours
        self.ours = restored(built)
        assert_same(built, self.ours)


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_a_restored_hand_made_graph_matches_alembic(name: str) -> None:
    _RestoredChecker(HAND_MADE[name]).run(max_state_size=2).assert_agree()


@_FAST
@given(dags())
def test_a_restored_random_graph_matches_alembic(defs: list[Def]) -> None:
    _RestoredChecker(defs).run(max_state_size=2, max_targets=30, stamp_pairs=False).assert_agree()


def _part(squashed: Revision, name: str, node_id: str, down: tuple[str, ...]) -> Revision:
    return Revision(node_id, down)


def test_a_restored_squash_keeps_its_aliases_kept_files_and_replaced_chain() -> None:
    revs = [
        Revision("aaaa", "pppp"),  # files kept by 'squash --keep'
        Revision("bbbb", "aaaa"),
        Revision("pppp", None, branch_labels="main"),
        Revision("ssss", "pppp", replaces=("aaaa", "bbbb", "cccc")),
        Revision("dddd", "cccc"),  # revises the squash's last revision
        Revision("eeee", "pppp", dependencies="ssss"),
    ]
    built = RevisionMap(revs)
    again = restored(built)
    assert_same(built, again)
    assert [r.revision for r in again.dormant] == ["aaaa", "bbbb"]
    assert again.revision("dddd").down_revisions == ("ssss",)
    found = again.get_revision("cccc")
    assert found is not None and found.revision == "ssss"
    squash = again.squashed_into("bbbb")
    assert squash is not None and squash.revision == "ssss"
    labelled = [r.revision for r in again.get_revisions("main@heads") if r is not None]
    assert sorted(labelled) == ["dddd", "eeee"]
    steps = [r.revision for r in again.expand(_part).upgrade_path([], "heads")]
    assert steps == [r.revision for r in built.expand(_part).upgrade_path([], "heads")]
    assert steps[:4] == ["pppp", "aaaa", "bbbb", "ssss"]


def test_an_empty_graph_round_trips() -> None:
    again = restored(RevisionMap([]))
    assert again.heads == () and again.walk() == [] and len(again) == 0
