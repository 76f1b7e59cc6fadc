"""transformers: ``from_pretrained`` and ``save_pretrained`` of a versioned ``PreTrainedModel``.

The decorator is the whole change::

    @ckptmigrate.versioned("migrations")
    class MyGPT(GPT2LMHeadModel): ...

    model = MyGPT.from_pretrained("checkpoints/last-year")   # upgraded on the way in

**Which layout the lineage describes.** The checkpoint as it is stored: the
keys ``save_pretrained`` writes (tied weights once, transformers' own
conversions reverted to the original layout), which are also the keys
``ckptmigrate upgrade`` sees in the folder. So loading an old folder with
``from_pretrained`` and loading the folder ``ckptmigrate upgrade`` wrote are
the same load.

**The order of conversions** when ``from_pretrained`` reads a checkpoint:

1. ckptmigrate's revisions bring the stored keys from the checkpoint's
   revision (its stamp, else its schema) to the class's, up or down;
2. then transformers' own: the ``key_mapping`` argument, then the model's
   ``conversion_mapping`` (renamings, then converters such as merging
   per-expert weights into one tensor), which turn the stored layout into the
   model's;
3. then a strict check: a key still missing (other than a tied weight), one
   left over, or one of another shape is a :class:`~ckptmigrate.errors.LoadError`
   that says which migration to write, raised before transformers would
   report it and initialise the layer randomly.

**Where the hook is.** ``PreTrainedModel._load_pretrained_model``, the one
step that receives the resolved checkpoint files (local or downloaded,
single or sharded, ``.safetensors`` or ``.bin``) together with the model it
loads into. The versioned class passes it the migrated state dict instead:
lazy values (transformers' ``tensor[...]`` computes one), read from a memory
map, so the checkpoint is never in memory twice, and ``dtype=`` and
``device_map=`` apply as usual. A transformers release without that step
refuses to load a versioned class rather than load it unmigrated.

**Stamps.** ``save_pretrained`` records the class's revision in
``config.json`` (under ``"ckptmigrate"``, the entries a safetensors stamp
has) and in the index's ``metadata`` of a sharded save: both survive the Hub.
A checkpoint's own stamp (a file's header, an index) wins over the config's.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CkptMigrateError, LoadError
from ..formats import read_checkpoint
from ..formats.atomic import atomic_output
from ..formats.checkpoint import Checkpoint
from ..formats.stamp import flatten_stamps, is_stamp_key, stamp_entries, write_stamp
from ..plan.nodes import Node, TensorSpec
from ..plan.state import Evaluator
from ..runtime.memory import in_memory
from .resume import lineages_in, plan_checkpoint

#: The ``config.json`` entry (and config attribute) that holds the stamp.
CONFIG_KEY = "ckptmigrate"
_WRAPPED = "__ckptmigrate__"
# Set while a versioned class's loader runs, so a loader it calls does not migrate again.
_LOADING: ContextVar[bool] = ContextVar("ckptmigrate_hf_loading", default=False)


def adapt(cls: type) -> None:
    """Hook ``from_pretrained``/``save_pretrained`` of a versioned ``PreTrainedModel`` subclass."""
    from transformers import PreTrainedModel

    if not issubclass(cls, PreTrainedModel):
        return
    loader = getattr(cls, "_load_pretrained_model", None)
    if loader is None:
        cls.from_pretrained = classmethod(_unsupported)  # type: ignore[assignment]
        return
    if not getattr(loader, _WRAPPED, False):
        cls._load_pretrained_model = staticmethod(_migrating(loader))  # type: ignore[method-assign]
    saver = cls.save_pretrained
    if not getattr(saver, _WRAPPED, False):
        cls.save_pretrained = _stamping(saver)  # type: ignore[method-assign]


def _unsupported(cls: type, *args: Any, **kwargs: Any) -> Any:
    import transformers

    raise CkptMigrateError(
        f"{cls.__name__}.from_pretrained cannot migrate checkpoints with transformers "
        f"{transformers.__version__}: it has no PreTrainedModel._load_pretrained_model",
        hint="install the transformers release ckptmigrate supports (5.x), or upgrade the "
        "checkpoint with 'ckptmigrate upgrade DIR' and load it with the plain class",
    )


# ------------------------------------------------------------------------------ loading


def _migrating(original: Callable[..., Any]) -> Callable[..., Any]:
    def _load_pretrained_model(
        model: torch.nn.Module,
        state_dict: Mapping[str, Any] | None,
        checkpoint_files: list[str] | None,
        load_config: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if _LOADING.get() or not lineages_in(model):
            return original(model, state_dict, checkpoint_files, load_config, *args, **kwargs)
        token = _LOADING.set(True)
        try:
            with _opened(model, state_dict, checkpoint_files) as source:
                plan = plan_checkpoint(model, source.schema, source.metadata, str(source.path))
                if plan.used:
                    _refuse_disk_offload(load_config, source)
                    lazy = LazyStateDict(plan.entries, source.read)
                    result = original(model, lazy, None, load_config, *args, **kwargs)
                else:
                    result = original(
                        model, state_dict, checkpoint_files, load_config, *args, **kwargs
                    )
        finally:
            _LOADING.reset(token)
        _check_loaded(model, result[0], str(source.path))
        setattr(model.config, CONFIG_KEY, own_stamps(model) or None)
        return result

    setattr(_load_pretrained_model, _WRAPPED, True)
    return _load_pretrained_model


@contextlib.contextmanager
def _opened(
    model: torch.nn.Module,
    state_dict: Mapping[str, Any] | None,
    checkpoint_files: list[str] | None,
) -> Iterator[Checkpoint]:
    """What ``from_pretrained`` is about to load, read lazily, with the config's stamp."""
    if state_dict is not None:
        meta = getattr(state_dict, "_metadata", None) or {}
        ckpt = in_memory(state_dict, meta, "the state_dict given to from_pretrained")
    elif checkpoint_files:
        ckpt = read_checkpoint(_checkpoint_path(checkpoint_files))
    else:
        raise CkptMigrateError(
            f"{type(model).__name__}.from_pretrained found no checkpoint files to migrate",
            hint="pass a folder with model.safetensors (or its shards and index)",
        )
    try:
        stamps = stamp_entries(getattr(model.config, CONFIG_KEY, None) or {})
        for module, entries in stamps.items():  # the checkpoint's own stamp wins
            if not any(is_stamp_key(k) for k in ckpt.metadata.get(module, {})):
                ckpt.metadata.setdefault(module, {}).update(entries)
        yield ckpt
    finally:
        ckpt.close()


