"""Unit tests of the pure revision graph (``ckptmigrate.script.revision``).

These need neither Alembic nor torch; ``test_graph_vs_alembic.py`` holds the
same module to Alembic's answers. Here: the error messages a user reads, the
heads a checkpoint records after each step, and the Alembic corners where we
deliberately answer differently.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from ckptmigrate.errors import (
    CycleDetected,
    DependencyCycleDetected,
    MultipleHeads,
    RangeNotAncestorError,
    ResolutionError,
    RevisionError,
)
from ckptmigrate.script import revision as revision_module
from ckptmigrate.script.revision import Revision, RevisionMap

Ids = str | tuple[str, ...] | None


def graph(*defs: tuple[str, Ids] | tuple[str, Ids, Ids] | tuple[str, Ids, Ids, Ids]) -> RevisionMap:
    return RevisionMap([Revision(*d) for d in defs])


def ids(revs: Sequence[Revision | None]) -> list[str | None]:
    return [r.revision if r is not None else None for r in revs]


def run(rmap: RevisionMap, heads: Sequence[str], target: str, *, up: bool) -> tuple[str, ...]:
    """The heads recorded after running the whole plan, step by step."""
    current = tuple(heads)
    if up:
        for rev in rmap.upgrade_path(current, target):
            current = rmap.heads_after_upgrade(current, rev)
    else:
        for rev in rmap.downgrade_path(current, target):
            current = rmap.heads_after_downgrade(current, rev)
    return current


# a1 - b2 - c3 - d4
LINEAR = graph(("a1a1a1", None), ("b2b2b2", "a1a1a1"), ("c3c3c3", "b2b2b2"), ("d4d4d4", "c3c3c3"))


# aaaa - bbbb < cccc ......... > eeee
#             < dddd - dddd2 /
def merged() -> RevisionMap:
    return graph(
        ("aaaa01", None),
        ("bbbb01", "aaaa01"),
        ("cccc01", "bbbb01"),
        ("dddd01", "bbbb01"),
        ("dddd02", "dddd01"),
        ("eeee01", ("cccc01", "dddd02")),
    )


def branched() -> RevisionMap:
    return graph(("aaaa01", None), ("bbbb01", "aaaa01"), ("cccc01", "bbbb01"), ("dddd01", "bbbb01"))


# main: m1 - m2 - m3 (m3 depends on the "feat" label)
# feat: f1 - f2      (f2 depends on m2)
def with_dependencies() -> RevisionMap:
    return graph(
        ("m1m1m1", None, None, "main"),
        ("f1f1f1", None, None, "feat"),
        ("m2m2m2", "m1m1m1"),
        ("f2f2f2", "f1f1f1", "m2m2m2"),
        ("m3m3m3", "m2m2m2", "feat"),
    )


# --------------------------------------------------------------------------- messages


def test_multiple_heads_names_them_and_says_how_to_choose() -> None:
    with pytest.raises(MultipleHeads) as err:
        branched().get_revision("head")
    text = str(err.value)
    assert "cccc01" in text and "dddd01" in text
    assert "'heads'" in text
    assert "@head" in text
    assert "merge" in text
    assert err.value.heads == ("cccc01", "dddd01")


def test_multiple_heads_stops_an_upgrade_to_head() -> None:
    with pytest.raises(MultipleHeads, match="cccc01, dddd01"):
        branched().upgrade_path(("aaaa01",), "head")
    # ... but "heads" is fine, and so is a label-free explicit target.
    assert ids(branched().upgrade_path(("aaaa01",), "heads")) == ["bbbb01", "dddd01", "cccc01"]


def test_branch_head_narrows_multiple_heads() -> None:
    rmap = graph(("aaaa", None), ("bbbb", "aaaa", None, "left"), ("cccc", "aaaa", None, "right"))
    assert rmap.get_current_head("left") == "bbbb"
    with pytest.raises(MultipleHeads, match=r"'head'.*bbbb, cccc"):
        rmap.get_current_head()


def test_unknown_revision() -> None:
    with pytest.raises(ResolutionError) as err:
        LINEAR.get_revision("zzzz")
    assert "'zzzz'" in str(err.value)
    assert "history" in str(err.value)
    assert err.value.argument == "zzzz"


def test_too_short_unknown_prefix_asks_for_four_characters() -> None:
    with pytest.raises(ResolutionError, match="at least four characters"):
        LINEAR.get_revision("zz")
    # Any unique prefix resolves, as in Alembic (ids themselves must be 4+ long).
    assert LINEAR.get_revision("a1") is LINEAR.revision("a1a1a1")
    assert LINEAR.get_revision("a1a1") is LINEAR.revision("a1a1a1")


def test_ambiguous_prefix_lists_candidates() -> None:
    rmap = graph(("abcd01", None), ("abcd02", "abcd01"), ("abce03", "abcd02"))
    with pytest.raises(ResolutionError) as err:
        rmap.get_revision("abcd")
    text = str(err.value)
    assert "'abcd01'" in text and "'abcd02'" in text
    assert "more characters" in text
    assert rmap.get_revision("abce") is rmap.revision("abce03")


def test_ambiguous_prefix_shows_at_most_three_candidates() -> None:
    rmap = graph(*[(f"abcd{i:02d}", None) for i in range(5)])
    with pytest.raises(ResolutionError) as err:
        rmap.get_revision("abcd")
    text = err.value.message
    assert text.count("'abcd0") == 3
    assert text.endswith("...")


def test_no_such_branch() -> None:
    with pytest.raises(ResolutionError, match="'nolabel'"):
        LINEAR.get_revision("nolabel@head")
    with pytest.raises(ResolutionError, match="no such branch: 'nolabel'"):
        LINEAR.get_revision("nolabel@base")


def test_revision_not_on_branch() -> None:
    rmap = graph(("aaaa", None, None, "left"), ("bbbb", None, None, "right"))
    with pytest.raises(ResolutionError, match="not a member of branch 'left'"):
        rmap.get_revision("left@bbbb")


def test_self_loop() -> None:
    with pytest.raises(CycleDetected, match=r"cycle detected in revisions \(aaaa\)") as err:
        graph(("aaaa", "aaaa"))
    assert not isinstance(err.value, DependencyCycleDetected)
    assert err.value.hint and "down_revision" in err.value.hint


def test_dependency_self_loop() -> None:
    with pytest.raises(DependencyCycleDetected, match=r"dependency cycle .*\(aaaa\)"):
        graph(("aaaa", None, "aaaa"))


def test_cycle_names_only_the_revisions_on_it() -> None:
    with pytest.raises(CycleDetected) as err:
        graph(("root", None), ("aaaa", "bbbb"), ("bbbb", "aaaa"))
    assert err.value.revisions == ("aaaa", "bbbb")


def test_cycle_with_no_base_at_all() -> None:
    with pytest.raises(CycleDetected) as err:
        graph(("aaaa", "bbbb"), ("bbbb", "aaaa"))
    assert err.value.revisions == ("aaaa", "bbbb")


def test_dependency_cycle() -> None:
    with pytest.raises(DependencyCycleDetected, match="dependency cycle"):
        graph(("aaaa", None), ("bbbb", "aaaa", "cccc"), ("cccc", "aaaa", "bbbb"))


def test_missing_down_revision() -> None:
    with pytest.raises(RevisionError) as err:
        graph(("aaaa", None), ("bbbb", "zzzz"))
    assert "zzzz" in err.value.message and "bbbb" in err.value.message
    assert err.value.hint and "down_revision" in err.value.hint


def test_missing_depends_on_target() -> None:
    with pytest.raises(RevisionError) as err:
        graph(("aaaa", None), ("bbbb", "aaaa", "zzzz"))
    assert "'zzzz'" in err.value.message and "bbbb" in err.value.message
    assert err.value.hint and "depends_on" in err.value.hint


def test_depends_on_a_branch_label() -> None:
    rmap = with_dependencies()
    assert rmap.revision("m3m3m3").resolved_dependencies == ("f1f1f1",)
    assert rmap.revision("m3m3m3").normalized_down_revisions == ("m2m2m2", "f1f1f1")


def test_duplicate_branch_label() -> None:
    with pytest.raises(RevisionError) as err:
        graph(("aaaa", None, None, "x"), ("bbbb", "aaaa", None, "x"))
    text = err.value.message
    assert "'x'" in text and "aaaa" in text and "bbbb" in text
    assert err.value.hint and "label" in err.value.hint


def test_branch_label_may_not_be_a_revision_id() -> None:
    with pytest.raises(RevisionError, match="branch name 'aaaa'"):
        graph(("aaaa", None), ("bbbb", "aaaa", None, "aaaa"))


def test_duplicate_revision_id() -> None:
    with pytest.raises(RevisionError, match="aaaa is present more than once"):
        graph(("aaaa", None), ("aaaa", None))


@pytest.mark.parametrize("char", ["@", "-", "+", ":"])
def test_illegal_characters_in_ids(char: str) -> None:
    rev_id = f"ab{char}cd"
    with pytest.raises(RevisionError) as err:
        Revision(rev_id, None)
    assert f"'{char}'" in err.value.message and rev_id in err.value.message
    assert err.value.hint


def test_revision_id_must_be_a_string() -> None:
    with pytest.raises(RevisionError, match="non-empty string"):
        Revision("", None)
    with pytest.raises(RevisionError, match="non-empty string"):
        Revision(None, None)  # type: ignore[arg-type]


def test_every_error_says_how_to_fix_it() -> None:
    cases = [
        lambda: branched().get_revision("head"),
        lambda: LINEAR.get_revision("zzzz"),
        lambda: graph(("aaaa", "aaaa")),
        lambda: graph(("aaaa", "zzzz")),
        lambda: branched().downgrade_path(("cccc01", "dddd01"), "-1"),
        lambda: LINEAR.upgrade_path((), "-1"),
        lambda: LINEAR.upgrade_path(("d4d4d4",), "+1"),
        lambda: branched().heads_after_stamp(("bbbb01",), ["heads", "cccc01+0", "aaaa01"]),
    ]
    for case in cases:
        with pytest.raises(RevisionError) as err:
            case()
        assert err.value.hint, err.value
        assert err.value.message[:1].islower(), err.value.message


# --------------------------------------------------------------------------- plans


def test_linear_plans() -> None:
    assert ids(LINEAR.upgrade_path((), "head")) == ["a1a1a1", "b2b2b2", "c3c3c3", "d4d4d4"]
    assert ids(LINEAR.upgrade_path(("b2b2b2",), "+1")) == ["c3c3c3"]
    assert ids(LINEAR.upgrade_path(("b2b2b2",), "+2")) == ["c3c3c3", "d4d4d4"]
    assert ids(LINEAR.upgrade_path(("a1a1a1",), "c3c3")) == ["b2b2b2", "c3c3c3"]
    assert ids(LINEAR.downgrade_path(("d4d4d4",), "-1")) == ["d4d4d4"]
    assert ids(LINEAR.downgrade_path(("d4d4d4",), "b2b2b2")) == ["d4d4d4", "c3c3c3"]
    assert ids(LINEAR.downgrade_path(("d4d4d4",), "base")) == [
        "d4d4d4",
        "c3c3c3",
        "b2b2b2",
        "a1a1a1",
    ]
    assert ids(LINEAR.upgrade_path(("d4d4d4",), "b2b2b2")) == []  # upgrade never goes down


def test_relative_steps_past_the_end_are_refused() -> None:
    with pytest.raises(RevisionError, match="didn't produce 1 migrations"):
        LINEAR.upgrade_path(("d4d4d4",), "+1")
    with pytest.raises(RevisionError, match="didn't produce 5 migrations"):
        LINEAR.downgrade_path(("d4d4d4",), "-5")
    with pytest.raises(RevisionError, match="didn't produce 1 migrations"):
        LINEAR.upgrade_path((), "-1")


def test_downgrade_target_above_current_is_refused() -> None:
    with pytest.raises(RangeNotAncestorError):
        LINEAR.downgrade_path(("b2b2b2",), "d4d4d4")


def test_relative_target_with_trailing_garbage_is_refused() -> None:
    # Alembic matches its relative pattern at the start only and reads this as
    # "c3c3c3+1"; a typo should not silently pick a migration target.
    with pytest.raises(ResolutionError):
        LINEAR.upgrade_path(("b2b2b2",), "c3c3c3+1x")


def test_downgrade_minus_one_from_several_heads_is_refused() -> None:
    # Alembic only warns ("will be disallowed in a future release") and picks
    # the first head; we refuse and point at the branch syntax.
    with pytest.raises(RevisionError) as err:
        branched().downgrade_path(("cccc01", "dddd01"), "-1")
    assert "<branch>@-N" in (err.value.hint or "")
    # Naming the branch through a revision works:
    assert ids(branched().downgrade_path(("cccc01", "dddd01"), "dddd01@-1")) == ["dddd01"]


def test_upgrade_to_below_a_base_is_a_no_op() -> None:
    # "<base>-1" is base: like "upgrade base", there is nothing to run (Alembic
    # stops on an internal assertion here).
    assert LINEAR.upgrade_path(("b2b2b2",), "a1a1a1-1") == []
    assert LINEAR.upgrade_path((), "a1a1a1-1") == []


def test_branch_point_and_merge_plans() -> None:
    rmap = merged()
    assert ids(rmap.upgrade_path((), "heads")) == [
        "aaaa01",
        "bbbb01",
        "dddd01",
        "dddd02",
        "cccc01",
        "eeee01",
    ]
    assert ids(rmap.downgrade_path(("eeee01",), "bbbb01")) == [
        "eeee01",
        "cccc01",
        "dddd02",
        "dddd01",
    ]
    assert ids(rmap.upgrade_path(("cccc01",), "dddd02")) == ["dddd01", "dddd02"]


def test_relative_label_targets() -> None:
    rmap = graph(
        ("aaaa", None),
        ("bbbb", "aaaa", None, "left"),
        ("bbb2", "bbbb"),
        ("cccc", "aaaa", None, "right"),
    )
    assert ids(rmap.upgrade_path(("aaaa",), "left@+1")) == ["bbbb"]
    assert ids(rmap.upgrade_path(("bbbb",), "right@+1")) == ["cccc"]
    assert ids(rmap.downgrade_path(("bbb2", "cccc"), "left@-1")) == ["bbb2"]
    with pytest.raises(RevisionError, match="ambiguous"):
        rmap.upgrade_path(("aaaa",), "+1")


def test_history_with_relative_lower_bound() -> None:
    assert ids(LINEAR.walk("-1", "heads")) == ["d4d4d4", "c3c3c3"]
    # Walking further than the graph from the heads is read relative to the upper bound.
    assert ids(LINEAR.walk("-9", "b2b2b2")) == ["b2b2b2", "a1a1a1"]
    # A relative lower bound can't be the starting point of "+N".
    with pytest.raises(RevisionError):
        LINEAR.walk("-1", "+1")


def test_history_lower_bound_walking_exactly_to_base_is_refused() -> None:
    # As in Alembic: "-N" from the heads that lands exactly on base is not an
    # ancestor of anything.
    with pytest.raises(RangeNotAncestorError):
        LINEAR.walk("-4", "d4d4d4")


def test_history_branch_lower_bound_needs_a_label() -> None:
    rmap = graph(("aaaa", None, None, "main"), ("bbbb", "aaaa"))
    assert ids(rmap.walk("main@base", "heads")) == ["bbbb", "aaaa"]
    assert ids(rmap.walk("bbbb@base", "heads")) == ["bbbb", "aaaa"]
    unlabelled = graph(("aaaa", None), ("bbbb", "aaaa"))
    with pytest.raises(RevisionError, match="not on exactly one labelled branch"):
        unlabelled.walk("bbbb@base", "heads")


def test_get_revisions_symbols() -> None:
    rmap = merged()
    assert ids(rmap.get_revisions("heads")) == ["eeee01"]
    assert ids(rmap.get_revisions("base")) == []
    assert ids(LINEAR.get_revisions("-1")) == ["c3c3c3"]
    assert ids(LINEAR.get_revisions("-4")) == [None]  # exactly base
    assert ids(LINEAR.get_revisions("-5")) == [None]  # past the end
    assert ids(LINEAR.get_revisions(["a1a1", "c3c3"])) == ["a1a1a1", "c3c3c3"]


def test_walking_down_from_a_merge_is_ambiguous() -> None:
    with pytest.raises(RevisionError, match="ambiguous walk"):
        merged().get_revisions("-1")


# --------------------------------------------------------------------------- branch labels


def test_label_in_the_middle_of_a_chain_covers_it_down_to_the_fork() -> None:
    rmap = graph(
        ("m1m1", None),
        ("m2m2", "m1m1"),
        ("x2x2", "m1m1"),
        ("x3x3", "x2x2", None, "mid"),
        ("x4x4", "x3x3"),
    )
    labelled = sorted(r.revision for r in rmap if "mid" in r.branch_labels)
    assert labelled == ["x2x2", "x3x3", "x4x4"]  # m1m1 is the fork: not labelled


def test_label_started_from_base_covers_its_own_root() -> None:
    rmap = graph(("m1m1", None, None, "main"), ("o1o1", None, None, "other"), ("o2o2", "o1o1"))
    assert rmap.revision("o2o2").branch_labels == {"other"}
    assert rmap.revision("m1m1").branch_labels == {"main"}
    assert rmap.get_current_head("other") == "o2o2"


def test_label_below_a_merge_stays_above_the_labelled_revision() -> None:
    # As in Alembic: when the line above a labelled revision merges or forks,
    # the label is not carried down into the revision's ancestors.
    rmap = graph(
        ("a000", None, None, "lab0"),
        ("b001", "a000", None, "lab1"),
        ("c002", None),
        ("d003", ("c002", "b001")),
    )
    assert rmap.revision("a000").branch_labels == {"lab0"}
    assert rmap.revision("b001").branch_labels == {"lab0", "lab1"}
    assert rmap.revision("d003").branch_labels == {"lab0", "lab1"}


# --------------------------------------------------------------------------- heads bookkeeping


def test_heads_through_a_merge() -> None:
    rmap = merged()
    merge = rmap.revision("eeee01")
    assert rmap.heads_after_upgrade(("cccc01", "dddd02"), merge) == ("eeee01",)
    assert rmap.heads_after_downgrade(("eeee01",), merge) == ("cccc01", "dddd02")
    assert run(rmap, (), "heads", up=True) == ("eeee01",)
    assert run(rmap, ("eeee01",), "bbbb01", up=False) == ("bbbb01",)


def test_heads_through_a_branch_point() -> None:
    rmap = branched()
    c, d = rmap.revision("cccc01"), rmap.revision("dddd01")
    assert rmap.heads_after_upgrade(("bbbb01",), c) == ("cccc01",)
    # bbbb01 is no longer recorded (cccc01 covers it): dddd01 opens a new head.
    assert rmap.heads_after_upgrade(("cccc01",), d) == ("cccc01", "dddd01")
    # Going down one branch: its parent is still covered by the other branch.
    assert rmap.heads_after_downgrade(("cccc01", "dddd01"), d) == ("cccc01",)
    assert rmap.heads_after_downgrade(("cccc01",), c) == ("bbbb01",)
    assert run(rmap, ("aaaa01",), "heads", up=True) == ("cccc01", "dddd01")
    assert run(rmap, ("cccc01", "dddd01"), "base", up=False) == ()


def test_heads_with_depends_on() -> None:
    rmap = with_dependencies()
    m3 = rmap.revision("m3m3m3")
    # m3 depends on feat's f1: recording m3 implies f1.
    assert rmap.heads_after_upgrade(("m2m2m2", "f1f1f1"), m3) == ("m3m3m3",)
    assert rmap.heads_after_downgrade(("m3m3m3",), m3) == ("f1f1f1", "m2m2m2")
    # Upgrading main pulls in feat's f1 first, and only that.
    assert ids(rmap.upgrade_path(("m2m2m2",), "main@head")) == ["f1f1f1", "m3m3m3"]
    assert run(rmap, ("m2m2m2",), "main@head", up=True) == ("m3m3m3",)
    assert run(rmap, (), "heads", up=True) == ("f2f2f2", "m3m3m3")
    # Downgrading main below m2 takes f2 (which depends on m2) along.
    assert ids(rmap.downgrade_path(("f2f2f2", "m3m3m3"), "m1m1m1")) == [
        "f2f2f2",
        "m3m3m3",
        "m2m2m2",
    ]
    assert run(rmap, ("f2f2f2", "m3m3m3"), "m1m1m1", up=False) == ("m1m1m1", "f1f1f1")


def test_heads_of_a_base_going_away() -> None:
    assert LINEAR.heads_after_downgrade(("a1a1a1",), LINEAR.revision("a1a1a1")) == ()
    assert LINEAR.heads_after_upgrade((), LINEAR.revision("a1a1a1")) == ("a1a1a1",)


# --------------------------------------------------------------------------- stamp


def test_stamp_moves_the_related_head() -> None:
    rmap = branched()
    assert rmap.heads_after_stamp(("cccc01",), ["aaaa01"]) == ("aaaa01",)
    assert rmap.heads_after_stamp(("bbbb01",), ["cccc01"]) == ("cccc01",)
    assert rmap.heads_after_stamp(("cccc01",), ["dddd01"]) == ("cccc01", "dddd01")
    assert rmap.heads_after_stamp(("cccc01", "dddd01"), ["base"]) == ()
    assert rmap.heads_after_stamp(("cccc01",), []) == ()
    assert rmap.heads_after_stamp((), ["heads"]) == ("cccc01", "dddd01")


def test_stamp_a_head_named_twice_records_it_once() -> None:
    # Alembic stops on an internal assertion for "stamp heads <a head>".
    assert LINEAR.heads_after_stamp((), ["heads", "d4d4d4"]) == ("d4d4d4",)
    assert branched().heads_after_stamp(("aaaa01",), ["heads", "cccc01"]) == ("cccc01", "dddd01")


def test_stamp_base_next_to_a_revision() -> None:
    # As in Alembic, "base" among other destinations stands for nothing.
    assert LINEAR.heads_after_stamp(("b2b2b2",), ["base", "b2b2b2"]) == ("b2b2b2",)
    assert branched().heads_after_stamp(("cccc01",), ["base", "dddd01"]) == ("cccc01", "dddd01")


def test_stamp_conflicting_destinations_is_refused() -> None:
    # Both destinations would replace the one recorded head.
    with pytest.raises(RevisionError, match="cannot stamp") as err:
        LINEAR.heads_after_stamp(("c3c3c3",), ["a1a1a1", "b2b2b2"])
    assert err.value.hint == "stamp one revision per branch"


def test_stamp_multiple_heads_requires_a_choice() -> None:
    with pytest.raises(MultipleHeads):
        branched().heads_after_stamp((), ["head"])


# --------------------------------------------------------------------------- the module


def test_module_is_pure() -> None:
    """No torch, no I/O: only the standard library and our errors."""
    tree = ast.parse(Path(revision_module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"open", "print", "input"}, node.func.id
    pure = {"__future__", "copy", "operator", "re", "collections.abc", "typing", "..errors"}
    assert imported <= pure, imported


def test_importing_the_graph_does_not_import_torch() -> None:
    code = "import sys, ckptmigrate.script.revision; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
