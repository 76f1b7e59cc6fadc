"""How state-dict key names relate: similarity for rename guesses, order for fused parts.

Model code renames in a few recognisable ways: a word is abbreviated
(``out_proj`` -> ``o_proj`` -> ``o``, ``attention`` -> ``attn``), a synonym
replaces it (``lm_head`` -> ``out``), or a wrapper level comes and goes
(``attn.out_proj`` -> ``o``). So names are compared word by word, not
character by character: ``attn.out_proj`` is closer to ``o`` than to ``q``,
although a shape-only guess cannot tell them apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")

#: Words that name the same part of a model. Kept small: each group is a
#: convention several model families share.
SYNONYMS: tuple[frozenset[str], ...] = (
    frozenset({"head", "out", "output", "classifier", "logits"}),
    frozenset({"proj", "projection"}),
    frozenset({"attn", "attention"}),
    frozenset({"fc", "linear", "dense"}),
    frozenset({"mlp", "ffn", "ff", "feedforward"}),
    frozenset({"norm", "ln", "layernorm"}),
    frozenset({"embed", "embedding", "embeddings", "emb", "wte"}),
)
_SYNONYM: dict[str, frozenset[str]] = {w: g for g in SYNONYMS for w in g}

#: Where a part goes in a fused tensor, by family: query, key, value (then
#: output), as ``nn.MultiheadAttention`` and most fused-qkv layouts
#: concatenate them; gate before up, as fused gate/up projections do.
ROLES: dict[str, tuple[str, int]] = {
    "q": ("attention", 0),
    "query": ("attention", 0),
    "k": ("attention", 1),
    "key": ("attention", 1),
    "v": ("attention", 2),
    "value": ("attention", 2),
    "o": ("attention", 3),
    "out": ("attention", 3),
    "output": ("attention", 3),
    "gate": ("mlp", 0),
    "up": ("mlp", 1),
}


@lru_cache(maxsize=65536)
def words(name: str) -> tuple[str, ...]:
    """Lower-case words: ``attn.out_proj`` -> (attn, out, proj); ``layers.10`` -> (layers, 10)."""
    return tuple(w.lower() for w in _WORD.findall(name))


@lru_cache(maxsize=65536)
def word_match(a: str, b: str) -> float:
    """1 for the same word; less for an abbreviation or a synonym; 0 otherwise."""
    if a == b:
        return 1.0
    if a.isdigit() or b.isdigit():
        return 0.0  # layer 3 is not layer 30
    short, long = sorted((a, b), key=len)
    if long.startswith(short):
        return 0.8  # o ~ out, proj ~ projection
    if _SYNONYM.get(a) is not None and _SYNONYM.get(a) is _SYNONYM.get(b):
        return 0.6  # head ~ out
    if len(short) >= 2 and short[0] == long[0] and _is_subsequence(short, long):
        return 0.6  # attn ~ attention
    for w, other in ((a, b), (b, a)):
        if len(w) == 2 and w[0] == "w" and not w[1].isdigit():
            return 0.9 * word_match(w[1], other)  # wo ~ o_proj: a weight matrix named by role
    return 0.0


def _is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(c in it for c in short)


def path_similarity(a: str, b: str) -> float:
    """How alike two dotted names are, from 0 to 1, by their words.

    Each word of the shorter name is paired with its best unused match in
    the other (in any order: a wrapper level may have moved); the total
    counts like a Dice coefficient, so extra words lower the score.
    Characters do not count: ``attn.out_proj`` shares more letters with
    ``attn_q`` than with ``o``, and is still ``o``.
    """
    wa, wb = words(a), words(b)
    if not wa or not wb:
        return 1.0 if wa == wb else 0.0
    shorter, longer = (wa, wb) if len(wa) <= len(wb) else (wb, wa)
    free = list(longer)
    total = 0.0
    for w in shorter:
        best, at = 0.0, -1
        for i, other in enumerate(free):
            s = word_match(w, other)
            if s > best:
                best, at = s, i
        if at >= 0:
            total += best * _weight(w)
            del free[at]
    return 2 * total / (sum(map(_weight, wa)) + sum(map(_weight, wb)))


def _weight(word: str) -> int:
    """An index counts double: layer 3 renamed is likelier than layer 3 become layer 30."""
    return 2 if word.isdigit() else 1


def name_similarity(a: str, b: str) -> float:
    """Similarity of two keys; nested keys must end alike (a weight is not a bias)."""
    if "." in a and "." in b and a.rsplit(".", 1)[-1] != b.rsplit(".", 1)[-1]:
        return 0.0
    return path_similarity(a, b)


#: A rename guess needs at least this similarity...
SIMILAR = 0.5
#: ...or this much when the structure already points at the only candidate.
LOOSE = 0.3


def best_match(
    name: str,
    candidates: Sequence[str],
    *,
    similarity: Callable[[str, str], float] = name_similarity,
    threshold: float = SIMILAR,
) -> tuple[str, float] | None:
    """(the candidate ``name`` most likely became, its similarity), or None when names cannot tell.

    The best must reach ``threshold`` and beat the runner-up: when the names
    cannot separate them (``out_proj`` between ``lin0`` and ``lin1``) the
    guess would be a coin toss, so none is made.
    """
    if not candidates:
        return None
    scores = {c: similarity(name, c) for c in candidates}
    ranked = sorted(candidates, key=lambda c: (-scores[c], c))
    top = ranked[0]
    if scores[top] < threshold:
        return None
    if len(ranked) > 1 and scores[ranked[1]] >= scores[top]:
        return None
    return top, scores[top]


def kind_word(key: str) -> str:
    """``weight`` or ``bias`` where the name says (``in_proj_weight``, ``q.bias``), else ""."""
    w = words(key.rsplit(".", 1)[-1])
    return w[-1] if w and w[-1] in ("weight", "bias") else ""


def same_kind(a: str, b: str) -> bool:
    """A weight is not a bias; a name that says neither can be either."""
    ka, kb = kind_word(a), kind_word(b)
    return ka == kb or not ka or not kb


def distinguishing(keys: Sequence[str]) -> list[str]:
    """Each key with the dotted head and tail it shares with all the others removed."""
    parts = [k.split(".") for k in keys]
    head = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    return [".".join(p[head : len(p) - tail]) for p in parts]


def role(label: str) -> tuple[str, int] | None:
    """(family, place) of a part by its name (see :data:`ROLES`): ``q``, ``q_proj``, ``wq``..."""
    for w in words(label):
        if w in ROLES:
            return ROLES[w]
        if len(w) == 2 and w[0] == "w" and w[1] in ROLES:
            return ROLES[w[1]]  # wq, wk, wv
    return None


def part_order(keys: Sequence[str]) -> list[str]:
    """The order the parts of a fused tensor go in.

    Parts are told apart by the part of their names they do not share
    (``q``/``k``/``v`` in ``layers.0.q.weight``...). A part whose name has a
    known role goes by that role: query, key, value, output (``q``, ``query``,
    ``q_proj``, ``wq``, ``to_q`` all count as query); gate before up. The
    rest follow, in natural order (``w1`` before ``w2`` before ``w10``).
    """
    labels = dict(zip(keys, distinguishing(keys)))

    def natural(label: str) -> tuple[tuple[int, int | str], ...]:
        return tuple((0, int(w)) if w.isdigit() else (1, w) for w in words(label))

    def sort_key(key: str) -> tuple[int, int, tuple[tuple[int, int | str], ...], str]:
        r = role(labels[key])
        return (0, r[1], (), key) if r is not None else (1, 0, natural(labels[key]), key)

    return sorted(keys, key=sort_key)
