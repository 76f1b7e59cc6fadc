"""``revision --autogenerate``: compare the model with the head schema, write the ops."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..model import configured_model
from ..paths import display_path
from ..schema import Schema, read_base_schema, write_base_schema
from ..script.directory import ScriptDirectory
from .compare import Op, diff_ops
from .render import render

__all__ = ["Generated", "Op", "autogenerate_ops", "diff_ops"]


@dataclass
class Generated:
    upgrades: list[str]
    downgrades: list[str]
    imports: list[str]
    ops: list[Op]
    target: Schema
    head: Schema


def autogenerate_ops(config: Config, script_dir: ScriptDirectory, head: str) -> Generated | None:
    """The ops for a new revision on ``head``; None when nothing changed."""
    from ..runtime.symbolic import load_base_schema, schema_at

    heads = tuple(r.revision for r in script_dir.parents_for(head))  # before the model builds
    model = configured_model(config)
    target, spec = model.schema, model.spec
    rmap = script_dir.revision_map
    if not len(rmap) and read_base_schema(script_dir.dir) is None:
        path = write_base_schema(script_dir.dir, target, spec)
        config.log(f"Recorded the base schema ({len(target)} keys) in {display_path(path)}")
        return Generated([], [], [], [], target, target)
    base = load_base_schema(script_dir)
    current = schema_at(script_dir, base, heads)
    ops = diff_ops(current, target, model.module)
    if not ops:
        return None
    up, down, imports = render(ops)
    return Generated(up, down, imports, ops, target, current)
