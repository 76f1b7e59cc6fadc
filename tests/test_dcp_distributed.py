"""DCP across ranks: FSDP2 (DTensor) state dicts saved on 2 ranks, migrated, resumed on 3 and 1.

Two ``torchrun`` jobs on gloo/CPU (tests/harness/dcp_job.py): the first
trains a versioned TinyV1 sharded over 2 ranks, saves it with DCP and trains
on (the unmigrated run); in the same job a TinyV2 loads the old checkpoint
through ``ckptmigrate.dcp.load``, migrating on the fly. Between the jobs the
checkpoint is migrated offline with the command line. The second job (3
ranks) resumes TinyV1 from the old checkpoint, TinyV2 from the migrated one,
and TinyV2 from the old one on the fly. This process resumes both on 1 rank.
Every resumed run must give the unmigrated run's losses, bit for bit: the
two classes compute the same thing on the same values.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from tests.harness import dcp_job
from tests.harness import dcp_models as tiny
from torch.distributed.checkpoint.state_dict import get_state_dict

import ckptmigrate
import ckptmigrate.dcp
from ckptmigrate.cli import cli

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def torchrun(ranks: int, phase: str, work: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            *("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"),
            *("-m", "tests.harness.dcp_job", phase, str(work)),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both jobs run, and the offline migration between them: the folder with every result."""
    work = tmp_path_factory.mktemp("dcp-job")
    tiny.write_project(work)
    torchrun(2, "save", work)
    ini = str(work / "alembic_style.ini")
    result = CliRunner().invoke(
        cli, ["-c", ini, "upgrade", str(work / "old"), "-o", str(work / "migrated")]
    )
    assert result.exit_code == 0, result.stderr
    torchrun(3, "resume", work)
    return work


def results(work: Path, phase: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((work / f"{phase}.json").read_text())
    return out


def metadata(folder: Path) -> Any:
    return pickle.loads((folder / ".metadata").read_bytes())


def test_saved_on_two_ranks_with_chunks_on_each(work: Path) -> None:
    md = metadata(work / "old")
    files = {
        info.relative_path for i, info in md.storage_data.items() if i.fqn == "model.embed.weight"
    }
    assert files == {"__0_0.distcp", "__1_0.distcp"}  # one chunk per rank
    # saved through ckptmigrate's planner: the versioned model's revision is in .metadata
    assert md.planner_data["__ckptmigrate__"]["model:ckptmigrate.revision"] == tiny.REV_V1


def test_migrated_on_the_fly_in_the_job_resumes_the_unmigrated_run(work: Path) -> None:
    saved = results(work, "save")
    assert saved["world"] == 2
    assert saved["on_the_fly"] == saved["continued"]


def test_resumed_on_three_ranks_migrated_offline_or_on_the_fly(work: Path) -> None:
    continued = results(work, "save")["continued"]
    resumed = results(work, "resume")
    assert resumed["world"] == 3
    assert resumed["v1_from_old"] == continued
    assert resumed["v2_from_migrated"] == continued
    assert resumed["on_the_fly"] == continued


def test_resumed_on_one_rank(work: Path) -> None:
    continued = results(work, "save")["continued"]
    for cls, folder, migrate in (
        (tiny.TinyV2, work / "migrated", False),
        (tiny.TinyV2, work / "old", True),
    ):
        torch.manual_seed(0)
        model = cls()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        msd, osd = get_state_dict(model, opt)
        state: dict[str, Any] = {"model": msd, "optim": osd, "step": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if migrate:
                config = str(work / "alembic_style.ini")
                ckptmigrate.dcp.load(state, folder, location=config)
            else:
                dcp.load(state, checkpoint_id=folder)
        dcp_job.restore(model, opt, state)
        assert tiny.train(model, opt, range(3, 6)) == continued, (folder, migrate)


def _shard(size: int, world: int, rank: int) -> range:
    """The rows of a dim-0 size FSDP2 gives ``rank`` (torch.chunk's cut)."""
    step = -(-size // world)
    return range(min(size, rank * step), min(size, (rank + 1) * step))


def test_each_rank_reads_only_the_chunks_it_needs_for_a_rename(work: Path) -> None:
    """A renamed tensor's chunks are read only by the ranks whose shard overlaps them."""
    migrated = metadata(work / "migrated")
    chunks: dict[tuple[str, int], tuple[str, range]] = {}  # blob -> (key, its rows)
    for index, info in migrated.storage_data.items():
        md = migrated.state_dict_metadata[index.fqn]
        if index.offset is None or not md.size or not info.relative_path.startswith("__"):
            continue  # objects, scalars (one chunk, read by all) and data written anew
        chunk = next(c for c in md.chunks if c.offsets == index.offset)
        rows = range(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0])
        chunks[(info.relative_path, info.offset)] = (index.fqn, rows)
    for rank in range(3):
        reads = {tuple(r) for r in json.loads((work / f"resume-reads-{rank}.json").read_text())}
        wanted = {b for b in chunks if needed_by(chunks, migrated, b, rank)}
        assert {b for b in reads if b in chunks} == wanted, rank  # exactly the overlapping ones
    # the ranks at the ends had chunks to skip (the other end's): they were not read
    assert any(not needed_by(chunks, migrated, b, 0) for b in chunks)
    assert any(not needed_by(chunks, migrated, b, 2) for b in chunks)


def needed_by(
    chunks: dict[tuple[str, int], tuple[str, range]], md: Any, blob: Any, rank: int
) -> bool:
    """Whether ``rank``'s shard of the blob's tensor overlaps the blob's chunk."""
    key, rows = chunks[blob]
    return bool(set(rows) & set(_shard(md.state_dict_metadata[key].size[0], 3, rank)))
