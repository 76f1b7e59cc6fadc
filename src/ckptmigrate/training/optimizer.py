"""An optimizer's state dict, carried along a migration plan.

``optimizer.state_dict()`` is ``{"state": {index: {name: value}}, "param_groups":
[{..., "params": [index, ...]}]}``: indices count the optimizer's parameters in
group order, and ``load_state_dict`` pairs them with the new optimizer's
parameters by position alone. So every parameter's state is moved to the
parameter's new position and transformed as its weights were:

* a state tensor with the parameter's shape (``exp_avg``, ``exp_avg_sq``,
  ``momentum_buffer``, ...) goes through the parameter's plan, each node by its
  op's own rule (``follow_state``): by default as the weights (reshape,
  transpose, permute, split, concat, stack, unstack; ``cast`` casts),
  ``resize`` grows with zeros (never the weights' init: a new row has seen no
  gradient) or slices; new parts (``add_tensor``, ``add_module``, the new rows
  of a resize) are zeros;
* a scalar (``step``, NAdam's ``mu_product``, ASGD's ``eta``/``mu``, or any 0-d
  tensor, number or None) is copied; for a concat of parameters whose values
  differ the largest is kept: with Adam, a smaller ``step`` would inflate the
  bias correction of the parts trained longer, while the largest only damps the
  newer parts' first updates;
* ``map_tensor`` is an error (its rule refuses): a function of the weights says nothing about
  their moments. ``op.reset_optimizer_state(key)`` after it (or anywhere) says
  to start that tensor's state afresh: no state at all when nothing else
  feeds the parameter, zeros for its part of a concatenation otherwise.

A parameter made only of new tensors starts with no state (as a fresh
optimizer would give it); a dropped parameter's state is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CkptMigrateError
from ..operations.registry import CannotFollowState
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

#: State entries that are per-step scalars even when a parameter is 0-d.
SCALAR_STATE = frozenset({"step", "mu_product", "eta", "mu"})
#: State entries PyTorch's optimizers keep with their parameter's shape.
PER_PARAMETER_STATE = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "sum",
        "square_avg",
        "acc_delta",
        "grad_avg",
        "ax",
        "prev",
        "step_size",
        "exp_inf",
    }
)
PathItem = str | int


class OptimizerStateError(CkptMigrateError):
    """The optimizer state cannot be carried along the migration."""


# --------------------------------------------------------------------- finding


@dataclass
class FoundOptimizer:
    """An optimizer state dict somewhere inside a training container."""

    path: tuple[PathItem, ...]
    value: Mapping[str, Any]

    @property
    def label(self) -> str:
        out = ""
        for item in self.path:
            out += f"[{item}]" if isinstance(item, int) else ("/" if out else "") + repr(item)
        return out or "top level"

    @property
    def groups(self) -> list[Mapping[str, Any]]:
        return list(self.value["param_groups"])

    @property
    def state(self) -> Mapping[Any, Any]:
        state = self.value.get("state")
        return state if isinstance(state, Mapping) else {}

    def ids(self) -> list[tuple[int, int | str]]:
        """(group index, parameter id) in group order, as ``load_state_dict`` pairs them."""
        return [(g, pid) for g, group in enumerate(self.groups) for pid in group["params"]]

    def state_names(self) -> list[str]:
        names: list[str] = []
        for entry in self.state.values():
            if isinstance(entry, Mapping):
                names.extend(str(n) for n in entry if str(n) not in names)
        return names


def _is_id(value: object) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def is_optimizer_state(obj: object) -> bool:
    """``torch.optim.Optimizer.state_dict()``'s shape (also with parameter names as ids)."""
    if not isinstance(obj, Mapping) or "param_groups" not in obj:
        return False
    groups = obj["param_groups"]
    if not isinstance(groups, (list, tuple)) or not groups:
        return False
    for group in groups:
        if not isinstance(group, Mapping):
            return False
        params = group.get("params")
        if not isinstance(params, (list, tuple)) or not all(_is_id(p) for p in params):
            return False
    return isinstance(obj.get("state", {}), Mapping)


