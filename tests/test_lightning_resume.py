"""``Trainer.fit(ckpt_path=old)`` migrates the whole checkpoint, with one line in the module.

The LightningModule inherits ``MigrateOnLoad``; its versioned ``self.model``
is at a newer revision than the checkpoint. Resuming from the old file must
be the same run as resuming from the file ``ckptmigrate upgrade`` wrote:
same weights, same optimizer state, same losses, step for step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from examples.simple_model import SimpleModel, SimpleModelV1
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from tests.conftest import ADD_FC3, INITIAL, Run, load_dict, two_step_lineage
from tests.harness.common import same
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptmigrate
from ckptmigrate.errors import CheckpointError, LoadError
from ckptmigrate.integration.lightning import MigrateOnLoad

R1, R2 = "cccc00000001", "cccc00000002"


class Classifier(MigrateOnLoad, L.LightningModule):  # type: ignore[misc]
    """A parameter before the model, a loss with a float buffer after it (as in test_lightning)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.log_temp = nn.Parameter(torch.zeros(()))
        self.model = net
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 1.5, 5))
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.model(x) * self.log_temp.exp(), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2)}


class RenamedV1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(10, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.enc(x)))


def versioned(base: type[nn.Module], revision: str) -> type[nn.Module]:
    """``base`` versioned by the lineage in ./migrations, pinned to ``revision``."""
    cls = type(base.__name__, (base,), {})
    return ckptmigrate.versioned(Path("migrations").resolve(), revision=revision)(cls)


def trainer(callbacks: list[Any] | None = None, **kw: Any) -> Any:
    kw.setdefault("max_steps", 3)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
        **kw,
    )


def data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(48, 10, generator=g), torch.randint(0, 5, (48,), generator=g))
    return DataLoader(ds, batch_size=8)


def save_trained(path: str, net: nn.Module, **kw: Any) -> None:
    torch.manual_seed(0)
    t = trainer(**kw)
    t.fit(Classifier(net), data())
    t.save_checkpoint(path)


def resume(net: nn.Module, path: str, **kw: Any) -> tuple[Classifier, Any]:
    module = Classifier(net)
    kw.setdefault("max_steps", 6)
    t = trainer(**kw)
    t.fit(module, data(), ckpt_path=path)
    return module, t


def assert_same_run(a: tuple[Classifier, Any], b: tuple[Classifier, Any]) -> None:
    (ma, ta), (mb, tb) = a, b
    assert ta.global_step == tb.global_step
    assert ma.losses == mb.losses and ma.losses
    sa, sb = ma.state_dict(), mb.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert same(sa[key], sb[key]), key
    oa, ob = ta.optimizers[0].state_dict(), tb.optimizers[0].state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for pid, entry in oa["state"].items():
        assert same(entry, ob["state"][pid]), pid


def test_resuming_an_old_checkpoint_is_resuming_the_cli_upgraded_one(
    project: Path, run: Run
) -> None:
    """A layer added in front: weights, Adam's moments and the schedule all carry on."""
    save_trained("v1.ckpt", SimpleModelV1())  # unstamped: identified by the base schema
    old = load_dict("v1.ckpt")
    run("upgrade", "v1.ckpt", "--key-prefix", "model.", "-o", "up.ckpt")
    model_cls = versioned(SimpleModel, ADD_FC3)

    hooked = resume(model_cls(), "v1.ckpt")
    cli = resume(model_cls(), "up.ckpt")
    assert_same_run(hooked, cli)
    module, t = hooked
    assert t.global_step == 6
    # fc3 went on with the moments fc2 had: after 3 more steps its step count is 6, fc2's 3
    opt = t.optimizers[0]
    assert float(opt.state[module.model.fc3.weight]["step"]) == 6.0
    assert float(opt.state[module.model.fc2.weight]["step"]) == 3.0
    assert t.lr_scheduler_configs[0].scheduler.base_lrs == old["lr_schedulers"][0]["base_lrs"]


def test_a_rename_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    two_step_lineage(
        tmp_path,
        (R1, R2),
        'op.rename_prefix("fc1.", "enc.")',
        'op.rename_prefix("enc.", "fc1.")',
        model="tests.test_lightning_resume:RenamedV1",
    )
    save_trained("v1.ckpt", versioned(SimpleModelV1, R1)())  # stamped at R1
    assert load_dict("v1.ckpt")["state_dict"]._metadata["model"]["ckptmigrate.revision"] == R1
    run("upgrade", "v1.ckpt", "--key-prefix", "model.", "-o", "up.ckpt")
    new_cls = versioned(RenamedV1, R2)
    hooked = resume(new_cls(), "v1.ckpt", max_steps=7)
    cli = resume(new_cls(), "up.ckpt", max_steps=7)
    assert_same_run(hooked, cli)
    untouched = resume(SimpleModelV1(), "v1.ckpt", max_steps=7)  # the run with no change at all
    assert hooked[0].losses == untouched[0].losses


