"""A multi-rank training job on FSDP2 (gloo, CPU), for tests/test_dcp_distributed.py.

``torchrun --standalone --nproc-per-node N -m tests.harness.dcp_job PHASE WORK``

* ``save`` (2 ranks): trains a versioned TinyV1 for 3 steps, saves it with
  ``dcp.save`` through ckptmigrate's planner (so the checkpoint records its
  revision) into ``WORK/old``, then trains on: the unmigrated run's losses.
  Then, in the same job, a fresh TinyV2 loads the old checkpoint through
  ``ckptmigrate.dcp.load`` (migrating on the fly) and trains the same steps.
* ``resume`` (3 ranks): TinyV1 from ``WORK/old`` (plain dcp.load), TinyV2
  from ``WORK/migrated`` (migrated offline, plain dcp.load) and TinyV2 from
  ``WORK/old`` migrating on the fly; each trains the same steps. Every rank
  records which blobs it read while migrating on the fly.

Rank 0 writes ``WORK/<phase>.json`` (the losses); every rank writes
``WORK/<phase>-reads-<rank>.json`` (``[file, offset]`` of each blob read).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptmigrate
import ckptmigrate.dcp

from . import dcp_models as tiny

SAVED_AT, RESUMED = range(3), range(3, 6)


def versioned(cls: type[torch.nn.Module], work: Path, revision: str) -> Any:
    return ckptmigrate.versioned(str(work / "migrations"), revision=revision)(
        type(cls.__name__, (cls,), {})
    )


def build(cls: type[torch.nn.Module], mesh: Any) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = cls()
    fully_shard(model, mesh=mesh)  # every parameter a DTensor, dim 0 cut across the ranks
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def resume(cls: Any, ckpt: Path, mesh: Any, *, migrate: bool) -> list[float]:
    """A fresh model of ``cls`` and its optimizer, loaded from ``ckpt``; the next losses."""
    model, opt = build(cls, mesh)
    msd, osd = get_state_dict(model, opt)
    state: dict[str, Any] = {"model": msd, "optim": osd, "step": 0}
    if migrate:
        ckptmigrate.dcp.load(state, ckpt, model=model)
    else:
        if "old_scale" in osd["state"]:  # never trained: the checkpoint has no state for it
            del osd["state"]["old_scale"]
        dcp.load(state, checkpoint_id=ckpt)
    restore(model, opt, state)
    assert state["step"] == len(SAVED_AT)
    return tiny.train(model, opt, RESUMED)


def restore(model: Any, opt: Any, state: dict[str, Any]) -> None:
    """The loaded state into the model and its optimizer (``old_scale``'s Adam state is fresh)."""
    set_state_dict(
        model,
        opt,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )


def main() -> None:
    phase, work = sys.argv[1], Path(sys.argv[2])
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    v1 = versioned(tiny.TinyV1, work, tiny.REV_V1)
    v2 = versioned(tiny.TinyV2, work, tiny.REV_V2)
    reads: list[tuple[str, int]] = []
    spied = FileSystemReader._slice_file

    def spy(self: Any, file: Any, info: Any) -> Any:
        reads.append((info.relative_path, info.offset))
        return spied(self, file, info)

    out: dict[str, Any] = {"world": dist.get_world_size()}
    if phase == "save":
        model, opt = build(v1, mesh)
        out["trained"] = tiny.train(model, opt, SAVED_AT)
        msd, osd = get_state_dict(model, opt)
        ckptmigrate.dcp.save({"model": msd, "optim": osd, "step": 3}, work / "old")
        out["continued"] = tiny.train(model, opt, RESUMED)
        FileSystemReader._slice_file = spy  # type: ignore[method-assign]
        out["on_the_fly"] = resume(v2, work / "old", mesh, migrate=True)
    else:
        out["v1_from_old"] = resume(v1, work / "old", mesh, migrate=False)
        out["v2_from_migrated"] = resume(v2, work / "migrated", mesh, migrate=False)
        FileSystemReader._slice_file = spy  # type: ignore[method-assign]
        out["on_the_fly"] = resume(v2, work / "old", mesh, migrate=True)
    (work / f"{phase}-reads-{rank}.json").write_text(json.dumps(reads))
    if rank == 0:
        (work / f"{phase}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
