"""Find what moved between two schemas: renamed subtrees, and renamed modules that changed size.

Only guesses are made here, from shapes, dtypes and names; :mod:`.compare`
turns them into operations. Where the evidence cannot tell two candidates
apart, there is no guess, and the keys are left for a drop and an addition.
"""

from __future__ import annotations

from ..names import LOOSE, SIMILAR, best_match, name_similarity, path_similarity
from ..plan.nodes import TensorSpec
from ..schema import MAX_CANDIDATES, Entry, PrefixIndex, Schema, TailIndex

#: A module prefix (or a top-level key) and its tensors, tail -> key.
Group = tuple[str, dict[str, str]]
#: (old prefix, new prefix, the old keys it moves).
Move = tuple[str, str, list[str]]
#: A suffix a key is parked under while a cycle of renames is broken.
TEMPORARY = ".__ckptmigrate_tmp"


def order_renames(renames: list[tuple[str, str]], existing: set[str]) -> list[tuple[str, str]]:
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
            tmp = src + TEMPORARY
            out.append((src, tmp))
            occupied.discard(src)
            occupied.add(tmp)
            pending.append((tmp, dst))
    return out


def subtree_renames(
    head: Schema,
    under: PrefixIndex,
    old_side: dict[str, Entry],
    added: dict[str, Entry],
    reappearing: dict[str, Entry],
) -> list[Move]:
    """Subtrees whose keys, shapes and dtypes all moved, found pass after pass.

    Prefix pairs are found through shared key tails; the pair most keys
    support wins. When several new prefixes fit one old one equally (an
    ``out_proj`` that could be ``q``, ``k``, ``v`` or ``o``), or several old
    ones one new one, the names decide, and if they cannot, there is no
    guess. A moved key in ``reappearing`` is free again, in its new layout,
    for the next rename (``fc2`` -> ``fc3``, then ``fc1`` -> ``fc2``).
    """
    old_side, added = dict(old_side), dict(added)
    ambiguous: set[str] = set()
    found: list[Move] = []
    while True:
        support = _prefix_support(old_side, added, ambiguous)
        fits = _whole_fits(head, under, support, old_side, added)
        batch = _agreed_moves(under, support, fits, ambiguous)
        if not batch:
            return found
        for pa, pb, moved in batch:
            found.append((pa, pb, moved))
            for k in moved:
                old_side.pop(k)
                added.pop(pb + k[len(pa) :])
                if k in reappearing:
                    added[k] = reappearing[k]


def _prefix_support(
    old_side: dict[str, Entry], added: dict[str, Entry], ambiguous: set[str]
) -> dict[str, dict[str, int]]:
    """old prefix -> new prefix -> how many keys with a shared tail (and layout) say so."""
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
    return support


def _whole_fits(
    head: Schema,
    under: PrefixIndex,
    support: dict[str, dict[str, int]],
    old_side: dict[str, Entry],
    added: dict[str, Entry],
) -> dict[str, list[str]]:
    """Every pair that fits: all keys under the old prefix reappear under the new, same layout."""
    fits: dict[str, list[str]] = {}
    for pa, counts in support.items():
        moved = under.under(pa)
        if len(moved) < 2 or not all(k in old_side for k in moved):
            continue
        ok = [pb for pb in counts if _moves_whole(head, moved, pa, pb, added)]
        if ok:
            fits[pa] = ok
    return fits


def _moves_whole(head: Schema, moved: list[str], pa: str, pb: str, added: dict[str, Entry]) -> bool:
    targets = (pb + k[len(pa) :] for k in moved)
    return all(t in added and added[t].same_layout(head[k]) for t, k in zip(targets, moved))