def find_optimizers(container: Any, skip: tuple[str, ...], depth: int = 3) -> list[FoundOptimizer]:
    """Every optimizer state dict within ``depth`` levels, outside the weights at ``skip``."""
    found: list[FoundOptimizer] = []

    def visit(obj: Any, path: tuple[PathItem, ...]) -> None:
        if path and path == skip:
            return
        if is_optimizer_state(obj):
            found.append(FoundOptimizer(path, obj))
            return
        if len(path) >= depth:
            return
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                if isinstance(k, (str, int)) and not isinstance(k, bool):
                    visit(v, (*path, k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, (*path, i))

    visit(container, ())
    return found


def replace_path(container: Any, path: Sequence[PathItem], value: Any) -> Any:
    """A copy of ``container`` with ``value`` at ``path``; nothing else is copied or changed."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(container, list):
        out_list = list(container)
        out_list[int(head)] = replace_path(container[int(head)], rest, value)
        return out_list
    if isinstance(container, tuple):
        items = list(container)
        items[int(head)] = replace_path(container[int(head)], rest, value)
        return type(container)(items) if type(container) is tuple else tuple(items)
    copy = container.copy() if hasattr(container, "copy") else dict(container)
    copy[head] = replace_path(container[head], rest, value)
    return copy


def remove_path(container: Any, path: Sequence[PathItem]) -> Any:
    """A copy of ``container`` without the entry at ``path``.

    From a list the item is removed (Lightning pairs ``optimizer_states`` with
    the optimizers it builds and restores as many as there are).
    """
    if len(path) == 1:
        if isinstance(container, (list, tuple)):
            items = list(container)
            del items[int(path[0])]
            return items if isinstance(container, list) else tuple(items)
        copy = container.copy() if hasattr(container, "copy") else dict(container)
        del copy[path[0]]
        return copy
    head = path[0]
    inner = container[int(head)] if isinstance(container, (list, tuple)) else container[head]
    return replace_path(container, [head], remove_path(inner, path[1:]))


# --------------------------------------------------------------------- carrying state


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


def _holds_tensor(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False


def _scalar_value(value: object) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.is_meta or b.is_meta:
            return a.shape == b.shape and a.dtype == b.dtype
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:
        return a is b


def pick_scalar(values: Sequence[object]) -> object:
    """One value for several sources: the common one, else the largest (see module doc)."""
    first = values[0]
    if all(_same(first, v) for v in values[1:]):
        return first
    numbers = [_scalar_value(v) for v in values]
    if all(n is not None for n in numbers):
        return values[max(range(len(values)), key=lambda i: numbers[i] or 0.0)]
    return first


@dataclass
class Carried:
    """One new parameter's state, and how it came about (for reports)."""

    state: dict[str, Any] | None
    sources: list[str] = field(default_factory=list)  # old keys whose state was used
    transforms: list[str] = field(default_factory=list)
    reset: bool = False


class StateCarrier:
    """Evaluates parameters' plans on their optimizer state instead of their weights.

    ``state_of(key)`` is the optimizer's state for the old parameter at file key
    ``key`` (None when it is not this optimizer's or has no state). With
    ``meta`` the transforms run on shape-only tensors (dry runs).
    """

    def __init__(
        self,
        state_of: Callable[[str], Mapping[str, Any] | None],
        *,
        meta: bool,
        label: str,
        display: Callable[[str], str],
        certain: bool,
        revisions: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.state_of = state_of
        self.meta = meta
        self.label = label
        self.display = display
        self.certain = certain
        # op name -> the revisions that call it, to say where a refused op comes from
        self.revisions = dict(revisions or {})

    # .................................................................. structure

    @staticmethod
    def stateful_sources(node: Node) -> list[Source]:
        """Sources reachable without passing a reset mark, each once, in order."""
        out: list[Source] = []
        seen: set[int] = set()
        stack = [node]
        while stack:
            cur = stack.pop()
            if id(cur) in seen or isinstance(cur, ResetOptimizerState):
                continue
            seen.add(id(cur))
            if isinstance(cur, Source):
                out.append(cur)
            stack.extend(reversed(cur.inputs))
        return out

    def carry(self, key: str, node: Node) -> Carried:
        """The state of the new parameter ``key`` (file key) produced by ``node``."""
        nodes = walk(node)
        reset = any(isinstance(n, ResetOptimizerState) for n in nodes)
        transforms: list[str] = []
        for n in nodes:
            if isinstance(n, Apply) and n.op.name not in transforms:
                transforms.append(n.op.name)
        stateful: list[tuple[Source, Mapping[str, Any]]] = []
        for src in self.stateful_sources(node):
            st = self.state_of(src.key)
            if st is not None and all(src.key != s.key for s, _ in stateful):
                stateful.append((src, st))
        if not stateful:
            return Carried(None, [], transforms, reset)
        names: list[Any] = []
        for _src, st in stateful:
            names.extend(n for n in st if n not in names)
        identity = isinstance(node, Source)
        out: dict[str, Any] = {}
        for name in names:
            values = [(src, st[name]) for src, st in stateful if name in st]
            shaped = [
                _is_tensor(v) and src.spec is not None and tuple(v.shape) == src.spec.shape
                for src, v in values
            ]
            if str(name) not in SCALAR_STATE and all(shaped):
                out[name] = values[0][1] if identity else self._evaluate(key, node, name)
            elif all(
                not _holds_tensor(v) or (_is_tensor(v) and v.dim() == 0) for _src, v in values
            ):
                out[name] = pick_scalar([v for _src, v in values])
            elif identity and self.certain:
                out[name] = values[0][1]  # unknown layout, but surely this parameter's own
            else:
                src, v = next((s, v) for (s, v), ok in zip(values, shaped) if not ok)
                what = f"a {type(v).__name__}" if not _is_tensor(v) else f"a {list(v.shape)} tensor"
                pshape = list(src.spec.shape) if src.spec is not None else "?"
                raise OptimizerStateError(
                    f"the optimizer state at {self.label} of {self.display(src.key)} holds "
                    f"{name!r} as {what}, which is neither the parameter's shape {pshape} nor "
                    "a scalar, so it cannot follow the migration",
                    hint="ckptmigrate carries state shaped like its parameter (SGD, Adam, "
                    "AdamW, RMSprop, Adagrad, ...); if the optimizer's parameters are not in the "
                    "model's order, save it with param_names (build it from "
                    "model.named_parameters()); otherwise start this tensor's state afresh with "
                    f"op.reset_optimizer_state({self.display(key)!r}) in the revision",
                )
        return Carried(out, [src.key for src, _ in stateful], transforms, reset)

    # .................................................................. evaluation

    def _zeros(self, spec: TensorSpec | None) -> torch.Tensor:
        assert spec is not None
        return torch.zeros(spec.shape, dtype=spec.dtype, device="meta" if self.meta else "cpu")

    def _evaluate(self, key: str, root: Node, name: Any) -> torch.Tensor:
        memo: dict[int, torch.Tensor] = {}

        def value(node: Node) -> torch.Tensor:
            if id(node) in memo:
                return memo[id(node)]
            if isinstance(node, ResetOptimizerState):
                out = self._zeros(node.spec)
            elif isinstance(node, Source):
                st = self.state_of(node.key)
                v = st.get(name) if st is not None else None
                spec = node.spec
                if (
                    isinstance(v, torch.Tensor)
                    and spec is not None
                    and tuple(v.shape) == spec.shape
                ):
                    out = torch.empty(v.shape, dtype=v.dtype, device="meta") if self.meta else v
                else:
                    out = self._zeros(spec)
            elif isinstance(node, (Init, Constant)) or not node.inputs:
                out = self._zeros(node.spec)
            elif isinstance(node, Apply):
                out = self._apply(key, node, [value(i) for i in node.inputs])
            else:
                raise OptimizerStateError(
                    f"the optimizer state of {self.display(key)} ({self.label}) cannot follow "
                    f"{node.describe()}",
                    hint=f"start it afresh with op.reset_optimizer_state({self.display(key)!r})",
                )
            memo[id(node)] = out
            return out

        result = value(root)
        spec = root.spec
        if spec is not None and tuple(result.shape) != spec.shape:  # pragma: no cover - guard
            raise OptimizerStateError(
                f"internal: the optimizer state of {self.display(key)} came out "
                f"{list(result.shape)}, not {list(spec.shape)}"
            )
        return result

    def _apply(self, key: str, node: Apply, args: list[torch.Tensor]) -> torch.Tensor:
        """The node's op applied to state values, by its own rule (see the module doc)."""
        try:
            return node.op.follow_state(args, **node.params)
        except CannotFollowState as exc:
            what = node.op.name
            revisions = self.revisions.get(what, [])
            where = f" (revision {', '.join(revisions)})" if revisions else ""
            raise OptimizerStateError(
                f"the optimizer state of {self.display(key)} ({self.label}) cannot follow "
                f"{what}{where}: {exc.reason}",
                hint=f"add op.reset_optimizer_state({self.display(key)!r}) after the {what} "
                "call, so that this parameter's optimizer state starts afresh",
            ) from None


def unshare(states: Mapping[Any, Mapping[str, Any]]) -> dict[Any, dict[str, Any]]:
    """The same states, with a tensor reused by two parameters copied for the second.

    Optimizers update their state in place (``exp_avg.lerp_``, ``step += 1``);
    a tensor shared by two parameters, which ``torch.save`` keeps shared,
    would be updated twice per step.
    """
    seen: set[tuple[int, int]] = set()
    out: dict[Any, dict[str, Any]] = {}
    for pid, st in states.items():
        new: dict[str, Any] = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor) and not v.is_meta and v.untyped_storage().nbytes():
                ident = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
                if ident in seen:
                    v = v.clone(memory_format=torch.contiguous_format)
                else:
                    seen.add(ident)
            new[name] = v
        out[pid] = new
    return out
