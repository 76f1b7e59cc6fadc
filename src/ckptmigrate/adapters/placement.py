"""Where an adapter stands on its base model's lineage: its stamp, ``--from``, or its shapes.

PEFT writes no stamp, so an adapter is usually placed by its schema: its
modules' names, and the base weight shapes their factors imply
(``lora_A [r, in]`` and ``lora_B [out, r]`` adapt a ``[out, in]`` weight, or
``[in, out]`` for a ``Conv1D``), must all be in the base model's schema at a
revision, and its ``modules_to_save`` copies must be keys of that shape
there. Revisions that differ only where the adapter has nothing are all
such matches; when migrating from each to the newest of them changes
nothing about the adapter, the newest is taken, else the user says which.
A stamp or ``--from`` is checked the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config import Config
from ..errors import CkptMigrateError, ClaimError, StampError
from ..plan.lowrank import LowRank
from ..plan.nodes import Node, Source
from ..runtime.migration import upgrade_steps
from ..schema import Schema
from ..script.directory import ScriptDirectory
from ..script.revision import format_ids
from .follow import follow
from .layout import AdapterLayout, Copy, Entry, Reading


@dataclass
class Fit:
    """A revision (None: base) and how the adapter fits the base model's schema there."""

    revision: str | None
    reading: Reading

    @property
    def name(self) -> str:
        return self.revision or "base"

    @property
    def heads(self) -> tuple[str, ...]:
        return (self.revision,) if self.revision else ()


def fits(script_dir: ScriptDirectory, layout: AdapterLayout, base: Schema) -> list[Fit]:
    """The adapter on the schema at base and at every revision, best fit first."""
    from ..runtime.symbolic import iter_revision_schemas

    out = [Fit(None, layout.read(base.specs()))]
    for item in iter_revision_schemas(script_dir, base):
        out.append(Fit(item.script.revision, layout.read(item.schema.specs())))
    return sorted(out, key=lambda f: len(f.reading.problems))


def identify(
    config: Config, script_dir: ScriptDirectory, layout: AdapterLayout, base: Schema, where: str
) -> tuple[str, ...]:
    """The revision an unstamped adapter is at, by its keys and shapes (see the module doc)."""
    ranked = fits(script_dir, layout, base)
    found = [f for f in ranked if not f.reading.problems]
    if not found:
        best = ranked[0]
        raise StampError(
            f"{where} has no stamp, and its modules fit the base model at no revision "
            f"(closest: {best.name}: {'; '.join(best.reading.problems[:2])})",
            hint="is it an adapter of this lineage's model? If you know the revision its base "
            "model was at, pass --from REV",
        )
    chosen = _newest_alike(script_dir, layout, base, found)
    if chosen is None:
        names = ", ".join(f.name for f in found)
        raise StampError(
            f"{where} has no stamp, and its modules fit the base model at several revisions "
            f"({names}), which the migrations treat differently",
            hint=f"say which with --from REV, or record it with 'ckptmigrate stamp {where} REV'",
        )
    also = [f.name for f in found if f is not chosen and f.revision is not None]
    note = f"; it fits {', '.join(also)} too, which the migrations treat alike" if also else ""
    config.log(
        f"Note: {where} has no stamp; identified by its keys and shapes as {chosen.name}{note}"
    )
    return chosen.heads


def _newest_alike(
    script_dir: ScriptDirectory, layout: AdapterLayout, base: Schema, found: list[Fit]
) -> Fit | None:
    """The match below which all others are, if upgrading from each leaves the adapter alone."""
    rmap = script_dir.revision_map
    if len(found) == 1:
        return found[0]
    for newest in found:
        below = set()
        if newest.revision is not None:
            below = {r.revision for r in rmap.ancestors([rmap.revision(newest.revision)])}
        if all(f is newest or f.revision is None or f.revision in below for f in found):
            break
    else:
        return None
    from ..runtime.symbolic import schema_at

    for fit in found:
        if fit is newest:
            continue
        steps = upgrade_steps(script_dir, fit.heads, newest.name)
        start = schema_at(script_dir, base, fit.heads).specs()
        try:
            after = follow(steps, start, fit.reading.entries).entries
        except CkptMigrateError:  # refused on the way: not alike
            return None
        if not _alike(after, newest.reading.entries):
            return None
    return newest


def _alike(a: Mapping[str, Entry], b: Mapping[str, Entry]) -> bool:
    """The same tensors of the file in the same places, the same way."""
    if set(a) != set(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, Copy) and isinstance(y, Copy):
            if not _same_source(x.node, y.node):
                return False
        elif isinstance(x, LowRank) and isinstance(y, LowRank):
            pairs = [(x.a, y.a), (x.b, y.b), (x.magnitude, y.magnitude), (x.bias, y.bias)]
            same = all(_same_source(p, q) for p, q in pairs)
            if not same or (x.scale, x.transposed, x.kind) != (y.scale, y.transposed, y.kind):
                return False
        else:
            return False
    return True


def _same_source(a: Node | None, b: Node | None) -> bool:
    if a is None or b is None:
        return a is b
    return isinstance(a, Source) and isinstance(b, Source) and a.key == b.key


def check_claim(
    config: Config,
    script_dir: ScriptDirectory,
    layout: AdapterLayout,
    base: Schema,
    heads: Sequence[str],
    where: str,
    *,
    claimed_by: str,
    force: bool = False,
) -> Reading:
    """The adapter fits the base model at ``heads``, as ``claimed_by`` says; its reading there."""
    from ..runtime.symbolic import schema_at

    reading = layout.read(schema_at(script_dir, base, heads).specs())
    if not reading.problems:
        return reading
    ids = format_ids(heads) or "base"
    found = [f.name for f in fits(script_dir, layout, base) if not f.reading.problems]
    message = (
        f"{where} is not at {ids} ({claimed_by} says so): its modules do not fit the base "
        f"model's schema there ({'; '.join(reading.problems[:2])})"
    )
    if found:
        message += f"; it fits {', '.join(found)}"
    if force:  # only a stamp can be forced: a migration needs every module to fit
        config.log(f"Warning: --force: {message}; going ahead")
        return reading
    fix = f"pass --from {found[0]}" if len(found) == 1 else "pass --from REV"
    raise ClaimError(message, hint=f"{fix} (or --force if you are sure)")
