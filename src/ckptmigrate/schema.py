"""A state dict's schema: every key with its shape, dtype and kind.

Schemas are what migrations are about: a model class defines one (read from
the model built on the ``meta`` device, so even a huge model costs
milliseconds), a checkpoint has one (read from its header), and the schema at
any revision is computed by running the migration scripts symbolically from
the lineage's recorded *base schema*. That base schema is stored as a text
file, one key per line in state-dict order, so it reviews well in a pull
request even for models with thousands of keys.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError
from .names import LOOSE, SIMILAR, best_match
from .plan.nodes import TensorSpec, dtype_name

BASE_SCHEMA_FILE = "base_schema.txt"
_HEADER = "# ckptmigrate schema"


@dataclass(frozen=True)
class Entry:
    """One state-dict entry; ``spec`` is None for a non-tensor (extra state)."""

    spec: TensorSpec | None
    kind: str = "tensor"  # "param", "buffer", "tensor" (unknown), "object"

    def same_layout(self, other: Entry) -> bool:
        return self.spec == other.spec

    def __str__(self) -> str:
        return str(self.spec) if self.spec is not None else "object"


class Schema(dict[str, Entry]):
    """Ordered key -> :class:`Entry`."""

    # ----------------------------------------------------------------- sources

    @classmethod
    def from_specs(
        cls, specs: Mapping[str, TensorSpec | None], kinds: Mapping[str, str] | None = None
    ) -> Schema:
        kinds = kinds or {}
        return cls(
            (k, Entry(s, kinds.get(k, "tensor" if s is not None else "object")))
            for k, s in specs.items()
        )

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> Schema:
        sd = module.state_dict(keep_vars=True)
        out = cls()
        for key, value in sd.items():
            if isinstance(value, torch.Tensor):
                kind = "param" if isinstance(value, torch.nn.Parameter) else "buffer"
                out[key] = Entry(TensorSpec.of(value), kind)
            else:
                out[key] = Entry(None, "object")
        return out

    # ----------------------------------------------------------------- comparison

    def specs(self) -> dict[str, TensorSpec | None]:
        return {k: e.spec for k, e in self.items()}

    def same_layout(self, other: Mapping[str, Entry]) -> bool:
        return set(self) == set(other) and all(self[k].same_layout(other[k]) for k in self)

    # ----------------------------------------------------------------- floating dtypes

    def floating_dtypes(self) -> dict[torch.dtype, int]:
        """How many floating tensors have each floating dtype, in order of appearance."""
        counts: dict[torch.dtype, int] = {}
        for e in self.values():
            if e.spec is not None and e.spec.dtype.is_floating_point:
                counts[e.spec.dtype] = counts.get(e.spec.dtype, 0) + 1
        return counts

    def uniform_floating_dtype(self) -> torch.dtype | None:
        """The one dtype every floating tensor has; None when there are none or several."""
        counts = self.floating_dtypes()
        return next(iter(counts)) if len(counts) == 1 else None

    def with_floating_dtype(self, dtype: torch.dtype) -> Schema:
        """Every floating tensor in ``dtype``, as ``model.to(dtype)`` leaves a state dict."""
        out = Schema()
        for key, e in self.items():
            if e.spec is not None and e.spec.dtype.is_floating_point:
                out[key] = Entry(TensorSpec(e.spec.shape, dtype), e.kind)
            else:
                out[key] = e
        return out

    # ----------------------------------------------------------------- text form

    def to_text(self, note: str) -> str:
        width_key = max((len(k) for k in self), default=3)
        rows = []
        for key, e in self.items():
            if e.spec is None:
                dtype, shape = "object", "-"
            else:
                dtype = dtype_name(e.spec.dtype)
                shape = "[" + ",".join(map(str, e.spec.shape)) + "]"
            rows.append(f"{key.ljust(width_key)}  {dtype:<9} {shape:<16} {e.kind}".rstrip())
        head = [
            f"{_HEADER}: {note}",
            "# One state-dict entry per line: key, dtype, shape, kind (param/buffer/tensor).",
        ]
        return "\n".join(head + rows) + "\n"

    @classmethod
    def from_text(cls, text: str, where: str) -> Schema:
        out = cls()
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) not in (3, 4):
                raise ConfigError(
                    f"{where}, line {lineno}: expected 'key dtype shape [kind]', got {raw!r}",
                    hint="fix the line or record the schema again",
                )
            key, dtype_text, shape_text = parts[:3]
            kind = parts[3] if len(parts) == 4 else "tensor"
            if dtype_text == "object":
                out[key] = Entry(None, "object")
                continue
            dtype = getattr(torch, dtype_text, None)
            try:
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"unknown dtype {dtype_text!r}")
                inner = shape_text.strip("[]")
                shape = tuple(int(d) for d in inner.split(",")) if inner else ()
            except ValueError as exc:
                raise ConfigError(
                    f"{where}, line {lineno}: {exc}", hint="fix the line or record the schema again"
                ) from None
            out[key] = Entry(TensorSpec(shape, dtype), kind)
        return out


def base_schema_path(script_location: Path) -> Path:
    return script_location / BASE_SCHEMA_FILE


def read_base_schema(script_location: Path) -> Schema | None:
    """The recorded base schema (parsed again only when the file changed)."""
    path = base_schema_path(script_location)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _BASE_SCHEMAS.get(path)
    if cached is None or cached[0] != stamp:
        cached = (stamp, Schema.from_text(path.read_text(encoding="utf-8"), str(path)))
        _BASE_SCHEMAS[path] = cached
    return Schema(cached[1])  # a copy: callers may change theirs


#: path -> ((mtime, size, inode), schema): a batch reads the base schema once per check
_BASE_SCHEMAS: dict[Path, tuple[tuple[int, int, int], Schema]] = {}


def write_base_schema(script_location: Path, schema: Schema, source: str) -> Path:
    path = base_schema_path(script_location)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        schema.to_text(f"the state dict at base (before the first revision), from {source}"),
        encoding="utf-8",
    )
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------- differences


@dataclass
class SchemaDiff:
    """How a state dict differs from what a model (or revision) expects."""

    missing: list[str] = field(default_factory=list)  # expected, not present
    unexpected: list[str] = field(default_factory=list)  # present, not expected
    mismatched: list[str] = field(default_factory=list)  # both, other shape/dtype
    matching: int = 0
    renames: list[tuple[str, str]] = field(default_factory=list)  # (present, expected)

    @property
    def empty(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = []
        for label, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape/dtype mismatch", self.mismatched),
        ):
            if items:
                parts.append(f"{len(items)} {label}")
        return ", ".join(parts) or "no differences"


def compare(have: Mapping[str, Entry], want: Mapping[str, Entry]) -> SchemaDiff:
    """Compare a state dict's schema (``have``) with the expected one (``want``)."""
    diff = SchemaDiff()
    for key, entry in want.items():
        if key not in have:
            diff.missing.append(key)
        elif not have[key].same_layout(entry):
            diff.mismatched.append(key)
        else:
            diff.matching += 1
    diff.unexpected = [k for k in have if k not in want]
    diff.renames = likely_renames(
        {k: have[k] for k in diff.unexpected + diff.mismatched},
        {k: want[k] for k in diff.missing},
    )
    return diff


