"""Carry an adapter through the base model's migrations, one revision at a time.

Each step runs symbolically on the base model's schema (as for ``--dry-run``),
which gives, for every base key after the step, the plan node that computes
it from the keys before. The adapter follows that plan: a key whose node
depends on adapted weights gets the low-rank delta each op's definition
derives (``Operation.low_rank``), a ``modules_to_save`` copy is computed by the
same nodes from the adapter's own tensors, a base weight the step drops takes
its adapter with it, and one it adds gets none. Where an op has no exact
counterpart, the step is refused with the op, the revision and the adapter
module, and what the user can do instead; nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import OperationError
from ..paths import display_path
from ..plan.lowrank import LowRank, NoExactCounterpart
from ..plan.nodes import (
    Apply,
    Constant,
    Init,
    Node,
    ResetOptimizerState,
    Source,
    TensorSpec,
    walk,
)
from ..plan.nodes import sources_of as _sources_of
from ..plan.state import PlanState
from ..runtime.migration import MigrationStep, run_step
from .layout import Copy, Entry

#: What a user can do when an op has no exact counterpart for the adapter.
OPTIONS = (
    "nothing was written; drop that adapter module first (its tensors from the adapter file "
    "and its name from target_modules in adapter_config.json), or merge the adapter into the "
    "base model (PeftModel.merge_and_unload()) and migrate the merged model instead"
)


@dataclass
class StepReport:
    """What one step did to the adapter, for ``--dry-run`` and the log."""

    step: MigrationStep
    lines: list[str] = field(default_factory=list)


@dataclass
class Followed:
    """The adapter after the steps: what it holds per base key, and the base schema there."""

    entries: dict[str, Entry]
    schema: dict[str, TensorSpec | None]
    reports: list[StepReport]


def follow(
    steps: Sequence[MigrationStep],
    schema: Mapping[str, TensorSpec | None],
    entries: Mapping[str, Entry],
    *,
    log: Callable[[str], None] | None = None,
) -> Followed:
    """Run ``steps`` on the base ``schema`` and carry ``entries`` (keyed by base key) along."""
    current = dict(entries)
    specs = dict(schema)
    reports = []
    for step in steps:
        if log is not None:
            log(f"Running {step}")
        state = PlanState.from_schema(specs)
        run_step(step, state, symbolic=True)
        report = StepReport(step)
        current = _Step(step, state, current, report).carry()
        reports.append(report)
        specs = state.schema()
    return Followed(current, specs, reports)


class _Refused(Exception):
    def __init__(self, node: Node, reason: str, parts: Sequence[LowRank | None]) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason
        self.parts = parts


class _Step:
    """One step's plan, and the adapter before it."""

    def __init__(
        self,
        step: MigrationStep,
        state: PlanState,
        entries: Mapping[str, Entry],
        report: StepReport,
    ) -> None:
        self.step = step
        self.state = state
        self.entries = entries
        self.report = report
        self._deltas: dict[int, LowRank | None] = {}
        self._copies: dict[int, Node] = {}

    def carry(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        used: set[str] = set()
        for key, node in self.state.entries.items():
            sources = _sources_of(node)
            held = [k for k in sources if k in self.entries]
            if not held:
                continue
            try:
                entry = self._entry(key, node, sources, held)
            except _Refused as exc:
                raise self._error(key, exc) from None
            if entry is None:
                continue
            out[key] = entry
            used.update(held)
            self._describe(key, entry, held)
        for key, entry in self.entries.items():
            if key not in used:
                self.report.lines.append(f"{_label(entry)}: dropped with {key}")
        return out

    def _entry(self, key: str, node: Node, sources: list[str], held: list[str]) -> Entry | None:
        copies = [k for k in held if isinstance(self.entries[k], Copy)]
        if not copies:
            return self._delta(node)
        if len(copies) != len(held):
            low = next(k for k in held if k not in copies)
            raise self._mixing(
                key, node, f"it joins a saved module's {copies[0]} and the adapted {low}"
            )
        missing = [k for k in dict.fromkeys(sources) if k not in self.entries]
        if missing:
            raise self._mixing(
                key,
                node,
                f"it computes the saved module's {key} from {missing[0]}, which the adapter "
                "does not hold",
            )
        origin = self.entries[copies[0]]
        assert isinstance(origin, Copy)
        return Copy(self._copy(node), origin.origin)

    def _mixing(self, key: str, node: Node, reason: str) -> _Refused:
        applies = [n for n in walk(node) if isinstance(n, Apply)]
        return _Refused(applies[-1] if applies else node, reason, [])

    # ------------------------------------------------------------------ low-rank deltas

    def _delta(self, node: Node) -> LowRank | None:
        nid = id(node)
        if nid in self._deltas:
            return self._deltas[nid]
        found: LowRank | None
        if isinstance(node, Source):
            entry = self.entries.get(node.key)
            found = entry if isinstance(entry, LowRank) else None
        elif isinstance(node, (Init, Constant)):
            found = None  # a new base tensor: the adapter has nothing for it
        elif isinstance(node, ResetOptimizerState):
            found = self._delta(node.inputs[0])
        elif isinstance(node, Apply):
            found = self._apply(node)
        else:  # pragma: no cover - every node kind is handled above
            raise TypeError(f"unknown plan node {node!r}")
        self._deltas[nid] = found
        return found

    def _apply(self, node: Apply) -> LowRank | None:
        parts = [self._delta(i) for i in node.inputs]
        if all(p is None for p in parts):
            return None
        specs = [i.spec for i in node.inputs]
        assert node.spec is not None and all(s is not None for s in specs)
        try:
            found = node.op.low_rank(parts, specs, node.spec, **node.params)  # type: ignore[arg-type]
        except NoExactCounterpart as exc:
            raise _Refused(node, exc.reason, parts) from None
        if found is not None and found.shape != node.spec.shape:
            raise AssertionError(
                f"{node.op.name}'s low-rank counterpart fits {list(found.shape)}, "
                f"not the {list(node.spec.shape)} the op makes"
            )
        return found

    # ------------------------------------------------------------------ full copies

    def _copy(self, node: Node) -> Node:
        """``node`` computed from the adapter's copies instead of the base model's tensors."""
        nid = id(node)
        if nid in self._copies:
            return self._copies[nid]
        made: Node
        if isinstance(node, Source):
            entry = self.entries[node.key]
            assert isinstance(entry, Copy)
            made = entry.node
        elif isinstance(node, ResetOptimizerState):
            made = self._copy(node.inputs[0])
        elif isinstance(node, Apply):
            inputs = tuple(self._copy(i) for i in node.inputs)
            made = Apply(node.op, inputs, node.params, _copied_spec(node, inputs))
        else:
            made = node  # new values: the same for the copy as for the base model
        self._copies[nid] = made
        return made

    # ------------------------------------------------------------------ messages

    def _describe(self, key: str, entry: Entry, held: list[str]) -> None:
        if held == [key] and isinstance(entry, LowRank) and entry is self.entries.get(key):
            return  # untouched
        text = f"{_label(entry)} -> {key}"
        if isinstance(entry, LowRank):
            text += f" (rank {entry.rank}"
            text += ", stored [in, out]" if entry.transposed and entry.kind != "embedding" else ""
            text += ")"
        self.report.lines.append(text)

    def _error(self, key: str, exc: _Refused) -> OperationError:
        script = self.step.script
        node = exc.node
        name = node.op.name if isinstance(node, Apply) else ""
        records = [r for r in self.step.records if r.name == name]
        mine = [r for r in records if key in [k for k, _ in r.results]]
        call = (mine or records)[0].call if records else node.describe()
        modules = [o for p in exc.parts if p is not None for o in p.origin]
        if modules:
            tensors = (
                "embedding_A/B"
                if any(p is not None and p.kind == "embedding" for p in exc.parts)
                else "lora_A/lora_B"
            )
            what = f"the adapter's {', '.join(dict.fromkeys(modules))} ({tensors})"
        else:
            what = f"the adapter's copy of {key}"
        return OperationError(
            f"{call} has no exact counterpart for {what}: {exc.reason}",
            revision=script.revision,
            location=display_path(script.path),
            hint=OPTIONS,
        )


def _label(entry: Entry) -> str:
    if isinstance(entry, Copy):
        return f"saved {entry.origin}"
    return " + ".join(entry.origin) or "adapter"


def _copied_spec(node: Apply, inputs: Sequence[Node]) -> TensorSpec:
    """The copy keeps its own dtype through ops that keep the dtype (a cast sets one)."""
    assert node.spec is not None
    before = node.inputs[0].spec if node.inputs else None
    have = inputs[0].spec if inputs else None
    if before is not None and have is not None and before.dtype == node.spec.dtype:
        return TensorSpec(node.spec.shape, have.dtype)
    return node.spec
