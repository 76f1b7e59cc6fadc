"""What a checkpoint format is, and the registry every read and write goes through.

A format recognises its inputs (from the path and the first bytes), opens
one lazily as a :class:`~.checkpoint.Checkpoint`, and writes a migrated plan
streaming and atomically. Callers never ask which format a checkpoint is in;
they ask the registry for the format that owns a path, or that an output
should be written in, and what it can hold (``holds_only_tensors``,
``keeps_wrapper_prefix``).

Importing this module, and the built-in format modules the registry loads
to recognise a path, does not import torch: a path that is no checkpoint is
answered before the seconds ``import torch`` takes.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from ..errors import CheckpointError, CkptMigrateError
from . import probe

if TYPE_CHECKING:
    from ..plan.nodes import Node
    from ..plan.state import PlanState
    from .checkpoint import Checkpoint, Header
    from .storage import CkptPath, Output

#: The built-in formats' modules, in the order they are asked to recognise a path.
BUILTIN_FORMATS = (
    "peft",
    "hf_trainer",
    "sharded",
    "hf_folder",
    "dcp",
    "safetensors_file",
    "torch_file",
)


@dataclass(frozen=True)
class ReadOptions:
    """How to open a checkpoint."""

    trust_pickle: bool = False
    state_dict_key: str | None = None


@dataclass(frozen=True)
class WriteOptions:
    """How to write one: the same for every format (each uses what applies to it)."""

    verify: bool = True
    jobs: int = 1
    durable: bool = True
    keep_wrapper_prefix: bool = False
    progress: Callable[[int], None] | None = None
    # what the output holds besides the tensors: the training container to write back
    # (from the training pass), an adapter's new config
    container: Any = None


class Format(Protocol):
    """One way checkpoints are stored (a file layout, a folder layout)."""

    #: For messages only; nothing dispatches on it.
    name: ClassVar[str]
    #: Output suffixes, the first one named in hints.
    suffixes: ClassVar[tuple[str, ...]]
    #: False where a training container (optimizer state, epochs) fits in.
    holds_only_tensors: ClassVar[bool]
    #: Whether ``--keep-wrapper-prefix`` can put ``module.`` back into its keys.
    keeps_wrapper_prefix: ClassVar[bool]

    def recognise(self, path: CkptPath, head: bytes) -> bool:
        """Whether ``path`` (whose first bytes are ``head``, ``b""`` for a folder) is ours."""

    def accepts_output(self, target: CkptPath, source: Format | None) -> bool:
        """Whether a checkpoint in ``source`` format asked to go to ``target`` is written by us."""

    def open(self, path: CkptPath, options: ReadOptions) -> Checkpoint:
        """The checkpoint at ``path``, read lazily (no tensor data yet)."""

    def check_target(self, target: CkptPath) -> None:
        """Refuse an output path we cannot write, before any work is done."""

    def write(
        self,
        target: CkptPath,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        """Write the whole file's plan (``metadata`` stamped) atomically; verify it if asked."""

    def lock_path(self, path: CkptPath) -> CkptPath:
        """The file a writer of ``path`` locks (one that every writer replaces)."""


@runtime_checkable
class Peekable(Protocol):
    """A format that can tell a checkpoint's stamp without torch (for ``current``)."""

    def peek(self, path: CkptPath, options: ReadOptions) -> Header | None:
        """What the file records about itself, or None when only :meth:`Format.open` can tell.

        Reads only what the stamp needs and imports no torch; anything unusual
        (a pickle needing more than tensors and plain containers, a damaged
        file) is None, so that ``open`` answers it, with its own errors.
        """


