"""Finding the revision of a checkpoint that carries no stamp.

Legacy files (saved before the lineage existed) and dicts rebuilt by hand
(which lose ``_metadata``) have no stamp. Their keys, shapes and dtypes are
matched against the schema at every revision, computed symbolically. Only an
exact, unique match is trusted; anything else is an error that shows the
closest candidates and how to say which revision the file is at.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .errors import StampError
from .formats.checkpoint import Checkpoint
from .paths import display_path
from .schema import Schema, compare, read_base_schema
from .script import display
from .script.directory import Script, ScriptDirectory


@dataclass
class Candidate:
    script: Script | None  # None: base
    differences: int
    detail: str


def _detail(have: Schema, want: Schema) -> tuple[int, str]:
    diff = compare(have, want)
    parts = []
    if diff.missing:
        parts.append(
            "lacks " + ", ".join(diff.missing[:3]) + (" ..." if len(diff.missing) > 3 else "")
        )
    if diff.unexpected:
        parts.append(
            "has extra "
            + ", ".join(diff.unexpected[:3])
            + (" ..." if len(diff.unexpected) > 3 else "")
        )
    if diff.mismatched:
        k = diff.mismatched[0]
        parts.append(
            f"{k} is {have[k]} not {want[k]}" + (" ..." if len(diff.mismatched) > 1 else "")
        )
    return len(diff.missing) + len(diff.unexpected) + len(diff.mismatched), "; ".join(parts)


def rank(script_dir: ScriptDirectory, have: Schema) -> list[Candidate] | None:
    """Every revision (and base) ranked by how far its schema is from ``have``.

    None when the lineage has no base schema to compute schemas from.
    """
    from .runtime.symbolic import iter_revision_schemas

    base = read_base_schema(script_dir.dir)
    if base is None:
        return None
    out: list[Candidate] = []
    n, detail = _detail(have, base)
    out.append(Candidate(None, n, detail))
    for item in iter_revision_schemas(script_dir, base):
        n, detail = _detail(have, item.schema)
        out.append(Candidate(item.script, n, detail))
    out.sort(key=lambda c: c.differences)
    return out


def _exact(candidates: list[Candidate]) -> list[Candidate]:
    exact = [c for c in candidates if c.differences == 0]
    # "base" only counts when no revision describes the file.
    revisions = [c for c in exact if c.script is not None]
    return revisions or exact


def exact_matches(script_dir: ScriptDirectory, have: Schema) -> list[str | None] | None:
    """Revisions (None for base) whose schema is exactly ``have``; None without a base schema."""
    candidates = rank(script_dir, have)
    if candidates is None:
        return None
    return [c.script.revision if c.script is not None else None for c in _exact(candidates)]


def _name(c: Candidate) -> str:
    return c.script.revision if c.script is not None else "base"


def identify_or_fail(
    config: Config, script_dir: ScriptDirectory, ckpt: Checkpoint
) -> tuple[str, ...]:
    """The revision an unstamped checkpoint is at, if its schema says so uniquely."""
    where = display_path(ckpt.path)
    candidates = rank(script_dir, Schema.from_specs(ckpt.schema))
    if candidates is None:
        raise StampError(
            f"{where} has no ckptmigrate stamp, so its revision is unknown",
            hint=f"record it with 'ckptmigrate stamp {where} REV', or pass --from REV "
            "(with a base schema recorded, 'ckptmigrate schema --record', it is identified "
            "automatically)",
        )
    exact = _exact(candidates)
    if len(exact) == 1:
        found = exact[0]
        config.log(f"Note: {where} has no stamp; identified by schema as {_name(found)}")
        return (found.script.revision,) if found.script is not None else ()
    if exact:
        names = ", ".join(_name(c) for c in exact)
        raise StampError(
            f"{where} has no stamp and its keys, shapes and dtypes match several revisions "
            f"({names}): they differ only in tensor values",
            hint=f"say which with --from REV, or record it with 'ckptmigrate stamp {where} REV'",
        )
    _explain(config, where, candidates)
    raise StampError(
        f"{where} has no stamp and matches no revision's schema "
        f"(closest: {_name(candidates[0])}, {candidates[0].differences} difference(s))",
        hint=f"see 'ckptmigrate diff {where}'; if you know its revision, pass --from REV",
    )


def _explain(config: Config, where: str, candidates: list[Candidate]) -> None:
    config.log(f"Closest revisions to {where}:")
    for c in candidates[:3]:
        config.log(f"  {_name(c)}: {c.differences} difference(s): {c.detail}")


def identify_current(
    config: Config, script_dir: ScriptDirectory, ckpt: Checkpoint, *, verbose: bool = False
) -> tuple[str, ...]:
    """``current`` for an unstamped file: print the identified revision(s)."""
    where = display_path(ckpt.path)
    candidates = rank(script_dir, Schema.from_specs(ckpt.schema))
    if candidates is None:
        config.log(
            f"Note: {where} has no ckptmigrate stamp (and no base schema is recorded "
            "to identify it by; see 'ckptmigrate schema --record')"
        )
        return ()
    exact = _exact(candidates)
    if not exact:
        _explain(config, where, candidates)
        raise StampError(
            f"{where} has no stamp and matches no revision's schema",
            hint=f"see 'ckptmigrate diff {where}'; record its revision with 'ckptmigrate stamp'",
        )
    config.log(f"Note: {where} has no ckptmigrate stamp; identified by its keys, shapes and dtypes")
    if len(exact) > 1:
        config.log(
            "Note: several revisions have this schema (they differ only in tensor values); "
            "record the right one with 'ckptmigrate stamp'"
        )
    out: list[str] = []
    for c in exact:
        if c.script is None:
            config.print_stdout("base (identified by schema)")
            continue
        text = display.cmd_format(c.script, verbose) if verbose else display.head_only(c.script)
        config.print_stdout(f"{text} (identified by schema)" if not verbose else text)
        out.append(c.script.revision)
    return tuple(out)