def _checkpoint_path(files: list[str]) -> Path:
    """The file, or for shards the index that names exactly them."""
    paths = [Path(f) for f in files]
    if len(paths) == 1:
        return paths[0]
    names = {p.name for p in paths}
    folder = paths[0].parent
    for index in sorted(folder.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError):
            continue
        if isinstance(weight_map, dict) and set(weight_map.values()) == names:
            return index
    raise CheckpointError(
        f"{folder}: no *.index.json names exactly the shards transformers resolved "
        f"({', '.join(sorted(names))})",
        hint="keep the index beside its shards",
    )


def _refuse_disk_offload(load_config: Any, source: Checkpoint) -> None:
    device_map = getattr(load_config, "device_map", None) or {}
    if "disk" in device_map.values():
        raise CkptMigrateError(
            f"{source.path} needs migrating, and device_map offloads part of the model to disk, "
            "which transformers does from the checkpoint files as they are",
            hint=f"upgrade the files first: ckptmigrate upgrade {source.path}",
        )


class LazyTensor:
    """One output of the migration; ``t[...]`` (how transformers materializes) computes it."""

    def __init__(self, values: _Values, key: str, spec: TensorSpec) -> None:
        self._values = values
        self._key = key
        self.shape = torch.Size(spec.shape)
        self.dtype = spec.dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        value = self._values.value(self._key)
        return value if index is Ellipsis else value[index]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        from ..formats.safetensors_file import dtype_names

        return dtype_names()[self.dtype]

    def __repr__(self) -> str:
        return f"LazyTensor({self._key!r}, {list(self.shape)}, {self.dtype})"


