"""PEFT: load an adapter saved for another revision of a versioned base model.

``PeftModel.from_pretrained(model, folder)`` reads ``adapter_config.json`` and
builds the adapter's layers from its ``target_modules`` before it loads a
single weight, so nothing the base model does when its state dict is loaded
can help an adapter whose module names (or shapes) belong to an older
revision: PEFT has failed by then, or attached the layers to the wrong
modules. :func:`from_pretrained` therefore migrates the adapter to the
model's revision first, into a temporary folder (the adapter's own folder is
left as it is), and hands that to PEFT. :func:`migrate_adapter` does the
first half alone, for a model or a lineage, up or down as needed.

Imported only where ``peft`` is used; ckptmigrate itself never imports peft.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import Config
from ..errors import CkptMigrateError
from .lineage import log
from .versioning import lineage_of

if TYPE_CHECKING:
    from peft import PeftModel

    from ..runtime.report import MigrationResult

PathLike = str | os.PathLike[str]


def _config(model: torch.nn.Module | None, location: PathLike | None) -> tuple[Config, str | None]:
    """The lineage's configuration, and the revision the model's class is at (if versioned)."""
    lineage = lineage_of(type(model)) if model is not None else None
    if location is not None:
        return Config.from_location(location, quiet=True, echo=False), None
    if lineage is None:
        owner = type(model).__name__ if model is not None else "no model"
        raise CkptMigrateError(
            f"{owner} is not a versioned model class, so its adapters have no lineage to follow",
            hint="decorate the class with @ckptmigrate.versioned(...), or pass location= (the "
            "migrations folder) and revision=",
        )
    folder = lineage.script_dir.dir
    return Config.from_location(folder, quiet=True, echo=False), lineage.revision


def migrate_adapter(
    adapter: PathLike,
    revision: str | None = None,
    *,
    model: torch.nn.Module | None = None,
    location: PathLike | None = None,
    output: PathLike | None = None,
    **options: Any,
) -> MigrationResult | None:
    """Bring a PEFT adapter folder to ``revision`` (default: ``model``'s class's), up or down.

    In place unless ``output``; ``options`` are those of ``ckptmigrate.upgrade``
    (``from_revision``, ``dry_run``, ``force`` ...). Returns None when the
    adapter is at ``revision`` already (and ``output`` is not asked for).
    """
    from .. import command
    from ..runtime.memory import direction

    config, own = _config(model, location)
    target = revision or own
    if target is None:
        raise CkptMigrateError(
            "migrate_adapter needs the revision to bring the adapter to",
            hint="pass revision=, or model= (a versioned model)",
        )
    from ..script.directory import ScriptDirectory

    rmap = ScriptDirectory.from_config(config).revision_map
    target_rev = rmap.get_revision(target)
    assert target_rev is not None
    target = target_rev.revision
    from_revision = options.get("from_revision")
    current = (
        tuple(r.revision for r in rmap.get_revisions(from_revision) if r is not None)
        if from_revision
        else command.current(config, adapter)
    )
    way = direction(rmap, current, target)
    if way == "unrelated":
        raise CkptMigrateError(
            f"{adapter} is at {', '.join(current) or 'base'}, on another branch than {target}",
            hint="migrate it explicitly with 'ckptmigrate upgrade/downgrade'",
        )
    if way == "none" and output is None:
        return None
    run = command.downgrade if way == "downgrade" else command.upgrade
    return run(config, adapter, target, output=output, **options)


def from_pretrained(
    model: torch.nn.Module,
    adapter: PathLike,
    *args: Any,
    location: PathLike | None = None,
    revision: str | None = None,
    **kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter, ...)`` for an adapter of any revision.

    The adapter (a local folder) is first brought to the revision of
    ``model``'s versioned class (or ``revision`` in the lineage at
    ``location``) in a temporary folder; the rest of the arguments go to
    PEFT unchanged.
    """
    from peft import PeftModel

    folder = Path(adapter)
    if not folder.is_dir():
        raise CkptMigrateError(
            f"{adapter} is not a local adapter folder",
            hint="download it first (huggingface_hub.snapshot_download) and pass the folder",
        )
    with tempfile.TemporaryDirectory(prefix="ckptmigrate-adapter-") as tmp:
        out = Path(tmp) / folder.name
        result = migrate_adapter(folder, revision, model=model, location=location, output=out)
        if result is not None and result.steps:
            log.info(
                "migrated the adapter %s from %s to %s for %s",
                adapter,
                ",".join(result.from_revisions) or "base",
                ",".join(result.to_revisions) or "base",
                type(model).__name__,
            )
        source = out if result is not None else folder
        return PeftModel.from_pretrained(model, str(source), *args, **kwargs)
