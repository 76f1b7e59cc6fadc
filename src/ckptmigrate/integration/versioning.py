"""``@ckptmigrate.versioned``: a model class that carries its schema revision.

* ``state_dict()`` stamps the class's revision into ``_metadata`` (through
  PyTorch's state-dict hooks), at whatever prefix the module sits;
* ``load_state_dict()`` first brings older (or newer, when the lineage allows)
  input to the class's revision, then loads it strictly as usual.

A versioned class used as the root migrates the whole tree itself, parents
before children, so a parent's rename of a child's prefix is seen by the
child. A versioned module inside an unversioned model is handled by a load
pre-hook on the module, at its own prefix.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import CkptMigrateError, LoadError
from ..formats import keyspace
from ..formats.container import WRAPPER_PREFIXES, wrapper_prefix
from ..formats.stamp import read_stamp, write_stamp
from ..schema import Schema, compare
from .lineage import Lineage, log

ModuleT = TypeVar("ModuleT", bound=type[torch.nn.Module])

_LINEAGE_ATTR = "__ckptmigrate_lineage__"
# Set while a load that already migrated the whole tree is running.
_TREE_DONE: ContextVar[bool] = ContextVar("ckptmigrate_tree_done", default=False)
# Set while ckptmigrate reads a module's own schema (no stamp, no warning).
_INTROSPECTING: ContextVar[bool] = ContextVar("ckptmigrate_introspecting", default=False)
# Collects what was migrated, for ckptmigrate.load's report.
_RECORDS: ContextVar[list[LineageRecord] | None] = ContextVar("ckptmigrate_records", default=None)


@dataclass
class LineageRecord:
    """One lineage's migration during a load."""

    prefix: str
    owner: str
    from_revisions: tuple[str, ...]
    to_revision: str
    steps: list[str] = field(default_factory=list)
    identified: bool = False


def lineage_of(cls: type) -> Lineage | None:
    value = getattr(cls, _LINEAGE_ATTR, None)
    return value if isinstance(value, Lineage) else None


class _SchemaRevision:
    """``cls.__schema_revision__``: resolved on first access, through the MRO.

    None while the lineage cannot name it (see :class:`LineageWarning`), so
    introspection never raises.
    """

    def __get__(self, obj: object, owner: type) -> str | None:
        lineage = lineage_of(owner)
        assert lineage is not None
        return lineage.resolve()


def versioned(
    location: str | os.PathLike[str], *, revision: str | None = None
) -> Callable[[ModuleT], ModuleT]:
    """Give an ``nn.Module`` class a schema revision from the lineage at ``location``.

    ``location`` is the migrations folder or the ini file naming it (relative
    paths are tried relative to the defining module first). ``revision``
    pins the class to a revision; by default it follows the lineage's head.
    """
    caller = sys._getframe(1).f_code.co_filename  # not inspect.stack(): it reads every source
    origin = Path(caller).resolve().parent if caller and not caller.startswith("<") else None

    def decorate(cls: ModuleT) -> ModuleT:
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise TypeError("@ckptmigrate.versioned decorates nn.Module subclasses")
        setattr(cls, _LINEAGE_ATTR, Lineage(location, revision, origin, cls.__qualname__))
        cls.__schema_revision__ = _SchemaRevision()  # type: ignore[attr-defined]
        _wrap_init(cls)
        _wrap_load_state_dict(cls)
        _adapt_to_frameworks(cls)
        return cls

    return decorate


#: Framework packages whose model classes load and save their own way, and the module of
#: ``ckptmigrate.integration`` whose ``adapt(cls)`` hooks a versioned subclass into that way.
FRAMEWORKS: dict[str, str] = {"transformers": "transformers"}


def _adapt_to_frameworks(cls: type[torch.nn.Module]) -> None:
    """Let each framework integration adapt ``cls``, for frameworks that are imported.

    A class can only subclass a framework's model class when that framework is
    imported already, so one that is not imported is never imported here.
    """
    for package, module in FRAMEWORKS.items():
        if package in sys.modules:
            importlib.import_module(f"{__package__}.{module}").adapt(cls)


