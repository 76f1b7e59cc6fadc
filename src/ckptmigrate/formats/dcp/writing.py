"""Writing a DCP checkpoint: new data only for what changed, then one atomic ``.metadata`` switch.

In order, all while the caller holds the lock on ``.metadata``:

1. data files an interrupted earlier write left (``ckptmigrate-*.distcp``
   that no ``.metadata`` references) are removed;
2. the tensors a migration computes are written as new chunks into new data
   files beside the old ones (``-j`` files in parallel), and fsynced when the
   write is durable; entries it does not change are referenced where they
   are (with ``-o`` into another folder, the data files they live in are
   copied there first);
3. the new ``.metadata`` (new objects such as an optimizer's ``params`` lists
   stored after its pickle) is written to a temporary file, read back and
   checked against the plan, and switched in with one rename: until then the
   old ``.metadata`` names only old, untouched files, and after it the new
   one names only complete files. A kill at any moment leaves the one or
   the other;
4. data files the old ``.metadata`` referenced and the new one does not are
   removed.

On a store (an fsspec URL) the same steps run through :mod:`..storage`: data
files are uploads under new names, visible only once complete; blobs are read
by ranges; the switch is one conditional PUT of ``.metadata``, refused if
another writer replaced the version that was read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from ...errors import CkptMigrateError, WriteError
from ...plan.nodes import sources_of
from ...plan.state import PlanState
from .. import keyspace
from ..atomic import atomic_output, write_error
from ..base import WriteOptions
from ..checkpoint import Checkpoint
from ..fileio import copy_range, fsync_dir, open_for_writing, plain_tensor
from ..stamp import flatten_stamps
from ..storage import open_blob, replace_small, same_location, staged_output
from ..verify import verify_written
from . import DATA_SUFFIX, OWN_PREFIX
from . import metadata as dcp_metadata
from .output import Box, Leaf, computing, plan_output, region
from .reading import DCPCheckpoint, described, flat_key, read_dcp
from .reading import referenced as files_of

if TYPE_CHECKING:
    from ..storage import CkptPath


@dataclass
class _DataFile:
    """One new data file: its name and the leaves whose chunks go into it."""

    name: str
    leaves: list[Leaf] = field(default_factory=list)
    nbytes: int = 0


def write_dcp(
    folder: CkptPath,
    source: Checkpoint,
    full: PlanState,
    metadata: Mapping[str, Mapping[str, Any]],
    options: WriteOptions,
) -> None:
    """Write ``full`` (``metadata`` stamped) as the DCP checkpoint in ``folder``."""
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise WriteError(
            f"cannot create the folder {folder}: {exc.strerror or exc}",
            hint="choose another place with -o; the input is unchanged",
        ) from exc
    dcp = source if isinstance(source, DCPCheckpoint) else None
    same = dcp is not None and same_location(folder, dcp.folder)
    previous = dcp if same else _existing(folder)
    referenced = previous.files() if previous is not None else set()
    remove_leftovers(folder, previous.md if previous is not None else None)
    leaves = plan_output(source, full.entries, options.container)
    stamps = _stamps(source, metadata)
    written: list[CkptPath] = []
    data: bytes | None = None
    try:
        infos = _write_data(folder, stamps, source, leaves, options, written)
        names = _carry_files(folder, dcp, leaves, same, referenced, options, written)
        md, blobs = _metadata(source, dcp, leaves, infos, names, stamps)
        replaced = sorted(referenced - files_of(md))
        if replaced and isinstance(md.planner_data, dict):  # for the next writer, if killed
            md.planner_data[dcp_metadata.REPLACED_KEY] = replaced
        data = dcp_metadata.encode(md, blobs)

        def check(tmp: Path) -> None:
            if options.verify:
                assert data is not None
                _verify(folder, tmp, data, md, source, full, metadata, leaves)

        if isinstance(folder, Path):
            if options.durable:
                fsync_dir(folder)
            with atomic_output(folder / dcp_metadata.METADATA_NAME, durable=options.durable) as tmp:
                tmp.write_bytes(data)
                check(tmp)
        else:  # the new .metadata replaces exactly the version read (or is a new object)
            expect = previous.version if previous is not None else None
            _switch_remote(folder, data, expect, check)
    except BaseException as exc:
        if not isinstance(folder, Path) and _switched(folder, data):
            raise  # the new .metadata is there (interrupted after the PUT): its files stay
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(folder, exc) from exc
        raise
    for name in replaced:
        (folder / name).unlink(missing_ok=True)  # no longer part of the checkpoint


def _existing(folder: CkptPath) -> DCPCheckpoint | None:
    """The DCP checkpoint an ``-o`` folder holds already (its files go after the switch)."""
    if not (folder / dcp_metadata.METADATA_NAME).is_file():
        return None
    try:
        return read_dcp(folder)
    except CkptMigrateError as exc:
        raise WriteError(
            f"cannot write into {folder}: it holds a DCP checkpoint that cannot be read "
            f"({exc.message})",
            hint="give a new or empty folder with -o",
        ) from exc


def _switch_remote(
    folder: CkptPath, data: bytes, expect: str | None, check: Callable[[Path], None]
) -> None:
    """The switch on a store: ``.metadata`` checked in a local copy, then one conditional PUT."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix="ckptmigrate-", suffix=".metadata")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        check(tmp)
        replace_small(folder / dcp_metadata.METADATA_NAME, data, durable=True, expect=expect)
    finally:
        tmp.unlink(missing_ok=True)


