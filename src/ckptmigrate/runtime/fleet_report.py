"""What a batch did, checkpoint by checkpoint: the summary table and its JSON form.

The table is for people; ``--format json`` prints the same rows for scripts
and CI (the schema is in the README's Fleets section, and ``REPORT_VERSION``
changes when a field changes meaning). Rows come in the order the
checkpoints were found, whatever order parallel jobs finished in, so two runs
on the same tree differ only in their times.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..script.revision import format_ids

REPORT_VERSION = 1

UPGRADED, DOWNGRADED, STAMPED = "upgraded", "downgraded", "stamped"
AT_TARGET = "at_target"
WOULD_UPGRADE, WOULD_DOWNGRADE = "would_upgrade", "would_downgrade"
AT_HEAD, BEHIND, UNKNOWN = "at_head", "behind", "unknown"
FAILED, INTERRUPTED = "failed", "interrupted"

#: How the table spells a status (the JSON keeps the token).
_SAID = {AT_TARGET: "already at target", AT_HEAD: "at head"}


@dataclass
class Outcome:
    """One checkpoint's row."""

    path: str
    status: str
    #: where it was before (None: not known, e.g. it could not be read)
    from_revisions: tuple[str, ...] | None = None
    #: where it is now (for ``current``: where it is)
    to_revisions: tuple[str, ...] | None = None
    #: steps run (or planned, in a dry run); for ``current``, the steps to the heads
    steps: int | None = None
    #: how its revision was known: "stamp", "schema" or "--from"
    found_by: str | None = None
    #: its size on disk afterwards (a folder: all its files)
    bytes: int | None = None
    seconds: float = 0.0
    #: why it failed, was interrupted, or is unknown; and what to do about it
    error: str | None = None
    hint: str | None = None
    #: what it printed while it ran, shown in order after it (not part of the report)
    log: str = field(default="", repr=False, compare=False)
    printed: str = field(default="", repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "from": list(self.from_revisions) if self.from_revisions is not None else None,
            "to": list(self.to_revisions) if self.to_revisions is not None else None,
            "steps": self.steps,
            "found_by": self.found_by,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "error": self.error,
            "hint": self.hint,
        }

    @property
    def problem(self) -> str | None:
        """The error and its hint on one line, as ``Error:`` lines read."""
        if self.error is None:
            return None
        return f"{self.error}; {self.hint}" if self.hint else self.error


@dataclass
class FleetReport:
    """A batch's result: one :class:`Outcome` per checkpoint found."""

    command: str
    #: the TARGET (upgrade, downgrade), the revisions (stamp, comma-separated), None (current)
    target: str | None
    heads: tuple[str, ...]
    checkpoints: list[Outcome]
    dry_run: bool = False
    #: Ctrl-C stopped the batch (rows not finished say ``interrupted``)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.checkpoints if o.status == FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def counts(self) -> dict[str, int]:
        return dict(Counter(o.status for o in self.checkpoints))

    def to_json(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "command": self.command,
            "target": self.target,
            "dry_run": self.dry_run,
            "heads": list(self.heads),
            "checkpoints": [o.to_json() for o in self.checkpoints],
            "counts": self.counts(),
            "failed": len(self.failed),
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 6),
        }

    def json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def table(self) -> list[str]:
        """The summary table, then one line of totals."""
        rows: list[tuple[str, ...]]
        if self.command == "current":
            rows = [("checkpoint", "revision", "to head", "status")]
            rows += [
                (
                    o.path,
                    _revisions(o.to_revisions, o.found_by, self.heads),
                    _n(o.steps),
                    _status(o),
                )
                for o in self.checkpoints
            ]
        else:
            rows = [("checkpoint", "from", "to", "steps", "bytes", "time", "status")]
            rows += [
                (
                    o.path,
                    _revisions(o.from_revisions),
                    _revisions(o.to_revisions),
                    _n(o.steps),
                    _bytes(o.bytes),
                    f"{o.seconds:.2f} s",
                    _status(o),
                )
                for o in self.checkpoints
            ]
        return [*_aligned(rows), self.totals()]

    def totals(self) -> str:
        n = len(self.checkpoints)
        counts = self.counts()
        parts = []
        for status in (*_ORDER, *sorted(set(counts) - set(_ORDER))):
            if status in counts:
                said = _SAID.get(status, status.replace("_", " "))
                if status == BEHIND:
                    most = max(o.steps or 0 for o in self.checkpoints if o.status == BEHIND)
                    said += f" (by up to {_steps(most)})"
                parts.append(f"{counts[status]} {said}")
        text = f"{n} checkpoint{'s' if n != 1 else ''}: {', '.join(parts) or 'none'}"
        if self.command == "current" and self.heads:
            text += f"; head: {format_ids(self.heads)}"
        return text + f" ({self.seconds:.2f} s)"


_ORDER = (
    UPGRADED,
    DOWNGRADED,
    STAMPED,
    WOULD_UPGRADE,
    WOULD_DOWNGRADE,
    AT_TARGET,
    AT_HEAD,
    BEHIND,
    UNKNOWN,
    FAILED,
    INTERRUPTED,
)


def _revisions(
    ids: tuple[str, ...] | None, found_by: str | None = None, heads: Sequence[str] = ()
) -> str:
    if ids is None:
        return "-"
    text = format_ids(ids) or "base"
    if heads and ids and set(ids) <= set(heads):
        text += " (head)"
    if found_by == "schema":
        text += " (schema)"
    return text


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _steps(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _status(o: Outcome) -> str:
    said = _SAID.get(o.status, o.status.replace("_", " "))
    return f"{said}: {o.error}" if o.error else said


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the last one (status, with reasons) is not."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows
    ]
