"""Squashing random chains of real ops: every checkpoint's result stays bit-identical."""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.harness.common import write_revision

from ckptmigrate import command
from ckptmigrate.config import Config
from ckptmigrate.errors import CommandError
from ckptmigrate.plan.nodes import TensorSpec
from ckptmigrate.plan.state import Evaluator, PlanState
from ckptmigrate.runtime.memory import specs_of
from ckptmigrate.runtime.migration import downgrade_steps, run_steps, upgrade_steps
from ckptmigrate.runtime.symbolic import load_base_schema, schema_at
from ckptmigrate.sample import same_bits, sample_state_dict
from ckptmigrate.schema import Entry, Schema
from ckptmigrate.script.directory import ScriptDirectory

Shape = tuple[int, ...]


@dataclass
class Sim:
    """The schema as the generated revisions leave it, to draw only ops that apply."""

    keys: dict[str, tuple[Shape, str]] = field(
        default_factory=lambda: {
            "a.w": ((4, 6), "float32"),
            "a.b": ((6,), "float32"),
            "b.w": ((6, 4), "float32"),
            "c.x": ((8,), "float32"),
            "n": ((3,), "int64"),
        }
    )
    made: int = 0

    def fresh(self, stem: str) -> str:
        self.made += 1
        return f"{stem}{self.made}"

    def floats(self, ndim: int | None = None) -> list[str]:
        return [
            k
            for k, (shape, dtype) in self.keys.items()
            if dtype == "float32" and (ndim is None or len(shape) == ndim)
        ]

    def prefixes(self) -> list[str]:
        return sorted({k.split(".")[0] + "." for k in self.keys if "." in k})


Op = tuple[str, str]  # (upgrade line, downgrade line)


