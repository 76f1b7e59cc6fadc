"""Lightning checkpoints upgrade, and ``Trainer.fit(ckpt_path=...)`` resumes from them.

The LightningModule wraps the lineage's model as ``self.model`` (keys
``model.*``, hence ``--key-prefix model.``) beside a parameter of its own
before it (``log_temp``) and a loss with class weights after it (a float
buffer, which the optimizer does not count): Lightning numbers the optimizer's
parameters over all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from examples.simple_model import SimpleModel, SimpleModelV1
from tests.conftest import INITIAL, Run, load_dict, write_revision
from tests.harness.common import same
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

R1, R2 = "bbbb00000001", "bbbb00000002"


class Classifier(L.LightningModule):  # type: ignore[misc]
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.log_temp = nn.Parameter(torch.zeros(()))
        self.model = net
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 1.5, 5))
        self.restored: dict[str, dict[str, torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.model(x) * self.log_temp.exp(), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2)}

    def on_train_start(self) -> None:
        # what the optimizer holds right after Lightning restored it, before any step
        opt = self.trainer.optimizers[0]
        for name, p in self.named_parameters():
            if p in opt.state:
                self.restored[name] = {k: v.clone() for k, v in opt.state[p].items()}


class RenamedV1(nn.Module):
    """SimpleModelV1 with fc1 renamed to enc."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(10, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.enc(x)))


def trainer(max_steps: int) -> Any:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(48, 10, generator=g), torch.randint(0, 5, (48,), generator=g))
    return DataLoader(ds, batch_size=8)


def trained_checkpoint(path: str, net: nn.Module, steps: int = 3) -> None:
    torch.manual_seed(0)
    module = Classifier(net)
    t = trainer(steps)
    t.fit(module, data())
    t.save_checkpoint(path)


def test_lightning_checkpoint_upgrades_and_resumes(project: Path, run: Run) -> None:
    trained_checkpoint("v1.ckpt", SimpleModelV1())
    before = load_dict("v1.ckpt")
    assert list(before["state_dict"]) == [
        "log_temp",
        "model.fc1.weight",
        "model.fc1.bias",
        "model.fc2.weight",
        "model.fc2.bias",
        "loss_fn.weight",
    ]
    result = run("upgrade", "v1.ckpt", "--key-prefix", "model.", "--from", INITIAL, "-o", "up.ckpt")
    assert "Optimizer state at 'optimizer_states'[0]: 5 -> 7 parameters" in result.stderr
    after = load_dict("up.ckpt")
    for key in before:
        if key not in ("state_dict", "optimizer_states"):
            assert same(after[key], before[key]), key  # epoch, loops, lr_schedulers, callbacks...
    (old_opt,) = before["optimizer_states"]
    (new_opt,) = after["optimizer_states"]
    # LightningModule order: log_temp, model.fc1.*, model.fc2.* (new), model.fc3.*; the
    # loss's class weights are a buffer and count nowhere
    assert new_opt["param_groups"] == [{**old_opt["param_groups"][0], "params": list(range(7))}]
    assert list(new_opt["state"]) == [0, 1, 2, 5, 6]
    for new_id, old_id in {0: 0, 1: 1, 2: 2, 5: 3, 6: 4}.items():
        assert same(new_opt["state"][new_id], old_opt["state"][old_id]), new_id

    module = Classifier(SimpleModel())
    t = trainer(6)
    t.fit(module, data(), ckpt_path="up.ckpt")
    assert t.global_step == 6
    restored = module.restored
    assert set(restored) == {"log_temp", "model.fc1.weight", "model.fc1.bias"} | {
        "model.fc3.weight",
        "model.fc3.bias",
    }
    # the moved layer kept its moments, tensor by tensor, in the live optimizer
    for new_name, old_id in [("model.fc3.weight", 3), ("model.fc3.bias", 4), ("log_temp", 0)]:
        for state_name in ("step", "exp_avg", "exp_avg_sq"):
            assert same(restored[new_name][state_name], old_opt["state"][old_id][state_name])
    opt = t.optimizers[0]
    assert float(opt.state[module.model.fc3.weight]["step"]) == 6.0
    assert float(opt.state[module.model.fc2.weight]["step"]) == 3.0
    scheduler = t.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == before["lr_schedulers"][0]["base_lrs"]  # restored as saved


def test_lightning_rename_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\nprepend_sys_path = .\n"
        "model = tests.test_lightning:RenamedV1\nkey_prefix = model.\n"
    )
    versions = tmp_path / "migrations" / "versions"
    write_revision(versions, R1, None)
    write_revision(versions, R2, R1, 'op.rename_prefix("fc1.", "enc.")')
    trained_checkpoint("v1.ckpt", SimpleModelV1())
    run("upgrade", "v1.ckpt", "--from", R1, "-o", "up.ckpt")
    before, after = load_dict("v1.ckpt"), load_dict("up.ckpt")
    assert same(after["optimizer_states"], before["optimizer_states"])

    old = Classifier(SimpleModelV1())
    t_old = trainer(7)
    t_old.fit(old, data(), ckpt_path="v1.ckpt")
    new = Classifier(RenamedV1())
    t_new = trainer(7)
    t_new.fit(new, data(), ckpt_path="up.ckpt")
    assert t_old.global_step == t_new.global_step == 7
    got = new.state_dict()
    for key, value in old.state_dict().items():
        assert same(got[key.replace("model.fc1.", "model.enc.")], value), key


def test_lightning_drop_policy_resumes_with_a_fresh_optimizer(project: Path, run: Run) -> None:
    trained_checkpoint("v1.ckpt", SimpleModelV1())
    with open("alembic_style.ini", "a") as fh:
        fh.write("optimizer_state = drop\nkey_prefix = model.\n")
    run("upgrade", "v1.ckpt", "--from", INITIAL)
    after = load_dict("v1.ckpt")
    assert after["optimizer_states"] == [] and after["lr_schedulers"]
    module = Classifier(SimpleModel())
    t = trainer(5)
    t.fit(module, data(), ckpt_path="v1.ckpt")
    assert t.global_step == 5
    assert float(t.optimizers[0].state[module.model.fc3.weight]["step"]) == 2.0
