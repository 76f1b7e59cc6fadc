"""A squash proves itself before it is kept.

For the whole range, and for every revision inside it, the new file's step
must do what the replaced revisions did:

* on shapes: the same schema (keys, shapes, dtypes) after each upgrade and
  downgrade, from the schema at the start of that step;
* on values: for a synthetic checkpoint built from that schema (real tensors,
  fixed seed), every tensor the step computes is the same bit for bit, and
  PyTorch's per-module metadata is the same.

Only tensors a step touched are computed: an entry the original left alone
is the very same source in both plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CkptMigrateError, CommandError
from ..plan.state import Evaluator, PlanState
from ..runtime.migration import MigrationStep, run_step
from ..sample import same_bits, sample_reader
from ..schema import Schema
from ..script.directory import ReplacedStep, Script
from .chain import Chain


@dataclass
class Proof:
    """What was compared."""

    steps: int = 0
    tensors: int = 0


Steps = Sequence[tuple[Script, bool]]


def prove(chain: Chain, squash: Script) -> Proof:
    """Compare ``squash`` (the written file) with the chain it replaces, or raise."""
    proof = Proof()
    ends = chain.positions[-1]
    originals_up = [(p.step, True) for p in chain.positions if p.step is not None]
    originals_down = [(p.step, False) for p in reversed(chain.positions) if p.step is not None]
    _same(proof, "upgrade()", chain.start, [(squash, True)], originals_up)
    _same(proof, "downgrade()", ends.after, [(squash, False)], originals_down)
    for p in chain.positions:
        node_id = squash.revision if p is ends else p.name
        part = ReplacedStep(squash, p.name, node_id, ())
        if p.step is None:
            _same(proof, f"the step of {p.name}", p.before, [(part, True)], [])
            _same(proof, f"the step back from {p.name}", p.after, [(part, False)], [])
            continue
        _same(proof, f"the step to {p.name}", p.before, [(part, True)], [(p.step, True)])
        _same(proof, f"the step back from {p.name}", p.after, [(part, False)], [(p.step, False)])
    return proof


def _same(proof: Proof, what: str, start: Schema, new: Steps, old: Steps) -> None:
    specs = start.specs()
    begin = PlanState.from_schema(specs)  # shared: an entry neither touches stays this source
    shaped = [_run(steps, begin, symbolic=True, what=what) for steps in (new, old)]
    got, want = (Schema.from_specs(s.schema()) for s in shaped)
    if list(got.items()) != list(want.items()):
        _fail(what, "gives another schema: " + _schema_difference(got, want))
    read = sample_reader(specs)
    ours, theirs = (_run(steps, begin, symbolic=False, what=what) for steps in (new, old))
    if ours.metadata != theirs.metadata:
        _fail(what, "leaves other per-module metadata (_metadata) than the revisions it replaces")
    evaluate_ours, evaluate_theirs = Evaluator(ours.entries, read), Evaluator(theirs.entries, read)
    for key, node in ours.entries.items():
        if node is theirs.entries[key]:
            continue  # untouched by both: the same source entry
        if not same_bits(evaluate_ours(key), evaluate_theirs(key)):
            _fail(what, f"computes other values for {key} on a synthetic checkpoint")
        proof.tensors += 1
    proof.steps += 1


def _run(steps: Steps, begin: PlanState, *, symbolic: bool, what: str) -> PlanState:
    state = begin.copy()
    try:
        for script, up in steps:
            run_step(MigrationStep(script, up), state, symbolic=symbolic)
    except CkptMigrateError as exc:
        _fail(what, f"fails: {exc.one_line()}")
    return state


def _schema_difference(got: Schema, want: Schema) -> str:
    extra = [k for k in got if k not in want]
    missing = [k for k in want if k not in got]
    changed = [f"{k} {got[k]} not {want[k]}" for k in got if k in want and got[k] != want[k]]
    if not (extra or missing or changed):
        return "the same keys in another order"
    parts = []
    for label, items in (("more", extra), ("lacks", missing), ("changes", changed)):
        if items:
            parts.append(f"{label} {', '.join(items[:3])}" + (" ..." if len(items) > 3 else ""))
    return "; ".join(parts)


def _fail(what: str, problem: str) -> None:
    raise SquashNotProved(f"the squashed revision's {what} {problem}")


class SquashNotProved(CommandError):
    """The new file does not do what the revisions it would replace did."""
