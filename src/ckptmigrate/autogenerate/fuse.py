"""Find fused tensors: one removed tensor that is several added ones side by side, or the reverse.

``nn.MultiheadAttention``'s ``in_proj_weight`` [48, 16] is ``q``, ``k`` and
``v`` [16, 16] stacked along dim 0; a fused ``gate_up_proj`` is ``gate`` and
``up``. When a model moves between the two layouts, the sizes tell which
tensors belong together (same dtype, same other dims, sizes adding up) and
the names tell the order (see :func:`ckptmigrate.names.part_order`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from ..names import distinguishing, part_order, role, same_kind
from ..schema import NEAR_LIMIT, Entry, PrefixIndex, ancestors

#: At most this many candidate parts, and parts per fused tensor.
MAX_PARTS_SEARCHED = 12
MAX_PARTS = 8


@dataclass(frozen=True)
class Fused:
    """``whole`` is ``parts`` (in order) concatenated along ``dim``."""

    whole: str
    parts: list[str]
    dim: int
    sizes: list[int]

    @property
    def equal(self) -> bool:
        return len(set(self.sizes)) == 1

    @property
    def labels(self) -> list[str]:
        return distinguishing(self.parts)


def find_fused(wholes: Mapping[str, Entry], pieces: Mapping[str, Entry]) -> list[Fused]:
    """Each tensor of ``wholes`` that is several tensors of ``pieces`` side by side.

    A piece belongs to one whole at most; the pieces are looked for nearest
    the whole first (its own module, then the one above, ...), so layer 3's
    fused tensor is matched with layer 3's parts.
    """
    found: list[Fused] = []
    if not wholes or len(pieces) < 2:
        return found
    pool = dict(pieces)
    index = PrefixIndex(pool)
    smallest = _smallest_sizes(pool)
    for key, entry in wholes.items():
        if not _could_be_cut(entry, smallest):
            continue
        match = _parts_of(key, entry, pool, index)
        if match is None:
            continue
        found.append(match)
        for part in match.parts:
            del pool[part]
            index.remove(part)
    return found


Slot = tuple[object, int, tuple[int, ...]]  # dtype, dim, the other dims


def _slots(shape: tuple[int, ...], dtype: object) -> list[Slot]:
    return [(dtype, d, shape[:d] + shape[d + 1 :]) for d in range(len(shape))]


def _smallest_sizes(pool: Mapping[str, Entry]) -> dict[Slot, int]:
    """For each way a piece could sit in a whole, its smallest size along that dim."""
    out: dict[Slot, int] = {}
    for entry in pool.values():
        if entry.spec is not None:
            for d, slot in enumerate(_slots(entry.spec.shape, entry.spec.dtype)):
                out[slot] = min(out.get(slot, entry.spec.shape[d]), entry.spec.shape[d])
    return out


def _could_be_cut(entry: Entry, smallest: Mapping[Slot, int]) -> bool:
    """A quick no: some piece fits along some dim and is smaller than the whole there."""
    spec = entry.spec
    if spec is None:
        return False
    slots = _slots(spec.shape, spec.dtype)
    return any(smallest.get(slot, spec.shape[d]) < spec.shape[d] for d, slot in enumerate(slots))


def _parts_of(
    key: str, entry: Entry, pool: Mapping[str, Entry], index: PrefixIndex
) -> Fused | None:
    spec = entry.spec
    if spec is None or not spec.shape:
        return None
    for prefix in ancestors(key):
        if index.count(prefix) > NEAR_LIMIT:
            return None
        near = []
        for k in index.under(prefix):
            s = pool[k].spec
            same = s is not None and s.dtype == spec.dtype and len(s.shape) == len(spec.shape)
            if s is not None and same and same_kind(k, key):
                near.append((k, s.shape))
        for dim, total in enumerate(spec.shape):
            cands = [
                k
                for k, shape in near
                if 0 < shape[dim] < total
                and all(a == b for i, (a, b) in enumerate(zip(shape, spec.shape)) if i != dim)
            ]
            sizes = {k: shape[dim] for k, shape in near}
            chosen = _choose(cands, sizes, total)
            if chosen is not None:
                parts = part_order(chosen)
                return Fused(key, parts, dim, [sizes[p] for p in parts])
    return None


def _choose(cands: Sequence[str], sizes: Mapping[str, int], total: int) -> list[str] | None:
    """The one set of candidates whose sizes add up to ``total``, best named first.

    Several sets can fit (q, k, v, o are all [16, 16]; any three make 48):
    the set with more roles of one family wins (q, k, v over gate, k, v),
    then the one with the earlier roles (q, k, v over k, v, o). A tie is no
    guess.
    """
    if len(cands) < 2 or len(cands) > MAX_PARTS_SEARCHED:
        return None
    best: tuple[int, int] | None = None
    choice: list[str] | None = None
    tied = False
    for r in range(2, min(len(cands), MAX_PARTS) + 1):
        for combo in combinations(cands, r):
            if sum(sizes[c] for c in combo) != total:
                continue
            score = _roles_score(combo)
            if best is None or score > best:
                best, choice, tied = score, list(combo), False
            elif score == best:
                tied = True
    return None if tied else choice


def _roles_score(parts: Sequence[str]) -> tuple[int, int]:
    """(how many distinct roles of one family the parts have, minus the sum of their places)."""
    found = [r for r in (role(label) for label in distinguishing(parts)) if r is not None]
    best = (0, 0)
    for family in {f for f, _ in found}:
        places = {p for f, p in found if f == family}
        best = max(best, (len(places), -sum(places)))
    return best
