"""How revisions are printed: Alembic's formats, plus a ``git log --graph`` view."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from ..paths import display_path
from .directory import Script
from .revision import RevisionMap


def down_text(script: Script) -> str:
    return ", ".join(script.down_revisions) if script.down_revisions else "<base>"


def head_only(
    script: Script,
    *,
    include_branches: bool = False,
    include_doc: bool = False,
    include_parents: bool = False,
    tree_indicators: bool = True,
    current: bool | str = False,
) -> str:
    text = script.revision
    if include_parents:
        if script.dependencies:
            text = f"{down_text(script)} ({', '.join(script.dependencies)}) -> {text}"
        else:
            text = f"{down_text(script)} -> {text}"
    if include_branches and script.branch_labels:
        text += f" ({', '.join(sorted(script.branch_labels))})"
    if script.is_real_head:
        text += " (head)"
    elif script.is_head:
        text += " (effective head)"
    if current:
        text += f" (current: {current})" if isinstance(current, str) else " (current)"
    if tree_indicators:
        if script.is_branch_point:
            text += " (branchpoint)"
        if script.is_merge_point:
            text += " (mergepoint)"
    if include_doc:
        text += f", {script.doc}"
    return text


def log_entry(script: Script, rmap: RevisionMap | None = None, current: bool | str = False) -> str:
    flags = "".join(
        (
            " (head)" if script.is_head else "",
            " (branchpoint)" if script.is_branch_point else "",
            " (mergepoint)" if script.is_merge_point else "",
            f" (current: {current})" if isinstance(current, str) else "",
            " (current)" if current is True else "",
        )
    )
    lines = [f"Rev: {script.revision}{flags}"]
    lines.append(("Merges: " if script.is_merge_point else "Parent: ") + down_text(script))
    if script.dependencies:
        lines.append(f"Also depends on: {', '.join(script.dependencies)}")
    if script.is_branch_point:
        nxt = sorted(script.nextrev)
        lines.append(f"Branches into: {', '.join(nxt)}")
    if script.branch_labels:
        lines.append(f"Branch names: {', '.join(sorted(script.branch_labels))}")
    lines.append(f"Path: {display_path(script.path)}")
    lines.append("")
    lines.extend(f"    {para}" for para in script.longdoc.splitlines())
    return "\n".join(lines) + "\n"


def cmd_format(
    script: Script,
    verbose: bool,
    *,
    include_branches: bool = False,
    include_doc: bool = False,
    include_parents: bool = False,
    tree_indicators: bool = True,
    current: bool | str = False,
) -> str:
    if verbose:
        return log_entry(script, current=current)
    return head_only(
        script,
        include_branches=include_branches,
        include_doc=include_doc,
        include_parents=include_parents,
        tree_indicators=tree_indicators,
        current=current,
    )


def graph_lines(
    scripts: Sequence[Script], current: Mapping[str, bool | str] | Collection[str] = ()
) -> list[str]:
    """Draw revisions (newest first) as lanes, like ``git log --graph``.

    Each lane waits for one revision. Lanes waiting for the same revision
    join just above it (a branch point); a merge forks its lane into one
    lane per parent. Only ``down_revision`` links are drawn.
    """
    shown = {s.revision for s in scripts}
    lanes: list[str] = []
    out: list[str] = []

    def bars(upto: int) -> list[str]:
        cells = [" "] * (2 * len(lanes))
        for i in range(min(upto, len(lanes))):
            cells[2 * i] = "|"
        return cells

    for script in scripts:
        rev = script.revision
        cols = [i for i, lane in enumerate(lanes) if lane == rev]
        if not cols:
            lanes.append(rev)
            cols = [len(lanes) - 1]
        col = cols[0]
        for n, j in reversed(list(enumerate(cols))[1:]):
            cells = bars(j)
            for i in range(cols[n - 1], j - 1):  # pass over lanes going elsewhere
                cells[2 * i + 1] = "_"
            cells[2 * j - 1] = "/"
            for i in range(j + 1, len(lanes)):
                cells[2 * i - 1] = "/"
            out.append("".join(cells).rstrip())
            del lanes[j]
        cells = bars(len(lanes))
        cells[2 * col] = "*"
        mark = current.get(rev, False) if isinstance(current, Mapping) else rev in current
        label = head_only(script, include_branches=True, include_doc=True, current=mark)
        out.append("".join(cells).rstrip() + " " + label)
        parents = [p for p in script.down_revisions if p in shown]
        if not parents:
            if col < len(lanes) - 1:
                cells = bars(col)
                for i in range(col + 1, len(lanes)):
                    cells[2 * i - 1] = "/"
                out.append("".join(cells).rstrip())
            del lanes[col]
            continue
        lanes[col] = parents[0]
        if len(parents) > 1:
            extra = len(parents) - 1
            cells = bars(len(lanes)) + [" "] * (2 * extra)
            for i in range(1, extra + 1):
                cells[2 * col + 2 * i - 1] = "\\"
            for j in range(col + 1, len(lanes)):  # lanes to the right move over
                cells[2 * j] = " "
                cells[2 * (j + extra) - 1] = "\\"
            out.append("".join(cells).rstrip())
            lanes[col + 1 : col + 1] = parents[1:]
    return out
