"""Lightning checkpoints (``Trainer.save_checkpoint``, ``ModelCheckpoint``'s ``.ckpt``).

A Lightning checkpoint is a container like any other::

    {"state_dict": <the LightningModule's state dict>, "optimizer_states": [...],
     "lr_schedulers": [...], "loops": ..., "callbacks": ..., "hyper_parameters": ...,
     "epoch": ..., "global_step": ..., "pytorch-lightning_version": ...}

The model a lineage describes usually sits under an attribute of the
LightningModule (``self.model`` -> keys ``model.*``): upgrade with
``--key-prefix model.`` (or ``key_prefix = model.`` in the ini file). Each entry
of ``optimizer_states`` numbers the parameters of the *whole* LightningModule
(``self.parameters()`` in ``configure_optimizers``), so the parameters outside
the prefix keep their state and their place around the lineage's. Learning-rate
schedulers keep one value per param group, and the groups stay, so
``lr_schedulers``, ``loops``, ``callbacks`` and ``hyper_parameters`` are carried
through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VERSION_KEY = "pytorch-lightning_version"


def is_lightning(container: Any) -> bool:
    """Whether ``container`` was written by Lightning's checkpoint connector."""
    return isinstance(container, Mapping) and (
        VERSION_KEY in container or ("optimizer_states" in container and "state_dict" in container)
    )


def count_hint(container: Any, key_prefix: str) -> str:
    """What to say when the optimizer's parameter count disagrees, for Lightning files."""
    if not is_lightning(container):
        return ""
    where = f"the keys under {key_prefix!r} and all others" if key_prefix else "all of its keys"
    return (
        "; Lightning numbers the optimizer's parameters over the whole LightningModule "
        f"({where}), so a buffer outside the lineage that looks like a parameter (a loss's "
        "class weights, say) also counts"
    )
