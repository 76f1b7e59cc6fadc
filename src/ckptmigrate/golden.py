"""Golden checkpoints: small synthetic checkpoints kept with the migrations, upgraded in CI.

``ckptmigrate fixture record`` writes one at the current head (tensors from the
schema, fixed seed) into ``<script_location>/fixtures/``. Every later change
of the lineage must still bring each of them to the head, where it loads
strictly: the pytest plugin's ``test_golden_checkpoints`` does exactly that.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .config import Config
from .errors import CommandError
from .formats.atomic import atomic_output, write_error
from .formats.stamp import write_stamp
from .paths import display_path
from .runtime.symbolic import load_base_schema, schema_at
from .sample import DEFAULT_SEED, sample_state_dict
from .schema import Schema, compare
from .script.directory import ScriptDirectory
from .script.revision import format_ids

FIXTURES = "fixtures"
#: What ``fixture record`` writes and the plugin finds.
SUFFIXES = (".pt", ".pth", ".safetensors")


def golden_folder(script_dir: ScriptDirectory) -> Path:
    return script_dir.dir / FIXTURES


def golden_paths(script_dir: ScriptDirectory) -> list[Path]:
    folder = golden_folder(script_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())


def record(
    config: Config, output: str | os.PathLike[str] | None = None, *, seed: int = DEFAULT_SEED
) -> Path:
    """Write a golden checkpoint at the head; returns its path."""
    script_dir = ScriptDirectory.from_config(config)
    heads = script_dir.revision_map.heads
    if len(heads) != 1:
        raise CommandError(
            f"the lineage has {len(heads)} heads ({format_ids(heads) or 'none'}): a golden "
            "checkpoint is recorded at the one head",
            hint="merge the heads first ('ckptmigrate merge heads -m ...')"
            if heads
            else 'write the first revision first ("ckptmigrate revision -m ...")',
        )
    base = load_base_schema(
        script_dir,
        hint="a golden checkpoint is built from the schema at the head: record the base "
        "schema first with 'ckptmigrate schema --record'",
    )
    schema = schema_at(script_dir, base, heads)
    objects = [k for k, e in schema.items() if e.spec is None]
    if objects:
        raise CommandError(
            f"the schema at {heads[0]} has entries that are not tensors ({', '.join(objects[:3])})"
            ", which a synthetic checkpoint cannot make up",
            hint="save a real checkpoint of the model into the fixtures folder instead",
        )
    target = Path(output) if output is not None else golden_folder(script_dir) / f"{heads[0]}.pt"
    if target.exists():
        raise CommandError(
            f"{display_path(target)} already exists", hint="pass -o PATH to write another one"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    sd = sample_state_dict(schema.specs(), seed)
    _write(target, sd, heads)
    size = target.stat().st_size
    config.print_stdout(
        f"Recorded a golden checkpoint at {heads[0]} ({len(sd)} tensors, {size:,} bytes) "
        f"in {display_path(target)}"
    )
    if size > 50 * 2**20:
        config.log(
            "Note: that is a big file to keep with the migrations; golden checkpoints are "
            "meant for small test models"
        )
    return target


def _write(target: Path, sd: dict[str, torch.Tensor], heads: tuple[str, ...]) -> None:
    metadata: dict[str, dict[str, object]] = {"": {}}
    write_stamp(metadata[""], heads)
    if target.suffix == ".safetensors":
        from .formats.safetensors_file import write_safetensors
        from .runtime.memory import specs_of

        with atomic_output(target) as tmp:
            write_safetensors(tmp, list(sd), specs_of(sd), sd.__getitem__, {}, metadata)
        return
    from collections import OrderedDict

    stamped: OrderedDict[str, torch.Tensor] = OrderedDict(sd)
    stamped._metadata = metadata  # type: ignore[attr-defined]
    with atomic_output(target) as tmp:
        try:
            torch.save(stamped, str(tmp))
        except Exception as exc:
            raise write_error(target, exc) from exc


def upgrade_and_load(config: Config, path: Path) -> str:
    """Upgrade a copy of ``path`` to the head and load it strictly; returns what was checked.

    Into the configured model when there is one (``load_state_dict(strict=True)``),
    else against the head schema (every key, shape and dtype, nothing more).
    Raises an ``AssertionError`` saying what failed.
    """
    from . import command
    from .formats import read_checkpoint
    from .runtime.memory import specs_of

    script_dir = ScriptDirectory.from_config(config)
    heads = script_dir.revision_map.heads
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        command.upgrade(config, path, "head", output=out)
        ckpt = read_checkpoint(out)
        try:
            sd = {k: ckpt.read(k) for k in ckpt.schema}
            stamp = ckpt.stamp.revisions if ckpt.stamp is not None else None
        finally:
            ckpt.close()
    if stamp != tuple(heads):
        raise AssertionError(f"{path.name} was upgraded to {stamp}, not to the head {heads}")
    factory = config.model_factory()
    if factory is None:
        want = schema_at(script_dir, load_base_schema(script_dir), heads)
        got = Schema.from_specs(specs_of(sd))
        diff = compare(got, want)
        if not diff.empty:
            raise AssertionError(f"{path.name} upgraded to the head does not fit: {diff.summary()}")
        return "the head schema"
    model = factory()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise AssertionError(
            f"{path.name} upgraded to the head does not load into the model: {exc}"
        ) from None
    return config.get("model") or "the model"
