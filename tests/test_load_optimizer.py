"""Plain training loops: ``ckptmigrate.load(model, path, optimizer=opt)`` restores both.

The optimizer state follows the migration exactly as ``ckptmigrate upgrade``
carries it, so resuming from the old file through ``load`` and resuming from
the file the command line upgraded are the same run, step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from examples.simple_model import SimpleModel, SimpleModelV1
from tests.conftest import ADD_FC3, INITIAL, Run, load_dict
from tests.harness.common import same
from torch import nn

import ckptmigrate
from ckptmigrate.errors import CheckpointError, LoadError


def versioned_model() -> nn.Module:
    """The walkthrough's class at "add fc3", versioned by the project's own migrations."""

    @ckptmigrate.versioned(Path("migrations").resolve(), revision=ADD_FC3)
    class Versioned(SimpleModel):
        pass

    return Versioned()


def batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, generator=g), torch.randn(8, 5, generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[Any]) -> list[float]:
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def v1_training_checkpoint(path: str, make: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
    torch.manual_seed(0)
    model = SimpleModelV1()
    opt = make(model)
    train(model, opt, batches(1, 3))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, path)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def test_load_restores_the_optimizer_along_the_migration_like_the_cli(
    project: Path, run: Run
) -> None:
    v1_training_checkpoint("train.pt", adam)
    old_opt = load_dict("train.pt")["optimizer"]

    model = versioned_model()
    opt = adam(model)
    report = ckptmigrate.load(model, "train.pt", optimizer=opt)
    assert report.steps == ["upgrade 1a0c3e5f7b2d -> 2b7f0c1d9e4a, add fc3"]
    assert report.optimizers == ["'optimizer'"]
    # fc3 goes on with the moments fc2 had; the new fc2 starts with none
    for name in ("step", "exp_avg", "exp_avg_sq"):
        assert same(opt.state[model.fc3.weight][name], old_opt["state"][2][name])
        assert same(opt.state[model.fc1.bias][name], old_opt["state"][1][name])
    assert model.fc2.weight not in opt.state

    run("upgrade", "train.pt", "--from", INITIAL, "-o", "cli.pt")
    cli = load_dict("cli.pt")
    other = versioned_model()
    other.load_state_dict(cli["model"])
    other_opt = adam(other)
    other_opt.load_state_dict(cli["optimizer"])
    data = batches(2, 4)
    assert train(model, opt, data) == train(other, other_opt, data)  # bit for bit
    for (key, value), got in zip(model.state_dict().items(), other.state_dict().values()):
        assert same(value, got), key


def test_the_live_optimizers_groups_decide_the_layout(project: Path) -> None:
    """An optimizer whose groups list the parameters out of state-dict order."""

    def grouped(model: nn.Module) -> torch.optim.Optimizer:
        last = model.fc3 if hasattr(model, "fc3") else model.fc2
        head = list(last.parameters())
        body = [p for p in model.parameters() if all(p is not q for q in head)]
        groups = [{"params": head, "lr": 0.1}, {"params": body}]
        return torch.optim.SGD(groups, lr=0.01, momentum=0.9)

    v1_training_checkpoint("train.pt", grouped)
    old = load_dict("train.pt")["optimizer"]  # ids: fc2.weight 0, fc2.bias 1, fc1.* 2, 3
    model = versioned_model()
    opt = grouped(model)
    ckptmigrate.load(model, "train.pt", optimizer=opt)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    moved = {model.fc3.weight: 0, model.fc3.bias: 1, model.fc1.weight: 2, model.fc1.bias: 3}
    for param, old_id in moved.items():
        assert same(opt.state[param]["momentum_buffer"], old["state"][old_id]["momentum_buffer"])
    assert model.fc2.weight not in opt.state


def test_optimizer_needs_a_training_checkpoint(project: Path) -> None:
    torch.manual_seed(0)
    torch.save(SimpleModelV1().state_dict(), "bare.pt")
    model = versioned_model()
    with pytest.raises(CheckpointError, match="holds a state dict alone, no optimizer state"):
        ckptmigrate.load(model, "bare.pt", optimizer=adam(model))


def test_an_unplaceable_checkpoint_is_a_ckptmigrate_error(project: Path) -> None:
    """No stamp, and no base schema to identify it by: the fix, not torch's mismatch list."""
    (project / "migrations" / "base_schema.txt").unlink()
    v1_training_checkpoint("train.pt", adam)
    model = versioned_model()
    with pytest.raises(LoadError) as info:
        ckptmigrate.load(model, "train.pt", optimizer=adam(model))
    text = str(info.value)
    assert "has no ckptmigrate stamp" in text and "no base schema" in text
    assert "ckptmigrate stamp CKPT REV" in text and "ckptmigrate schema --record" in text
    assert "Error(s) in loading" not in text and "size mismatch" not in text


def test_an_optimizer_built_with_other_groups_is_refused_with_the_fix(project: Path) -> None:
    def two_groups(model: nn.Module) -> torch.optim.Optimizer:
        params = list(model.parameters())
        return torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}])

    v1_training_checkpoint("train.pt", two_groups)
    model = versioned_model()
    opt = adam(model)
    with pytest.raises(ckptmigrate.CkptMigrateError) as info:
        ckptmigrate.load(model, "train.pt", optimizer=opt)
    text = str(info.value)
    assert "has 2 param group(s), but the optimizer to restore it into has 1" in text
    assert "build the optimizer with the same param groups" in text
    assert not opt.state  # nothing half-restored
