"""``revision --autogenerate``: compare the model with the head schema, write the ops."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..errors import CommandError
from ..paths import display_path
from ..schema import Schema, build_on_meta, read_base_schema, write_base_schema
from ..script.directory import ScriptDirectory
from .compare import Op, diff_ops
from .render import render

__all__ = ["Generated", "Op", "autogenerate_ops", "diff_ops", "model_schema"]


@dataclass
class Generated:
    upgrades: list[str]
    downgrades: list[str]
    imports: list[str]
    ops: list[Op]
    target: Schema
    head: Schema


def model_schema(config: Config) -> tuple[Schema, object, str]:
    """(schema, model built on meta, the factory's name) of the configured model."""
    factory = config.model_factory()
    spec = config.get("model") or ""
    if factory is None:
        where = config.file or "the configuration"
        raise CommandError(
            f"no model configured in [{config.section}] of {where}",
            hint="add 'model = package.module:build_model' (a function or class "
            "returning your nn.Module)",
        )
    model = build_on_meta(factory, spec)
    return Schema.from_module(model), model, spec


def autogenerate_ops(config: Config, script_dir: ScriptDirectory, head: str) -> Generated | None:
    """The ops for a new revision on ``head``; None when nothing changed."""
    from ..runtime.symbolic import load_base_schema, schema_at

    heads = tuple(r.revision for r in script_dir.parents_for(head))  # before the model builds
    target, model, spec = model_schema(config)
    rmap = script_dir.revision_map
    if not len(rmap) and read_base_schema(script_dir.dir) is None:
        path = write_base_schema(script_dir.dir, target, spec)
        config.log(f"Recorded the base schema ({len(target)} keys) in {display_path(path)}")
        return Generated([], [], [], [], target, target)
    base = load_base_schema(script_dir)
    current = schema_at(script_dir, base, heads)
    import torch

    ops = diff_ops(current, target, model if isinstance(model, torch.nn.Module) else None)
    if not ops:
        return None
    up, down, imports = render(ops)
    return Generated(up, down, imports, ops, target, current)
