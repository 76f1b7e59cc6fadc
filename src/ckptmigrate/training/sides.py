"""The checkpoint before and after the migration, as the optimizer sees it.

Both sides are lists of entries by file key (the lineage's keys under the
prefix, everything else around them) with a kind each (parameter, buffer,
other) and the tied groups, in the order the optimizer numbered its
parameters: the configured model's where it describes that side, else the
file's (a state dict saved from a model has the model's order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..config import Config
from ..errors import CkptMigrateError
from ..formats.checkpoint import Checkpoint
from ..plan.nodes import Node, Source, TensorSpec
from ..plan.state import PlanState
from ..schema import Schema
from ..script.directory import ScriptDirectory
from .layout import (
    Layout,
    fill_kinds,
    kinds_backward,
    kinds_forward,
    sources,
    ties_by_identity,
    ties_by_storage,
)


@dataclass
class ModelInfo:
    """The configured model's schema (lineage keys) and its tied parameters."""

    spec: str
    schema: Schema
    alias: dict[str, str]

    def matches(self, specs: Mapping[str, TensorSpec | None]) -> bool:
        """The same entries; the second key of a tied parameter may be absent (stored once)."""
        want = {k for k in self.schema if not (k in self.alias and k not in specs)}
        return set(specs) == want and all(self.schema[k].spec == spec for k, spec in specs.items())


@dataclass
class Facts:
    """What is known to be true beyond the checkpoint: the model, and live optimizers.

    The command line knows the configured model (``model =``); a loader that
    migrates on the way into a live model knows that model, and sometimes the
    optimizers built for it (``optimizers``: per optimizer found in the
    container, the file keys of its parameters per param group, in order).
    """

    model: ModelInfo | None = None
    optimizers: Sequence[Sequence[Sequence[str]]] | None = None


def model_info(config: Config) -> ModelInfo | None:
    """The configured model, built on meta; None (with a note) when it cannot be built.

    The model only adds facts (kinds, order, ties), so a broken factory must
    not stop a migration that the checkpoint's own facts suffice for.
    """
    if not config.get("model"):
        return None
    from ..model import configured_model

    try:
        found = configured_model(config)
        schema, model, spec = found.schema, found.module, found.spec
    except CkptMigrateError as exc:
        config.log(f"Note: not using the configured model for the optimizer state: {exc}")
        return None
    import torch

    alias = ties_by_identity(model) if isinstance(model, torch.nn.Module) else {}
    return ModelInfo(spec, schema, alias)


def _base_kinds(
    script_dir: ScriptDirectory,
    heads: Sequence[str],
    specs: Mapping[str, TensorSpec | None],
) -> dict[str, str]:
    """Kinds the base schema knows, pushed through the migrations up to ``heads``."""
    from ..runtime.symbolic import state_at
    from ..schema import read_base_schema

    try:
        base = read_base_schema(script_dir.dir)
        if base is None or not any(e.kind in ("param", "buffer") for e in base.values()):
            return {}
        at = state_at(script_dir, base, heads)
    except CkptMigrateError:
        return {}
    out: dict[str, str] = {}
    for key, node in at.entries.items():
        if key not in specs or specs[key] != node.spec:
            continue
        kinds = {base[s].kind for s in sources(node) if s in base}
        if len(kinds) == 1 and kinds <= {"param", "buffer"}:
            out[key] = kinds.pop()
    return out


def file_order(file_keys: Sequence[str], prefix: str, lineage: Sequence[str]) -> list[str]:
    """File keys with the lineage's block (keys under ``prefix``) in the order ``lineage``.

    Keys outside the prefix keep their places; the block goes where its first
    key was, as a submodule's keys sit together in its parent's state dict.
    """
    out: list[str] = []
    placed = False
    for key in file_keys:
        if key.startswith(prefix):
            if not placed:
                out.extend(prefix + k for k in lineage)
                placed = True
        else:
            out.append(key)
    if not placed:
        out.extend(prefix + k for k in lineage)
    return out


def old_file_specs(
    ckpt: Checkpoint,
    model_old: ModelInfo | None,
    state: PlanState | None = None,
    model_new: ModelInfo | None = None,
) -> dict[str, TensorSpec | None]:
    """The checkpoint's entries by file key, in the order its optimizer numbered them.

    That is the model's order where the model describes the checkpoint, else
    the file's. A file that does not keep the order it was saved in (a
    safetensors file lists its keys sorted; see ``keeps_parameter_order``)
    takes the new model's order, carried back through the plan: each old key
    where the first new entry made of it sits.
    """
    prefix = ckpt.key_prefix
    file_specs = ckpt.file_schema if prefix and ckpt.file_schema is not None else ckpt.schema
    if model_old is not None:
        old_order = list(model_old.schema)
    elif state is not None and model_new is not None and not keeps_order(ckpt):
        old_order = carried_back(state, list(model_new.schema), list(ckpt.schema))
    else:
        old_order = list(ckpt.schema)
    return {k: file_specs[k] for k in file_order(list(file_specs), prefix, old_order)}


