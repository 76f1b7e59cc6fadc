"""What happened to an optimizer's state, in words: one summary line, then the details.

The summary goes to the log of every upgrade; ``--dry-run`` prints the
details too, one line per parameter whose state did not simply stay with it,
so a user sees which moments moved where before anything is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from ..plan.nodes import Node
from .layout import Layout
from .optimizer import Carried
from .pairing import OptimizerPlan, param_sources
from .rebuild import Rebuilt


def report(
    plan: OptimizerPlan, old: Layout, entries: Mapping[str, Node], rebuilt: Rebuilt
) -> list[str]:
    """The summary line, then one line per parameter whose state moved, reset or went."""
    tally: Counter[str] = Counter()
    lines: list[str] = []
    used: set[str] = set()
    several = len(rebuilt.members) > 1
    for g, keys in enumerate(rebuilt.members):
        for key in keys:
            srcs = param_sources(entries[key], old)
            used.update(srcs)
            where = f"#{rebuilt.pid_of[key]}" + (f", group {g}" if several else "")
            fate, line = _fate(plan, key, srcs, rebuilt.carried[key], rebuilt.pid_of[key], where)
            tally[fate] += 1
            if line:
                lines.append(line)
    for key, slot in plan.slots.items():
        if key not in used:
            tally["dropped"] += 1
            lines.append(f"    {key}: dropped, with its state (#{slot.pid})")
    unchanged = tally["unchanged"] + tally["shifted"]
    if unchanged:
        at = f" ({tally['shifted']} at a new index)" if tally["shifted"] else ""
        lines.append(
            f"    {unchanged} other parameter{'s' if unchanged != 1 else ''} keep their state{at}"
        )
    return [_summary(plan, rebuilt, tally), *lines]


def _fate(
    plan: OptimizerPlan,
    key: str,
    srcs: list[str],
    c: Carried,
    pid: int | str,
    where: str,
) -> tuple[str, str | None]:
    """What happened to ``key``'s state (new, reset, unchanged, shifted, moved) and its line."""
    if not srcs:
        return "new", f"    {key}: new parameter, starts with no state ({where})"
    was = ", ".join(f"#{plan.slots[s].pid}" for s in srcs if s in plan.slots)
    if c.reset and not c.sources:
        return "reset", f"    {key}: state reset, starts with none ({where})"
    if srcs == [key] and not c.transforms and not c.reset:
        return ("shifted" if str(pid) != was.lstrip("#") else "unchanged"), None
    how = f" ({', '.join(c.transforms)})" if c.transforms else ""
    extra = ", part reset" if c.reset else ""
    extra += ", none yet" if c.state is None else ""
    return (
        "moved",
        f"    {key}: state of {', '.join(srcs)}{how}{extra} ({was or 'none'} -> {where})",
    )


def _summary(plan: OptimizerPlan, rebuilt: Rebuilt, tally: Counter[str]) -> str:
    opt = plan.found
    n_new = sum(len(m) for m in rebuilt.members)
    groups = len(rebuilt.members)
    names = ", ".join(opt.state_names()) or "none yet"
    bits = [
        f"{tally['moved']} moved" if tally["moved"] else "",
        f"{tally['new']} new without state" if tally["new"] else "",
        f"{tally['reset']} reset" if tally["reset"] else "",
        f"{tally['dropped']} dropped" if tally["dropped"] else "",
    ]
    summary = ", ".join(b for b in bits if b) or "unchanged"
    return (
        f"Optimizer state at {opt.label}: {len(plan.slots)} -> {n_new} parameters "
        f"in {groups} param group{'s' if groups > 1 else ''} ({summary}; state: {names})"
    )