def test_stochastic_weight_averaging_keeps_its_average(project: Path) -> None:
    swa = {"swa_lrs": 1e-2, "swa_epoch_start": 1}
    save_trained("v1.ckpt", SimpleModelV1(), max_steps=-1, max_epochs=2,
                 callbacks=[StochasticWeightAveraging(**swa)])  # fmt: skip
    saved = load_dict("v1.ckpt")
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("StochasticWeight")]
    average = state["average_model_state"]
    assert "model.fc2.weight" in average

    seen: dict[str, torch.Tensor] = {}

    class Probe(Callback):  # type: ignore[misc]
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            averaged = next(
                c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging)
            )
            seen.update({k: v.clone() for k, v in averaged._average_model.state_dict().items()})

    cb = StochasticWeightAveraging(**swa)
    resume(versioned(SimpleModel, ADD_FC3)(), "v1.ckpt", max_steps=-1, max_epochs=3,
           callbacks=[cb, Probe()])  # fmt: skip
    assert same(seen["model.fc3.weight"], average["model.fc2.weight"])
    assert same(seen["model.fc2.weight"], torch.eye(20))
    assert same(seen["log_temp"], average["log_temp"])


class SaveAt(Callback):  # type: ignore[misc]
    """Save during training (at the end, WeightAveraging puts the average into the module)."""

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_weight_averaging_keeps_the_average_and_the_current_weights(project: Path) -> None:
    save_trained(
        "unused.ckpt", SimpleModelV1(), callbacks=[WeightAveraging(), SaveAt("v1.ckpt", 3)]
    )
    saved = load_dict("v1.ckpt")
    current, average = saved["current_model_state"], saved["state_dict"]
    assert not same(current["model.fc2.weight"], average["model.fc2.weight"])

    module = Classifier(versioned(SimpleModel, ADD_FC3)())
    probe: dict[str, Any] = {}

    class Probe(Callback):  # type: ignore[misc]
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            averaging = next(c for c in trainer.callbacks if isinstance(c, WeightAveraging))
            average = averaging._average_model.module.state_dict()
            probe["average"] = {k: v.clone() for k, v in average.items()}
            probe["live"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    t = trainer(callbacks=[WeightAveraging(), Probe()], max_steps=4)
    t.fit(module, data(), ckpt_path="v1.ckpt")
    assert same(probe["live"]["model.fc3.weight"], current["model.fc2.weight"])
    assert same(probe["average"]["model.fc3.weight"], average["model.fc2.weight"])


def test_an_unknown_copy_of_the_weights_is_refused(project: Path) -> None:
    class KeepsACopy(Callback):  # type: ignore[misc]
        def state_dict(self) -> dict[str, Any]:
            return {"ema": {k: v.clone() for k, v in self.module.state_dict().items()}}

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.module = pl_module

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            pass

    save_trained("v1.ckpt", SimpleModelV1(), callbacks=[KeepsACopy()])
    with pytest.raises(CheckpointError) as info:
        resume(versioned(SimpleModel, ADD_FC3)(), "v1.ckpt", callbacks=[KeepsACopy()])
    text = str(info.value)
    assert "another copy of the weights at callbacks['" in text and "KeepsACopy']['ema']" in text


def test_checkpoints_that_cannot_be_placed_are_a_ckptmigrate_error(project: Path) -> None:
    (project / "migrations" / "base_schema.txt").unlink()
    save_trained("v1.ckpt", SimpleModelV1())  # no stamp, and nothing to identify it by
    with pytest.raises(LoadError) as info:
        resume(versioned(SimpleModel, ADD_FC3)(), "v1.ckpt")
    text = str(info.value)
    assert "has no ckptmigrate stamp" in text and "ckptmigrate schema --record" in text
    assert "size mismatch" not in text

    ckpt = load_dict("v1.ckpt")
    ckpt["state_dict"]._metadata["model"]["ckptmigrate.revision"] = "ffff99999999"
    torch.save(ckpt, "newer.ckpt")
    with pytest.raises(LoadError, match="ffff99999999, unknown to"):
        resume(versioned(SimpleModel, INITIAL)(), "newer.ckpt")
