"""Join the calls of many revisions into fewer, without changing what they compute.

Each rule joins a call with the next call that touches the same keys, and
only when no call in between touches any key either of them involves (known
from :func:`~ckptmigrate.squash.calls.replay`), so moving work to the earlier
call's place changes no result:

* rename chains collapse: ``a -> b``, ``b -> c`` is ``a -> c`` (``a -> b -> a`` is
  nothing), for ``rename_key`` and for ``rename_prefix`` over the same keys;
* a key renamed and then dropped is dropped under its first name;
* an ``add_tensor`` (or ``add_module``) whose keys are dropped again disappears;
  a tensor added with a deterministic init and renamed is added under the new name;
* consecutive ``reshape`` calls fold into one (none when the shape comes back),
  and a ``transpose`` of the same two dims twice disappears;
* a call that changes only one key, followed by a drop of that key, is the drop.

New values never move to another revision's or key's seed: a random init is
drawn from its key, so it is not renamed into its add, and an ``add_module``
is only dropped when no later module of the same revision draws after it.
Whatever the rules do, ``squash`` then proves the result against the chain.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence

from ..operations.registry import OpCall, operation
from ..plan.nodes import TensorSpec
from .calls import Call, Effect, replay

Rewrite = dict[int, list[Call]]  # index -> what replaces the call there ([] removes it)


class _Index:
    """Which calls touch each key, to find the next one fast."""

    def __init__(self, effects: Sequence[Effect]) -> None:
        self.effects = effects
        self._by_key: dict[str, list[int]] = {}
        for i, effect in enumerate(effects):
            for key in effect.touched:
                self._by_key.setdefault(key, []).append(i)

    def next(self, keys: Sequence[str] | frozenset[str], after: int) -> int | None:
        """The first call after ``after`` that touches any of ``keys``."""
        found: int | None = None
        for key in keys:
            hits = self._by_key.get(key, [])
            at = bisect.bisect_right(hits, after)
            if at < len(hits) and (found is None or hits[at] < found):
                found = hits[at]
        return found

    def between(self, key: str, lo: int, hi: int) -> bool:
        """Whether a call strictly between ``lo`` and ``hi`` touches ``key``."""
        hits = self._by_key.get(key, [])
        at = bisect.bisect_right(hits, lo)
        return at < len(hits) and hits[at] < hi


def simplify(
    calls: Sequence[Call], start: Mapping[str, TensorSpec | None], *, direction: str = "upgrade"
) -> list[Call]:
    """``calls`` (run from the schema ``start``) with every rule applied until none applies."""
    out = list(calls)
    while True:
        effects, _ = replay(out, start, direction=direction)
        rewrite = _one_pass(out, effects)
        if not rewrite:
            return out
        out = [c for i, call in enumerate(out) for c in rewrite.get(i, [call])]


def _one_pass(calls: Sequence[Call], effects: Sequence[Effect]) -> Rewrite:
    """Non-overlapping rewrites found in one scan, earliest first."""
    index = _Index(effects)
    rewrite: Rewrite = {}
    for i, call in enumerate(calls):
        if i in rewrite:
            continue
        rule = _RULES.get(call.name)
        found = rule(calls, index, i) if rule is not None else None
        if not found:
            found = _changed_then_dropped(calls, index, i)
        if found and not set(found) & set(rewrite):
            rewrite.update(found)
    return rewrite


def _partner(calls: Sequence[Call], index: _Index, i: int, keys: Sequence[str]) -> int | None:
    """The next call touching ``keys`` after ``i``."""
    return index.next(keys, i)


def _rename_key(calls: Sequence[Call], index: _Index, i: int) -> Rewrite | None:
    call = calls[i]
    old, new = call.argument("old"), call.argument("new")
    if old == new:
        return {i: []}
    j = _partner(calls, index, i, [new])
    if j is None:
        return None
    nxt = calls[j]
    if nxt.name == "rename_key" and nxt.argument("old") == new:
        target = nxt.argument("new")
        if index.between(target, i, j):
            return None
        if target == old:
            return {i: [], j: []}
        return {i: [call.with_arguments(new=target)], j: []}
    if nxt.name == "drop_key" and nxt.argument("key") == new:
        return {i: [nxt.with_arguments(key=old)], j: []}
    return None


def _rename_prefix(calls: Sequence[Call], index: _Index, i: int) -> Rewrite | None:
    call = calls[i]
    moved = index.effects[i].results
    if not moved:
        return None
    j = _partner(calls, index, i, moved)
    if j is None or set(index.effects[j].removed) != set(moved):
        return None
    nxt = calls[j]
    if nxt.name == "rename_prefix" and nxt.argument("old") == call.argument("new"):
        landed = index.effects[j].results
        if any(index.between(k, i, j) for k in landed):
            return None
        if nxt.argument("new") == call.argument("old"):
            return {i: [], j: []}
        return {i: [call.with_arguments(new=nxt.argument("new"))], j: []}
    if nxt.name == "drop_prefix":
        dropped = Call(OpCall("drop_prefix", (call.argument("old"),)), nxt.seeds)
        return {i: [dropped.with_arguments(intended=nxt.argument("intended"))], j: []}
    return None


def _add_tensor(calls: Sequence[Call], index: _Index, i: int) -> Rewrite | None:
    call = calls[i]
    key = call.argument("key")
    j = _partner(calls, index, i, [key])
    if j is None:
        return None
    nxt = calls[j]
    if nxt.name == "drop_key" and nxt.argument("key") == key:
        return {i: [], j: []}
    if (
        not operation(call.name).draws(call.op)
        and nxt.name == "rename_key"
        and nxt.argument("old") == key
    ):
        target = nxt.argument("new")
        if not index.between(target, i, j):
            return {i: [call.with_arguments(key=target)], j: []}
    return None


def _add_module(calls: Sequence[Call], index: _Index, i: int) -> Rewrite | None:
    added = index.effects[i].results
    j = _partner(calls, index, i, added)
    if j is None or calls[j].name != "drop_prefix":
        return None
    if set(index.effects[j].removed) != set(added):
        return None
    seeds = calls[i].seeds
    if any(c.name == "add_module" and c.seeds == seeds for c in calls[i + 1 :]):
        return None  # a later module of that revision draws where this one left the RNG
    return {i: [], j: []}


def _reshape(calls: Sequence[Call], index: _Index, i: int) -> Rewrite | None:
    call = calls[i]
    key = call.argument("key")
    j = _partner(calls, index, i, [key])
    if j is None or calls[j].name != "reshape" or calls[j].argument("key") != key:
        return None
    was = index.effects[i].before.get(key)
    now = index.effects[j].after.get(key)
    if was is not None and now is not None and was.shape == now.shape:
        return {i: [], j: []}
    return {i: [calls[j]], j: []}


def _transpose(calls: Sequence[Call], index: _Index, i: int) -> Rewrite | None:
    call = calls[i]
    key = call.argument("key")
    j = _partner(calls, index, i, [key])
    if j is None or calls[j].name != "transpose" or calls[j].argument("key") != key:
        return None
    spec = index.effects[i].before.get(key)
    if spec is None:
        return None
    ndim = len(spec.shape)

    def dims(c: Call) -> set[int]:
        return {int(c.argument("dim0")) % ndim, int(c.argument("dim1")) % ndim}

    return {i: [], j: []} if dims(call) == dims(calls[j]) else None


def _changed_then_dropped(calls: Sequence[Call], index: _Index, i: int) -> Rewrite | None:
    """``reshape(k)`` (any call that only rewrote ``k``) and then ``drop_key(k)``: the drop."""
    effect = index.effects[i]
    if effect.removed or len(effect.results) != 1:
        return None
    (key,) = effect.results
    if effect.touched != {key} or key not in effect.before:
        return None
    j = index.next([key], i)
    if j is None or calls[j].name != "drop_key" or calls[j].argument("key") != key:
        return None
    return {i: [], j: [calls[j]]}


_RULES: dict[str, Callable[[Sequence[Call], _Index, int], Rewrite | None]] = {
    "rename_key": _rename_key,
    "rename_prefix": _rename_prefix,
    "add_tensor": _add_tensor,
    "add_module": _add_module,
    "reshape": _reshape,
    "transpose": _transpose,
}
