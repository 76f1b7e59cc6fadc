"""transformers' ``Trainer`` checkpoint folders (``checkpoint-N/``): upgraded as one unit, resumed.

A tiny GPT-2 trained for two steps by the real ``Trainer`` (AdamW, its decay
and no-decay param groups, a scheduler, RNG states). The lineage: R1 stores
the blocks as ``transformer.blocks.``, R2 as ``transformer.h.``, R3 adds a
parameter that the model registers *first*, so every old parameter moves one
place in the optimizer's order.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tests.conftest import Run, make_lineage
from tests.harness.common import same

import ckptmigrate
from ckptmigrate.errors import LoadError, WriteError
from ckptmigrate.formats.safetensors_file import read_header
from ckptmigrate.integration.hf_trainer import MigrateOnResume

R1, R2, R3 = "eeee00000001", "eeee00000002", "eeee00000003"
RENAME = ('op.rename_prefix("transformer.blocks.", "transformer.h.")',
          'op.rename_prefix("transformer.h.", "transformer.blocks.")')  # fmt: skip
ADD_SCALE = ('op.add_tensor("extra.scale", shape=(4,), init="ones")', 'op.drop_key("extra.scale")')
CARRIED = ["scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"]

#: The model at R3, importable by ``model =`` (a module name no other test uses).
MODELS = '''
from collections import OrderedDict

import torch
import transformers


def config():
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                   n_positions=32, bos_token_id=0, eos_token_id=0)


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(4))


class ScaledGPT2(transformers.GPT2LMHeadModel):
    """One more parameter, registered before the transformer's."""

    def __init__(self, config):
        super().__init__(config)
        self._modules = OrderedDict([("extra", Scale()), *self._modules.items()])


def build():
    return ScaledGPT2(config())
