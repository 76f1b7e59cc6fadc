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

from ..plan.discards import count
from ..plan.nodes import TensorSpec
from ..schema import Entry, PrefixIndex, Schema, ancestors, likely_renames
from .fuse import Fused, find_fused
from .renames import TEMPORARY, Group, order_renames, resized_renames, subtree_renames


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
    if isinstance(module, torch.nn.Sequential | torch.nn.ModuleList):
        return _container_expr(module)
    if next(module.children(), None) is not None:
        return None
    return _leaf_expr(module)


def _container_expr(module: torch.nn.Sequential | torch.nn.ModuleList) -> str | None:
    parts = [module_expr(child) for child in module.children()]
    if any(p is None for p in parts):
        return None
    inner = ", ".join(p for p in parts if p is not None)
    expr = (
        f"torch.nn.Sequential({inner})"
        if isinstance(module, torch.nn.Sequential)
        else f"torch.nn.ModuleList([{inner}])"
    )
    return expr if _rebuilds(expr, module) else None


def _leaf_expr(module: torch.nn.Module) -> str | None:
    """The module's repr as a constructor call, with its dtype added when the repr omits it."""
    text = repr(module)
    if "\n" in text:
        return None
    expr = f"torch.nn.{text}"
    if _rebuilds(expr, module):
        return expr
    dtypes = {t.dtype for t in module.state_dict().values() if isinstance(t, torch.Tensor)}
    if len(dtypes) != 1 or not expr.endswith(")"):
        return None
    sep = "" if expr.endswith("()") else ", "
    with_dtype = f"{expr[:-1]}{sep}dtype=torch.{str(dtypes.pop()).removeprefix('torch.')})"
    return with_dtype if _rebuilds(with_dtype, module) else None


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


def diff_ops(head: Schema, target: Schema, model: torch.nn.Module | None = None) -> list[Op]:
    """Operations turning a checkpoint with schema ``head`` into one with ``target``.

    In the order a person would look: renamed subtrees and keys, fused and
    unfused tensors, renamed modules whose size changed; only what none of
    these explains is dropped (marked, with what it throws away) or added.
    """
    return _Comparison(head, target, model).ops()


