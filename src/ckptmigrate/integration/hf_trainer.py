"""transformers' ``Trainer``: ``train(resume_from_checkpoint=old)`` resumes an older folder.

The one-line change is in the trainer's class::

    class MyTrainer(ckptmigrate.integration.hf_trainer.MigrateOnResume, Trainer): ...

``Trainer`` resumes from a ``checkpoint-N/`` folder in two steps, the weights
before the optimizer exists and the optimizer and scheduler after it was
built; this mixin takes over both. The weights are read through
:func:`ckptmigrate.load` (migrated to the model's revisions, then loaded
strictly, where ``Trainer`` alone loads with ``strict=False``); then
``optimizer.pt`` follows the same migration into the live optimizer, laid
out by its param groups (``Trainer``'s decay and no-decay groups included),
as ``ckptmigrate upgrade checkpoint-N/`` would carry it; the scheduler,
scaler and RNG states are restored by ``Trainer`` as usual. transformers'
own load-time conversions are not applied at resume; ckptmigrate's
migrations are.

The hooks are ``Trainer._load_from_checkpoint`` and
``Trainer._load_optimizer_and_scheduler``, the two steps every
single-process and DDP resume goes through. DeepSpeed and FSDP restore their
own sharded states elsewhere: a run with either is refused with the fix
(upgrade the folder with ``ckptmigrate upgrade`` first) rather than resumed
unmigrated.

This module imports nothing from ``transformers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .loading import load

#: The files ``Trainer`` writes beside the weights.
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"


class MigrateOnResume:
    """``Trainer`` mixin: resuming migrates the checkpoint folder to the model's revisions.

    Put it before ``Trainer`` in the bases.
    """

    model: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    is_deepspeed_enabled: bool
    is_fsdp_enabled: bool

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._refuse_sharded_engines(resume_from_checkpoint)
        load(_unwrapped(model if model is not None else self.model), resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        self._refuse_sharded_engines(checkpoint)
        folder = Path(checkpoint)
        if not (folder / OPTIMIZER).is_file() or not (folder / SCHEDULER).is_file():
            return  # Trainer, too, restores neither without both
        # the weights again (the values the first step loaded), with the optimizer state beside them
        load(_unwrapped(self.model), folder, optimizer=self.optimizer)
        self.lr_scheduler.load_state_dict(
            torch.load(folder / SCHEDULER, map_location="cpu", weights_only=True)
        )

    def _refuse_sharded_engines(self, checkpoint: str) -> None:
        engine = (
            "DeepSpeed"
            if getattr(self, "is_deepspeed_enabled", False)
            else "FSDP"
            if getattr(self, "is_fsdp_enabled", False)
            else None
        )
        if engine is not None:
            raise CheckpointError(
                f"cannot migrate {checkpoint} on resume: {engine} restores its own sharded state",
                hint=f"upgrade the folder first ('ckptmigrate upgrade {checkpoint}'), then resume "
                "with the plain Trainer",
            )


def _unwrapped(model: Any) -> torch.nn.Module:
    """The model inside ``DataParallel``/DDP wrappers, whose keys the checkpoint has."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    assert isinstance(model, torch.nn.Module)
    return model
