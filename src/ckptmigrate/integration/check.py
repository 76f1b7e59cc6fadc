"""``ckptmigrate check``: versioned classes must be at their lineage's head."""

from __future__ import annotations

from ..config import Config
from ..model import build_on_meta
from ..script.directory import ScriptDirectory
from .versioning import lineage_of


def versioned_class_problems(config: Config, script_dir: ScriptDirectory) -> list[str]:
    factory = config.model_factory()
    if factory is None:
        return []
    model = build_on_meta(factory, config.get("model") or "")
    problems: list[str] = []
    seen: set[int] = set()
    for _name, module in model.named_modules():
        cls = type(module)
        lineage = lineage_of(cls)
        if lineage is None or id(lineage) in seen:
            continue
        seen.add(id(lineage))
        revision = lineage.resolve()
        if revision is None:
            assert lineage.problem is not None
            problems.append(lineage.problem.one_line())
            continue
        heads = lineage.script_dir.revision_map.heads
        if revision not in heads:
            problems.append(
                f"{cls.__qualname__} is pinned to revision {revision}, but its lineage's head is "
                f"{', '.join(heads)}: update revision= in @ckptmigrate.versioned (or drop it to "
                "follow the head)"
            )
    return problems
