"""Sharded checkpoints in the Hugging Face layout, upgraded as one checkpoint.

``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) maps
every key to its shard file. Reading opens each shard lazily; the stamp lives
in the index's ``metadata``. Writing keeps every key in the shard it came
from (new keys join their neighbour's shard), rewrites only the shards whose
contents change, in parallel, under new file names, and then replaces the
index in one atomic step, so a crash leaves either the old set or the new
one; files no longer referenced are removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, CkptMigrateError
from ..plan.nodes import Node, Source, TensorSpec, sources_of
from ..plan.state import Evaluator, PlanState
from .atomic import atomic_output, fsync_dir, write_error
from .checkpoint import Checkpoint
from .probe import index_path
from .stamp import read_stamp


@dataclass
class ShardSet:
    index_path: Path
    index: dict[str, Any]
    shard_of: dict[str, str]  # key -> shard file name
    shards: dict[str, Checkpoint] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.index_path.parent


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid sharded-checkpoint index: {what}",
        hint="check the index and that every shard file it names is present",
    )


def read_sharded(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    from . import read_checkpoint
    from .safetensors_file import stamp_entries

    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"cannot read it as JSON ({exc})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise _bad(path, "no 'weight_map' object")
    weight_map = index["weight_map"]
    meta = index.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _bad(path, "'metadata' is not an object")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise _bad(path, f"key {key!r} names an invalid shard {shard!r}")
    shards: dict[str, Checkpoint] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = path.parent / shard
        if not shard_path.exists():
            raise _bad(path, f"shard {shard} is missing")
        shards[shard] = read_checkpoint(shard_path, trust_pickle=trust_pickle)
    schema: dict[str, TensorSpec | None] = {}
    for key, shard in weight_map.items():
        if key not in shards[shard].schema:
            raise _bad(path, f"key {key!r} is not in its shard {shard}")
        schema[key] = shards[shard].schema[key]
    modules = stamp_entries({str(k): str(v) for k, v in meta.items()})
    sharded = ShardSet(path, index, dict(weight_map), shards)

    def reader(key: str) -> Any:
        return shards[sharded.shard_of[key]].read(key)

    def close() -> None:
        for ckpt in shards.values():
            ckpt.close()

    return Checkpoint(
        path=path,
        format="sharded",
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
    if set(shard.schema) != set(keys) or len(keys) != len(shard.schema):
        return False  # (order inside a shard carries no meaning)
    return all(isinstance(entries[k], Source) and entries[k].key == k for k in keys)  # type: ignore[attr-defined]


def _new_name(shard: str, tag: str, taken: set[str]) -> str:
    stem, dot, ext = shard.partition(".")
    stem = re.sub(r"-ckm[0-9a-f]{8}$", "", stem)
    name = f"{stem}-ckm{tag}{dot}{ext}"
    n = 1
    while name in taken:
        name = f"{stem}-ckm{tag}-{n}{dot}{ext}"
        n += 1
    return name


def write_sharded(
    target: Path,
    source: Checkpoint,
    full: PlanState,
    metadata: Mapping[str, Mapping[str, Any]],
    *,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
    verify: bool = True,
    durable: bool = True,
) -> None:
    """Write the shards that change (in parallel), then switch the index atomically."""
    from .safetensors_file import flatten_stamps, write_safetensors
    from .torch_file import write_torch

    sharded: ShardSet = source.parts
    out_index = index_path(target) if target.exists() else None
    if out_index is None:
        if target.suffix == ".json":
            out_index = target
        else:
            target.mkdir(parents=True, exist_ok=True)
            out_index = target / sharded.index_path.name
    folder = out_index.parent
    same_folder = folder.resolve() == sharded.folder.resolve()
    assignment = _assign(full.entries, sharded)
    tag = hashlib.sha256(
        json.dumps(flatten_stamps(metadata), sort_keys=True).encode()
        + "\0".join(f"{k}:{full.entries[k].spec}" for k in full.entries).encode()
    ).hexdigest()[:8]
    taken = set(sharded.shard_of.values()) | {p.name for p in folder.iterdir()}
    jobs_todo: list[tuple[str, str, list[str]]] = []  # (old name, new name, keys)
    weight_map: dict[str, str] = {}
    for shard, keys in assignment.items():
        original = sharded.shards.get(shard)
        if same_folder and original is not None and _unchanged(keys, full.entries, original):
            name = shard
        else:
            name = _new_name(shard, tag, taken)
            taken.add(name)
            jobs_todo.append((shard, name, keys))
        weight_map.update((k, name) for k in keys)
    written: list[Path] = []

    def write_one(job: tuple[str, str, list[str]]) -> Path:
        shard, name, keys = job
        path = folder / name
        entries = {k: full.entries[k] for k in keys}
        evaluator = Evaluator(entries, source.read)
        fmt = "safetensors" if name.endswith(".safetensors") else "torch"
        try:
            if fmt == "safetensors":
                specs = {k: entries[k].spec for k in keys}
                write_safetensors(path, keys, specs, evaluator, {"format": "pt"}, {})
            else:
                leaves = {sharded.shard_of.get(k) for n in entries.values() for k in sources_of(n)}
                own = sharded.shards.get(shard) if leaves <= {shard} else None
                write_torch(path, own, entries, evaluator, {}, None, None)
        except CkptMigrateError:
            raise
        except Exception as exc:
            raise write_error(path, exc) from exc
        if durable:
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        if verify:
            _verify_shard(path, entries)
        return path

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for path in pool.map(write_one, jobs_todo):
                written.append(path)
                if progress is not None:
                    progress(path.stat().st_size)
        if not same_folder:
            for shard in dict.fromkeys(weight_map.values()):
                if shard in sharded.shards and not (folder / shard).exists():
                    _copy_file(sharded.folder / shard, folder / shard)
        index = dict(sharded.index)
        meta = {
            k: v
            for k, v in (index.get("metadata") or {}).items()
            if not str(k).split(":", 1)[-1].startswith("ckptmigrate.")
        }
        meta.update(flatten_stamps(metadata))
        specs = [node.spec for node in full.entries.values()]
        meta["total_size"] = sum(spec.nbytes for spec in specs if spec is not None)
        index["metadata"] = meta
        index["weight_map"] = weight_map
        with atomic_output(out_index, durable=durable) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(folder)
    if same_folder:  # the old files are no longer referenced
        keep = set(weight_map.values())
        for shard in sharded.shards:
            if shard not in keep:
                (folder / shard).unlink(missing_ok=True)


def _copy_file(src: Path, dst: Path) -> None:
    from .torch_zip import copy_range

    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        copy_range(fin.fileno(), fout.fileno(), 0, size)
        os.fsync(fout.fileno())


def _verify_shard(path: Path, entries: Mapping[str, Node]) -> None:
    from . import read_checkpoint

    ckpt = read_checkpoint(path)
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
