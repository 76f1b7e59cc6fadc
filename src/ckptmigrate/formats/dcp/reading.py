"""A DCP checkpoint folder opened as a :class:`~ckptmigrate.formats.checkpoint.Checkpoint`.

``.metadata`` lists every entry by its flat key (``model.layers.0.weight``,
``optim.state.layers.0.weight.exp_avg``, ``optim.param_groups.0.lr``) and,
in ``planner_data``, its path in the nested state dict that was saved
(``("model", "layers.0.weight")``). That path rebuilds the structure: the
lineage's state dict is found in it as in a torch training container (under
``model``, ``state_dict`` or ``model_state_dict``, or ``--state-dict-key``),
and everything else becomes a *lazy* training container whose values are plan
nodes (:class:`Stored`) read only if a migration computes from them (or, for
an optimizer's ``params`` lists of parameter names, when its state is carried).

Opening reads ``.metadata`` and looks at which data files exist; it reads no
byte of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import CheckpointError
from ...plan.nodes import Node, Source, TensorSpec
from ...plan.spec import interned
from .. import keyspace
from ..checkpoint import Checkpoint, TrainingContainer
from ..container import locate_state_dict
from ..stamp import read_stamp, stamp_entries
from ..unpickle import InertTensor
from . import metadata as dcp_metadata
from .store import ChunkStore

if TYPE_CHECKING:
    from ..storage import CkptPath

PathItem = str | int


@dataclass
class Entry:
    """One entry of ``.metadata``: its flat key, its path in the saved state dict, its storage."""

    key: str
    path: tuple[PathItem, ...]
    md: Any  # TensorStorageMetadata or BytesStorageMetadata
    spec: TensorSpec | None  # None for a bytes entry

    @property
    def chunks(self) -> int:
        return len(self.md.chunks) if self.spec is not None else 0


def flat_key(path: Sequence[PathItem]) -> str:
    """The key DCP's planner gives the value at ``path`` (its parts joined by dots)."""
    if len(path) == 1 and type(path[0]) is str:  # a flat state dict's entries: most of them
        return path[0]
    return ".".join(map(str, path))


@dataclass(kw_only=True)
class DCPCheckpoint(Checkpoint):
    """A DCP folder: its metadata, its entries by flat key, and where the lineage sits."""

    folder: CkptPath
    md: Any
    entries: dict[str, Entry]
    flat_of: dict[str, str]  # lineage key -> flat key
    state_path: tuple[str, ...]
    store: ChunkStore
    #: objects read so far (hyper-parameters, names: small), by flat key
    objects: dict[str, Any] = field(default_factory=dict)
    #: ``storage_data`` by ``(fqn, offsets)``, made by the check of ``md``
    chunk_table: dcp_metadata.ChunkTable

    def read_entry(self, key: str) -> Any:
        """The value of the entry with flat key ``key`` (a tensor or an object)."""
        entry = self.entries[key]
        if entry.spec is not None:
            return self.store.tensor(key, entry.md, self.md.storage_data)
        if key not in self.objects:
            from torch.distributed.checkpoint.metadata import MetadataIndex

            self.objects[key] = self.store.load(self.md.storage_data[MetadataIndex(key)], key)
        return self.objects[key]

    def storage_of(
        self, key: str, under: str | None = None, index: Callable[..., Any] | None = None
    ) -> list[tuple[Any, Any]]:
        """The storage entries (one per chunk, or one for an object) of entry ``key``.

        Each as ``(index, info)``, the index naming ``under`` (default: ``key``):
        a renamed entry is the same chunks under its new key. ``index`` makes
        the indexes (default: ``MetadataIndex`` itself).
        """
        make: Callable[..., Any]
        if index is None:
            from torch.distributed.checkpoint.metadata import MetadataIndex as make
        else:
            make = index
        entry, name, table = self.entries[key], key if under is None else under, self.chunk_table
        if entry.spec is None:
            return [(make(name), table[(key, None)])]
        return [
            (make(name, c.offsets, i), table[(key, tuple(c.offsets))])
            for i, c in enumerate(entry.md.chunks)
        ]

    def stored(self, key: str) -> Stored:
        return Stored(key, self.entries[key].spec, self)

    def owns(self, node: Stored) -> bool:
        """Whether ``node`` is an entry of this checkpoint (also seen under a key prefix)."""
        return node.ckpt.md is self.md

    def files(self) -> set[str]:
        """The data files ``.metadata`` references (``.metadata`` itself left out)."""
        return referenced(self.md)


