"""Sharded checkpoints in the Hugging Face layout, upgraded as one checkpoint.

``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) maps
every key to its shard file. Reading opens each shard lazily, through the
registry (a shard is an ordinary safetensors or torch file); the stamp lives
in the index's ``metadata``. Writing keeps every key in the shard it came
from (new keys join their neighbour's shard), rewrites only the shards whose
contents change, in parallel, and then replaces the index in one atomic
step, so a crash leaves either the old set or the new one; files no longer
referenced are removed afterwards. A shard keeps its standard name
(``model-00001-of-00004.safetensors``) unless a file of that name is still
in use in the output folder, as it is when upgrading in place: then the new
shard gets a name of its own until the index switches to it.

Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CheckpointError, CkptMigrateError, WriteError
from .base import FileFormat, Format, ReadOptions, WriteOptions, output_format, register
from .checkpoint import Checkpoint, Header
from .fileio import fsync_dir
from .hub_layout import copy_companions, with_config_stamps, write_config_stamp
from .probe import index_path
from .stamp import flatten_stamps, is_stamp_key, read_stamp, stamp_entries
from .storage import replace_small, same_location, staged_output, version

if TYPE_CHECKING:
    from ..plan.nodes import Node, TensorSpec
    from ..plan.state import PlanState
    from .storage import CkptPath

_TAG = re.compile(r"-ckm[0-9a-f]{8}(?:-\d+)?$")
_SHARD_EXTS = ("safetensors", "bin", "pt", "pth")


@dataclass
class ShardSet:
    """The index as read, and its shards: what writing needs to keep keys where they were."""

    index_path: CkptPath
    index: dict[str, Any]
    shard_of: dict[str, str]  # key -> shard file name
    shards: dict[str, Checkpoint] = field(default_factory=dict)
    #: the index's version as read (on a store: its ETag), which the new index replaces
    version: str | None = None

    @property
    def folder(self) -> CkptPath:
        return self.index_path.parent


@dataclass(kw_only=True)
class ShardedCheckpoint(Checkpoint):
    """A sharded checkpoint: its index and its shards, each opened lazily."""

    parts: ShardSet


class ShardedFormat:
    """A folder of shards and the index naming them; written only from a sharded input."""

    name: ClassVar[str] = "sharded"
    suffixes: ClassVar[tuple[str, ...]] = ()
    holds_only_tensors: ClassVar[bool] = True
    keeps_wrapper_prefix: ClassVar[bool] = False

    def recognise(self, path: CkptPath, head: bytes) -> bool:
        return index_path(path) is not None

    def accepts_output(self, target: CkptPath, source: Format | None) -> bool:
        return source is self  # a sharded input stays sharded, wherever it goes

    def open(self, path: CkptPath, options: ReadOptions) -> Checkpoint:
        found = index_path(path)
        assert found is not None
        return read_sharded(found, trust_pickle=options.trust_pickle)

    def peek(self, path: CkptPath, options: ReadOptions) -> Header | None:
        """The index alone: the stamp is in its metadata, no shard needs opening."""
        found = index_path(path)
        if found is None:
            return None
        try:
            _index, weight_map, meta = _read_index(found)
        except CheckpointError:
            return None
        return Header(
            found, tuple(weight_map), stamp_entries({str(k): str(v) for k, v in meta.items()})
        )

    def check_target(self, target: CkptPath) -> None:
        if target.is_file() and not target.name.endswith(".json"):
            raise WriteError(
                f"cannot write a sharded checkpoint to {target}: it is a file",
                hint="give a folder or an *.index.json path with -o",
            )

    def write(
        self,
        target: CkptPath,
        source: Checkpoint,
        full: PlanState,
        metadata: Mapping[str, Mapping[str, Any]],
        options: WriteOptions,
    ) -> None:
        assert isinstance(source, ShardedCheckpoint)
        write_sharded(target, source, full, metadata, options)

    def lock_path(self, path: CkptPath) -> CkptPath:
        return index_path(path) or path

    def recover(self, path: CkptPath) -> list[str]:
        found = index_path(path)
        return recover(found) if isinstance(found, Path) else []


def _bad(path: CkptPath, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid sharded-checkpoint index: {what}",
        hint="check the index and that every shard file it names is present",
    )


def _read_index(path: CkptPath) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """The index, its weight map and its metadata, every shard name checked."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"cannot read it as JSON ({exc})") from None
    except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack
        raise _bad(path, "it is JSON nested too deeply to be an index") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise _bad(path, "no 'weight_map' object")
    weight_map = index["weight_map"]
    meta = index.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _bad(path, "'metadata' is not an object")
    for key, shard in weight_map.items():
        if not _plain_file_name(shard):
            raise _bad(path, f"key {key!r} names an invalid shard {_short(shard)}")
    return index, weight_map, meta


