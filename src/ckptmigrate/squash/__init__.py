"""``ckptmigrate squash A:B``: one revision for a linear run of them, proved equal.

What the squashed revision file holds, and how the graph treats it:

* ``down_revision`` is the first replaced revision's parent, and
  ``replaces = (...)`` lists every replaced id, oldest first (like Django's
  ``replaces``);
* ``upgrade()``/``downgrade()`` run the whole range in one step, its calls
  simplified (see :mod:`.simplify`), with values drawn exactly as the
  replaced revisions drew them (``op.seeds_of``);
* ``upgrade_<id>()``/``downgrade_<id>()`` keep each replaced revision's own
  calls, so a checkpoint stamped with any of them still migrates: checkpoint
  commands see the range as the chain it was and cross it in one step when a
  migration goes all the way through (``RevisionMap.expand``); graph commands
  show one revision, and the last replaced id is another name for it.

The new file is proved (:mod:`.proof`) before the replaced files are removed
(kept with ``keep``); a range whose calls cannot be written as source is
refused (:mod:`.source`).
"""

from __future__ import annotations

import datetime
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import CkptMigrateError
from ..runtime.symbolic import load_base_schema
from ..script.directory import Script, ScriptDirectory, load_script, py_literal, step_function
from ..script.revision import tuple_or_scalar
from .calls import Call
from .chain import Chain, record_chain, resolve_range
from .floats import pin_new_floats
from .proof import Proof, SquashNotProved, prove
from .simplify import simplify
from .source import Source, writable

HEADER = "# Written by 'ckptmigrate squash': the revisions below in one step."

__all__ = ["Squashed", "squash"]


@dataclass
class Squashed:
    """What ``squash`` did (or, for a dry run, would do)."""

    chain: Chain
    text: str
    upgrade: list[str]  # the lines of upgrade() and downgrade()
    downgrade: list[str]
    ops_before: int
    ops_after: int
    proof: Proof
    script: Script | None  # None for a dry run
    removed: list[Path]


def squash(
    config: Config,
    rev_range: str,
    message: str | None,
    *,
    keep: bool = False,
    dry_run: bool = False,
    rev_id: str | None = None,
) -> Squashed:
    script_dir = ScriptDirectory.from_config(config)
    revisions = resolve_range(script_dir, rev_range)
    base = load_base_schema(
        script_dir,
        hint="a squash is proved on the schema at each revision it replaces: record the "
        "base schema first with 'ckptmigrate schema --record' (or --record CKPT --from REV)",
    )
    new_id = script_dir.new_id(rev_id)
    chain = record_chain(script_dir, base, revisions)
    where = f"{chain.replaces[0]}..{chain.replaces[-1]}"
    writable(Source(), _every_call(chain), where)
    # one step stands for the range: dtype-less new tensors get the dtype their revision gave
    pinned = (
        pin_new_floats(chain.up_steps, chain.start.specs(), direction="upgrade", where=where),
        pin_new_floats(chain.down_steps, chain.end.specs(), direction="downgrade", where=where),
    )
    simplified = (
        simplify(pinned[0], chain.start.specs()),
        simplify(pinned[1], chain.end.specs(), direction="downgrade"),
    )
    attempts = [simplified]
    if simplified != pinned:
        attempts.append(pinned)  # if the simplified ops do not prove
    message = message or f"squash {where}"
    created = datetime.datetime.now().replace(microsecond=0)
    failed: SquashNotProved | None = None
    for up, down in attempts:
        text, lines = _file_text(script_dir, new_id, message, chain, up, down, created)
        path = None if dry_run else script_dir.revision_path(new_id, message, created)
        try:
            script, proof = _write_and_prove(script_dir, chain, path, text)
        except SquashNotProved as exc:
            failed = exc
            continue
        if failed is not None:
            config.log(
                f"Note: the simplified ops did not prove ({failed.message}); wrote the "
                "replaced revisions' ops as they were"
            )
        removed = [] if dry_run or keep else _remove_replaced(script_dir, chain)
        script_dir.forget()
        return Squashed(chain, text, *lines, len(chain.up), len(up), proof, script, removed)
    assert failed is not None
    raise failed


def _every_call(chain: Chain) -> list[Call]:
    return [*chain.up, *chain.down, *(c for p in chain.positions for c in (*p.up, *p.down))]


