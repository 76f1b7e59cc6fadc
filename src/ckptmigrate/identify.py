"""What revision a checkpoint's schema says it is at.

Legacy files (saved before the lineage existed) and dicts rebuilt by hand
(which lose ``_metadata``) have no stamp. Their keys, shapes and dtypes are
matched against the schema at every revision, computed symbolically. Only an
exact, unique match is trusted; anything else is an error that shows the
closest candidates and how to say which revision the file is at. The same
matching checks a revision somebody claims (see ``claims.py``).

A copy in another floating dtype still matches its revision: every floating
tensor of the file in one dtype X and the revision's floating tensors in one
dtype (what ``model.half()`` saves), or the revision's schema replayed from the
base schema in X (what upgrading such a copy writes, where a script names a
dtype of its own). Integer and bool tensors must match exactly. A match as is
wins over a match in another dtype. Keys under a module that carries its own
lineage's stamp belong to that lineage and are left out of the comparison.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config
from .errors import StampError
from .formats.checkpoint import Checkpoint
from .formats.stamp import is_stamped
from .paths import display_path
from .plan.nodes import TensorSpec, dtype_name
from .schema import Schema, compare, read_base_schema
from .script import display
from .script.directory import Script, ScriptDirectory


@dataclass(frozen=True)
class Fit:
    """How far a checkpoint's schema is from a revision's, and in which dtype it fits best."""

    differences: int
    detail: str
    dtype: torch.dtype | None = None  # compared with the floating tensors in this dtype

    @property
    def exact(self) -> bool:
        return self.differences == 0

    @property
    def as_dtype(self) -> str:
        """`` (as float16)`` when the match needed another floating dtype."""
        return f" (as {dtype_name(self.dtype)})" if self.dtype is not None else ""

    @property
    def how(self) -> str:
        """How a revision found this way is labelled: ``identified by schema[, as float16]``."""
        return "identified by schema" + (
            f", as {dtype_name(self.dtype)}" if self.dtype is not None else ""
        )


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


def nested_prefixes(metadata: Mapping[str, Mapping[str, Any]] | None) -> tuple[str, ...]:
    """Prefixes of modules stamped by a lineage of their own (the root is not one)."""
    return tuple(name + "." for name, meta in (metadata or {}).items() if name and is_stamped(meta))


def _without(schema: Schema, prefixes: Sequence[str]) -> Schema:
    if not prefixes:
        return schema
    return Schema((k, e) for k, e in schema.items() if not k.startswith(tuple(prefixes)))


class Observed:
    """A checkpoint's schema as matching sees it (made when first asked for: without a
    base schema there is nothing to match, and nothing is built)."""

    def __init__(
        self,
        specs: Mapping[str, TensorSpec | None],
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.nested = nested_prefixes(metadata)
        self._specs = specs

    @functools.cached_property
    def schema(self) -> Schema:
        return _without(Schema.from_specs(self._specs), self.nested)

    @functools.cached_property
    def dtype(self) -> torch.dtype | None:
        """The floating dtype most tensors have."""
        counts = self.schema.floating_dtypes()
        return max(counts, key=lambda d: counts[d]) if counts else None

    @functools.cached_property
    def uniform(self) -> torch.dtype | None:
        return self.schema.uniform_floating_dtype()

    def replay_base(self, base: Schema) -> Schema | None:
        """The base schema in this checkpoint's floating dtype, if that differs."""
        if self.dtype is None or set(base.floating_dtypes()) <= {self.dtype}:
            return None
        return base.with_floating_dtype(self.dtype)

    def fit(self, want: Schema, replayed: Schema | None = None) -> Fit:
        """The closest of: ``want`` as is, cast to the file's uniform dtype, or ``replayed``."""
        want = _without(want, self.nested)
        best = Fit(*_detail(self.schema, want))
        if best.exact:
            return best
        variants: list[Schema] = []
        if self.uniform is not None and want.uniform_floating_dtype() not in (None, self.uniform):
            variants.append(want.with_floating_dtype(self.uniform))
        if replayed is not None:
            variants.append(_without(replayed, self.nested))
        for variant in variants:
            n, detail = _detail(self.schema, variant)
            if n < best.differences:
                best = Fit(n, detail, self.dtype)
        return best


@dataclass
class Candidate:
    script: Script | None  # None: base
    fit: Fit

    @property
    def name(self) -> str:
        return self.script.revision if self.script is not None else "base"