def _switched(folder: CkptPath, data: bytes | None) -> bool:
    """Whether the ``.metadata`` on the store is the one this write put there."""
    if data is None:
        return False
    try:
        return (folder / dcp_metadata.METADATA_NAME).read_bytes() == data
    except (OSError, CkptMigrateError):
        return False


def remove_leftovers(folder: CkptPath, md: Any = None) -> list[str]:
    """Data files interrupted writes left: ours, or replaced, and referenced by no ``.metadata``.

    Run holding the lock on ``.metadata`` (or before writing a new folder); ``md``:
    its ``.metadata``, already read under that lock. The names removed.
    """
    path = folder / dcp_metadata.METADATA_NAME
    files = {file.name: file for file in folder.iterdir()}
    ours = {n for n in files if n.startswith(OWN_PREFIX) and n.endswith(DATA_SUFFIX)}
    names: set[str] = set()
    replaced: list[str] = []
    if md is None and path.is_file():
        try:
            if not ours and not dcp_metadata.lists_replaced(path.read_bytes()):
                return []
            md, _ = dcp_metadata.load(path)
        except (CkptMigrateError, OSError):
            return []  # reading the checkpoint says what is wrong with it
    if md is not None:
        names = files_of(md)
        if isinstance(md.planner_data, dict):
            replaced = list(md.planner_data.get(dcp_metadata.REPLACED_KEY, []))
    removed = []
    for name, file in files.items():
        if name not in names and (name in ours or name in replaced):
            file.unlink(missing_ok=True)
            removed.append(name)
    return removed