def _wrap_init(cls: type[torch.nn.Module]) -> None:
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        lineage = lineage_of(type(self))
        if lineage is not None:
            lineage.report_built()
        if not self.__dict__.get("_ckptmigrate_hooks", False):
            self.register_state_dict_post_hook(_stamp_hook)  # type: ignore[no-untyped-call]
            self.register_load_state_dict_pre_hook(_load_pre_hook)  # type: ignore[no-untyped-call]
            self.__dict__["_ckptmigrate_hooks"] = True

    cls.__init__ = __init__  # type: ignore[method-assign]


def _stamp_hook(
    module: torch.nn.Module, state_dict: Any, prefix: str, local_metadata: dict[str, Any]
) -> None:
    lineage = lineage_of(type(module))
    if lineage is None or _INTROSPECTING.get():
        return
    revision = lineage.resolve()
    if revision is None:
        lineage.report_unstamped()  # saving never fails because of the lineage
    else:
        write_stamp(local_metadata, (revision,))


def _load_pre_hook(
    module: torch.nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    *_: Any,
) -> None:
    """Migrate this module's part of the dict being loaded (unversioned parents only)."""
    if _TREE_DONE.get():
        return
    lineage = lineage_of(type(module))
    if lineage is None:
        return
    metadata = {prefix[:-1]: dict(local_metadata)}
    _migrate_at(lineage, module, state_dict, metadata, prefix)


def _describe(module: torch.nn.Module, prefix: str) -> str:
    where = f"the state dict of {type(module).__name__}"
    return where + (f" at {prefix[:-1]!r}" if prefix else "")


@dataclass(frozen=True)
class Start:
    """Where a lineage's entries in a state dict stand, when they need migrating."""

    current: tuple[str, ...]
    target: str
    stamped: bool
    where: str


def start_of(
    lineage: Lineage,
    module: torch.nn.Module,
    sd: dict[str, Any],
    metadata: dict[str, dict[str, Any]],
    prefix: str,
) -> Start | None:
    """The revisions the entries under ``prefix`` are at, or None when they need nothing.

    Strips a wrapper prefix the entries carry (in place). A dict that cannot be
    placed on the lineage (no stamp, and no base schema to identify it by) and
    does not fit the module as it is, is an error naming the fix: torch's
    mismatch list would say nothing about revisions. A dict of some of the
    module's own entries, as they are now, is a partial load (PEFT loads an
    adapter's keys alone that way, with ``strict=False``): left to PyTorch.
    """
    root = prefix[:-1]
    target = lineage.resolve()
    where = _describe(module, prefix)
    stamp = read_stamp(metadata.get(root), where)
    if stamp is not None and stamp.revisions == (target,):
        return None  # the common case: already at the class's revision
    keys = [k for k in sd if k.startswith(prefix)] if prefix else list(sd)
    keys = _unwrap_at(module, sd, metadata, prefix, keys)
    stamp = read_stamp(metadata.get(root), where)  # a wrapper's stamp is at root now
    sub = keyspace.keys_under({k: sd[k] for k in keys}, prefix)
    fits = stamp is None and _fits_as_is(sub, module)
    if target is None:
        if fits:
            return None  # e.g. an EMA copy of a model saved unstamped: nothing to migrate
        raise lineage.load_error(where, ",".join(stamp.revisions) if stamp else None)
    if stamp is not None and stamp.revisions == (target,):
        return None
    current = lineage.current(sub, metadata.get(root), where)
    if current is None:
        differences, only_wrappers = mismatch(module, sub)
        if fits or only_wrappers or _part_of(sub, module):
            return None  # loads as it is, or the load says which wrapper is in the way
        raise lineage.unplaced_error(where, differences)
    if current == (target,):
        return None
    return Start(tuple(current), target, stamp is not None, where)


def _fits_as_is(sub: Mapping[str, Any], module: torch.nn.Module) -> bool:
    """The module's own layout, a tied parameter's second key allowed to be absent.

    ``safetensors`` stores a tensor once, so a state dict saved through it
    (``save_pretrained``, ``save_model``) lacks the keys that repeat a tied one.
    """
    from ..runtime.memory import specs_of
    from ..training.layout import ties_by_identity

    have = Schema.from_specs(specs_of(sub))
    want = own_schema(module)
    tied = ties_by_identity(module)
    want = Schema(
        (k, e) for k, e in want.items() if not (k in tied and k not in have and tied[k] in have)
    )
    return have.same_layout(want)