#: Beyond this many same-layout candidates a key gets no rename guess.
MAX_CANDIDATES = 50


def ancestors(key: str) -> list[str]:
    """``a.b.c`` -> ``a.b.``, ``a.``, ``""``: the nearest enclosing prefix first."""
    parts = key.split(".")
    return [".".join(parts[:i]) + "." for i in range(len(parts) - 1, 0, -1)] + [""]


#: Beyond this many keys, a module is too wide to look for a key's neighbours in.
NEAR_LIMIT = 64


class PrefixIndex:
    """The keys under any dotted prefix, in their original order, without a scan.

    Keys sharing a prefix are neighbours once sorted, so a lookup is two
    binary searches; one sorted list costs far less than a table per prefix.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._place = {k: i for i, k in enumerate(keys)}
        self._sorted = sorted(self._place)
        self._gone: set[str] = set()

    def remove(self, key: str) -> None:
        self._gone.add(key)

    def _span(self, prefix: str) -> tuple[int, int]:
        lo = bisect.bisect_left(self._sorted, prefix)
        return lo, bisect.bisect_left(self._sorted, prefix + "\U0010ffff", lo)

    def under(self, prefix: str) -> list[str]:
        lo, hi = self._span(prefix)
        found = [k for k in self._sorted[lo:hi] if k not in self._gone]
        return sorted(found, key=self._place.__getitem__)

    def count(self, prefix: str) -> int:
        """How many keys start with ``prefix`` (removed ones included: a bound, cheaply)."""
        lo, hi = self._span(prefix)
        return hi - lo

    def nearest(self, key: str, accept: Callable[[str], bool]) -> list[str]:
        """The accepted keys in the smallest module around ``key`` that has any."""
        for prefix in ancestors(key):
            if self.count(prefix) > NEAR_LIMIT:
                break
            found = [k for k in self.under(prefix) if accept(k)]
            if found:
                return found
        return []


class TailIndex:
    """New keys by (layout, dotted tail), to find rename candidates without an n*m scan.

    A removed ``layers.17.weight`` is matched first with new keys ending in
    ``17.weight`` (and the same shape and dtype), then ``weight``: the longest
    shared tail wins, which is also what makes a prefix rename recognisable.
    When a tail is too common (every layer's ``q.weight`` and ``o.weight``
    end in ``weight``), the candidates are the ones in the same layer.
    """

    def __init__(self, new: Mapping[str, Entry]) -> None:
        self._new = new
        self._near: PrefixIndex | None = None
        self._index: dict[tuple[object, str], list[str]] = {}
        for key, entry in new.items():
            if entry.spec is None:
                continue
            parts = key.split(".")
            for n in range(1, len(parts)):
                self._index.setdefault((entry.spec, ".".join(parts[n:])), []).append(key)
            self._index.setdefault((entry.spec, ""), []).append(key)

    def candidates(self, key: str, entry: Entry) -> tuple[str, list[str]]:
        """(shared tail, new keys with that tail and the same layout), longest tail first."""
        if entry.spec is None:
            return "", []
        parts = key.split(".")
        for n in range(1, len(parts)):
            tail = ".".join(parts[n:])
            found = self._index.get((entry.spec, tail))
            if found:
                if len(found) > MAX_CANDIDATES:
                    return tail, self._nearby(key, entry.spec, tail) or found
                return tail, found
        return "", self._index.get((entry.spec, ""), [])

    def _nearby(self, key: str, spec: TensorSpec, tail: str) -> list[str]:
        if self._near is None:
            self._near = PrefixIndex(k for k, e in self._new.items() if e.spec is not None)
        return self._near.nearest(
            key, lambda k: self._new[k].spec == spec and k.endswith("." + tail)
        )


def likely_renames(old: Mapping[str, Entry], new: Mapping[str, Entry]) -> list[tuple[str, str]]:
    """Pairs (old, new) with equal layout and similar names, in the order of ``old``.

    Each key is used once; where several old keys want the same new one, the
    most similar name gets it.

    A key with one same-layout candidate that no other key competes for needs
    only a loosely similar name; among several candidates the names decide,
    and a choice they cannot make (``out_proj`` between ``a`` and ``b``) is
    not guessed at.
    """
    index = TailIndex(new)
    options: dict[str, list[str]] = {}
    wanted: dict[str, int] = {}
    for o, oe in old.items():
        _tail, cands = index.candidates(o, oe)
        if not cands or len(cands) > MAX_CANDIDATES:
            continue
        options[o] = [n for n in cands if n != o]
        for n in options[o]:
            wanted[n] = wanted.get(n, 0) + 1
    scored: list[tuple[float, str, str]] = []
    for o, cands in options.items():
        alone = len(cands) == 1 and wanted[cands[0]] == 1
        pick = best_match(o, cands, threshold=LOOSE if alone else SIMILAR)
        if pick is not None:
            scored.append((pick[1], o, pick[0]))
    scored.sort(key=lambda t: (-t[0], t[1], t[2]))
    used_old: set[str] = set()
    used_new: set[str] = set()
    out: list[tuple[str, str]] = []
    for _score, o, n in scored:
        if o in used_old or n in used_new:
            continue
        used_old.add(o)
        used_new.add(n)
        out.append((o, n))
    place = {k: i for i, k in enumerate(old)}
    return sorted(out, key=lambda pair: place[pair[0]])


def format_table(
    diff: SchemaDiff,
    have: Mapping[str, Entry],
    want: Mapping[str, Entry],
    have_name: str,
    want_name: str,
) -> list[str]:
    """The differences as aligned rows a person reads at a glance."""
    rows: list[tuple[str, str, str, str]] = []
    for key in diff.missing:
        rows.append(("missing", key, "-", str(want[key])))
    for key in diff.unexpected:
        rows.append(("unexpected", key, str(have[key]), "-"))
    for key in diff.mismatched:
        rows.append(("mismatch", key, str(have[key]), str(want[key])))
    if not rows:
        return []
    header = ("", "key", have_name, want_name)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for o, n in diff.renames:
        lines.append(f"likely rename: {o} -> {n} (same shape and dtype)")
    return lines