def rank(script_dir: ScriptDirectory, have: Observed) -> list[Candidate] | None:
    """Every revision (and base) ranked by how far its schema is from ``have``.

    None when the lineage has no base schema to compute schemas from.
    """
    from .runtime.symbolic import revision_schemas

    base = read_base_schema(script_dir.dir)
    if base is None:
        return None
    replay_base = have.replay_base(base)
    out = [Candidate(None, have.fit(base, replay_base))]
    replayed: Iterable[Schema | None] = (
        (item.schema for item in revision_schemas(script_dir, replay_base))
        if replay_base is not None
        else itertools.repeat(None)
    )
    for item, other in zip(revision_schemas(script_dir, base), replayed):
        out.append(Candidate(item.script, have.fit(item.schema, other)))
    out.sort(key=lambda c: (c.fit.differences, c.fit.dtype is not None))
    return out


def fit_at(script_dir: ScriptDirectory, have: Observed, heads: Sequence[str]) -> Fit | None:
    """How ``have`` fits the schema at ``heads``; None without a base schema."""
    from .runtime.symbolic import schema_at

    base = read_base_schema(script_dir.dir)
    if base is None:
        return None
    replay_base = have.replay_base(base)
    replayed = schema_at(script_dir, replay_base, heads) if replay_base is not None else None
    return have.fit(schema_at(script_dir, base, heads), replayed)


def _exact(candidates: list[Candidate]) -> list[Candidate]:
    exact = [c for c in candidates if c.fit.exact]
    # a match as is wins over one in another dtype ...
    as_is = [c for c in exact if c.fit.dtype is None]
    exact = as_is or exact
    # ... and "base" only counts when no revision describes the file
    revisions = [c for c in exact if c.script is not None]
    return revisions or exact


def matches(script_dir: ScriptDirectory, have: Observed) -> list[Candidate] | None:
    """The revisions whose schema ``have`` is; None without a base schema."""
    candidates = rank(script_dir, have)
    return None if candidates is None else _exact(candidates)


def unique_match(script_dir: ScriptDirectory, ckpt: Checkpoint) -> Candidate | None:
    """The one revision (or base) an unstamped checkpoint's schema is; None otherwise."""
    found = matches(script_dir, Observed(ckpt.schema, ckpt.metadata))
    return found[0] if found and len(found) == 1 else None


def exact_matches(script_dir: ScriptDirectory, have: Schema) -> list[str | None] | None:
    """Revisions (None for base) whose schema ``have`` is; None without a base schema."""
    found = matches(script_dir, Observed(have.specs()))
    if found is None:
        return None
    return [c.script.revision if c.script is not None else None for c in found]


def identify_or_fail(
    config: Config, script_dir: ScriptDirectory, ckpt: Checkpoint
) -> tuple[str, ...]:
    """The revision an unstamped checkpoint is at, if its schema says so uniquely."""
    where = display_path(ckpt.path)
    candidates = rank(script_dir, Observed(ckpt.schema, ckpt.metadata))
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
        config.log(
            f"Note: {where} has no stamp; identified by schema as {found.name}{found.fit.as_dtype}"
        )
        return (found.script.revision,) if found.script is not None else ()
    if exact:
        names = ", ".join(c.name for c in exact)
        raise StampError(
            f"{where} has no stamp and its keys, shapes and dtypes match several revisions "
            f"({names}): they differ only in tensor values",
            hint=f"say which with --from REV, or record it with 'ckptmigrate stamp {where} REV'",
        )
    _explain(config, where, candidates)
    raise StampError(
        f"{where} has no stamp and matches no revision's schema "
        f"(closest: {candidates[0].name}, {candidates[0].fit.differences} difference(s))",
        hint=f"see 'ckptmigrate diff {where}'; if you know its revision, pass --from REV",
    )


def _explain(config: Config, where: str, candidates: list[Candidate]) -> None:
    config.log(f"Closest revisions to {where}:")
    for c in candidates[:3]:
        fit = c.fit
        config.log(f"  {c.name}{fit.as_dtype}: {fit.differences} difference(s): {fit.detail}")


def identify_current(
    config: Config, script_dir: ScriptDirectory, ckpt: Checkpoint, *, verbose: bool = False
) -> tuple[str, ...]:
    """``current`` for an unstamped file: print the identified revision(s)."""
    where = display_path(ckpt.path)
    candidates = rank(script_dir, Observed(ckpt.schema, ckpt.metadata))
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
            config.print_stdout(f"base ({c.fit.how})")
            continue
        text = display.cmd_format(c.script, verbose) if verbose else display.head_only(c.script)
        config.print_stdout(f"{text} ({c.fit.how})" if not verbose else text)
        out.append(c.script.revision)
    return tuple(out)