def _draw_op(draw: Callable[..., object], sim: Sim) -> Op | None:
    kind = draw(
        st.sampled_from(
            [
                "rename",
                "prefix",
                "drop",
                "add",
                "module",
                "reshape",
                "transpose",
                "cast",
                "resize",
                "split",
                "neg",
            ]
        )
    )
    keys = sorted(sim.keys)
    if kind == "rename" and keys:
        old = draw(st.sampled_from(keys))
        new = sim.fresh("r")
        sim.keys[new] = sim.keys.pop(old)
        return f"op.rename_key({old!r}, {new!r})", f"op.rename_key({new!r}, {old!r})"
    if kind == "prefix" and sim.prefixes():
        old = draw(st.sampled_from(sim.prefixes()))
        new = sim.fresh("p") + "."
        sim.keys = {
            (new + k[len(old) :] if k.startswith(old) else k): v for k, v in sim.keys.items()
        }
        return f"op.rename_prefix({old!r}, {new!r})", f"op.rename_prefix({new!r}, {old!r})"
    if kind == "drop" and len(keys) > 2:
        key = draw(st.sampled_from(keys))
        shape, dtype = sim.keys.pop(key)
        return (
            f"op.drop_key({key!r}, intended=True)",
            f"op.add_tensor({key!r}, shape={shape!r}, dtype=torch.{dtype})",
        )
    if kind == "add":
        key = sim.fresh("t")
        shape = draw(st.sampled_from([(3,), (2, 5), (4, 4)]))
        init = draw(st.sampled_from(["zeros", "normal", "uniform", "ones"]))
        sim.keys[key] = (shape, "float32")
        return f"op.add_tensor({key!r}, shape={shape!r}, init={init!r})", f"op.drop_key({key!r})"
    if kind == "module":
        name = sim.fresh("m")
        i, o = draw(st.sampled_from([(2, 3), (4, 2)]))
        sim.keys[f"{name}.weight"] = ((o, i), "float32")
        sim.keys[f"{name}.bias"] = ((o,), "float32")
        return (
            f"op.add_module({name!r}, torch.nn.Linear({i}, {o}))",
            f"op.drop_prefix({name + '.'!r})",
        )
    if kind == "reshape" and sim.floats():
        key = draw(st.sampled_from(sim.floats()))
        shape, dtype = sim.keys[key]
        numel = 1
        for d in shape:
            numel *= d
        new = (numel,) if len(shape) > 1 else ((2, numel // 2) if numel % 2 == 0 else (1, numel))
        sim.keys[key] = (new, dtype)
        return f"op.reshape({key!r}, {new!r})", f"op.reshape({key!r}, {shape!r})"
    if kind == "transpose" and sim.floats(2):
        key = draw(st.sampled_from(sim.floats(2)))
        (a, b), dtype = sim.keys[key]
        sim.keys[key] = ((b, a), dtype)
        return f"op.transpose({key!r}, 0, 1)", f"op.transpose({key!r}, 0, 1)"
    if kind == "cast" and sim.floats():
        key = draw(st.sampled_from(sim.floats()))
        shape, _ = sim.keys[key]
        sim.keys[key] = (shape, "float64")
        return f"op.cast({key!r}, torch.float64)", f"op.cast({key!r}, torch.float32)"
    if kind == "resize" and sim.floats():
        key = draw(st.sampled_from(sim.floats()))
        shape, dtype = sim.keys[key]
        grown = (shape[0] + 2, *shape[1:])
        init = draw(st.sampled_from(["zeros", "normal"]))
        sim.keys[key] = (grown, dtype)
        return (
            f"op.resize({key!r}, {grown!r}, init={init!r})",
            f"op.resize({key!r}, {shape!r}, intended=True)",
        )
    if kind == "split":
        even = [k for k in sim.floats() if sim.keys[k][0][0] % 2 == 0]
        if even:
            key = draw(st.sampled_from(even))
            shape, dtype = sim.keys.pop(key)
            parts = [sim.fresh("s"), sim.fresh("s")]
            for p in parts:
                sim.keys[p] = ((shape[0] // 2, *shape[1:]), dtype)
            return f"op.split({key!r}, into={parts!r})", f"op.concat({parts!r}, into={key!r})"
    if kind == "neg" and sim.floats():
        key = draw(st.sampled_from(sim.floats()))
        return f"op.map_tensor({key!r}, torch.neg)", f"op.map_tensor({key!r}, torch.neg)"
    return None


@st.composite
def lineages(draw: Callable[..., object]) -> list[tuple[str, list[Op]]]:
    sim = Sim()
    revisions = []
    for i in range(draw(st.integers(3, 6))):
        ops: list[Op] = []
        for _ in range(draw(st.integers(1, 4))):
            found = _draw_op(draw, sim)
            if found is not None:
                ops.append(found)
        revisions.append((f"rev{i:09d}", ops))
    return revisions


def _write(root: Path, revisions: list[tuple[str, list[Op]]]) -> Config:
    (root / "migrations" / "versions").mkdir(parents=True)
    base = Schema(
        {
            k: Entry(TensorSpec(shape, getattr(torch, dtype)), "param")
            for k, (shape, dtype) in Sim().keys.items()
        }
    )
    (root / "migrations" / "base_schema.txt").write_text(base.to_text("test"))
    (root / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\n"
    )
    down = None
    for rev, ops in revisions:
        up = "\n".join(u for u, _ in ops) or "pass"
        back = "\n".join(d for _, d in reversed(ops)) or "pass"
        write_revision(root / "migrations" / "versions", rev, down, up, back)
        down = rev
    return Config(root / "alembic_style.ini", stdout=io.StringIO(), stderr=io.StringIO())


def _results(config: Config, ids: list[str]) -> dict[tuple[str | None, str | None], object]:
    """A synthetic checkpoint at every position, taken to the head, the middle and base.

    Positions and targets are named by the ids the lineage had before any squash.
    """
    script_dir = ScriptDirectory.from_config(config)
    rmap = script_dir.revision_map
    base = load_base_schema(script_dir)
    out: dict[tuple[str | None, str | None], object] = {}
    for at in [None, *ids]:
        current = rmap.canonical([at]) if at else ()
        sd = sample_state_dict(schema_at(script_dir, base, current).specs(), seed=7)
        for target in (ids[-1], ids[len(ids) // 2], None):
            goal = rmap.canonical([target]) if target else ()
            up = bool(goal) and (not current or ids.index(at) <= ids.index(target))  # type: ignore[arg-type]
            steps = (upgrade_steps if up else downgrade_steps)(
                script_dir, current, goal[0] if goal else "base"
            )
            state = PlanState.from_schema(specs_of(sd))
            run_steps(steps, state, current, rmap)
            evaluate = Evaluator(state.entries, sd.__getitem__)
            out[(at, target)] = [(k, evaluate(k)) for k in state.entries]
    return out


def _same(a: object, b: object) -> bool:
    assert isinstance(a, list) and isinstance(b, list)
    return [k for k, _ in a] == [k for k, _ in b] and all(
        same_bits(x, y) for (_, x), (_, y) in zip(a, b)
    )


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(revisions=lineages(), cut=st.tuples(st.integers(0, 5), st.integers(0, 5)))
def test_squashing_random_op_chains_keeps_every_result(
    revisions: list[tuple[str, list[Op]]], cut: tuple[int, int]
) -> None:
    root = Path(tempfile.mkdtemp(prefix="squash-random-"))
    try:
        config = _write(root, revisions)
        ids = [rev for rev, _ in revisions]
        lo, hi = sorted(min(c, len(ids) - 1) for c in cut)
        if lo == hi:
            hi = min(hi + 1, len(ids) - 1)
            lo = hi - 1
        before = _results(config, ids)
        try:
            done = command.squash(config, f"{ids[lo]}:{ids[hi]}", "squashed", rev_id="squashed0")
        except CommandError as exc:
            # a dtype-less new tensor whose revision's dtype no single step reproduces for
            # every checkpoint: refused, and the lineage is left as it was
            assert "without a dtype" in exc.message, exc.message
        else:
            assert done.script is not None and len(done.chain.positions) == hi - lo + 1
        after = _results(config, ids)
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert _same(value, after[key]), key
    finally:
        shutil.rmtree(root)