def referenced(md: Any) -> set[str]:
    """The data files a ``Metadata`` references (``.metadata`` itself left out)."""
    return {
        info.relative_path
        for info in md.storage_data.values()
        if info.relative_path != dcp_metadata.METADATA_NAME
    }


@dataclass(eq=False)
class Stored(Node):
    """An entry of a DCP checkpoint, read only when a migration computes from it."""

    key: str
    spec: TensorSpec | None
    ckpt: DCPCheckpoint
    inputs: tuple[Node, ...] = ()

    def compute(self, args: Sequence[Any]) -> Any:
        return self.ckpt.read_entry(self.key)

    def describe(self) -> str:
        return f"stored {self.key!r}"


class _Bytes:
    """A bytes entry in the skeleton the state dict is looked for in."""


def _entries(md: Any) -> dict[str, Entry]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    planner = md.planner_data if isinstance(md.planner_data, dict) else {}
    out: dict[str, Entry] = {}
    for key, entry in md.state_dict_metadata.items():
        path = planner.get(key)
        spec = (  # a torch.Size holds ints
            interned(tuple(entry.size), entry.properties.dtype)
            if isinstance(entry, TensorStorageMetadata)
            else None
        )
        out[key] = Entry(key, (key,) if path is None else tuple(path), entry, spec)
    return out


def _check_files(
    folder: CkptPath,
    md: Any,
    entries: dict[str, Entry],
    metadata: CkptPath,
    chunks: dcp_metadata.ChunkTable,
) -> None:
    """Every data file is present, and holds ``torch.save`` blobs (from the metadata alone)."""
    sizes: dict[str, int] = {}
    ends: dict[str, int] = {}  # the end of the last byte range in each file
    for info in md.storage_data.values():
        end = info.offset + info.length
        if end > ends.get(info.relative_path, -1):
            ends[info.relative_path] = end
    for name in ends:
        if name != dcp_metadata.METADATA_NAME and not (folder / name).is_file():
            raise CheckpointError(
                f"{folder} is an incomplete DCP checkpoint: its data file {name} is missing",
                hint="copy the checkpoint folder completely (every .distcp file and .metadata)",
            )
        file = metadata if name == dcp_metadata.METADATA_NAME else folder / name
        sizes[name] = file.stat().st_size
    if any(ends[name] > sizes[name] for name in ends):  # a file is short: name a blob it cuts
        index, info = next(
            (index, info)
            for index, info in md.storage_data.items()
            if info.offset + info.length > sizes[info.relative_path]
        )
        raise CheckpointError(
            f"{folder / info.relative_path} is shorter than its .metadata says "
            f"(a blob of {index.fqn} at {info.offset}+{info.length})",
            hint="the file was truncated, or .metadata belongs to another save; "
            "restore the checkpoint from a complete copy",
        )
    # one writer wrote every blob, in one serialization: the first one that holds data tells
    for key, entry in entries.items():
        if entry.spec is None:
            continue
        itemsize = entry.spec.dtype.itemsize
        for chunk in entry.md.chunks:
            raw = itemsize
            for d in chunk.sizes:
                raw *= d
            if not raw:
                continue
            if chunks[(key, tuple(chunk.offsets))].length == raw:
                raise CheckpointError(
                    f"{folder} was saved with FileSystemWriter(serialization_format="
                    "SerializationFormat.SAFETENSORS): its data files hold safetensors, "
                    "which torch.distributed.checkpoint's own FileSystemReader cannot read "
                    "back either",
                    hint="save with the default serialization, or with HuggingFaceStorageWriter "
                    "(ckptmigrate migrates its folders as sharded safetensors checkpoints)",
                )
            return


