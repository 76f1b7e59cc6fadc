"""Ready-made lineage checks, as plain functions any test can call.

The pytest plugin (``pytest --test-ckptmigrate``) runs each of them as a test;
a project's own tests can call them too. Each raises ``AssertionError`` with a
message saying what is wrong and how to fix it. Unlike ``ckptmigrate check``,
which works on shapes, these run every step on real tensors: a synthetic
checkpoint built from the schema at each revision.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import CkptMigrateError
from .script.directory import ReplacedStep, Script, ScriptDirectory, step_function
from .script.revision import format_ids

__all__ = [
    "MigrationRunner",
    "Step",
    "golden_checkpoint_upgrades",
    "model_matches_head",
    "revisions_import",
    "single_head",
    "steps",
    "up_down_consistency",
]


@dataclass(frozen=True)
class Step:
    """One step a checkpoint can take: a revision, or a squash's combined step."""

    name: str  # the id a checkpoint records there (a replaced revision's, for a squash's steps)
    script: Script
    parents: tuple[str, ...]


def steps(script_dir: ScriptDirectory) -> list[Step]:
    """Every step, oldest first: each revision (those a squash replaced too), each squash whole."""
    out = []
    for script in reversed(script_dir.revision_map.walk()):
        assert isinstance(script, Script)
        name = script.replaced if isinstance(script, ReplacedStep) else script.revision
        out.append(Step(name, script, script.normalized_down_revisions))
    for script in reversed(script_dir.walk_revisions(compact=True)):
        if script.replaces:
            out.append(Step(script.revision, script, script.normalized_down_revisions))
    return out


def single_head(script_dir: ScriptDirectory, expected: Sequence[str] | int = 1) -> None:
    """One head (or exactly ``expected``: a number of heads, or their ids)."""
    heads = script_dir.compact_map.heads
    if isinstance(expected, int):
        if len(heads) == expected:
            return
        raise AssertionError(
            f"the lineage has {len(heads)} head(s) ({format_ids(heads) or 'none'}), "
            f"expected {expected}; join them with 'ckptmigrate merge heads -m \"merge\"'"
        )
    want = [script_dir.get_revision(h, compact=True) for h in expected]
    if sorted(heads) != sorted(r.revision for r in want if r is not None):
        raise AssertionError(
            f"the lineage's heads are {format_ids(heads) or 'none'}, expected "
            f"{format_ids(expected)}"
        )


def revisions_import(script_dir: ScriptDirectory) -> None:
    """Every revision file imports and has its functions (a squash: one pair per revision)."""
    problems = []
    for script in script_dir.walk_revisions(compact=True):
        names = ["upgrade", "downgrade"]
        names += [step_function(n, r) for r in script.replaces for n in ("upgrade", "downgrade")]
        try:
            for name in names:
                script.migration_fn(name)
        except CkptMigrateError as exc:
            problems.append(exc.one_line())
    if problems:
        raise AssertionError("\n".join(problems))


def up_down_consistency(script_dir: ScriptDirectory, step: Step, *, seed: int = 0) -> None:
    """``downgrade()`` gives back the synthetic checkpoint ``upgrade()`` started from.

    Bit for bit, except values the upgrade discards on purpose (a drop, a
    shrink: they cannot come back) and values it casts to a narrower dtype,
    which must come back exactly rounded to it.
    """
    import torch

    from .plan.discards import find_discards
    from .plan.nodes import sources_of, walk
    from .plan.state import Evaluator, PlanState
    from .runtime.memory import specs_of
    from .runtime.migration import MigrationStep, run_step
    from .runtime.symbolic import load_base_schema, schema_at
    from .sample import same_bits, sample_state_dict

    base = load_base_schema(script_dir)
    start = schema_at(script_dir, base, step.parents).specs()
    sample = sample_state_dict(start, seed)
    up = PlanState.from_schema(start)
    where = f"{step.name} ({step.script.path.name})"
    try:
        run_step(MigrationStep(step.script, True), up, symbolic=False)
        upgraded = _evaluate(Evaluator(up.entries, sample.__getitem__), up.entries)
        down = PlanState.from_schema(specs_of(upgraded), up.metadata)
        run_step(MigrationStep(step.script, False), down, symbolic=False)
        back = _evaluate(Evaluator(down.entries, upgraded.__getitem__), down.entries)
    except CkptMigrateError as exc:
        raise AssertionError(f"{where}: {exc.one_line()}") from None
    discarded = {k for d in find_discards(start, up) for k in d.key.split(" + ")}
    problems = []
    lost = [k for k in sample if k not in back]
    extra = [k for k in back if k not in sample]
    if lost:
        problems.append("the downgrade does not bring back " + ", ".join(lost))
    if extra:
        problems.append("the downgrade leaves " + ", ".join(extra))
    for key in (k for k in sample if k in back and k not in discarded):
        want, got = sample[key], back[key]
        if same_bits(want, got):
            continue
        if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
            passed = [
                n.spec.dtype
                for out in up.entries.values()
                if key in sources_of(out)
                for n in walk(out)
                if n.spec is not None
            ]
            if same_bits(_rounded(want, passed), got):
                continue
            if want.shape != got.shape or want.dtype != got.dtype:
                problems.append(
                    f"{key} comes back as {list(got.shape)} {got.dtype}, "
                    f"not {list(want.shape)} {want.dtype}"
                )
                continue
            diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
            problems.append(f"{key} comes back with other values (max |diff| {diff:.3g})")
        else:
            problems.append(f"{key} comes back as {got!r}, not {want!r}")
    if problems:
        raise AssertionError(
            f"{where}: downgrade() does not undo upgrade() on a synthetic checkpoint: "
            + "; ".join(problems)
        )


