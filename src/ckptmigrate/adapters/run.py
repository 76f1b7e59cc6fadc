"""The adapter's part of ``upgrade``, ``downgrade``, ``stamp`` and ``current``.

The session opens the folder, locks it and writes it as for any checkpoint;
what differs is what the lineage is run on. An adapter holds only part of
its base model, so the steps run on the base model's schema at the adapter's
revision (the lineage's recorded base schema, pushed through the scripts),
and the adapter follows their plan (:mod:`.follow`). The result is checked
against the base model's schema at the target before it is written, and the
new ``adapter_config.json`` goes into the same atomic switch as the tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import CkptMigrateError
from ..formats.peft import AdapterFiles
from ..paths import display_path
from ..script.directory import ScriptDirectory
from ..script.revision import format_ids
from .follow import follow
from .layout import AdapterLayout
from .output import AdapterOutput, build_output
from .placement import check_claim, identify

if TYPE_CHECKING:
    from ..formats.checkpoint import Checkpoint
    from ..plan.nodes import TensorSpec
    from ..plan.state import PlanState
    from ..runtime.report import MigrationResult
    from ..runtime.session import MigrationSession
    from ..schema import Schema

_NEEDS_BASE = (
    "migrating a PEFT adapter runs the lineage on its base model's schema, so the lineage "
    "needs its base schema recorded"
)


def base_schema(config: Config, script_dir: ScriptDirectory) -> Schema:
    from ..recording import record_base_hint
    from ..runtime.symbolic import load_base_schema

    return load_base_schema(script_dir, hint=f"{_NEEDS_BASE}: {record_base_hint(config)}")


def _layout(ckpt: Checkpoint) -> AdapterLayout:
    assert ckpt.adapter is not None
    return ckpt.adapter


def place(
    session: MigrationSession, ckpt: Checkpoint, base: Schema, where: str
) -> tuple[tuple[str, ...], bool]:
    """(the revisions the adapter is at, whether it was identified by its shapes); checked."""
    from ..claims import FROM, STAMPED
    from ..runtime.placement import resolve_ids, stamped_heads

    config, script_dir, opts = session.config, session.script_dir, session.options
    layout = _layout(ckpt)
    if opts.from_revision is not None:
        heads = resolve_ids(script_dir, opts.from_revision)
        if ckpt.stamp is not None and set(ckpt.stamp.revisions) != set(heads):
            config.log(
                f"Note: ignoring the stamp {','.join(ckpt.stamp.revisions) or 'base'} "
                f"(--from {opts.from_revision})"
            )
        check_claim(config, script_dir, layout, base, heads, where, claimed_by=FROM)
        return heads, False
    stamped = stamped_heads(script_dir, ckpt)
    if stamped is not None:
        check_claim(config, script_dir, layout, base, stamped, where, claimed_by=STAMPED)
        return stamped, False
    return identify(config, script_dir, layout, base, where), True


def migrate(
    session: MigrationSession,
    checkpoint: str | os.PathLike[str],
    ckpt: Checkpoint,
    out: Path,
    target: str,
    upgrade: bool,
) -> MigrationResult:
    """Bring the adapter to ``target`` along its base model's lineage."""
    from ..plan.state import PlanState
    from ..runtime.migration import heads_after
    from ..runtime.report import done_line, print_plan
    from ..runtime.route import steps_to
    from ..runtime.symbolic import schema_at

    config, script_dir, opts = session.config, session.script_dir, session.options
    where = display_path(checkpoint)
    layout = _layout(ckpt)
    base = base_schema(config, script_dir)
    current, identified = place(session, ckpt, base, where)
    steps = steps_to(script_dir, current, target, upgrade, where)
    result = session.result(checkpoint, current, steps, identified)
    if not steps:
        session.nothing_to_do(checkpoint, ckpt, out, current, target, upgrade)
        return result
    start = schema_at(script_dir, base, current).specs()
    log = None if opts.dry_run else config.log
    followed = follow(steps, start, layout.read(start).entries, log=log)
    heads = current
    for step in steps:
        heads = heads_after(script_dir.revision_map, heads, step)
    result.to_revisions = heads
    output = build_output(
        followed.entries, followed.schema, layout.config, rslora=layout.config.rslora
    )
    state = PlanState(output.entries)
    _check_result(output, state, followed.schema, where, heads)
    if opts.dry_run:
        print_plan(config, where, result, len(ckpt.schema), state)
        for report in followed.reports:
            config.print_stdout(f"Adapter modules, {report.step}:")
            for line in report.lines or ["(unchanged)"]:
                config.print_stdout(f"    {line}")
        config.print_stdout("adapter_config.json:")
        for change in output.changes or ["(unchanged)"]:
            config.print_stdout(f"    {change}")
        return result
    for report in followed.reports:
        for line in report.lines:
            if "dropped with" in line:
                config.log(f"Note: {line}")
    for change in output.changes:
        config.log(f"Note: adapter_config.json: {change}")
    files = AdapterFiles(output.config, output.storage)
    session.write(out, ckpt, state, heads, container=files)
    config.log(done_line(result, where, out, upgrade))
    return result


def _check_result(
    output: AdapterOutput,
    state: PlanState,
    schema: Mapping[str, TensorSpec | None],
    where: str,
    heads: Sequence[str],
) -> None:
    """The new files, read back as PEFT would, fit the base model's schema at ``heads``."""
    layout = AdapterLayout.parse(output.config, state.schema(), where, output.storage)
    problems = layout.read(schema).problems
    if problems:
        raise CkptMigrateError(
            f"the migrated adapter for {where} would not fit the base model at "
            f"{format_ids(heads) or 'base'} ({problems[0]})",
            hint="this is a bug in ckptmigrate; please report it; nothing was written",
        )


def check_stamp(
    session: MigrationSession, ckpt: Checkpoint, heads: Sequence[str], where: str
) -> None:
    """``stamp ADAPTER REV``: the adapter must fit the base model at REV (where that is known)."""
    from ..claims import STAMP
    from ..schema import read_base_schema

    base = read_base_schema(session.script_dir.dir)
    if base is None:
        return  # nothing to check against, as for a model's checkpoint
    check_claim(
        session.config,
        session.script_dir,
        _layout(ckpt),
        base,
        heads,
        where,
        claimed_by=STAMP,
        force=session.options.force,
    )


def identified(config: Config, script_dir: ScriptDirectory, ckpt: Checkpoint) -> tuple[str, ...]:
    """Where an adapter without a stamp is, by its keys and shapes (a note says so)."""
    where = display_path(ckpt.path)
    return identify(config, script_dir, _layout(ckpt), base_schema(config, script_dir), where)


def current(config: Config, script_dir: ScriptDirectory, ckpt: Checkpoint) -> tuple[str, ...]:
    """``current`` for an adapter without a stamp: identified by its keys and shapes."""
    from ..script import display

    heads = identified(config, script_dir, ckpt)
    if not heads:
        config.print_stdout("base (identified by its keys and shapes)")
    for rev in heads:
        config.print_stdout(
            f"{display.head_only(script_dir.script(rev))} (identified by its keys and shapes)"
        )
    return heads