'''


class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(12) * (i + 1)) % 100
        return {"input_ids": ids, "labels": ids}


class MigratingTrainer(MigrateOnResume, transformers.Trainer):  # type: ignore[misc]
    pass


class Moments(transformers.TrainerCallback):  # type: ignore[misc]
    """Adam's first moment and the value of each parameter, by name, as the first step begins."""

    def __init__(self) -> None:
        self.moments: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.values:
            return
        for name, p in kwargs["model"].named_parameters():
            self.values[name] = p.detach().clone()
            if "exp_avg" in kwargs["optimizer"].state[p]:
                self.moments[name] = kwargs["optimizer"].state[p]["exp_avg"].clone()


def train(model: Any, out: Path, steps: int, resume: Path | None = None,
          trainer_class: type = transformers.Trainer) -> tuple[Any, Moments]:  # fmt: skip
    args = transformers.TrainingArguments(
        str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], logging_steps=1, learning_rate=1e-2, weight_decay=0.1, seed=0,
        disable_tqdm=True,
    )  # fmt: skip
    moments = Moments()
    trainer = trainer_class(model=model, args=args, train_dataset=Data(), callbacks=[moments])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, moments


def losses(trainer: Any) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def downgrade_to_r1(run: Run, folder: Path, *args: str) -> None:
    """R1's folder, made from R2's: a rename keeps every parameter's place in the optimizer,
    so its state is carried as it is (no model of R1 exists to give the order)."""
    ini = Path("alembic_style.ini")
    text = ini.read_text()
    ini.write_text(text + "optimizer_state = keep\n")
    run("downgrade", str(folder), R1, *args)
    ini.write_text(text)


def versioned(cls: type, revision: str) -> Any:
    sub = type(f"V{cls.__name__}", (cls,), {})
    return ckptmigrate.versioned(Path("migrations").resolve(), revision=revision)(sub)


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trainer_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "trainer_models", raising=False)
    make_lineage(
        tmp_path, "migrations", None,
        [(R1, None, "pass", "pass"), (R2, R1, *RENAME), (R3, R2, *ADD_SCALE)],
        ini="alembic_style.ini",
    )  # fmt: skip
    return importlib.import_module("trainer_models")


@pytest.fixture
def saved(models: Any, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """``checkpoint-2/`` of a model at R2, and Adam's first moments by parameter name."""
    torch.manual_seed(0)
    model = versioned(transformers.GPT2LMHeadModel, R2)(models.config())
    trainer, _ = train(model, tmp_path / "run", 2)
    state = trainer.optimizer.state
    moments = {n: state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    return tmp_path / "run" / "checkpoint-2", moments


def test_the_cli_upgrades_a_trainer_folder_with_the_optimizer_following(
    models: Any, saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, run: Run
) -> None:
    folder, moments = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "optimizer.pt", *CARRIED]
    )
    assert run("current", str(folder)).stdout == f"{R2}\n"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    ini = tmp_path / "alembic_style.ini"
    ini.write_text(ini.read_text() + "prepend_sys_path = .\nmodel = trainer_models:build\n")

    run("upgrade", str(folder), "-o", "upgraded")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # -o: input untouched
    up = tmp_path / "upgraded"
    assert sorted(p.name for p in up.iterdir()) == sorted(before)
    for name in CARRIED:
        assert (up / name).read_bytes() == before[name], name
    assert run("current", "upgraded").stdout == f"{R3} (head)\n"
    assert "extra.scale" in read_header(up / "model.safetensors")[1]

    # the plain Trainer resumes from it, with each moment on its own parameter
    trainer, seen = train(models.build(), tmp_path / "cli", 4, resume=up)
    assert set(seen.moments) == set(moments)  # the new parameter starts without state
    for name, value in moments.items():
        assert same(seen.moments[name], value), name
    assert same(seen.values["extra.scale"], torch.ones(4))

    # and resuming from the old folder itself is the same run
    migrating, seen_too = train(
        versioned(models.ScaledGPT2, R3)(models.config()), tmp_path / "resumed", 4,
        resume=folder, trainer_class=MigratingTrainer,
    )  # fmt: skip
    assert losses(migrating) == losses(trainer) and len(losses(trainer)) == 4  # 2 saved, 2 new
    for name, value in seen.moments.items():
        assert same(seen_too.moments[name], value), name
    for name, value in trainer.model.state_dict().items():
        assert same(migrating.model.state_dict()[name], value), name

    run("upgrade", str(folder))  # in place, as one unit
    assert (folder / "optimizer.pt").read_bytes() != before["optimizer.pt"]
    assert (folder / "model.safetensors").read_bytes() == (up / "model.safetensors").read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-2")]


def test_without_the_model_the_upgrade_does_not_guess_the_optimizer_order(
    saved: tuple[Path, dict[str, torch.Tensor]], run: Run
) -> None:
    folder, _ = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = run("upgrade", str(folder), code=1)
    error = result.stderr.splitlines()[-1]
    assert "the weights file lists its keys sorted" in error, result.stderr
    assert "model =" in error and "optimizer_state = drop" in error
    assert "state dict found under" not in result.stderr  # no such entry in a folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_resuming_an_older_layout_is_resuming_the_folder_it_came_from(
    models: Any, saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, run: Run
) -> None:
    folder, moments = saved
    downgrade_to_r1(run, folder, "-o", "old")
    keys = read_header(tmp_path / "old" / "model.safetensors")[1]
    assert any(k.startswith("transformer.blocks.") for k in keys)
    assert not any(k.startswith("transformer.h.") for k in keys)

    cls = versioned(transformers.GPT2LMHeadModel, R2)
    reference, _ = train(cls(models.config()), tmp_path / "ref", 4, resume=folder)
    resumed, seen = train(cls(models.config()), tmp_path / "mig", 4, resume=tmp_path / "old",
                          trainer_class=MigratingTrainer)  # fmt: skip
    assert losses(resumed) == losses(reference)
    for name, value in moments.items():
        assert same(seen.moments[name], value), name
    for name, value in reference.model.state_dict().items():
        assert same(resumed.model.state_dict()[name], value), name


def test_a_folder_that_cannot_be_placed_is_a_ckptmigrate_error(
    models: Any, saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, run: Run
) -> None:
    folder, _ = saved
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    downgrade_to_r1(run, legacy)
    run("stamp", str(legacy), "base")  # as if saved before the lineage existed
    config = json.loads((legacy / "config.json").read_text())
    assert "ckptmigrate" not in config
    cls = versioned(transformers.GPT2LMHeadModel, R2)
    with pytest.raises(LoadError) as info:
        train(cls(models.config()), tmp_path / "x", 4, resume=legacy,
              trainer_class=MigratingTrainer)  # fmt: skip
    text = str(info.value)
    assert "has no ckptmigrate stamp" in text and "ckptmigrate stamp CKPT REV" in text

    future = tmp_path / "future"  # saved by code newer than this lineage
    shutil.copytree(folder, future)
    config = json.loads((future / "config.json").read_text())
    config["ckptmigrate"]["ckptmigrate.revision"] = "ffff99999999"
    (future / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="ffff99999999, unknown to"):
        train(cls(models.config()), tmp_path / "y", 4, resume=future,
              trainer_class=MigratingTrainer)  # fmt: skip


def _configure_model() -> None:
    ini = Path("alembic_style.ini")
    ini.write_text(ini.read_text() + "prepend_sys_path = .\nmodel = trainer_models:build\n")


def test_a_failed_write_leaves_the_folder_as_it_was(
    saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, run: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The weights are written, then the optimizer state fails: nothing of it is seen."""
    import ckptmigrate.formats.hf_trainer as fmt

    folder, _ = saved
    _configure_model()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(path: Path, state: Any) -> None:
        raise WriteError(f"cannot write {path}: the disk is full")

    monkeypatch.setattr(fmt, "_save_optimizer", disk_full)
    result = run("upgrade", str(folder), code=1)
    assert "optimizer.pt: the disk is full" in result.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint-2"]


def test_a_folder_a_killed_writer_left_is_removed(
    saved: tuple[Path, dict[str, torch.Tensor]], run: Run
) -> None:
    import subprocess

    from ckptmigrate.formats.atomic import TMP_SUFFIX

    folder, _ = saved
    _configure_model()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    left = folder.parent / f".checkpoint-2.{dead.stdout.strip()}.x{TMP_SUFFIX}"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    run("upgrade", str(folder))
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint-2"]
    assert run("current", str(folder)).stdout == f"{R3} (head)\n"