def _part_of(sub: Mapping[str, Any], module: torch.nn.Module) -> bool:
    """Every entry is one of the module's own, with its shape and dtype now."""
    from ..runtime.memory import specs_of

    own = own_schema(module)
    return all(k in own and own[k].spec == spec for k, spec in specs_of(sub).items())


def _migrate_at(
    lineage: Lineage,
    module: torch.nn.Module,
    sd: dict[str, Any],
    metadata: dict[str, dict[str, Any]],
    prefix: str,
) -> LineageRecord | None:
    """Bring the entries under ``prefix`` to the lineage's revision, in place."""
    from ..runtime.memory import migrate_state_dict

    start = start_of(lineage, module, sd, metadata, prefix)
    if start is None:
        return None
    root = prefix[:-1]
    keys = [k for k in sd if k.startswith(prefix)] if prefix else list(sd)
    sub = keyspace.keys_under({k: sd[k] for k in keys}, prefix)
    sub_meta = keyspace.metadata_under(metadata, prefix)
    try:
        outcome = migrate_state_dict(
            lineage.script_dir, sub, sub_meta, start.current, start.target, log=log.info
        )
    except CkptMigrateError as exc:
        raise migration_failed(start, exc) from exc
    for k in keys:
        del sd[k]
    for k, v in outcome.state_dict.items():
        sd[prefix + k] = v
    keyspace.replace_under(metadata, prefix, outcome.metadata)
    write_stamp(metadata.setdefault(root, {}), (start.target,))
    record = LineageRecord(
        prefix,
        type(module).__qualname__,
        start.current,
        start.target,
        [str(s) for s in outcome.steps],
        identified=not start.stamped,
    )
    note(record)
    return record


def migration_failed(start: Start, exc: CkptMigrateError) -> LoadError:
    return LoadError(
        f"bringing {start.where} from {', '.join(start.current) or 'base'} to {start.target} "
        f"failed: {exc.message}",
        hint=exc.hint,
    )


def note(record: LineageRecord) -> None:
    """Tell ``ckptmigrate.load``'s report (when one is being made) what was migrated."""
    records = _RECORDS.get()
    if records is not None:
        records.append(record)


def _unwrap_at(
    module: torch.nn.Module,
    sd: dict[str, Any],
    metadata: dict[str, dict[str, Any]],
    prefix: str,
    keys: list[str],
) -> list[str]:
    """Drop a ``module.``/``_orig_mod.`` run the entries ``keys`` carry after ``prefix``.

    DataParallel and torch.compile put it there when they saved; the
    module's own keys decide what is a wrapper (a module whose only child is
    called ``module`` keeps it). Changes ``sd`` and ``metadata`` in place and
    returns the keys as they are now.
    """
    carried = wrapper_prefix([k[len(prefix) :] for k in keys])
    if not carried:
        return keys
    own = wrapper_prefix(list(own_schema(module)))
    if carried == own or not carried.endswith(own):
        return keys
    strip = carried[: len(carried) - len(own)]
    renamed = [prefix + key[len(prefix) + len(strip) :] for key in keys]
    values = [sd.pop(key) for key in keys]  # all out first: a new key may be an old one
    sd.update(zip(renamed, values))
    inner = keyspace.metadata_under(metadata, prefix)
    keyspace.replace_under(metadata, prefix, keyspace.metadata_under(inner, strip))
    log.info("stripped wrapper prefix %r from %s", strip, _describe(module, prefix))
    return renamed


def own_schema(module: torch.nn.Module) -> Schema:
    """The module's own state-dict schema, read without stamping or warning."""
    token = _INTROSPECTING.set(True)
    try:
        return Schema.from_module(module)
    finally:
        _INTROSPECTING.reset(token)


def migrate_tree(
    model: torch.nn.Module, sd: Mapping[str, Any], metadata: Mapping[str, Mapping[str, Any]]
) -> tuple[OrderedDict[str, Any], dict[str, dict[str, Any]], list[LineageRecord]]:
    """Migrate every versioned module's entries, parents before children."""
    out: OrderedDict[str, Any] = OrderedDict(sd)
    meta = {k: dict(v) for k, v in metadata.items()}  # never write into the caller's
    records: list[LineageRecord] = []
    for name, module in model.named_modules():
        lineage = lineage_of(type(module))
        if lineage is None:
            continue
        record = _migrate_at(lineage, module, out, meta, name + "." if name else "")
        if record is not None:
            records.append(record)
    return out, meta, records


