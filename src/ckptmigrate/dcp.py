"""ckptmigrate in multi-rank jobs that checkpoint with ``torch.distributed.checkpoint`` (DCP).

``ckptmigrate.dcp.load(state_dict, path, location=...)`` loads an old DCP
checkpoint into the current model's (sharded) state dict, migrating on the
way; ``ckptmigrate.dcp.save`` (or ``dcp.save(..., planner=ckptmigrate.dcp.SavePlanner())``)
records a ``@versioned`` model's revision in the checkpoint. See
:mod:`ckptmigrate.integration.dcp`.
"""

from .integration.dcp import Reader, SavePlanner, load, save

__all__ = ["Reader", "SavePlanner", "load", "save"]
