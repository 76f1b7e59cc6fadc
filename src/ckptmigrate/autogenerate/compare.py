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

from ..plan.nodes import TensorSpec
from ..schema import MAX_CANDIDATES, Entry, Schema, TailIndex, likely_renames


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
    """Operations turning a checkpoint with schema ``head`` into one with ``target``."""
    removed = {k: head[k] for k in head if k not in target}
    added = {k: target[k] for k in target if k not in head}
    changed = {k for k in head if k in target and not head[k].same_layout(target[k])}
    # "old side" candidates for renames: removed keys, and changed keys' old layouts
    old_side = {**removed, **{k: head[k] for k in changed}}
    ops: list[Op] = []

    # 1. whole subtrees renamed
    while True:
        index = TailIndex(added)
        support: dict[tuple[str, str], int] = {}
        for o, oe in old_side.items():
            tail, cands = index.candidates(o, oe)
            if not tail or len(cands) > MAX_CANDIDATES:
                continue
            for a in cands:
                pair = (o[: -len(tail)], a[: -len(tail)])
                support[pair] = support.get(pair, 0) + 1
        best = None
        for (pa, pb), _count in sorted(support.items(), key=lambda kv: (-kv[1], len(kv[0][0]))):
            moved = [k for k in head if k.startswith(pa)]
            if len(moved) < 2 or not all(k in old_side for k in moved):
                continue
            if all(
                pb + k[len(pa) :] in added and added[pb + k[len(pa) :]].same_layout(head[k])
                for k in moved
            ):
                best = (pa, pb, moved)
                break
        if best is None:
            break
        pa, pb, moved = best
        ops.append(
            Op(
                "rename_prefix",
                (pa, pb),
                review="guessed rename: same keys, shapes and dtypes",
                inverse=[Op("rename_prefix", (pb, pa))],
            )
        )
        for k in moved:
            new = pb + k[len(pa) :]
            old_side.pop(k)
            added.pop(new)
            removed.pop(k, None)
            if k in changed:  # the old tensor moved away; the new layout is an addition
                changed.discard(k)
                added[k] = target[k]

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
        old_side.pop(o, None)
        added.pop(n, None)
        removed.pop(o, None)
        if o in changed:
            changed.discard(o)
            added[o] = target[o]

    # 3. drops, as whole subtrees where possible
    drops: list[Op] = []
    done: set[str] = set()
    for key in list(removed):
        if key in done:
            continue
        parts = key.split(".")
        chosen = None
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            under = [k for k in head if k.startswith(prefix)]
            if len(under) >= 2 and all(k in removed for k in under):
                chosen = (prefix, under)
                break
        if chosen is not None:
            prefix, under = chosen
            drops.append(
                Op(
                    "drop_prefix",
                    (prefix,),
                    inverse=[
                        _add_tensor(k, head[k], "dropped values cannot be restored; re-initialised")
                        for k in under
                        if head[k].spec is not None
                    ],
                )
            )
            done.update(under)
        else:
            inv = (
                [_add_tensor(key, head[key], "dropped values cannot be restored; re-initialised")]
                if head[key].spec is not None
                else []
            )
            drops.append(Op("drop_key", (key,), inverse=inv))
            done.add(key)
    ops.extend(drops)

    # 4. tensors whose shape or dtype changed
    for key in [k for k in head if k in changed]:
        was, now = head[key].spec, target[key].spec
        if was is None or now is None:
            ops.append(Op("drop_key", (key,), inverse=[]))
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

    # 5. additions, whole new submodules as one add_module
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
        grows = any(n > o for n, o in zip(new.shape, old.shape))
        note = f"shape changed from {was}; " + (
            "new entries start at zeros" if grows else "entries beyond the new size are cut"
        )
        return [
            Op(
                "resize",
                (key, tuple(new.shape)),
                review=note,
                inverse=[Op("resize", (key, tuple(old.shape)))],
            )
        ]
    entry_new = Entry(new, "tensor")
    drop = Op(
        "drop_key", (key,), review=f"shape changed from {was} to another rank; old values dropped"
    )
    add = _add_tensor(key, entry_new, "re-initialised after a change of rank")
    drop.inverse = []
    add.inverse = [Op("drop_key", (key,)), _add_tensor(key, Entry(old, "tensor"), "re-initialised")]
    return [drop, add]


class _Expr(str):
    """Source code to render verbatim (not as a string literal)."""