@contextlib.contextmanager
def tree_migrated() -> Iterator[None]:
    token = _TREE_DONE.set(True)
    try:
        yield
    finally:
        _TREE_DONE.reset(token)


def _wrap_load_state_dict(cls: type[torch.nn.Module]) -> None:
    original = cls.load_state_dict

    @functools.wraps(original)
    def load_state_dict(
        self: torch.nn.Module,
        state_dict: Mapping[str, Any],
        strict: bool = True,
        assign: bool = False,
    ) -> Any:
        if _TREE_DONE.get():
            return original(self, state_dict, strict=strict, assign=assign)
        metadata = getattr(state_dict, "_metadata", None) or {}
        migrated, meta, _records = migrate_tree(self, state_dict, metadata)
        migrated._metadata = meta  # type: ignore[attr-defined]
        with tree_migrated():
            try:
                return original(self, migrated, strict=strict, assign=assign)
            except RuntimeError as exc:
                if isinstance(exc, CkptMigrateError) or "Error(s) in loading" not in str(exc):
                    raise
                raise load_error(self, migrated) from exc

    cls.load_state_dict = load_state_dict  # type: ignore[method-assign]


def load_error(model: torch.nn.Module, migrated: Mapping[str, Any]) -> LoadError:
    """What still does not fit after migration, and how to fix it."""
    parts, only_wrappers = mismatch(model, migrated)
    name = type(model).__name__
    versioned_cls = lineage_of(type(model)) is not None
    if only_wrappers:
        fix = (
            "remove the wrapper's part of those keys, or save the unwrapped module's "
            "state_dict() (its .module or ._orig_mod)"
        )
    elif versioned_cls:
        fix = "write the missing migration with 'ckptmigrate revision --autogenerate -m \"...\"'"
    else:
        fix = (
            "version the model with @ckptmigrate.versioned and write a migration "
            "('ckptmigrate revision --autogenerate -m \"...\"')"
        )
    return LoadError(
        f"{name} cannot load the state dict even after migration: " + "; ".join(parts),
        hint=fix,
    )


def mismatch(model: torch.nn.Module, have_sd: Mapping[str, Any]) -> tuple[list[str], bool]:
    """How a state dict differs from the model's, in short phrases; and whether only by wrappers."""
    from ..runtime.memory import specs_of

    have = Schema.from_specs(specs_of(have_sd))
    want = own_schema(model)
    diff = compare(have, want)
    parts = []
    if diff.missing:
        parts.append(f"missing {_few(diff.missing)}")
    if diff.unexpected:
        parts.append(f"unexpected {_few(diff.unexpected)}")
    for key in diff.mismatched[:3]:
        parts.append(f"{key} is {have[key]} in the checkpoint but {want[key]} in the model")
    if len(diff.mismatched) > 3:
        parts.append(f"{len(diff.mismatched) - 3} more shape/dtype mismatches")
    wrapped = _behind_wrappers(diff.unexpected, diff.missing)
    if wrapped:
        parts.append(
            "keys behind a DataParallel/torch.compile wrapper: "
            + _few([f"{key} for {plain}" for key, plain in wrapped.items()])
        )
    renames = [(o, n) for o, n in diff.renames if o not in wrapped and n not in wrapped.values()]
    if renames:
        parts.append("likely renames: " + ", ".join(f"{o} -> {n}" for o, n in renames[:5]))
    only_wrappers = (
        bool(wrapped)
        and set(wrapped) == set(diff.unexpected)
        and set(wrapped.values()) == set(diff.missing)
        and not diff.mismatched
    )
    return parts, only_wrappers


def _behind_wrappers(unexpected: list[str], missing: list[str]) -> dict[str, str]:
    """Unexpected keys that are missing ones plus a ``module``/``_orig_mod`` segment."""

    def plain(key: str) -> str:
        return ".".join(p for p in key.split(".") if p + "." not in WRAPPER_PREFIXES)

    wanted = {plain(k): k for k in missing}
    return {k: wanted[plain(k)] for k in unexpected if plain(k) != k and plain(k) in wanted}


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


@contextlib.contextmanager
def recording() -> Iterator[list[LineageRecord]]:
    records: list[LineageRecord] = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)