def read_dcp(
    folder: CkptPath,
    *,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
    metadata_file: CkptPath | None = None,
) -> DCPCheckpoint:
    """Open the folder lazily (``metadata_file``: read another .metadata, e.g. one just written)."""
    from ..storage import version

    path = metadata_file or folder / dcp_metadata.METADATA_NAME
    md, chunks = dcp_metadata.load(path, trust_pickle=trust_pickle)
    # the version of the bytes just read: a switch replaces only that one
    return described(folder, md, chunks, path, version(path), trust_pickle, state_dict_key)


def described(
    folder: CkptPath,
    md: Any,
    chunks: dcp_metadata.ChunkTable,
    path: CkptPath,
    read_version: str | None,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
) -> DCPCheckpoint:
    """The checkpoint ``md`` (checked, its chunk table ``chunks``) describes, read from
    ``path``: what reading a ``.metadata`` that holds ``md``'s pickle opens."""
    from . import FORMAT

    entries = _entries(md)
    _check_files(folder, md, entries, path, chunks)
    state_path, flat_of = _lineage(folder, entries, state_dict_key)
    prefix = keyspace.normal(flat_key(state_path))
    planner = md.planner_data if isinstance(md.planner_data, dict) else {}
    modules = keyspace.metadata_under(
        stamp_entries(planner.get(dcp_metadata.STAMP_KEY, {})), prefix
    )
    schema = {k: entries[f].spec for k, f in flat_of.items()}
    store = ChunkStore(folder, trust_pickle=trust_pickle, metadata_file=path)
    ckpt = DCPCheckpoint(
        path=folder,
        format=FORMAT,
        schema=schema,
        metadata=modules,
        stamp=read_stamp(modules.get(""), str(folder)),
        reader=lambda key: ckpt.read_entry(flat_of[key]),
        close=store.close,
        views_share_storage=False,
        version=read_version,
        folder=folder,
        md=md,
        entries=entries,
        flat_of=flat_of,
        state_path=state_path,
        store=store,
        chunk_table=chunks,
    )
    if state_path:
        ckpt.training = TrainingContainer(_container(ckpt), state_path, lazy=True)
    return ckpt


def _lineage(
    folder: CkptPath, entries: dict[str, Entry], state_dict_key: str | None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Where the state dict sits in the saved structure, and its keys' flat keys."""
    from torch.distributed.checkpoint._traverse import set_element

    skeleton: dict[str, Any] = {}
    flat_at: dict[tuple[PathItem, ...], str] = {}
    # only where the tensors sit matters to the lookup, not what they are: one stands for all
    tensor, data = InertTensor(None, ()), _Bytes()
    for key, entry in entries.items():
        value = tensor if entry.spec is not None else data
        path = entry.path
        # most paths are one key, or two (in a dict at the top); lists, deeper nesting and
        # anything odd follow DCP's own rules
        top: Any = path[0]
        if len(path) == 1 and type(top) is str:
            skeleton[top] = value
        elif len(path) == 2 and type(path[1]) is str and type(skeleton.get(top, {})) is dict:
            skeleton.setdefault(top, {})[path[1]] = value
        else:
            set_element(skeleton, path, value)
        flat_at[path] = key
    state_path, sd = locate_state_dict(skeleton, state_dict_key, str(folder))
    return state_path, {k: flat_at[(*state_path, k)] for k in sd}


def _container(ckpt: DCPCheckpoint) -> dict[str, Any]:
    """Everything outside the lineage as plan nodes, the state dict where its first entry was."""
    from torch.distributed.checkpoint._traverse import set_element

    lineage = set(ckpt.flat_of.values())
    out: dict[str, Any] = {}
    placed = False
    for key, entry in ckpt.entries.items():
        if key in lineage:
            if not placed:  # the state dict goes where its first entry was
                sd = {k: Source(k, ckpt.schema[k]) for k in ckpt.flat_of}
                set_element(out, ckpt.state_path, sd)
                placed = True
            continue
        set_element(out, entry.path, ckpt.stored(key))
    return out