def _stamps(source: Checkpoint, metadata: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The stamp entries, their modules named as flat keys of the saved state dict."""
    path = source.training.state_path if source.training is not None else ()
    return flatten_stamps(keyspace.metadata_at(metadata, keyspace.normal(flat_key(path))))


def _tag(leaves: Sequence[Leaf], stamps: Mapping[str, str]) -> str:
    """A name part for the new data files: the same plan gives the same names."""
    digest = hashlib.sha256(repr(sorted(stamps.items())).encode())
    for leaf in leaves:
        digest.update(f"{leaf.key}\0{leaf.ref}\0{leaf.spec}\0{leaf.boxes}\n".encode())
    return digest.hexdigest()[:8]


def _file_name(folder: CkptPath, tag: str, n: int) -> str:
    name = f"{OWN_PREFIX}{tag}-{n}{DATA_SUFFIX}"
    extra = 0
    while (folder / name).exists():
        extra += 1
        name = f"{OWN_PREFIX}{tag}-{n}.{extra}{DATA_SUFFIX}"
    return name


def _buckets(
    folder: CkptPath, stamps: Mapping[str, str], leaves: Sequence[Leaf], jobs: int
) -> list[_DataFile]:
    """The tensors to write, in at most ``jobs`` files; tensors with a common input share one."""
    todo = [leaf for leaf in leaves if leaf.node is not None and leaf.node.spec is not None]
    groups: dict[str, list[Leaf]] = {}
    owner: dict[str, str] = {}
    for leaf in todo:
        assert leaf.node is not None
        srcs = sources_of(leaf.node)
        home = next((owner[s] for s in srcs if s in owner), leaf.key)
        groups.setdefault(home, []).append(leaf)
        for s in srcs:
            owner.setdefault(s, home)
    files = [_DataFile("") for _ in range(max(1, min(jobs, len(groups))))]
    for group in sorted(groups.values(), key=lambda g: -sum(_nbytes(x) for x in g)):
        target = min(files, key=lambda f: f.nbytes)
        target.leaves.extend(group)
        target.nbytes += sum(_nbytes(x) for x in group)
    used = [f for f in files if f.leaves]
    tag = _tag(leaves, stamps) if used else ""
    for n, f in enumerate(used):
        f.name = _file_name(folder, tag, n)
    return used


def _nbytes(leaf: Leaf) -> int:
    return leaf.spec.nbytes if leaf.spec is not None else 0


@contextlib.contextmanager
def _new_file(path: CkptPath, durable: bool) -> Iterator[IO[bytes]]:
    """A new data file to write: a local file (fsynced when durable), or an upload to a store
    under a name no object has, visible only once complete."""
    if isinstance(path, Path):
        with open_for_writing(path) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        return
    with staged_output(path, durable=durable, expect=None) as staged:
        assert not isinstance(staged.output, Path)
        with staged.output as upload:
            yield upload  # type: ignore[misc]


def _write_data(
    folder: CkptPath,
    stamps: Mapping[str, str],
    source: Checkpoint,
    leaves: Sequence[Leaf],
    options: WriteOptions,
    written: list[CkptPath],
) -> dict[tuple[str, tuple[int, ...]], Any]:
    """Write every computed tensor's chunks, into files named after the plan and ``stamps``;
    their ``_StorageInfo`` by (flat key, chunk offsets)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    lock = threading.Lock()
    infos: dict[tuple[str, tuple[int, ...]], Any] = {}

    def write_one(data: _DataFile) -> None:
        path = folder / data.name
        with lock:
            written.append(path)
        evaluate = computing(data.leaves, source.read)
        with _new_file(path, options.durable) as fh:
            for leaf in data.leaves:
                value = plain_tensor(evaluate(leaf.key))
                assert leaf.boxes is not None
                for box in leaf.boxes:
                    offset = fh.tell()
                    torch.save(_own(region(value, box), box), fh)
                    info = _StorageInfo(data.name, offset, fh.tell() - offset)
                    with lock:
                        infos[(leaf.key, box[0])] = info
                if options.progress is not None:
                    options.progress(_nbytes(leaf))
                del value

    files = _buckets(folder, stamps, leaves, options.jobs)
    with ThreadPoolExecutor(max_workers=max(1, len(files))) as pool:
        futures = [pool.submit(write_one, f) for f in files]
        for future in futures:
            try:
                future.result()
            except (CkptMigrateError, OSError):
                raise
            except Exception as exc:
                raise write_error(folder, exc) from exc
    return infos


def _own(part: torch.Tensor, box: Box) -> torch.Tensor:
    """A chunk with a storage of its own (``torch.save`` writes a view's whole storage)."""
    if part.untyped_storage().nbytes() == part.numel() * part.element_size() and (
        part.is_contiguous()
    ):
        return part
    return part.clone(memory_format=torch.contiguous_format)


def _carry_files(
    folder: CkptPath,
    dcp: DCPCheckpoint | None,
    leaves: Sequence[Leaf],
    same: bool,
    taken: set[str],
    options: WriteOptions,
    written: list[CkptPath],
) -> dict[str, str]:
    """Data files of referenced entries, by their name in the input -> name in ``folder``.

    In place they stay; into another folder they are copied (in the kernel),
    under their own name unless the folder's current checkpoint uses it.
    """
    if dcp is None:
        return {}
    kept = {leaf.ref for leaf in leaves if leaf.ref is not None}
    used = {
        info.relative_path
        for index, info in dcp.md.storage_data.items()
        if index.fqn in kept and info.relative_path != dcp_metadata.METADATA_NAME
    }
    if same:
        return {name: name for name in used}
    names: dict[str, str] = {}
    for n, name in enumerate(sorted(used)):
        target = name
        if target in taken or (folder / target).exists():
            target = _file_name(folder, "copy", n)
        path = folder / target
        written.append(path)
        _copy(dcp.folder / name, path, options.durable)
        names[name] = target
    return names


#: How much of a data file one request carries when a copy involves a store.
_COPY_BLOCK = 8 << 20


def _copy(src: CkptPath, dst: CkptPath, durable: bool) -> None:
    """One data file copied as it is: in the kernel between local files, else by ranges."""
    if isinstance(src, Path) and isinstance(dst, Path):
        with open(src, "rb") as fin, open_for_writing(dst) as fout:
            copy_range(fin.fileno(), fout.fileno(), 0, os.fstat(fin.fileno()).st_size)
            if durable:
                fout.flush()
                os.fsync(fout.fileno())
        return
    blob = open_blob(src)
    try:
        with _new_file(dst, durable) as fh:
            for start in range(0, blob.size, _COPY_BLOCK):
                fh.write(blob.read(start, min(start + _COPY_BLOCK, blob.size)))
    finally:
        blob.close()


def _metadata(
    source: Checkpoint,
    dcp: DCPCheckpoint | None,
    leaves: Sequence[Leaf],
    infos: Mapping[tuple[str, tuple[int, ...]], Any],
    names: Mapping[str, str],
    stamps: Mapping[str, str],
) -> tuple[Any, list[dcp_metadata.Blob]]:
    """The new ``Metadata``, and the objects to store after its pickle."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    planner: dict[str, Any] = {}
    blobs: list[dcp_metadata.Blob] = []
    shared = dcp_metadata.Shared()
    for leaf in leaves:
        planner[leaf.key] = leaf.path
        if leaf.ref is not None:
            assert dcp is not None
            entries[leaf.key] = shared.entry(dcp.entries[leaf.ref].md)
            for index, info in dcp.storage_of(leaf.ref, leaf.key, shared.index):
                if info.relative_path == dcp_metadata.METADATA_NAME:
                    blob = dcp_metadata.Blob(dcp.store.raw(info), _copy_info(info))
                    blobs.append(blob)
                    storage[index] = blob.info
                elif names[info.relative_path] == info.relative_path:
                    storage[index] = info  # the same range of the same file (never changed)
                else:
                    storage[index] = _copy_info(info, names[info.relative_path])
        elif leaf.spec is not None:
            assert leaf.boxes is not None
            spec = leaf.spec
            chunk_list = [
                ChunkStorageMetadata(torch.Size(off), torch.Size(size)) for off, size in leaf.boxes
            ]
            entries[leaf.key] = shared.entry(
                TensorStorageMetadata(
                    TensorProperties(dtype=spec.dtype), torch.Size(spec.shape), chunk_list
                )
            )
            for i, (off, _size) in enumerate(leaf.boxes):
                storage[shared.index(leaf.key, off, i)] = infos[(leaf.key, off)]
        else:
            value = leaf.value
            if leaf.node is not None:  # an object computed from the input
                value = computing([leaf], source.read)(leaf.key)
            buf = io.BytesIO()
            torch.save(value, buf)
            blob = dcp_metadata.Blob(buf.getvalue(), _StorageInfo(dcp_metadata.METADATA_NAME, 0, 0))
            blobs.append(blob)
            entries[leaf.key] = BytesStorageMetadata()
            storage[MetadataIndex(leaf.key)] = blob.info
    old = dcp.md if dcp is not None else None
    planner_data: Any = planner
    if old is not None and old.planner_data is not None and not isinstance(old.planner_data, dict):
        if stamps:
            raise WriteError(
                f"{dcp.folder if dcp else ''}: its planner_data was written by a custom planner "
                f"(a {type(old.planner_data).__name__}), which leaves no place for the stamp",
                hint="save the checkpoint with DCP's default planner",
            )
        planner_data = old.planner_data
    elif stamps:
        planner_data[dcp_metadata.STAMP_KEY] = dict(stamps)
    md = Metadata(
        state_dict_metadata=entries,
        planner_data=planner_data,
        storage_data=storage,
        storage_meta=(old.storage_meta if old is not None else None) or StorageMeta(),
        version=(old.version if old is not None else None) or dcp_metadata.DCP_VERSION,
    )
    return md, blobs


def _copy_info(info: Any, name: str | None = None) -> Any:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo(
        name or info.relative_path,
        info.offset,
        info.length,
        transform_descriptors=getattr(info, "transform_descriptors", None),
    )


def _verify(
    folder: CkptPath,
    tmp: Path,
    data: bytes,
    md: Any,
    source: Checkpoint,
    full: PlanState,
    metadata: Mapping[str, Mapping[str, Any]],
    leaves: Sequence[Leaf],
) -> None:
    """The ``.metadata`` just written describes exactly the planned entries, and the stamp.

    The file must read back as the very bytes ``md`` was encoded to, and ``md``
    must pass every check a reader makes and describe the plan. That is what
    unpickling the file again would check, without building each entry a
    second time (``md`` holds only DCP's own classes and plain values, which
    pickle restores as they were).
    """
    if tmp.read_bytes() != data:
        raise WriteError(
            f"{folder}: the new .metadata does not read back as it was written",
            hint="check the disk (or the file system's free space); the input is unchanged",
        )
    dcp = source if isinstance(source, DCPCheckpoint) else None
    key = "/".join(source.training.state_path) if source.training is not None else None
    chunks = dcp_metadata.check(md, tmp)
    written = described(folder, md, chunks, tmp, None, state_dict_key=key)
    got = {k: e.spec for k, e in written.entries.items()}
    want: dict[str, Any] = {}
    for leaf in leaves:
        if leaf.ref is not None:
            assert dcp is not None
            want[leaf.key] = dcp.entries[leaf.ref].spec
        else:
            want[leaf.key] = leaf.spec
    if list(got) != list(want) or got != want:
        written.close()
        missing = [k for k in want if k not in got][:3]
        changed = [k for k in want if k in got and got[k] != want[k]][:3]
        raise WriteError(
            f"{folder} does not match the migration plan after writing (missing {missing}, "
            f"changed {changed})",
            hint="this is a bug in ckptmigrate; please report it; the input is unchanged",
        )
    verify_written(written, folder, full, metadata, source.key_prefix)