def _agreed_moves(
    under: PrefixIndex,
    support: dict[str, dict[str, int]],
    fits: dict[str, list[str]],
    ambiguous: set[str],
) -> list[Move]:
    """Every old prefix whose names agree with a free new one, all in one pass.

    An old prefix the names cannot place is added to ``ambiguous``, so the
    next pass does not count it again.
    """
    rivals: dict[str, list[str]] = {}
    for pa, pbs in fits.items():
        for pb in pbs:
            rivals.setdefault(pb, []).append(pa)
    batch: list[Move] = []
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
    return batch


def _by_name(prefix: str, options: list[str]) -> str | None:
    """The option whose name is closest to ``prefix``; None when the names cannot tell."""
    if len(options) == 1:
        return options[0]
    names = {o.removesuffix("."): o for o in options}
    pick = best_match(
        prefix.removesuffix("."), list(names), similarity=path_similarity, threshold=0.0
    )
    return names[pick[0]] if pick is not None else None


def resized_renames(
    removed: dict[str, Entry], added: dict[str, Entry]
) -> list[tuple[Group, Group]]:
    """Pairs (old module, new module) with the same tensors, some resized.

    ``lm_head`` [100, 16] + [100] and ``out`` [128, 16] + [128] are one
    module renamed with a wider vocabulary. A module that is the only fit,
    and fits nothing else, is taken on its structure; among several fits the
    names decide. A single top-level tensor needs a similar name.
    """
    olds, news = _groups(removed), _groups(added)
    fits = _resizable_fits(olds, news, removed, added)
    wanted: dict[str, int] = {}
    for cands in fits.values():
        for c in cands:
            wanted[c] = wanted.get(c, 0) + 1
    picks = [p for name, cands in fits.items() if (p := _pick(name, cands, wanted)) is not None]
    out = []
    taken: set[str] = set()
    for _score, name, new in sorted(picks, key=lambda p: (-p[0], p[1])):
        if new not in taken:
            taken.add(new)
            out.append(((name, olds[name]), (new, news[new])))
    return out


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


def _signature(group: dict[str, str], entries: dict[str, Entry]) -> tuple[object, ...]:
    """What a resize keeps: each tensor's tail, dtype and rank."""
    specs = {t: entries[k].spec for t, k in group.items()}
    return tuple(sorted((t, str(s.dtype), len(s.shape)) for t, s in specs.items() if s))


def _resizable_fits(
    olds: dict[str, dict[str, str]],
    news: dict[str, dict[str, str]],
    removed: dict[str, Entry],
    added: dict[str, Entry],
) -> dict[str, list[str]]:
    """old group -> the new groups it could have become by resizing."""
    by_sig: dict[tuple[object, ...], list[str]] = {}
    for name, group in news.items():
        by_sig.setdefault(_signature(group, added), []).append(name)
    near: PrefixIndex | None = None
    fits: dict[str, list[str]] = {}
    for name, group in olds.items():
        cands = by_sig.get(_signature(group, removed), [])
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
    return fits


def _pick(name: str, cands: list[str], wanted: dict[str, int]) -> tuple[float, str, str] | None:
    """(score, old, new): the candidate ``name`` most likely became, None when none is likely."""
    module = name.endswith(".")
    if module and len(cands) == 1 and wanted[cands[0]] == 1:
        return 1.0, name, cands[0]
    pick = best_match(
        name.removesuffix("."),
        [c.removesuffix(".") for c in cands],
        similarity=path_similarity if module else name_similarity,
        threshold=LOOSE if module else SIMILAR,
    )
    if pick is None:
        return None
    return pick[1], name, pick[0] + ("." if module else "")


def _resizable(old: TensorSpec, new: TensorSpec) -> bool:
    """Same dtype and rank, and different sizes along one dim at most: a resize keeps the rest."""
    return (
        old.dtype == new.dtype
        and len(old.shape) == len(new.shape)
        and sum(a != b for a, b in zip(old.shape, new.shape)) <= 1
    )


def _spec(entries: dict[str, Entry], key: str) -> TensorSpec:
    spec = entries[key].spec
    assert spec is not None
    return spec