class _Comparison:
    """What is still unexplained between two schemas, narrowed phase by phase.

    ``removed`` and ``added`` are the keys only one side has, ``changed`` the
    keys both have in different layouts; ``old_side`` holds the candidates
    for a rename (removed keys, and changed keys in their old layout). Each
    phase returns its operations and takes what it explained out of them.
    """

    def __init__(self, head: Schema, target: Schema, model: torch.nn.Module | None) -> None:
        self.head, self.target, self.model = head, target, model
        self.removed = {k: head[k] for k in head if k not in target}
        self.added = {k: target[k] for k in target if k not in head}
        self.changed = {k for k in head if k in target and not head[k].same_layout(target[k])}
        self.old_side = {**self.removed, **{k: head[k] for k in self.changed}}
        self.under = PrefixIndex(head) if self.removed or self.changed else PrefixIndex()

    def ops(self) -> list[Op]:
        phases = (
            self.subtree_renames,
            self.key_renames,
            self.fusions,
            self.resized_renames,
            self.drops,
            self.layout_changes,
            self.additions,
        )
        return [op for phase in phases for op in phase()]

    def _moved_away(self, key: str) -> None:
        """``key`` was renamed; if the model still has ``key``, in a new layout, that is new."""
        self.old_side.pop(key, None)
        self.removed.pop(key, None)
        if key in self.changed:
            self.changed.discard(key)
            self.added[key] = self.target[key]

    def subtree_renames(self) -> list[Op]:
        """Whole subtrees renamed: one ``rename_prefix`` each."""
        reappearing = {k: self.target[k] for k in self.changed}
        moves = subtree_renames(self.head, self.under, self.old_side, self.added, reappearing)
        ops: list[Op] = []
        for pa, pb, moved in moves:
            ops.append(_rename("rename_prefix", pa, pb, "same keys, shapes and dtypes"))
            for k in moved:
                self.added.pop(pb + k[len(pa) :])
                self._moved_away(k)
        return ops

    def key_renames(self) -> list[Op]:
        """Single keys renamed, ordered so that no rename lands on a key still in use."""
        renames = likely_renames(self.old_side, self.added)
        why = "same shape and dtype, similar name"
        ops = [
            _rename("rename_key", o, n, None if n.endswith(TEMPORARY) else why)
            for o, n in order_renames(renames, set(self.head))
        ]
        for o, n in renames:
            self.added.pop(n, None)
            self._moved_away(o)
        return ops

    def fusions(self) -> list[Op]:
        """One tensor cut into several (``split``), then several joined into one (``concat``)."""
        split = _fused(self.removed, self.added, split=True)
        return split + _fused(self.added, self.removed, split=False)

    def resized_renames(self) -> list[Op]:
        """Renamed modules whose tensors changed size: a rename, then each resize."""
        ops: list[Op] = []
        for old, new in resized_renames(self.removed, self.added):
            ops.extend(_rename_and_resize(self.head, self.target, self.under, old, new))
            for k in old[1].values():
                del self.removed[k]
            for k in new[1].values():
                del self.added[k]
        return ops

    def drops(self) -> list[Op]:
        """What is left of the old side: ``drop_prefix`` for whole subtrees, else ``drop_key``.

        Each drop says in its review what trained values it discards.
        """
        ops: list[Op] = []
        done: set[str] = set()
        for key in list(self.removed):
            if key in done:
                continue
            subtree = self._removed_subtree(key)
            prefix, keys = subtree if subtree is not None else (None, [key])
            ops.append(_drop(self.head, keys, prefix))
            done.update(keys)
        return ops

    def _removed_subtree(self, key: str) -> tuple[str, list[str]] | None:
        """The shallowest subtree above ``key`` removed whole (two keys at least), and its keys."""
        for prefix in reversed(ancestors(key)[:-1]):
            keys = self.under.under(prefix)
            if len(keys) >= 2 and all(k in self.removed for k in keys):
                return prefix, keys
        return None

    def layout_changes(self) -> list[Op]:
        """Keys on both sides whose dtype or shape changed."""
        ops: list[Op] = []
        for key in [k for k in self.head if k in self.changed]:
            was, now = self.head[key].spec, self.target[key].spec
            if was is None or now is None:  # to or from a non-tensor: nothing to carry over
                ops.append(Op("drop_key", (key,), review=_discards([self.head[key]]), inverse=[]))
                self.added[key] = self.target[key]
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
        return ops

    def additions(self) -> list[Op]:
        """New tensors: a whole new submodule as one ``add_module``, the rest as ``add_tensor``."""
        ops = self._new_modules()
        for key, entry in self.added.items():
            if entry.spec is not None:
                op = _add_tensor(key, entry, "initialisation guessed")
                op.inverse = [Op("drop_key", (key,))]
                ops.append(op)
        return ops

    def _new_modules(self) -> list[Op]:
        """``add_module`` for each submodule of the model whose keys are all new, outermost first.

        Only modules :func:`module_expr` can rebuild; their keys leave ``added``.
        """
        ops: list[Op] = []
        if self.model is None or not self.added:
            return ops
        for name, module in sorted(self.model.named_modules(), key=lambda nm: nm[0].count(".")):
            keys = [k for k in self.added if k.startswith(name + ".")] if name else []
            if not keys or sorted(keys) != sorted(module.state_dict(prefix=name + ".")):
                continue
            expr = module_expr(module)
            if expr is None:
                continue
            ops.append(
                Op("add_module", (name, _Expr(expr)), inverse=[Op("drop_prefix", (name + ".",))])
            )
            for k in keys:
                self.added.pop(k)
        return ops


def _rename(name: str, old: str, new: str, why: str | None) -> Op:
    """A guessed ``rename_key``/``rename_prefix`` (``why`` makes it likely), and its inverse."""
    review = f"guessed rename: {why}" if why is not None else None
    return Op(name, (old, new), review=review, inverse=[Op(name, (new, old))])


def _fused(wholes: dict[str, Entry], pieces: dict[str, Entry], *, split: bool) -> list[Op]:
    """Each of ``wholes`` that is several of ``pieces`` side by side; both lose what it explains."""
    ops: list[Op] = []
    for f in find_fused(wholes, pieces):
        ops.append(_fuse_op(f, split=split))
        del wholes[f.whole]
        for p in f.parts:
            del pieces[p]
    return ops


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


def _rename_and_resize(
    head: Schema, target: Schema, under: PrefixIndex, old: Group, new: Group
) -> list[Op]:
    """A module renamed (one rename_prefix where it moves whole), then each tensor resized."""
    (pa, olds), (pb, news) = old, new
    resized = any(head[olds[t]].spec != target[news[t]].spec for t in olds)
    why = "same keys, " + ("a change of size" if resized else "same shapes and dtypes")
    whole = pa.endswith(".") and sorted(under.under(pa)) == sorted(olds.values())
    pairs = [(pa, pb)] if whole else [(olds[t], news[t]) for t in olds]
    name = "rename_prefix" if whole else "rename_key"
    ops = [_rename(name, a, b, why) for a, b in pairs]
    for t in olds:
        was, now = head[olds[t]].spec, target[news[t]].spec
        assert was is not None and now is not None
        if was != now:
            ops.extend(_shape_change(news[t], was, now))
    return ops


def _drop(head: Schema, keys: list[str], prefix: str | None) -> Op:
    """``drop_prefix`` of the subtree ``keys``, or ``drop_key`` of the one key; re-added to undo."""
    op = Op("drop_key", (keys[0],)) if prefix is None else Op("drop_prefix", (prefix,))
    op.review = _discards([head[k] for k in keys])
    op.inverse = [_restore(k, head[k]) for k in keys if head[k].spec is not None]
    return op


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