class _Values:
    """Computes outputs one at a time (transformers asks from several threads).

    A tensor the migration leaves as it was stays a view of the checkpoint's
    memory map, as transformers' own loading leaves it: a private, copy-on-
    write map, so training never writes to the file, and the weights are in
    memory once, as page cache, not copied.
    """

    def __init__(self, entries: Mapping[str, Node], read: Callable[[str], Any]) -> None:
        self._evaluate = Evaluator(entries, read)
        self._lock = threading.Lock()

    def value(self, key: str) -> torch.Tensor:
        with self._lock:
            value = self._evaluate(key)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key}: the checkpoint holds a {type(value).__name__} there")
        return value


class LazyStateDict(dict[str, Any]):
    """The migrated state dict, each tensor computed when transformers loads it."""

    def __init__(self, entries: Mapping[str, Node], read: Callable[[str], Any]) -> None:
        values = _Values(entries, read)
        super().__init__(
            (key, LazyTensor(values, key, node.spec))
            for key, node in entries.items()
            if node.spec is not None
        )


def _check_loaded(model: torch.nn.Module, info: Any, where: str) -> None:
    """No key missing (but tied weights), left over, or of another shape; else our error."""
    probe = type(info)(
        missing_keys=set(info.missing_keys),
        unexpected_keys=set(info.unexpected_keys),
        mismatched_keys=set(info.mismatched_keys),
        error_msgs=list(info.error_msgs),
        conversion_errors=dict(info.conversion_errors),
        skipped_pp_keys=set(getattr(info, "skipped_pp_keys", set())),
    )
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:
        adjust(probe)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = sorted(
        k for k in probe.missing_keys if not (k in tied and tied[k] not in probe.missing_keys)
    )
    parts = []
    if missing:
        parts.append(f"missing {_few(missing)}")
    if probe.unexpected_keys:
        parts.append(f"unexpected {_few(sorted(probe.unexpected_keys))}")
    for key, have, want in sorted(probe.mismatched_keys)[:3]:
        parts.append(f"{key} is {list(have)} in the checkpoint but {list(want)} in the model")
    for key, error in list(probe.conversion_errors.items())[:3]:
        parts.append(f"converting {key} failed: {error}")
    parts.extend(probe.error_msgs[:3])
    if not parts:
        return
    raise LoadError(
        f"{type(model).__name__} cannot load {where} even after migration: " + "; ".join(parts),
        hint="write the missing migration with 'ckptmigrate revision --autogenerate -m \"...\"' "
        "(the lineage describes the checkpoint as save_pretrained writes it); nothing was "
        "initialised at random",
    )


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


# ------------------------------------------------------------------------------ saving


def own_stamps(model: torch.nn.Module) -> dict[str, str]:
    """The stamps of ``model``'s versioned modules as flat entries (empty if unresolved)."""
    from .versioning import lineage_of

    metadata: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        lineage = lineage_of(type(module))
        if lineage is None:
            continue
        revision = lineage.resolve()
        if revision is None:
            lineage.report_unstamped()  # saving never fails because of the lineage
            continue
        write_stamp(metadata.setdefault(name, {}), (revision,))
    return flatten_stamps(metadata)


def _stamping(original: Callable[..., Any]) -> Callable[..., Any]:
    def save_pretrained(
        self: torch.nn.Module, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> Any:
        # a state_dict of the caller's own may be at any revision: it is saved unstamped
        stamps = own_stamps(self) if kwargs.get("state_dict") is None else {}
        setattr(self.config, CONFIG_KEY, stamps or None)  # config.json is written from it
        result = original(self, save_directory, *args, **kwargs)
        if stamps and kwargs.get("is_main_process", True):
            variant = kwargs.get("variant")
            infix = f".{variant}" if variant else ""
            stamp_index(Path(save_directory) / f"model{infix}.safetensors.index.json", stamps)
        return result

    setattr(save_pretrained, _WRAPPED, True)
    return save_pretrained


def stamp_index(index: Path, stamps: Mapping[str, str]) -> None:
    """Record ``stamps`` in a sharded checkpoint's index (if there is one), atomically."""
    if not index.exists():
        return
    data = json.loads(index.read_text(encoding="utf-8"))
    meta = {k: v for k, v in (data.get("metadata") or {}).items() if not is_stamp_key(str(k))}
    data["metadata"] = {**meta, **stamps}
    with atomic_output(index) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