def _plain_file_name(name: object) -> bool:
    """A file right in the index's folder: not empty, hidden, elsewhere or unwritable."""
    return (
        isinstance(name, str)
        and 0 < len(name.encode("utf-8", "surrogatepass")) <= 255
        and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_sharded(path: CkptPath, *, trust_pickle: bool = False) -> ShardedCheckpoint:
    """Open every shard lazily; every key the index names must be in its shard."""
    from . import open_checkpoint

    index_version = version(path)
    index, weight_map, meta = _read_index(path)
    shards: dict[str, Checkpoint] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = path.parent / shard
        if not shard_path.is_file():
            what = "not a file" if shard_path.exists() else "missing"
            raise _bad(path, f"shard {shard} is {what}")
        shards[shard] = open_checkpoint(shard_path, ReadOptions(trust_pickle=trust_pickle))
    schema: dict[str, TensorSpec | None] = {}
    for key, shard in weight_map.items():
        if key not in shards[shard].schema:
            raise _bad(path, f"key {key!r} is not in its shard {shard}")
        schema[key] = shards[shard].schema[key]
    modules = with_config_stamps(
        stamp_entries({str(k): str(v) for k, v in meta.items()}), path.parent
    )
    sharded = ShardSet(path, index, dict(weight_map), shards, index_version)

    def reader(key: str) -> Any:
        return shards[sharded.shard_of[key]].read(key)

    def close() -> None:
        for ckpt in shards.values():
            ckpt.close()

    return ShardedCheckpoint(
        path=path,
        format=FORMAT,
        schema=schema,
        metadata=modules,
        stamp=read_stamp(modules.get(""), str(path)),
        reader=reader,
        close=close,
        parts=sharded,
    )


def _assign(entries: Mapping[str, Node], sharded: ShardSet) -> dict[str, list[str]]:
    """Output keys per shard.

    A key stays with the shard its first source came from; a brand-new key
    joins the shard of the existing key it shares the longest dotted prefix
    with (``layer0.extra`` goes where ``layer0.weight`` is), else the last one.
    """
    from ..plan.nodes import sources_of

    plan: dict[str, list[str]] = {name: [] for name in dict.fromkeys(sharded.shard_of.values())}
    by_prefix: dict[str, str] = {}
    homeless: list[str] = []
    for key, node in entries.items():
        shard = next((sharded.shard_of[k] for k in sources_of(node) if k in sharded.shard_of), None)
        if shard is None:
            homeless.append(key)
            continue
        plan.setdefault(shard, []).append(key)
        parts = key.split(".")
        for n in range(1, len(parts)):
            by_prefix.setdefault(".".join(parts[:n]), shard)
    last = next(reversed(plan)) if plan else "model.safetensors"
    for key in homeless:
        parts = key.split(".")
        shard = next(
            (
                by_prefix[".".join(parts[:n])]
                for n in range(len(parts) - 1, 0, -1)
                if ".".join(parts[:n]) in by_prefix
            ),
            last,
        )
        plan.setdefault(shard, []).append(key)
    return {name: keys for name, keys in plan.items() if keys}


def _unchanged(keys: list[str], entries: Mapping[str, Node], shard: Checkpoint) -> bool:
    from ..plan.nodes import Source

    if set(shard.schema) != set(keys) or len(keys) != len(shard.schema):
        return False  # (order inside a shard carries no meaning)
    return all(isinstance(entries[k], Source) and entries[k].key == k for k in keys)  # type: ignore[attr-defined]


def _free_name(shard: str, tag: str, taken: set[str]) -> str:
    """The shard's standard name if no file in the output folder has it, else a unique one.

    A name left by an earlier in-place upgrade (``...-ckm1a2b3c4d``) goes
    back to the standard one where that is free.
    """
    stem, dot, ext = shard.partition(".")
    stem = _TAG.sub("", stem)
    name = f"{stem}{dot}{ext}"
    if name not in taken:
        return name
    name = f"{stem}-ckm{tag}{dot}{ext}"
    n = 1
    while name in taken:
        name = f"{stem}-ckm{tag}-{n}{dot}{ext}"
        n += 1
    return name


def _output_index(target: CkptPath, sharded: ShardSet) -> CkptPath:
    """Where the new index goes, its folder created: ``-o v5`` and ``-o v5/x.index.json`` alike."""
    found = index_path(target) if target.exists() else None
    if found is not None:
        return found
    if target.suffix == ".json":
        folder, found = target.parent, target
    else:
        folder, found = target, target / sharded.index_path.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(
            f"cannot create the folder {folder}: {exc.strerror or exc}",
            hint="choose another place with -o; the input is unchanged",
        ) from exc
    return found


@dataclass
class _Job:
    """One shard to write: its name in the input, its name in the output, its keys."""

    shard: str
    name: str
    keys: list[str]


def _plan_names(
    full: PlanState,
    sharded: ShardSet,
    metadata: Mapping[str, Mapping[str, Any]],
    folder: CkptPath,
    same_folder: bool,
) -> tuple[list[_Job], dict[str, str]]:
    """The shards to write and the new weight map; shards unchanged in place are kept."""
    tag = hashlib.sha256(
        json.dumps(flatten_stamps(metadata), sort_keys=True).encode()
        + "\0".join(f"{k}:{full.entries[k].spec}" for k in full.entries).encode()
    ).hexdigest()[:8]
    taken = {p.name for p in folder.iterdir()}
    jobs: list[_Job] = []
    weight_map: dict[str, str] = {}
    for shard, keys in _assign(full.entries, sharded).items():
        original = sharded.shards.get(shard)
        if same_folder and original is not None and _unchanged(keys, full.entries, original):
            name = shard
        else:
            name = _free_name(shard, tag, taken)
            taken.add(name)
            jobs.append(_Job(shard, name, keys))
        weight_map.update((k, name) for k in keys)
    return jobs, weight_map


def write_sharded(
    target: CkptPath,
    source: ShardedCheckpoint,
    full: PlanState,
    metadata: Mapping[str, Mapping[str, Any]],
    options: WriteOptions,
) -> None:
    """Write the shards that change (in parallel), then switch the index atomically."""
    sharded = source.parts
    out_index = _output_index(target, sharded)
    folder = out_index.parent
    same_folder = same_location(folder, sharded.folder)
    if same_folder and not isinstance(out_index, Path):
        _remove_orphans(folder, sharded)  # a store keeps no journal (below)
    jobs, weight_map = _plan_names(full, sharded, metadata, folder, same_folder)
    replaced = [s for s in sharded.shards if same_folder and s not in set(weight_map.values())]
    if same_folder and isinstance(out_index, Path):  # what a kill leaves, for the next command
        _journal(out_index, [job.name for job in jobs], replaced, options.durable)
    index = _new_index(sharded, full, metadata, weight_map)
    # In place, the new index replaces exactly the one read (a store refuses any other).
    expect = sharded.version if same_folder else version(out_index)
    written: list[CkptPath] = []
    try:
        _write_shards(jobs, folder, source, full, options, written)
        _write_index(out_index, index, options.durable, expect)
    except BaseException:
        if not _is_in_place(out_index, index):  # failed before the switch: undo
            for path in written:
                path.unlink(missing_ok=True)
            if isinstance(out_index, Path):
                _pending(out_index).unlink(missing_ok=True)
        # after it (an interrupt or a failed folder sync), the new shards are the
        # checkpoint; the journal stays for the next command to clear the old ones
        raise
    if options.durable and isinstance(folder, Path):
        fsync_dir(folder)
    # a new folder is a whole model folder (config.json ...); either way config's stamp is the
    # index's
    if isinstance(folder, Path) and isinstance(sharded.folder, Path):
        copy_companions(sharded.folder, folder)
        write_config_stamp(folder, metadata, durable=options.durable)
    for shard in replaced:  # no longer referenced
        (folder / shard).unlink(missing_ok=True)
    if isinstance(out_index, Path):
        _pending(out_index).unlink(missing_ok=True)


def _is_in_place(path: CkptPath, index: dict[str, Any]) -> bool:
    """Whether the index at ``path`` is the new one (the switch happened)."""
    try:
        return bool(_read_index(path)[0] == index)
    except (OSError, ValueError, TypeError, KeyError, RecursionError, CheckpointError):
        return False


#: Beside the index while an in-place write runs: the files it creates and replaces.
PENDING_SUFFIX = ".ckptmigrate-pending"


def _pending(index: Path) -> Path:
    return index.with_name(f".{index.name}{PENDING_SUFFIX}")


def _journal(index: Path, created: list[str], replaced: list[str], durable: bool) -> None:
    from .atomic import atomic_output

    with atomic_output(_pending(index), durable=durable) as tmp:
        tmp.write_text(json.dumps({"created": created, "replaced": replaced}), encoding="utf-8")


def recover(index: Path) -> list[str]:
    """Clear what a killed in-place write of this folder left behind; the names removed.

    A write killed before its index switch leaves the shards it created; one
    killed after it, the shards it replaced. The journal lists both, and
    whichever of them the index in place does not reference goes, with the
    temporary files of the killed writers. Nothing else in the folder is
    touched. Runs under the writer's lock.
    """
    from .atomic import clean_stale

    journal = _pending(index)
    if not journal.exists():
        return []
    try:
        entries = json.loads(journal.read_text(encoding="utf-8"))
        names = [n for n in [*entries["created"], *entries["replaced"]] if _plain_file_name(n)]
        referenced = set(_read_index(index)[1].values())
    except (OSError, ValueError, TypeError, KeyError, RecursionError, CheckpointError):
        return []  # cannot tell what is referenced: leave everything as it is
    removed = []
    for name in names:
        clean_stale(index.parent / name)
        if name not in referenced and (index.parent / name).is_file():
            (index.parent / name).unlink()
            removed.append(name)
    journal.unlink(missing_ok=True)
    return removed


def _remove_orphans(folder: CkptPath, sharded: ShardSet) -> None:
    """On a store (no journal): shards a killed in-place run wrote under its own names
    (``-ckm...``) and never switched to. No index names them, and this run holds the
    index's lock, so their writer is gone."""
    for path in folder.iterdir():
        stem, _, ext = path.name.partition(".")
        if path.name not in sharded.shards and ext in _SHARD_EXTS and _TAG.search(stem):
            path.unlink(missing_ok=True)


def _write_shards(
    jobs: list[_Job],
    folder: CkptPath,
    source: ShardedCheckpoint,
    full: PlanState,
    options: WriteOptions,
    written: list[CkptPath],
) -> None:
    """Write every job's shard, ``options.jobs`` at a time; each one lands in ``written``."""
    from ..plan.nodes import sources_of
    from ..plan.state import Evaluator
    from .atomic import write_error

    sharded = source.parts
    lock = threading.Lock()

    def write_one(job: _Job) -> CkptPath:
        path = folder / job.name
        original = sharded.shards.get(job.shard)
        fmt = output_format(path, original.format if original is not None else None)
        if not isinstance(fmt, FileFormat):
            raise CheckpointError(f"shard {job.name}: no file format writes it")
        entries = {k: full.entries[k] for k in job.keys}
        leaves = {sharded.shard_of.get(k) for n in entries.values() for k in sources_of(n)}
        own = original if leaves <= {job.shard} else None
        # a shard is written under a name no file has (create-only on a store)
        with staged_output(path, durable=options.durable, expect=None) as staged:
            try:
                fmt.write_part(staged.output, entries, Evaluator(entries, source.read), own)
            except CkptMigrateError:
                raise
            except Exception as exc:
                raise write_error(path, exc) from exc
            if options.verify:
                _verify_shard(fmt, staged.readable, path, entries)
        with lock:
            written.append(path)
        return path

    with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        futures = [pool.submit(write_one, job) for job in jobs]
        try:
            for future in futures:
                path = future.result()
                if options.progress is not None:
                    options.progress(path.stat().st_size)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the written ones are all in `written`
            raise


def _new_index(
    sharded: ShardSet,
    full: PlanState,
    metadata: Mapping[str, Mapping[str, Any]],
    weight_map: dict[str, str],
) -> dict[str, Any]:
    """The index that makes the new shard set the checkpoint."""
    index = dict(sharded.index)
    meta = {k: v for k, v in (index.get("metadata") or {}).items() if not is_stamp_key(str(k))}
    meta.update(flatten_stamps(metadata))
    specs = [node.spec for node in full.entries.values()]
    meta["total_size"] = sum(spec.nbytes for spec in specs if spec is not None)
    index["metadata"] = meta
    index["weight_map"] = weight_map
    return index


def _write_index(
    out_index: CkptPath, index: dict[str, Any], durable: bool, expect: str | None
) -> None:
    """The switch: one atomic replace of the index (on a store, of the version read)."""
    text = json.dumps(index, indent=2) + "\n"
    if not isinstance(out_index, Path):
        replace_small(out_index, text.encode("utf-8"), durable=durable, expect=expect)
        return
    from .atomic import atomic_output

    with atomic_output(out_index, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _verify_shard(fmt: FileFormat, tmp: Path, path: CkptPath, entries: Mapping[str, Node]) -> None:
    """The shard just written holds exactly the planned keys, shapes and dtypes."""
    ckpt = fmt.open(tmp, ReadOptions())
    try:
        got = ckpt.schema
        want = {k: n.spec for k, n in entries.items()}
        if got != want:
            raise CheckpointError(
                f"shard {path.name} does not match the plan after writing",
                hint="this is a bug in ckptmigrate; please report it; the input is unchanged",
            )
    finally:
        ckpt.close()


FORMAT = register(ShardedFormat())