class FileFormat(ABC):
    """A format that stores a checkpoint in one file: written to a temporary file, then switched."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()
    holds_only_tensors: ClassVar[bool] = True
    keeps_wrapper_prefix: ClassVar[bool] = False

    @abstractmethod
    def recognise(self, path: CkptPath, head: bytes) -> bool: ...

    @abstractmethod
    def open(self, path: CkptPath, options: ReadOptions) -> Checkpoint: ...

    @abstractmethod
    def write_file(
        self,
        path: Output,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        """Write the file's bytes to ``path``, reading via ``source``.

        ``path`` is a fresh temporary file or an upload: open it with
        :func:`.fileio.open_for_writing`, nothing else.
        """

    def write_part(
        self,
        path: Output,
        entries: Mapping[str, Node],
        produce: Callable[[str], Any],
        own: Checkpoint | None,
    ) -> None:
        """Write ``entries`` as one shard of a larger checkpoint: tensors only, no stamp.

        ``own`` is the shard's previous file when every entry comes from it,
        so that its bytes may be copied; else None.
        """
        raise CheckpointError(
            f"{self.name} files cannot be written as shards",
            hint="write the checkpoint as one file with -o",
        )

    def accepts_output(self, target: CkptPath, source: Format | None) -> bool:
        return target.suffix.lower() in self.suffixes

    def check_target(self, target: CkptPath) -> None:
        from .atomic import check_target

        check_target(target)

    def lock_path(self, path: CkptPath) -> CkptPath:
        return path

    def open_written(self, path: Path, source: Checkpoint) -> Checkpoint:
        """Read back a file this format just wrote from ``source``, to verify it.

        ``path`` is local: the temporary file, or an upload's read-back file,
        which holds everything but the tensor bytes.
        """
        return self.open(path, ReadOptions())

    def write(
        self,
        target: CkptPath,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        """Write beside ``target`` (or upload it), verify what was written, then switch it in."""
        from .atomic import write_error
        from .storage import staged_output, target_version
        from .verify import verify_written

        expect = target_version(target, source)
        with staged_output(target, durable=options.durable, expect=expect) as staged:
            try:
                self.write_file(staged.output, source, full, metadata, options)
            except CkptMigrateError:
                raise
            except Exception as exc:
                raise write_error(target, exc) from exc
            if options.verify:
                wrapper = source.wrapper_prefix if options.keep_wrapper_prefix else ""
                written = self.open_written(staged.readable, source)
                verify_written(written, target, full, metadata, source.key_prefix, wrapper)


# --------------------------------------------------------------------------- registry

_registry: list[Format] = []
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_FORMATS:
            importlib.import_module(f"{__package__}.{module}")


def _rank(fmt: Format) -> int:
    """Built-in formats in their listed order, then the others as registered."""
    package, _, module = type(fmt).__module__.rpartition(".")
    if package == __package__ and module in BUILTIN_FORMATS:
        return BUILTIN_FORMATS.index(module)
    return len(BUILTIN_FORMATS)


def register(fmt: Format) -> Format:
    """Add a format; formats are asked in the order registered, the built-in ones first.

    The built-in ones keep their listed order whichever of their modules is
    imported first.
    """
    _load_builtins()
    if any(f.name == fmt.name for f in _registry):
        raise ValueError(f"a checkpoint format named {fmt.name!r} is registered already")
    _registry.append(fmt)
    _registry.sort(key=_rank)  # stable: the others stay in registration order
    return fmt


def unregister(fmt: Format) -> None:
    """Remove a format registered with :func:`register`."""
    _registry.remove(fmt)


def formats() -> tuple[Format, ...]:
    """Every registered format, in the order they are asked."""
    _load_builtins()
    return tuple(_registry)


def recognise(path: CkptPath) -> Format:
    """The format that owns ``path``; a :class:`CheckpointError` saying what it is otherwise."""
    head = probe.read_head(path)
    for fmt in formats():
        if fmt.recognise(path, head):
            return fmt
    raise probe.not_a_checkpoint(path, head)


def output_format(target: CkptPath, source: Format | None) -> Format | None:
    """The format a checkpoint in ``source`` format is written in at ``target``.

    The first format that accepts the target (by its suffix, or a folder
    layout that keeps its own), else the source's own; None when neither.
    """
    for fmt in formats():
        if fmt.accepts_output(target, source):
            return fmt
    return source