def keeps_order(ckpt: Checkpoint) -> bool:
    """Whether the file lists its entries in the order the model held them."""
    return bool(getattr(ckpt.format, "keeps_parameter_order", True))


def carried_back(state: PlanState, new_order: Sequence[str], old_keys: Sequence[str]) -> list[str]:
    """Old keys in the order of the new entries they become; the rest after, as they were."""
    out: dict[str, None] = {}
    for key in new_order:
        node = state.entries.get(key)
        if node is not None:
            out.update((s, None) for s in sources(node) if s in old_keys)
    out.update((k, None) for k in old_keys)
    return list(out)


def new_file_entries(
    ckpt: Checkpoint, state: PlanState, order: list[str] | None
) -> dict[str, Node]:
    """The migrated file's entries by file key, the lineage's in ``order`` (else the plan's)."""
    p = ckpt.key_prefix
    lineage = order if order is not None else list(state.entries)
    file_keys = list(ckpt.file_schema) if p and ckpt.file_schema is not None else []
    out: dict[str, Node] = {}
    for key in file_order(file_keys, p, lineage):
        if p and not key.startswith(p):
            assert ckpt.file_schema is not None
            out[key] = Source(key, ckpt.file_schema[key])
        else:
            out[key] = state.entries[key[len(p) :]]
    return out


def old_layout(
    ckpt: Checkpoint,
    state: PlanState,
    script_dir: ScriptDirectory,
    from_revisions: Sequence[str],
    specs: dict[str, TensorSpec | None],
    named: Iterable[str],
    model_old: ModelInfo | None,
    model_new: ModelInfo | None,
) -> Layout:
    """The checkpoint's entries with kinds from every source of facts (see :mod:`.layout`).

    ``named`` are the keys an optimizer's ``param_names`` name: surely parameters.
    """
    prefix = ckpt.key_prefix
    known: dict[str, str] = dict.fromkeys(named, "param")
    if model_old is not None:
        for key, entry in model_old.schema.items():
            known.setdefault(prefix + key, entry.kind)
    for key, kind in _base_kinds(script_dir, from_revisions, ckpt.schema).items():
        known.setdefault(prefix + key, kind)
    if model_new is not None:
        new_model_kinds = {k: e.kind for k, e in model_new.schema.items()}
        for key, kind in kinds_backward(state.entries, new_model_kinds).items():
            known.setdefault(key, kind)
    old = Layout(specs)
    fill_kinds(old, known)
    if ckpt.views_share_storage:  # else reading would load data, and nothing is stored twice
        old.alias = ties_by_storage([k for k, s in specs.items() if s is not None], ckpt.read)
    if model_old is not None:
        old.alias.update({prefix + a: prefix + b for a, b in model_old.alias.items()})
    return old


def new_layout(
    entries: dict[str, Node], old: Layout, model_new: ModelInfo | None, prefix: str
) -> Layout:
    """The migrated entries' kinds: the model's, else carried from their sources."""
    new = Layout({k: n.spec for k, n in entries.items()})
    known = (
        {prefix + k: e.kind for k, e in model_new.schema.items()} if model_new is not None else {}
    )
    forward = kinds_forward(entries, old, known)
    fill_kinds(new, {k: kind for k, (kind, _sure) in forward.items()})
    new.guessed |= {k for k, (_kind, sure) in forward.items() if not sure}
    new.alias = _new_ties(entries, old, model_new, prefix)
    return new


def _new_ties(
    entries: Mapping[str, Node], old: Layout, model: ModelInfo | None, prefix: str
) -> dict[str, str]:
    """New tied keys: the model's, else entries that are the same tied old tensor."""
    alias: dict[str, str] = {}
    if model is not None:
        alias.update({prefix + a: prefix + b for a, b in model.alias.items()})
    first: dict[str, str] = {}
    for key, node in entries.items():
        if not isinstance(node, Source) or (model is not None and key.startswith(prefix)):
            continue
        rep = old.rep(node.key)
        if rep in first:
            alias.setdefault(key, first[rep])
        else:
            first[rep] = key
    return alias