def _write_and_prove(
    script_dir: ScriptDirectory, chain: Chain, path: Path | None, text: str
) -> tuple[Script | None, Proof]:
    """Write ``text`` to ``path`` (None: a temporary file) and prove it, else remove it."""
    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp) / "squashed.py"
            scratch.write_text(text, encoding="utf-8")
            return None, prove(chain, load_script(scratch))
    try:
        script_dir.write_file(path, text)  # the post_write_hooks run before the proof
        script = load_script(path)
        return script, prove(chain, script)
    except CkptMigrateError:
        path.unlink(missing_ok=True)
        raise


def _file_text(
    script_dir: ScriptDirectory,
    new_id: str,
    message: str,
    chain: Chain,
    up: Sequence[Call],
    down: Sequence[Call],
    created: datetime.datetime,
) -> tuple[str, tuple[list[str], list[str]]]:
    source = Source()
    upgrades = [HEADER, *source.body(up, blocks=True)]
    downgrades = [HEADER, *source.body(down, blocks=True)]
    parts = _parts(source, chain)
    listing = "\n".join(f"    {p.name}  {p.message}".rstrip() for p in chain.positions)
    text = script_dir.render(
        message=f"{message}\n\nReplaces {len(chain.positions)} revisions, oldest first:\n{listing}",
        up_revision=new_id,
        down_revision=tuple_or_scalar(chain.parents),
        branch_labels=tuple_or_scalar(chain.labels) if chain.labels else None,
        depends_on=None,
        create_date=created,
        upgrades=upgrades,
        downgrades=downgrades,
        imports=list(source.imports),
    )
    replaces = (
        "# The revisions this one squashed, oldest first: a checkpoint stamped with any of\n"
        "# them still upgrades and downgrades, through the steps at the end of this file.\n"
        "replaces = (\n" + "".join(f"    {py_literal(p.name)},\n" for p in chain.positions) + ")"
    )
    head, found, tail = _split_after_depends_on(text)
    text = f"{head}\n{replaces}{tail}" if found else f"{text.rstrip()}\n\n{replaces}\n"
    return text.rstrip("\n") + "\n" + parts, (upgrades[1:], downgrades[1:])


def _split_after_depends_on(text: str) -> tuple[str, bool, str]:
    """``text`` cut after the template's ``depends_on = ...`` line, where ``replaces`` goes."""
    match = re.search(r"^depends_on = .*$", text, flags=re.M)
    if match is None:
        return text, False, ""
    return text[: match.end()], True, text[match.end() :]


def _parts(source: Source, chain: Chain) -> str:
    lines = [
        "",
        "",
        "# One step per replaced revision, as it was: what a checkpoint stamped with one of",
        "# them runs. A migration across all of them runs upgrade()/downgrade() above.",
    ]
    for p in chain.positions:
        for name, calls in (("upgrade", p.up), ("downgrade", p.down)):
            lines += ["", "", f"def {step_function(name, p.name)}() -> None:"]
            if name == "upgrade" and p.message:
                doc = p.message.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
                lines.append(f'    """{doc}"""')
            body = source.body(calls, blocks=False)
            if not body and not (name == "upgrade" and p.message):
                body = ["pass"]
            lines += [f"    {line}" for line in body]
    return "\n".join(lines) + "\n"


def _remove_replaced(script_dir: ScriptDirectory, chain: Chain) -> list[Path]:
    """The replaced revisions' files, and files kept by an earlier squash --keep of them."""
    names = set(chain.replaces)
    paths = [r.path for r in chain.revisions]
    paths += [
        r.path
        for r in script_dir.compact_map.dormant
        if isinstance(r, Script) and r.revision in names
    ]
    removed = []
    for path in dict.fromkeys(paths):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def describe(done: Squashed) -> list[str]:
    """What ``squash`` replaced, how many ops remain, and what was proved."""
    chain = done.chain
    return [
        f"Squash of {len(chain.positions)} revisions ({chain.replaces[0]} .. "
        f"{chain.replaces[-1]}): upgrade() has {done.ops_after} ops "
        f"(the revisions had {done.ops_before})",
        f"Proved: {done.proof.steps} steps give the same schema, and the same "
        f"{done.proof.tensors} computed tensors bit for bit on synthetic checkpoints",
    ]
