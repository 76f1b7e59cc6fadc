"""The pure graph with squashed revisions (``replaces``): one node for graph commands,
the replaced chain for checkpoints."""

from __future__ import annotations

import pytest

from ckptmigrate.errors import ResolutionError, RevisionError
from ckptmigrate.script.revision import Revision, RevisionMap


def _squashed() -> list[Revision]:
    """p -> [a -> b -> c squashed as s] -> d; c's file is gone, d still names it."""
    return [
        Revision("pppp", None),
        Revision("ssss", "pppp", replaces=("aaaa", "bbbb", "cccc")),
        Revision("dddd", "cccc"),
    ]


def _part(squashed: Revision, name: str, node_id: str, down: tuple[str, ...]) -> Revision:
    rev = Revision(node_id, down)
    rev.replaced = name  # type: ignore[attr-defined]
    return rev


def test_a_squash_is_one_node_that_ends_where_its_last_revision_did() -> None:
    rmap = RevisionMap(_squashed())
    assert [r.revision for r in rmap.walk()] == ["dddd", "ssss", "pppp"]
    assert rmap.revision("dddd").down_revisions == ("ssss",)
    assert rmap.heads == ("dddd",)
    got = rmap.get_revision("cccc")
    assert got is not None and got.revision == "ssss"
    assert rmap.canonical(["cccc", "dddd"]) == ("ssss", "dddd")
    assert rmap.knows("aaaa") and rmap.knows("cccc") and not rmap.knows("zzzz")
    assert "aaaa" not in rmap
    squash = rmap.squashed_into("bbbb")
    assert squash is not None and squash.revision == "ssss"
    assert rmap.squashed_into("dddd") is None


def test_a_revision_inside_a_squash_is_no_target_of_graph_commands() -> None:
    rmap = RevisionMap(_squashed())
    with pytest.raises(ResolutionError, match="bbbb was squashed into ssss"):
        rmap.get_revision("bbbb")
    with pytest.raises(ResolutionError):
        rmap.canonical(["aaaa"])


def test_a_child_of_a_revision_inside_a_squash_is_refused() -> None:
    revs = [*_squashed(), Revision("eeee", "bbbb")]
    with pytest.raises(RevisionError, match="eeee revises bbbb, which lies inside"):
        RevisionMap(revs)
    with pytest.raises(RevisionError, match="depends on bbbb"):
        RevisionMap([*_squashed(), Revision("eeee", "dddd", dependencies="bbbb")])


def test_one_revision_squashed_twice_is_refused() -> None:
    revs = [*_squashed(), Revision("tttt", "dddd", replaces=("cccc", "xxxx"))]
    with pytest.raises(RevisionError, match="cccc is replaced by both ssss and tttt"):
        RevisionMap(revs)
    with pytest.raises(RevisionError, match="lists itself or one revision twice"):
        Revision("ssss", "pppp", replaces=("aaaa", "aaaa"))


def test_kept_files_of_squashed_revisions_are_no_nodes() -> None:
    """``squash --keep``: the old files stay, the squash stands for them."""
    kept = [Revision("aaaa", "pppp"), Revision("bbbb", "aaaa"), Revision("cccc", "bbbb")]
    rmap = RevisionMap(kept + _squashed())
    assert [r.revision for r in rmap.walk()] == ["dddd", "ssss", "pppp"]
    assert sorted(r.revision for r in rmap.dormant) == ["aaaa", "bbbb", "cccc"]


def test_expanded_map_is_the_replaced_chain() -> None:
    compact = RevisionMap(_squashed())
    expanded = compact.expand(_part)
    assert [r.revision for r in expanded.walk()] == ["dddd", "ssss", "bbbb", "aaaa", "pppp"]
    assert [getattr(r, "replaced", None) for r in expanded.walk()] == [
        None,
        "cccc",
        "bbbb",
        "aaaa",
        None,
    ]
    assert expanded.revision("ssss").down_revisions == ("bbbb",)
    # c still names where the squash ends; the compact map is left as it was
    got = expanded.get_revision("cccc")
    assert got is not None and got.revision == "ssss"
    assert [r.revision for r in expanded.upgrade_path(["aaaa"], "head")] == [
        "bbbb",
        "ssss",
        "dddd",
    ]
    assert [r.revision for r in expanded.downgrade_path(["ssss"], "aaaa")] == ["ssss", "bbbb"]
    assert compact.revision("pppp").nextrev == {"ssss"}
    assert expanded.revision("pppp").nextrev == {"aaaa"}


def test_a_graph_without_squashes_expands_to_itself() -> None:
    rmap = RevisionMap([Revision("pppp", None), Revision("qqqq", "pppp")])
    assert rmap.expand(_part) is rmap
