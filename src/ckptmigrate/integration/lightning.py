"""Lightning: ``Trainer.fit(ckpt_path=old)`` resumes from a checkpoint of an older revision.

The one-line change is in the LightningModule, whose ``on_load_checkpoint``
hook sees the whole checkpoint before anything is restored from it::

    class Classifier(ckptmigrate.integration.lightning.MigrateOnLoad, L.LightningModule):
        ...

(or call :func:`migrate_checkpoint` from your own ``on_load_checkpoint``). The
checkpoint is then migrated as a whole, in place: every versioned module's
weights (``model.*`` for a versioned ``self.model``, or the LightningModule
itself), ``optimizer_states`` carried along the same plan by the rules
``ckptmigrate upgrade`` follows (the live module gives the new parameter
order), and the copies of the weights callbacks keep: the averaged model of
``StochasticWeightAveraging`` and the average and current weights of
``WeightAveraging``. Everything else (``lr_schedulers``, ``loops``,
``hyper_parameters``, other callbacks' states) is carried unchanged. Another
copy of the weights that ckptmigrate does not know is refused with an error
naming it, rather than restored at the old layout.

This module imports nothing from ``lightning``: the hook works on the
checkpoint dict and the module, whichever Lightning saved them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from ..formats.container import is_state_dict, replace_at
from .resume import lineages_in
from .resume import migrate_checkpoint as migrate_into

#: Where ``WeightAveraging`` keeps the live weights when it saves the average as ``state_dict``.
CURRENT_MODEL_STATE = "current_model_state"
#: The weight copy in ``StochasticWeightAveraging``'s callback state.
SWA_AVERAGE = "average_model_state"


def migrate_checkpoint(module: torch.nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Migrate a Lightning checkpoint dict to ``module``'s revisions, in place; True if it changed.

    Call it first thing in ``on_load_checkpoint``.
    """
    if not lineages_in(module) or not isinstance(checkpoint.get("state_dict"), Mapping):
        return False
    live = CURRENT_MODEL_STATE if CURRENT_MODEL_STATE in checkpoint else "state_dict"
    weights = checkpoint[live]
    main = migrate_into(
        module,
        weights,
        _metadata(weights),
        f"the checkpoint's {live!r}",
        container=checkpoint,
        state_path=(live,),
    )
    if not main.records:
        return False
    out = dict(main.container)
    for path, copy in _copies(checkpoint, live, set(weights)).items():
        # WeightAveraging saves the average without PyTorch's metadata: it was taken at the
        # live weights' revision
        meta = _metadata(copy) or _metadata(weights)
        migrated = migrate_into(module, copy, meta, f"the checkpoint's {_label(path)}")
        out = replace_at(out, path, migrated.state_dict)
    checkpoint.clear()
    checkpoint.update(out)
    return True


class MigrateOnLoad:
    """LightningModule mixin: a checkpoint is migrated to the module's revisions as it is loaded.

    Put it before ``LightningModule`` in the bases. A module that overrides
    ``on_load_checkpoint`` itself calls ``super().on_load_checkpoint(checkpoint)``
    first.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert isinstance(self, torch.nn.Module)
        migrate_checkpoint(self, checkpoint)
        parent = super()
        if hasattr(parent, "on_load_checkpoint"):
            parent.on_load_checkpoint(checkpoint)


def _metadata(sd: Any) -> dict[str, dict[str, Any]]:
    meta = getattr(sd, "_metadata", None) or {}
    return {k: dict(v) for k, v in meta.items()}


def _copies(
    checkpoint: Mapping[str, Any], live: str, keys: set[str]
) -> dict[tuple[str, ...], Mapping[str, Any]]:
    """Every other copy of the weights in the checkpoint, by where it is; unknown ones refused.

    A copy is a state dict sharing keys with the live weights (``keys``).
    """
    out: dict[tuple[str, ...], Mapping[str, Any]] = {}
    if live != "state_dict":
        out[("state_dict",)] = checkpoint["state_dict"]
    for key, value in checkpoint.items():
        if key in (live, "state_dict"):
            continue
        if key == "callbacks" and isinstance(value, Mapping):
            for name, state in value.items():
                out.update(_callback_copies(str(name), state, keys))
        elif _is_copy(value, keys):
            raise _unknown_copy(repr(key))
    return out


def _is_copy(value: Any, keys: set[str]) -> bool:
    return is_state_dict(value) and not keys.isdisjoint(value)


def _callback_copies(
    name: str, state: Any, keys: set[str]
) -> dict[tuple[str, ...], Mapping[str, Any]]:
    if not isinstance(state, Mapping):
        return {}
    out: dict[tuple[str, ...], Mapping[str, Any]] = {}
    for key, value in state.items():
        if not _is_copy(value, keys):
            continue
        if key != SWA_AVERAGE or not name.startswith("StochasticWeightAveraging"):
            raise _unknown_copy(f"callbacks[{name!r}][{key!r}]")
        out[("callbacks", name, key)] = value
    return out


def _unknown_copy(where: str) -> CheckpointError:
    return CheckpointError(
        f"the checkpoint holds another copy of the weights at {where}, which ckptmigrate does "
        "not know how to migrate, so it would be restored at the old layout",
        hint="save that copy as a versioned module's state_dict() under the LightningModule, or "
        "remove it from the checkpoint before resuming (ckptmigrate migrates state_dict, "
        "optimizer_states, StochasticWeightAveraging's and WeightAveraging's copies)",
    )


def _label(path: tuple[str, ...]) -> str:
    return path[0] if len(path) == 1 else path[0] + "".join(f"[{p!r}]" for p in path[1:])
