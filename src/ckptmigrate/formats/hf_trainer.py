"""A Hugging Face Trainer checkpoint folder (``checkpoint-N/``), upgraded as one unit.

What ``Trainer`` saves every ``save_steps``: the model as ``save_pretrained``
writes it (``model.safetensors`` or shards, ``config.json``), the optimizer's
state dict in ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json`` and ``training_args.bin``. The weights are read
through their own format (a model folder or a sharded one) and
``optimizer.pt`` is the training container's optimizer state, so ``upgrade``
carries Adam's moments along the migration as for any training checkpoint
(the Trainer's param groups, weights with decay then biases and norms
without, are paired by the shapes of their state). The scheduler, RNG and
trainer state are carried unchanged; ``training_args.bin`` (a pickle) is
copied, never loaded.

The folder is written whole and switched in one step (:func:`.atomic.atomic_folder`),
so weights and optimizer state never disagree, even after a crash.

Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import WriteError
from . import hf_folder, sharded  # modules, not names: either may be importing this one
from .base import Format, ReadOptions, WriteOptions, register
from .checkpoint import Checkpoint, TrainingContainer
from .probe import index_path
from .storage import local_only

if TYPE_CHECKING:
    from ..plan.state import PlanState
    from .storage import CkptPath

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
#: Where the optimizer state sits in the training container this format builds.
OPTIMIZER_PATH = ("optimizer",)


def is_trainer_folder(path: Path) -> bool:
    """A folder with ``trainer_state.json`` beside a model's weights (one file or shards)."""
    return (
        path.is_dir()
        and (path / TRAINER_STATE).is_file()
        and (index_path(path) is not None or hf_folder.weights_file(path) is not None)
    )


@dataclass(kw_only=True)
class TrainerCheckpoint(Checkpoint):
    """The folder: its model's checkpoint (``model``) and the optimizer state beside it."""

    model: Checkpoint

    def notes(self, *, keep_wrapper_prefix: bool | None = None) -> list[str]:
        # the container is this format's own making: no entry of the folder to point at
        notes = super().notes(keep_wrapper_prefix=keep_wrapper_prefix)
        return [n for n in notes if not n.startswith("state dict found under")]


class TrainerFolderFormat:
    """``checkpoint-N/``: weights and ``optimizer.pt`` migrate together; the rest is carried."""

    name: ClassVar[str] = "Hugging Face Trainer checkpoint"
    suffixes: ClassVar[tuple[str, ...]] = ()
    holds_only_tensors: ClassVar[bool] = False
    keeps_wrapper_prefix: ClassVar[bool] = False
    #: The weights' keys are listed sorted, not in the model's order the optimizer numbered.
    keeps_parameter_order: ClassVar[bool] = False

    def recognise(self, path: CkptPath, head: bytes) -> bool:
        return isinstance(path, Path) and is_trainer_folder(path)

    def accepts_output(self, target: CkptPath, source: Format | None) -> bool:
        return source is self and hf_folder.FORMAT.accepts_output(target, hf_folder.FORMAT)

    def open(self, path: CkptPath, options: ReadOptions) -> Checkpoint:
        path = local_only(path, "Hugging Face Trainer checkpoints")
        fmt = sharded.FORMAT if index_path(path) is not None else hf_folder.FORMAT
        model = fmt.open(path, options)
        training = None
        if (path / OPTIMIZER).is_file():
            state = _load_optimizer(path / OPTIMIZER, options)
            # the weights stay in their own files: their place in the container is empty
            training = TrainingContainer({"model": {}, OPTIMIZER_PATH[0]: state}, ("model",))
        return TrainerCheckpoint(
            path=path,
            format=FORMAT,
            schema=model.schema,
            metadata=model.metadata,
            stamp=model.stamp,
            reader=model.reader,
            close=model.close,
            training=training,
            model=model,
        )

    def check_target(self, target: CkptPath) -> None:
        target = local_only(target, "Hugging Face Trainer checkpoints")
        hf_folder.FORMAT.check_target(target)

    def write(
        self,
        target: CkptPath,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        """The whole folder in a new one beside ``target``, then switched in."""
        from .atomic import atomic_folder

        assert isinstance(source, TrainerCheckpoint)
        target = local_only(target, "Hugging Face Trainer checkpoints")
        model = dataclasses.replace(source.model, key_prefix=source.key_prefix)
        with atomic_folder(target, durable=options.durable) as out:
            model.format.write(out, model, full, metadata, options)
            state = _optimizer_after(source, options)
            if state is not None:
                _save_optimizer(out / OPTIMIZER, state)
            _carry_the_rest(source, out)

    def lock_path(self, path: CkptPath) -> CkptPath:
        return path / TRAINER_STATE


def _load_optimizer(path: Path, options: ReadOptions) -> Any:
    """``optimizer.pt``, loaded as untrusted data, as any torch checkpoint is."""
    from .torch_file import load_object

    return load_object(path, trust_pickle=options.trust_pickle)[0]


def _optimizer_after(source: TrainerCheckpoint, options: WriteOptions) -> Any | None:
    """The optimizer state to write: migrated, or as it was; None when there is to be none."""
    if options.container is not None:
        return dict(options.container).get(OPTIMIZER_PATH[0])
    return source.training.container[OPTIMIZER_PATH[0]] if source.training else None


def _save_optimizer(path: Path, state: Any) -> None:
    import torch

    from .atomic import write_error

    try:
        torch.save(state, str(path))
    except Exception as exc:
        raise write_error(path, exc) from exc


def _weights_names(model: Checkpoint) -> set[str]:
    if isinstance(model, sharded.ShardedCheckpoint):
        return {*model.parts.shards, model.parts.index_path.name}
    return {model.path.name} if model.path.is_file() else set()


def _carry_the_rest(source: TrainerCheckpoint, out: Path) -> None:
    """Every other file of the folder (scheduler, RNG, trainer state ...), hard-linked or copied."""
    skip = {OPTIMIZER, *_weights_names(getattr(source.model, "weights", source.model))}
    for path in sorted(local_only(source.path, "Hugging Face Trainer checkpoints").iterdir()):
        dest = out / path.name
        if path.name in skip or path.name.startswith(".") or dest.exists():
            continue
        try:
            if path.is_dir():
                shutil.copytree(path, dest)
            else:
                try:
                    os.link(path, dest)
                except OSError:
                    shutil.copy2(path, dest)
        except OSError as exc:
            raise WriteError(
                f"cannot carry {path.name} into the new checkpoint folder: {exc.strerror or exc}",
                hint="free space or fix permissions; the input is unchanged",
            ) from exc


FORMAT = register(TrainerFolderFormat())
