"""Optimizer state in a lazy training container, keyed by parameter name (DCP's layout).

``torch.distributed.checkpoint.state_dict.get_state_dict`` gives an
optimizer's state by fully qualified name, not by position::

    {"state": {"layers.0.weight": {"step": ..., "exp_avg": ..., "exp_avg_sq": ...}},
     "param_groups": [{"lr": ..., ..., "params": ["layers.0.weight", ...]}]}

and ``dcp.save`` stores every value as its own entry. A DCP checkpoint opens
as a *lazy* container: its values are plan nodes, and nothing is read yet.
The pass in :mod:`.migrate` runs on shape-only stand-ins of those values
(only the groups' ``params`` lists, a few names each, are read), with the
very rules, pairing (by name: the ids are names), param-group placement and
reports it uses for a torch file; then :func:`planned` turns each new state
value back into a node:

* where the parameter itself only moved (a rename, or nothing at all), its
  state is the input entry itself, so the checkpoint's writer references it
  where it is: nothing is read or written;
* where the parameter is computed (split, concat, resize, ...), a
  :class:`CarriedState` node computes its state while the checkpoint is
  written, by the same :class:`.optimizer.StateCarrier` from the old state
  it reads then, one parameter at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..plan.nodes import Node, Source, TensorSpec
from .layout import Layout
from .optimizer import StateCarrier
from .pairing import OptimizerPlan
from .rebuild import Rebuilt, _old_state

#: id of a stand-in -> the node it stands for.
StandIns = dict[int, Node]


#: Objects read to pair an optimizer with its parameters: each group's names.
NAMES = ("params", "param_names")


def stand_ins(container: Any) -> tuple[Any, StandIns]:
    """A copy of the container's structure with every tensor node a meta tensor of its shape.

    A param group's ``params`` (and ``param_names``) are read: the names say
    which parameter each state belongs to. Other objects stay nodes.
    """
    table: StandIns = {}

    def copy(value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, Node):
            if value.spec is None:
                names = len(path) >= 3 and path[-3] == "param_groups" and path[-1] in NAMES
                return value.compute(()) if names else value
            meta = value.spec.meta()
            table[id(meta)] = value
            return meta
        if isinstance(value, Mapping):
            return {k: copy(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(copy(v, (*path, i)) for i, v in enumerate(value))
        return value

    return copy(container, ()), table


def planned(
    plan: OptimizerPlan,
    old: Layout,
    entries: Mapping[str, Node],
    rebuilt: Rebuilt,
    table: StandIns,
    revisions: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """The optimizer's new state dict, its values nodes again (see the module docstring)."""
    carry = _SharedCarry(
        StateCarrier(
            _real_state(_old_state(plan, old), table),
            meta=False,
            label=plan.found.label,
            display=lambda k: k,
            certain=plan.names is not None,
            revisions=revisions,
        ),
        entries,
    )
    value = dict(rebuilt.value)
    state: dict[Any, dict[str, Any]] = {}
    for key, pid in rebuilt.pid_of.items():
        carried = rebuilt.value["state"].get(pid)
        if carried is None:
            continue
        if isinstance(entries[key], Source):  # the parameter moved: so does its state
            state[pid] = {name: table.get(id(v), v) for name, v in carried.items()}
        else:
            state[pid] = {
                name: CarriedState(key, name, _spec(v), carry) for name, v in carried.items()
            }
            carry.expect(key, len(carried))
    value["state"] = state
    return value


def _spec(value: Any) -> TensorSpec | None:
    return TensorSpec.of(value) if isinstance(value, torch.Tensor) else None


def _real_state(
    state_of: Callable[[str], Mapping[str, Any] | None], table: StandIns
) -> Callable[[str], Mapping[str, Any] | None]:
    """``state_of`` with every stand-in (and stored object) read for real."""

    def real(key: str) -> Mapping[str, Any] | None:
        found = state_of(key)
        if found is None:
            return None
        out: dict[str, Any] = {}
        for name, v in found.items():
            node = table.get(id(v), v)
            out[name] = node.compute(()) if isinstance(node, Node) else node
        return out

    return real


class _SharedCarry:
    """One parameter's whole state, computed once and handed out name by name."""

    def __init__(self, carrier: StateCarrier, entries: Mapping[str, Node]) -> None:
        self.carrier = carrier
        self.entries = entries
        self._lock = threading.Lock()
        self._left: dict[str, int] = {}
        self._done: dict[str, dict[str, Any]] = {}

    def expect(self, key: str, names: int) -> None:
        self._left[key] = names

    def value(self, key: str, name: str) -> Any:
        with self._lock:
            if key not in self._done:
                state = self.carrier.carry(key, self.entries[key]).state
                self._done[key] = dict(state or {})
            value = self._done[key][name]
            self._left[key] -= 1
            if self._left[key] <= 0:  # the last of its names: let it go
                del self._done[key]
            return value


@dataclass(eq=False)
class CarriedState(Node):
    """One state value (``exp_avg``, ``step``) of a computed parameter, computed when written."""

    key: str
    name: str
    spec: TensorSpec | None
    carry: _SharedCarry
    inputs: tuple[Node, ...] = ()

    def compute(self, args: Sequence[Any]) -> Any:
        return self.carry.value(self.key, self.name)

    def describe(self) -> str:
        return f"optimizer state {self.name!r} of {self.key!r}"
