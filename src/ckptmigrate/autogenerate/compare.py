"""Compare the model's schema with the head schema and decide the operations.

The result reads like what a person would write: a renamed subtree is one
``rename_prefix``, a brand-new submodule is one ``add_module`` built with its
own initialisation, and every guess (renames, initialisers, shape changes) is
marked for review, as Alembic marks its own guesses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..names import LOOSE, SIMILAR, best_match, name_similarity, path_similarity
from ..plan.discards import count
from ..plan.nodes import TensorSpec
from ..schema import (
    MAX_CANDIDATES,
    Entry,
    PrefixIndex,
    Schema,
    TailIndex,
    ancestors,
    likely_renames,
)
from .fuse import Fused, find_fused

#: A module prefix (or a top-level key) and its tensors, tail -> key.
Group = tuple[str, dict[str, str]]


@dataclass
class Op:
    """One detected change; ``review`` explains a guess."""

    name: str
    args: tuple[object, ...]
    kwargs: dict[str, object] = field(default_factory=dict)
    review: str | None = None
    inverse: list[Op] = field(default_factory=list)


def _init_guess(key: str, entry: Entry) -> tuple[str, dict[str, object]]:
    spec = entry.spec
    assert spec is not None
    last = key.rsplit(".", 1)[-1]
    if not spec.dtype.is_floating_point:
        return "zeros", {}
    if last == "running_var":
        return "ones", {}
    if last.endswith("bias") or entry.kind == "buffer":
        return "zeros", {}
    if len(spec.shape) == 1:
        return "ones", {}
    if len(spec.shape) >= 2:
        return "kaiming_uniform", {"a": math.sqrt(5)}
    return "zeros", {}


def _add_tensor(key: str, entry: Entry, why: str) -> Op:
    assert entry.spec is not None
    init, args = _init_guess(key, entry)
    kwargs: dict[str, object] = {"shape": tuple(entry.spec.shape)}
    if entry.spec.dtype != torch.float32:
        kwargs["dtype"] = entry.spec.dtype
    if init != "zeros":
        kwargs["init"] = init
    kwargs.update(args)
    return Op("add_tensor", (key,), kwargs, review=why)


def module_expr(module: torch.nn.Module) -> str | None:
    """Python that rebuilds ``module`` (same keys, shapes, dtypes), or None."""
    if not type(module).__module__.startswith("torch.nn"):
        return None
    children = list(module.named_children())
    if isinstance(module, torch.nn.Sequential | torch.nn.ModuleList):
        parts = [module_expr(child) for _, child in children]
        if any(p is None for p in parts):
            return None
        inner = ", ".join(p for p in parts if p is not None)
        expr = (
            f"torch.nn.Sequential({inner})"
            if isinstance(module, torch.nn.Sequential)
            else f"torch.nn.ModuleList([{inner}])"
        )
        return expr if _rebuilds(expr, module) else None
    if children:
        return None
    text = repr(module)
    if "\n" in text:
        return None
    expr = f"torch.nn.{text}"
    if _rebuilds(expr, module):
        return expr
    dtypes = {t.dtype for t in module.state_dict().values() if isinstance(t, torch.Tensor)}
    if len(dtypes) == 1 and expr.endswith(")"):
        dtype = dtypes.pop()
        sep = "" if expr.endswith("()") else ", "
        with_dtype = f"{expr[:-1]}{sep}dtype=torch.{str(dtype).removeprefix('torch.')})"
        if _rebuilds(with_dtype, module):
            return with_dtype
    return None


def _rebuilds(expr: str, module: torch.nn.Module) -> bool:
    try:
        with torch.device("meta"):
            built = eval(expr, {"torch": torch, "inf": math.inf, "nan": math.nan})
    except Exception:
        return False
    if not isinstance(built, torch.nn.Module):
        return False
    return Schema.from_module(built).same_layout(Schema.from_module(module)) and list(
        built.state_dict()
    ) == list(module.state_dict())


def _order_renames(renames: list[tuple[str, str]], existing: set[str]) -> list[tuple[str, str]]:
    """Order key renames so no target is taken when it runs; break swaps with a temporary."""
    pending = list(renames)
    out: list[tuple[str, str]] = []
    occupied = set(existing)
    while pending:
        for i, (src, dst) in enumerate(pending):
            if dst not in occupied or dst == src:
                out.append((src, dst))
                occupied.discard(src)
                occupied.add(dst)
                del pending[i]
                break
        else:  # a cycle: park one source under a temporary name
            src, dst = pending.pop(0)
            tmp = src + ".__ckptmigrate_tmp"
            out.append((src, tmp))
            occupied.discard(src)
            occupied.add(tmp)
            pending.append((tmp, dst))
    return out


def diff_ops(head: Schema, target: Schema, model: torch.nn.Module | None = None) -> list[Op]:
    """Operations turning a checkpoint with schema ``head`` into one with ``target``.

    In the order a person would look: renamed subtrees and keys, fused and
    unfused tensors, renamed modules whose size changed; only what none of
    these explains is dropped (marked, with what it throws away) or added.
    """
    removed = {k: head[k] for k in head if k not in target}
    added = {k: target[k] for k in target if k not in head}
    changed = {k for k in head if k in target and not head[k].same_layout(target[k])}
    # "old side" candidates for renames: removed keys, and changed keys' old layouts
    old_side = {**removed, **{k: head[k] for k in changed}}
    under = PrefixIndex(head) if removed or changed else PrefixIndex()
    ops: list[Op] = []

    def moved_away(k: str) -> None:
        """``k`` was renamed; if the model still has ``k`` in a new layout, that is an addition."""
        old_side.pop(k, None)
        removed.pop(k, None)
        if k in changed:
            changed.discard(k)
            added[k] = target[k]

    # 1. whole subtrees renamed
    reappearing = {k: target[k] for k in changed}
    for pa, pb, moved in _subtree_renames(head, under, old_side, added, reappearing):
        ops.append(
            Op(
                "rename_prefix",
                (pa, pb),
                review="guessed rename: same keys, shapes and dtypes",
                inverse=[Op("rename_prefix", (pb, pa))],
            )
        )
        for k in moved:
            added.pop(pb + k[len(pa) :])
            moved_away(k)

    # 2. single keys renamed
    key_renames = likely_renames(old_side, added)
    for o, n in _order_renames(key_renames, set(head)):
        ops.append(
            Op(
                "rename_key",
                (o, n),
                review="guessed rename: same shape and dtype, similar name"
                if not n.endswith(".__ckptmigrate_tmp")
                else None,
                inverse=[Op("rename_key", (n, o))],
            )
        )
    for o, n in key_renames:
        added.pop(n, None)
        moved_away(o)

    # 3. one tensor cut into several, and several joined into one
    for f in find_fused(removed, added):
        ops.append(_fuse_op(f, split=True))
        del removed[f.whole]
        for p in f.parts:
            del added[p]
    for f in find_fused(added, removed):
        ops.append(_fuse_op(f, split=False))
        del added[f.whole]
        for p in f.parts:
            del removed[p]

    # 4. renamed modules whose tensors changed size
    for (pa, old), (pb, new) in _resized_renames(removed, added):
        ops.extend(_rename_and_resize(head, target, under, (pa, old), (pb, new)))
        for k in old.values():
            del removed[k]
        for k in new.values():
            del added[k]

    # 5. drops of what is left, as whole subtrees where possible
    ops.extend(_drops(head, under, removed))

    # 6. tensors whose shape or dtype changed
    for key in [k for k in head if k in changed]:
        was, now = head[key].spec, target[key].spec
        if was is None or now is None:
            ops.append(Op("drop_key", (key,), review=_discards([head[key]]), inverse=[]))
            added[key] = target[key]
            continue
        if was.dtype != now.dtype:
            ops.append(
                Op(
                    "cast",
                    (key, now.dtype),
                    review=f"dtype changed from {_dt(was)}",
                    inverse=[Op("cast", (key, was.dtype))],
                )
            )
        if was.shape != now.shape:
            ops.extend(_shape_change(key, was, now))

    # 7. additions, whole new submodules as one add_module
    ops.extend(_additions(added, model))
    return ops


def _subtree_renames(
    head: Schema,
    under: PrefixIndex,
    old_side: dict[str, Entry],
    added: dict[str, Entry],
    reappearing: dict[str, Entry],
) -> list[tuple[str, str, list[str]]]:
    """(old prefix, new prefix, keys moved): subtrees whose keys, shapes and dtypes all moved.

    Prefix pairs are found through shared key tails; the pair most keys
    support wins. When several new prefixes fit one old one equally (an
    ``out_proj`` that could be ``q``, ``k``, ``v`` or ``o``), or several old
    ones one new one, the names decide, and if they cannot, there is no
    guess. A moved key in ``reappearing`` is free again, in its new layout,
    for the next rename (``fc2`` -> ``fc3``, then ``fc1`` -> ``fc2``).
    """
    old_side, added = dict(old_side), dict(added)
    ambiguous: set[str] = set()
    found: list[tuple[str, str, list[str]]] = []
    while True:
        index = TailIndex(added)
        support: dict[str, dict[str, int]] = {}
        for o, oe in old_side.items():
            tail, cands = index.candidates(o, oe)
            if not tail or len(cands) > MAX_CANDIDATES:
                continue
            for a in cands:
                pa, pb = o[: -len(tail)], a[: -len(tail)]
                if pa not in ambiguous:
                    to = support.setdefault(pa, {})
                    to[pb] = to.get(pb, 0) + 1
        # every pair that fits: all keys under the old prefix reappear, same layout
        fits: dict[str, list[str]] = {}
        for pa, counts in support.items():
            moved = under.under(pa)
            if len(moved) < 2 or not all(k in old_side for k in moved):
                continue
            ok = [
                pb
                for pb in counts
                if all(
                    pb + k[len(pa) :] in added and added[pb + k[len(pa) :]].same_layout(head[k])
                    for k in moved
                )
            ]
            if ok:
                fits[pa] = ok
        rivals: dict[str, list[str]] = {}
        for pa, pbs in fits.items():
            for pb in pbs:
                rivals.setdefault(pb, []).append(pa)
        # every old prefix whose names agree with a free new one, all in one pass
        batch: list[tuple[str, str, list[str]]] = []
        taken: set[str] = set()
        for pa in sorted(fits, key=lambda p: (-max(support[p].values()), len(p), p)):
            to_pb = _by_name(pa, fits[pa])
            back = _by_name(to_pb, rivals[to_pb]) if to_pb is not None else None
            if to_pb is None or back is None:
                ambiguous.add(pa)
                continue
            if back != pa:  # the rival that names it better takes it
                continue
            moved = under.under(pa)
            targets = [to_pb + k[len(pa) :] for k in moved]
            if taken.intersection(moved) or taken.intersection(targets):
                continue  # inside a subtree this pass already moves
            taken.update(moved + targets)
            batch.append((pa, to_pb, moved))
        if not batch:
            return found
        for pa, pb, moved in batch:
            found.append((pa, pb, moved))
            for k in moved:
                old_side.pop(k)
                added.pop(pb + k[len(pa) :])
                if k in reappearing:
                    added[k] = reappearing[k]


def _by_name(prefix: str, options: list[str]) -> str | None:
    """The option whose name is closest to ``prefix``; None when the names cannot tell."""
    if len(options) == 1:
        return options[0]
    names = {o.removesuffix("."): o for o in options}
    pick = best_match(
        prefix.removesuffix("."), list(names), similarity=path_similarity, threshold=0.0
    )
    return names[pick[0]] if pick is not None else None


def _fuse_op(f: Fused, *, split: bool) -> Op:
    """``split`` of the whole into its parts (unfuse), or ``concat`` of the parts into it."""
    cut: dict[str, object] = {"into": list(f.parts)}
    join: dict[str, object] = {"into": f.whole}
    if f.dim:
        cut["dim"] = join["dim"] = f.dim
    if not f.equal:
        cut["sizes"] = list(f.sizes)
    ops = Op("split", (f.whole,), cut), Op("concat", (list(f.parts),), join)
    op, inverse = ops if split else ops[::-1]
    what = "split" if split else "fusion"
    op.review = f"guessed {what}: sizes add up along dim {f.dim}; parts ordered " + ", ".join(
        f.labels
    )
    op.inverse = [inverse]
    return op


def _groups(entries: dict[str, Entry]) -> dict[str, dict[str, str]]:
    """Keys by module: ``lm_head.`` -> {weight: lm_head.weight, ...}; a top-level key alone."""
    out: dict[str, dict[str, str]] = {}
    for key, entry in entries.items():
        if entry.spec is None:
            continue
        if "." in key:
            parent, tail = key.rsplit(".", 1)
            out.setdefault(parent + ".", {})[tail] = key
        else:
            out[key] = {"": key}
    return out


def _resizable(old: TensorSpec, new: TensorSpec) -> bool:
    """Same dtype and rank, and different sizes along one dim at most: a resize keeps the rest."""
    return (
        old.dtype == new.dtype
        and len(old.shape) == len(new.shape)
        and sum(a != b for a, b in zip(old.shape, new.shape)) <= 1
    )


def _resized_renames(
    removed: dict[str, Entry], added: dict[str, Entry]
) -> list[tuple[Group, Group]]:
    """Pairs (old module, new module) with the same tensors, some resized.

    ``lm_head`` [100, 16] + [100] and ``out`` [128, 16] + [128] are one
    module renamed with a wider vocabulary. A module that is the only fit,
    and fits nothing else, is taken on its structure; among several fits the
    names decide. A single top-level tensor needs a similar name.
    """
    olds, news = _groups(removed), _groups(added)

    def signature(group: dict[str, str], entries: dict[str, Entry]) -> tuple[object, ...]:
        specs = {t: entries[k].spec for t, k in group.items()}
        return tuple(sorted((t, str(s.dtype), len(s.shape)) for t, s in specs.items() if s))

    by_sig: dict[tuple[object, ...], list[str]] = {}
    for name, group in news.items():
        by_sig.setdefault(signature(group, added), []).append(name)
    near: PrefixIndex | None = None
    fits: dict[str, list[str]] = {}
    wanted: dict[str, int] = {}
    for name, group in olds.items():
        cands = by_sig.get(signature(group, removed), [])
        if len(cands) > MAX_CANDIDATES:  # every layer has one: look in the same layer
            near = near or PrefixIndex(news)
            cands = near.nearest(name.removesuffix("."), set(cands).__contains__)
            if len(cands) > MAX_CANDIDATES:
                continue
        fits[name] = [
            c
            for c in cands
            if (c.endswith(".") == name.endswith("."))
            and all(_resizable(_spec(removed, group[t]), _spec(added, news[c][t])) for t in group)
        ]
        for c in fits[name]:
            wanted[c] = wanted.get(c, 0) + 1
    picks: list[tuple[float, str, str]] = []
    for name, cands in fits.items():
        module = name.endswith(".")
        alone = len(cands) == 1 and wanted[cands[0]] == 1
        if module and alone:
            picks.append((1.0, name, cands[0]))
            continue
        pick = best_match(
            name.removesuffix("."),
            [c.removesuffix(".") for c in cands],
            similarity=path_similarity if module else name_similarity,
            threshold=LOOSE if module else SIMILAR,
        )
        if pick is not None:
            picks.append((pick[1], name, pick[0] + ("." if module else "")))
    out = []
    taken: set[str] = set()
    for _score, name, new in sorted(picks, key=lambda p: (-p[0], p[1])):
        if new not in taken:
            taken.add(new)
            out.append(((name, olds[name]), (new, news[new])))
    return out


def _spec(entries: dict[str, Entry], key: str) -> TensorSpec:
    spec = entries[key].spec
    assert spec is not None
    return spec


def _rename_and_resize(
    head: Schema, target: Schema, under: PrefixIndex, old: Group, new: Group
) -> list[Op]:
    """A module renamed (one rename_prefix where it moves whole), then each tensor resized."""
    (pa, olds), (pb, news) = old, new
    ops: list[Op] = []
    resized = any(head[olds[t]].spec != target[news[t]].spec for t in olds)
    why = "guessed rename: same keys, " + (
        "a change of size" if resized else "same shapes and dtypes"
    )
    whole = pa.endswith(".") and sorted(under.under(pa)) == sorted(olds.values())
    pairs = [(pa, pb)] if whole else [(olds[t], news[t]) for t in olds]
    name = "rename_prefix" if whole else "rename_key"
    for a, b in pairs:
        ops.append(Op(name, (a, b), review=why, inverse=[Op(name, (b, a))]))
    for t in olds:
        was, now = head[olds[t]].spec, target[news[t]].spec
        assert was is not None and now is not None
        if was != now:
            ops.extend(_shape_change(news[t], was, now))
    return ops


def _drops(head: Schema, under: PrefixIndex, removed: dict[str, Entry]) -> list[Op]:
    """``drop_prefix`` for whole removed subtrees, else ``drop_key``; each says what it discards."""
    drops: list[Op] = []
    done: set[str] = set()
    for key in list(removed):
        if key in done:
            continue
        chosen = None
        for prefix in reversed(ancestors(key)[:-1]):  # shallowest first
            keys = under.under(prefix)
            if len(keys) >= 2 and all(k in removed for k in keys):
                chosen = (prefix, keys)
                break
        if chosen is not None:
            prefix, keys = chosen
            drops.append(
                Op(
                    "drop_prefix",
                    (prefix,),
                    review=_discards([head[k] for k in keys]),
                    inverse=[_restore(k, head[k]) for k in keys if head[k].spec is not None],
                )
            )
            done.update(keys)
        else:
            inv = [_restore(key, head[key])] if head[key].spec is not None else []
            drops.append(Op("drop_key", (key,), review=_discards([head[key]]), inverse=inv))
            done.add(key)
    return drops


def _restore(key: str, entry: Entry) -> Op:
    return _add_tensor(key, entry, "dropped values cannot be restored; re-initialised")


def _discards(entries: list[Entry]) -> str:
    """The review note of a drop: what trained values it throws away."""
    tensors = [e.spec for e in entries if e.spec is not None]
    others = len(entries) - len(tensors)
    values = count(sum(s.numel for s in tensors))
    if len(entries) == 1 and tensors:
        what = f"[{', '.join(map(str, tensors[0].shape))}] ({values} values)"
    elif tensors:
        what = f"{len(tensors)} tensor{'s' if len(tensors) != 1 else ''}, {values} values"
        if others:
            what += f" and {others} other entr{'ies' if others != 1 else 'y'}"
    else:
        what = f"{others} non-tensor entr{'ies' if others != 1 else 'y'}"
    return f"discards trained values: {what}"


def _additions(added: dict[str, Entry], model: torch.nn.Module | None) -> list[Op]:
    """New tensors: a whole new submodule as one add_module, the rest as add_tensor."""
    ops: list[Op] = []
    added = dict(added)
    if model is not None and added:
        for name, module in sorted(model.named_modules(), key=lambda nm: nm[0].count(".")):
            if not name:
                continue
            keys = [k for k in added if k.startswith(name + ".")]
            sub_keys = list(module.state_dict(prefix=name + "."))
            if not keys or sorted(keys) != sorted(sub_keys):
                continue
            expr = module_expr(module)
            if expr is None:
                continue
            ops.append(
                Op("add_module", (name, _Expr(expr)), inverse=[Op("drop_prefix", (name + ".",))])
            )
            for k in keys:
                added.pop(k)
    for key, entry in added.items():
        if entry.spec is None:
            continue
        op = _add_tensor(key, entry, "initialisation guessed")
        op.inverse = [Op("drop_key", (key,))]
        ops.append(op)
    return ops


def _dt(spec: TensorSpec) -> str:
    return str(spec.dtype).removeprefix("torch.")


def _shape_change(key: str, old: TensorSpec, new: TensorSpec) -> list[Op]:
    was = f"[{', '.join(map(str, old.shape))}]"
    if old.numel == new.numel:
        return [
            Op(
                "reshape",
                (key, tuple(new.shape)),
                review=f"shape changed from {was}; same elements",
                inverse=[Op("reshape", (key, tuple(old.shape)))],
            )
        ]
    if len(old.shape) == len(new.shape):
        kept = 1
        for o, n in zip(old.shape, new.shape):
            kept *= min(o, n)
        notes = []
        if old.numel > kept:
            notes.append(f"discards {count(old.numel - kept)} trained values (cut to the new size)")
        if any(n > o for n, o in zip(new.shape, old.shape)):
            notes.append("new entries start at zeros")
        return [
            Op(
                "resize",
                (key, tuple(new.shape)),
                review=f"shape changed from {was}; " + "; ".join(notes),
                inverse=[Op("resize", (key, tuple(old.shape)))],
            )
        ]
    entry_new = Entry(new, "tensor")
    drop = Op(
        "drop_key",
        (key,),
        review=f"shape changed from {was} to another rank; {_discards([Entry(old)])}",
    )
    add = _add_tensor(key, entry_new, "re-initialised after a change of rank")
    drop.inverse = []
    add.inverse = [Op("drop_key", (key,)), _add_tensor(key, Entry(old, "tensor"), "re-initialised")]
    return [drop, add]


class _Expr(str):
    """Source code to render verbatim (not as a string literal)."""
