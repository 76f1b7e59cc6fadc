"""Where the optimizer's parameters sit after a migration is known, or the upgrade stops.

PyTorch pairs optimizer state with parameters by position. A migration that
adds a parameter (or splits or joins some) says nothing about where the model
puts the result, so without the model the new order would be a guess: the
upgrade refuses, naming the two ways out. Parameters that are one old
parameter each (renamed, reshaped, cast) keep that parameter's place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from examples.simple_model import SimpleModel, SimpleModelV1
from tests.conftest import Run, invoke, load_dict, two_step_lineage
from tests.harness.common import same
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

R1, R2 = "aaaa0001", "aaaa0002"
ADD_FC3 = (
    'op.rename_prefix("model.fc2.", "model.fc3.")\n'
    'op.add_tensor("model.fc2.weight", shape=(20, 20), init="eye")\n'
    'op.add_tensor("model.fc2.bias", shape=(20,), init="zeros")'
)


class Wrapped(L.LightningModule):  # type: ignore[misc]
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def wrapped_v2() -> nn.Module:
    """``model =`` for the lineage: the LightningModule at the new revision."""
    return Wrapped(SimpleModel())


def data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(48, 10, generator=g), torch.randint(0, 5, (48,), generator=g))
    return DataLoader(ds, batch_size=8)


def trainer(steps: int) -> Any:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture
def v1_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    t = trainer(3)
    t.fit(Wrapped(SimpleModelV1()), data())
    t.save_checkpoint("v1.ckpt")
    return tmp_path / "v1.ckpt"


def test_new_parameters_without_the_model_stop_the_upgrade(
    v1_ckpt: Path, tmp_path: Path, run: Run
) -> None:
    """The case that resumed into a crash inside Adam: fc3's moments at fc2's positions."""
    two_step_lineage(tmp_path, (R1, R2), ADD_FC3)
    for extra in ([], ["--dry-run"]):
        code, err = invoke("upgrade", "v1.ckpt", "--from", R1, "-o", "v2.ckpt", *extra)
        assert code == 1, err
        (line,) = [x for x in err.splitlines() if x.startswith("Error:")]
        assert "model.fc2.weight, model.fc2.bias" in line
        assert "`model = package.module:build_model`" in line
        assert "optimizer_state = drop" in line and "keep" in line
        assert "Traceback" not in err
    assert not (tmp_path / "v2.ckpt").exists()


def test_with_the_model_the_order_is_the_models_and_training_resumes(
    v1_ckpt: Path, tmp_path: Path, run: Run
) -> None:
    two_step_lineage(tmp_path, (R1, R2), ADD_FC3, model="tests.test_optimizer_order:wrapped_v2")
    run("upgrade", "v1.ckpt", "--from", R1, "-o", "v2.ckpt")
    old = load_dict("v1.ckpt")["optimizer_states"][0]
    new = load_dict("v2.ckpt")["optimizer_states"][0]
    # model order: fc1.weight, fc1.bias, fc2.weight (new), fc2.bias (new), fc3.weight, fc3.bias
    assert new["param_groups"][0]["params"] == list(range(6))
    assert list(new["state"]) == [0, 1, 4, 5]
    for new_id, old_id in {0: 0, 1: 1, 4: 2, 5: 3}.items():
        assert same(new["state"][new_id], old["state"][old_id])
    module = Wrapped(SimpleModel())
    t = trainer(5)
    t.fit(module, data(), ckpt_path="v2.ckpt")  # crashed inside Adam when the order was guessed
    assert t.global_step == 5


def test_drop_or_keep_is_the_way_out_without_a_model(
    v1_ckpt: Path, tmp_path: Path, run: Run
) -> None:
    two_step_lineage(tmp_path, (R1, R2), ADD_FC3)
    with open("alembic_style.ini", "a") as fh:
        fh.write("optimizer_state = drop\n")
    run("upgrade", "v1.ckpt", "--from", R1, "-o", "v2.ckpt")
    assert load_dict("v2.ckpt")["optimizer_states"] == []


@pytest.mark.parametrize(
    ("up", "ok"),
    [
        ('op.rename_prefix("model.fc1.", "model.enc.")', True),
        ('op.reshape("model.fc1.bias", (4, 5))', True),
        ('op.drop_prefix("model.fc2.", intended=True)', True),
        ('op.split("model.fc1.weight", into=["model.a", "model.b"], sizes=[5, 15])', False),
        ('op.concat(["model.fc1.bias", "model.fc2.bias"], into="model.bias")', False),
    ],
    ids=["rename", "reshape", "drop", "split", "concat"],
)
def test_only_one_to_one_parameters_keep_their_place_without_a_model(
    v1_ckpt: Path, tmp_path: Path, run: Run, up: str, ok: bool
) -> None:
    two_step_lineage(tmp_path, (R1, R2), up)
    code, err = invoke("upgrade", "v1.ckpt", "--from", R1, "-o", "v2.ckpt")
    if not ok:
        assert code == 1 and "optimizer's parameter order after the migration" in err, err
        return
    assert code == 0, err
    old = load_dict("v1.ckpt")["optimizer_states"][0]
    new = load_dict("v2.ckpt")["optimizer_states"][0]
    kept = [pid for pid in old["state"] if pid in new["state"]]
    assert kept == list(new["state"])
    for pid in kept:  # every surviving parameter's state stayed at its own position
        for name, value in old["state"][pid].items():
            assert same(new["state"][pid][name].flatten(), value.flatten()), (pid, name)


# ------------------------------------------------------------ several param groups, one model


class Decayed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


def grouped(model: nn.Module) -> torch.optim.Optimizer:
    """What the Hugging Face Trainer builds: weights with decay, then biases and norms without."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if all(p is not q for q in decay)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2)


def test_entries_grouped_out_of_state_dict_order_are_paired_by_their_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    two_step_lineage(tmp_path, (R1, R2), 'op.rename_prefix("fc1.", "enc.")')
    torch.manual_seed(0)
    model = Decayed()
    opt = grouped(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(4, 6, generator=g)), torch.zeros(4, 3)).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "ckpt.pt")
    run("upgrade", "ckpt.pt", "--from", R1, "-o", "up.pt")
    before, after = load_dict("ckpt.pt")["optimizer"], load_dict("up.pt")["optimizer"]
    assert after["param_groups"] == before["param_groups"]
    for pid, entry in before["state"].items():
        assert same(after["state"][pid], entry)