def _rounded(value: Any, dtypes: Sequence[Any]) -> Any:
    """``value`` rounded through every floating dtype narrower than its own (in order)."""
    import torch

    if not value.dtype.is_floating_point:
        return value
    eps = torch.finfo(value.dtype).eps
    narrower = sorted(
        {d for d in dtypes if d.is_floating_point and torch.finfo(d).eps > eps},
        key=lambda d: torch.finfo(d).eps,
    )
    for dtype in narrower:
        value = value.to(dtype).to(value.dtype)
    return value


def _evaluate(evaluate: Any, entries: Any) -> OrderedDict[str, Any]:
    return OrderedDict((k, evaluate(k)) for k in entries)


def model_matches_head(config: Config, script_dir: ScriptDirectory) -> str:
    """The configured model's state dict has the head schema; returns the model's name."""
    from . import checks
    from .model import configured_model
    from .recording import base_schema

    model = configured_model(config)
    out = io.StringIO()
    report = Config(config.file, config.section, stdout=out, stderr=out)
    problems = checks.model_matches_head(report, script_dir, base_schema(config, script_dir), model)
    if problems:
        raise AssertionError(out.getvalue() + "; ".join(problems))
    return model.spec


def golden_checkpoint_upgrades(config: Config, path: Any) -> str:
    """A stored golden checkpoint upgrades to the head and loads strictly."""
    from .golden import upgrade_and_load

    try:
        return upgrade_and_load(config, path)
    except CkptMigrateError as exc:
        raise AssertionError(f"{path.name}: {exc.one_line()}") from None


class MigrationRunner:
    """What the ``ckptmigrate_runner`` fixture gives a test: the lineage and its schemas,
    synthetic checkpoints at any revision, and migrations of in-memory state dicts."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.script_dir = ScriptDirectory.from_config(config)

    @property
    def heads(self) -> tuple[str, ...]:
        return self.script_dir.compact_map.heads

    def steps(self) -> list[Step]:
        return steps(self.script_dir)

    def schema(self, revision: str = "heads") -> Any:
        """The schema (key -> entry) at ``revision``."""
        from .recording import base_schema
        from .runtime.placement import resolve_ids
        from .runtime.symbolic import schema_at

        ids = resolve_ids(self.script_dir, revision)
        return schema_at(self.script_dir, base_schema(self.config, self.script_dir), ids)

    def sample(self, revision: str = "heads", *, seed: int = 0) -> OrderedDict[str, Any]:
        """A synthetic state dict (real tensors, fixed seed) at ``revision``."""
        from .sample import sample_state_dict

        return sample_state_dict(self.schema(revision).specs(), seed)

    def migrate(self, state_dict: Any, from_revision: str, to_revision: str = "head") -> Any:
        """``state_dict`` (at ``from_revision``) brought to ``to_revision``, up or down."""
        from .runtime.memory import migrate_state_dict
        from .runtime.placement import resolve_ids

        current = resolve_ids(self.script_dir, from_revision)
        targets = resolve_ids(self.script_dir, to_revision) or ("base",)
        if len(targets) > 1:
            raise CkptMigrateError(
                f"{to_revision!r} is {len(targets)} revisions ({format_ids(targets)})",
                hint="migrate to one revision at a time",
            )
        (target,) = targets
        return migrate_state_dict(self.script_dir, state_dict, {}, current, target).state_dict

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps())
