"""``ckptmigrate.load``/``save``/``upgrade_state_dict``: files and dicts meet models."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CkptMigrateError
from ..formats import read_checkpoint
from ..formats.atomic import atomic_output, write_error
from ..formats.stamp import write_stamp
from .lineage import Lineage, log
from .versioning import LineageRecord, load_error, tree_migrated


@dataclass
class LoadReport:
    """What ``ckptmigrate.load`` did."""

    path: Path
    lineages: list[LineageRecord] = field(default_factory=list)
    state_dict_key: str | None = None
    wrapper_prefix: str = ""
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    #: Where in the file the optimizer states loaded into ``optimizer=`` came from.
    optimizers: list[str] = field(default_factory=list)

    @property
    def migrated(self) -> bool:
        return bool(self.lineages)

    @property
    def steps(self) -> list[str]:
        return [s for rec in self.lineages for s in rec.steps]

    @property
    def from_revision(self) -> str | None:
        root = self._root()
        return ",".join(root.from_revisions) if root else None

    @property
    def to_revision(self) -> str | None:
        root = self._root()
        return root.to_revision if root else None

    def _root(self) -> LineageRecord | None:
        return next((r for r in self.lineages if r.prefix == ""), None)


def _read_state_dict(
    path: str | os.PathLike[str], trust_pickle: bool, state_dict_key: str | None
) -> tuple[OrderedDict[str, Any], dict[str, dict[str, Any]], Any]:
    ckpt = read_checkpoint(path, trust_pickle=trust_pickle, state_dict_key=state_dict_key)
    sd: OrderedDict[str, Any] = OrderedDict((k, ckpt.read(k)) for k in ckpt.schema)
    meta = {k: dict(v) for k, v in ckpt.metadata.items()}  # the stamp included, in any format
    return sd, meta, ckpt


def load(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    map_location: str | torch.device | None = None,
    location: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> LoadReport:
    """Load a checkpoint file into ``model``, migrating it first; strict by default.

    Reads bare state dicts and training containers (``weights_only``), strips
    ``module.``/``_orig_mod.`` prefixes, upgrades (or downgrades) every
    versioned module's entries to its class's revision, then loads. For a
    model whose class is not versioned, ``location`` names the lineage to
    bring the whole dict to (its head, or ``revision``). With ``optimizer``
    (built for ``model``; a list for several), a training checkpoint's
    optimizer state follows the migration as ``ckptmigrate upgrade`` carries
    it, laid out as that optimizer holds its parameters, and is loaded into it.
    """
    from ..training.sides import keeps_order
    from .resume import migrate_checkpoint, optimizer_groups

    sd, meta, ckpt = _read_state_dict(path, trust_pickle, state_dict_key)
    try:
        report = LoadReport(
            Path(path),
            state_dict_key="/".join(ckpt.training.state_path) if ckpt.training else None,
            wrapper_prefix=ckpt.wrapper_prefix,
        )
        if ckpt.wrapper_prefix:
            log.info("stripped wrapper prefix %r from %s", ckpt.wrapper_prefix, path)
        if map_location is not None:
            sd = OrderedDict(
                (k, v.to(map_location) if isinstance(v, torch.Tensor) else v) for k, v in sd.items()
            )
        optimizers = _optimizers(optimizer)
        training = ckpt.training if optimizers else None
        if optimizers and training is None:
            raise CheckpointError(
                f"{path} holds a state dict alone, no optimizer state to restore",
                hint="leave out optimizer=, or load a training checkpoint (weights with the "
                "optimizer's state_dict() beside them)",
            )
        extra = (
            [(Lineage(location, revision, None, type(model).__qualname__), model, "")]
            if location is not None
            else []
        )
        migrated = migrate_checkpoint(
            model,
            sd,
            meta,
            str(path),
            container=training.container if training else None,
            state_path=training.state_path if training else (),
            optimizers=optimizer_groups(model, optimizers) if optimizers else None,
            extra=extra,
            wrapper_prefix=ckpt.wrapper_prefix,
            keeps_order=keeps_order(ckpt),
        )
        report.lineages.extend(migrated.records)
        _fill_ties(model, migrated.state_dict)
        with tree_migrated():
            try:
                result = model.load_state_dict(migrated.state_dict, strict=strict)
            except RuntimeError as exc:
                if isinstance(exc, CkptMigrateError) or "Error(s) in loading" not in str(exc):
                    raise
                raise load_error(model, migrated.state_dict) from exc
        report.missing_keys = list(result.missing_keys)
        report.unexpected_keys = list(result.unexpected_keys)
        if training is not None:
            report.optimizers = _restore(optimizers, migrated.container, training.state_path, path)
        return report
    finally:
        ckpt.close()


def _fill_ties(model: torch.nn.Module, sd: dict[str, Any]) -> None:
    """A tied parameter stored under one of its keys only (as safetensors stores it) fills both."""
    from ..training.layout import ties_by_identity

    for alias, first in ties_by_identity(model).items():
        if alias not in sd and first in sd:
            sd[alias] = sd[first]
        elif first not in sd and alias in sd:
            sd[first] = sd[alias]


def _optimizers(
    given: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
) -> list[torch.optim.Optimizer]:
    if given is None:
        return []
    if isinstance(given, torch.optim.Optimizer):
        return [given]
    return list(given)


def _restore(
    optimizers: Sequence[torch.optim.Optimizer],
    container: Any,
    state_path: tuple[str, ...],
    path: str | os.PathLike[str],
) -> list[str]:
    """Load the migrated optimizer states into the optimizers; where each came from."""
    from ..training.optimizer import find_optimizers

    found = find_optimizers(container, state_path)
    if not found:
        log.info("%s: no optimizer state to restore (optimizer_state = drop)", path)
        return []
    if len(found) != len(optimizers):
        raise CheckpointError(
            f"{path} holds {len(found)} optimizer state(s) "
            f"({', '.join(f.label for f in found)}), but {len(optimizers)} optimizer(s) were "
            "given to restore them into",
            hint="pass optimizer=[...] with one optimizer per state, in the same order",
        )
    for opt, state in zip(optimizers, found):
        opt.load_state_dict(dict(state.value))
    return [f.label for f in found]


def save(model: torch.nn.Module, path: str | os.PathLike[str], **extra: Any) -> Path:
    """Save ``model.state_dict()`` (stamped) atomically; ``extra`` makes a container.

    With ``extra`` (``optimizer=..., epoch=...``) the file is
    ``{"state_dict": ..., **extra}``. A ``.safetensors`` path writes that
    format (no ``extra``).
    """
    target = Path(path)
    sd = model.state_dict()
    if target.suffix == ".safetensors":
        if extra:
            raise CheckpointError(
                f"{target}: a safetensors file holds only tensors, not {', '.join(extra)}",
                hint="save to a .pt file for a training checkpoint",
            )
        from ..formats.safetensors_file import write_safetensors
        from ..runtime.memory import specs_of

        tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        with atomic_output(target) as tmp:
            try:
                write_safetensors(
                    tmp,
                    list(tensors),
                    specs_of(tensors),
                    tensors.__getitem__,
                    {},
                    getattr(sd, "_metadata", {}),
                )
            except CkptMigrateError:
                raise
            except Exception as exc:
                raise write_error(target, exc) from exc
        return target
    obj: Any = {"state_dict": sd, **extra} if extra else sd
    with atomic_output(target) as tmp:
        try:
            torch.save(obj, str(tmp))
        except Exception as exc:
            raise write_error(target, exc) from exc
    return target


def upgrade_state_dict(
    state_dict: Mapping[str, Any],
    location: str | os.PathLike[str],
    target: str = "head",
    *,
    from_revision: str | None = None,
) -> OrderedDict[str, Any]:
    """Bring an in-memory state dict to ``target`` (up or down); returns a new, stamped dict.

    Its revision comes from ``from_revision``, else its stamp
    (``_metadata``), else its schema. The input's tensors are not modified;
    unchanged ones are passed through as the same objects.
    """
    from ..runtime.memory import migrate_state_dict

    lineage = Lineage(location, target, None, "the state dict")
    script_dir = lineage.script_dir
    goal = lineage.revision
    metadata = {k: dict(v) for k, v in (getattr(state_dict, "_metadata", None) or {}).items()}
    current: tuple[str, ...] | None
    if from_revision is not None:
        rev = script_dir.revision_map.get_revision(from_revision)
        current = (rev.revision,) if rev is not None else ()
    else:
        current = lineage.current(state_dict, metadata.get(""), "the state dict")
    if current is None:
        raise CkptMigrateError(
            "the state dict has no ckptmigrate stamp and cannot be identified by its schema",
            hint="pass from_revision=...",
        )
    outcome = migrate_state_dict(script_dir, state_dict, metadata, current, goal)
    out = outcome.state_dict
    write_stamp(outcome.metadata.setdefault("", {}), (goal,))
    out._metadata = outcome.metadata  # type: ignore[attr-defined]
    return out
