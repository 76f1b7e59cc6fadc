"""Renames: entries move to new keys, and no tensor data is read or copied."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from ..checks import OpContext
from ..registry import OpCall, Operation, SpecOf, register


class _Swappable(Operation):
    """A rename from ``old`` to ``new``, undone by the same op from ``new`` to ``old``."""

    touches_data = False

    def inverse(self, call: OpCall, before: SpecOf) -> list[OpCall]:
        a = self.arguments(call)
        return [OpCall(self.name, (a["new"], a["old"]))]


@register
class RenameKey(_Swappable):
    """Move the tensor at ``old`` to ``new`` (no data is copied)."""

    name = "rename_key"

    def record(self, ctx: OpContext, old: str, new: str) -> None:
        call = ctx.call(self, old, new)
        ctx.need(call, old, tensor=False)
        if new == old:
            return ctx.done(self, call, [new])
        ctx.free(call, new)
        ctx.state.replace_keys({old: new})
        ctx.done(self, call, [new], [old])


def _rename_many(ctx: OpContext, call: str, mapping: dict[str, str]) -> None:
    """Rename several keys at once; no two may meet, nor land on a key that stays."""
    new_keys = set(mapping.values())
    met = len(new_keys) != len(mapping)
    taken = (new_keys & ctx.state.entries.keys()) - mapping.keys()
    if not met and not taken and "" not in new_keys:
        return ctx.state.replace_keys(mapping)  # checked in bulk: the usual case
    targets: dict[str, str] = {}  # else find the first key at fault, to name it
    for old, new in mapping.items():
        if not new:
            raise ctx.fail(call, f"{old!r} would be renamed to an empty key")
        if new in targets:
            raise ctx.fail(call, f"{targets[new]!r} and {old!r} would both become {new!r}")
        targets[new] = old
        if new in ctx.state.entries and new not in mapping:
            raise ctx.fail(
                call,
                f"{old!r} would become {new!r}, which already exists",
                hint="drop or rename the existing key first",
            )
    ctx.state.replace_keys(mapping)


@register
class RenamePrefix(_Swappable):
    """Rename every key starting with ``old`` (e.g. ``"encoder."`` -> ``"enc."``).

    PyTorch's per-module metadata under the prefix moves along.
    """

    name = "rename_prefix"

    def record(self, ctx: OpContext, old: str, new: str) -> None:
        call = ctx.call(self, old, new)
        if not isinstance(old, str) or not isinstance(new, str) or not old:
            raise ctx.fail(call, "prefixes are non-empty strings")
        mapping = {k: new + k[len(old) :] for k in ctx.state.keys(old)}
        if not mapping:
            raise ctx.fail(call, f"no key starts with {old!r}", near=old)
        _rename_many(ctx, call, mapping)
        ctx.state.rename_metadata(lambda p: new + p[len(old) :] if p.startswith(old) else p)
        ctx.done(self, call, mapping.values(), mapping.keys())


@register
class RenameRegex(Operation):
    """Rename every key through ``re.sub(pattern, repl, key)`` (``r"^"`` prepends)."""

    name = "rename_regex"
    touches_data = False

    def record(self, ctx: OpContext, pattern: str, repl: str) -> None:
        call = ctx.call(self, pattern, repl)
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ctx.fail(call, f"bad regular expression: {exc}") from None
        try:
            mapping = _substituted(ctx.state.entries, rx, repl)
        except (re.error, IndexError) as exc:
            raise ctx.fail(call, f"bad replacement: {exc}") from None
        if not mapping:
            raise ctx.fail(call, f"pattern {pattern!r} renamed no key", near=pattern)
        _rename_many(ctx, call, mapping)
        ctx.state.rename_metadata(lambda p: rx.sub(repl, p))
        ctx.done(self, call, mapping.values(), mapping.keys())


#: A pattern that is plain text (optionally anchored at the start): letters, digits,
#: ``_`` and punctuation with no meaning in a regular expression, or any escaped symbol.
_PLAIN = re.compile(r"(\^?)((?:[A-Za-z0-9_\-/:,;=@!%&~<>'\" ]|\\[^A-Za-z0-9])+)")


def _substituted(
    keys: Iterable[str], rx: re.Pattern[str], repl: str | Callable[[re.Match[str]], str]
) -> dict[str, str]:
    """Each key ``rx.sub(repl, key)`` changes, to what it becomes.

    Most renames are plain text (the pattern ``\\.attn\\.``, the replacement
    ``.attention.``), and a history applies dozens of them to every key; for
    those, string methods give ``re.sub``'s result (every non-overlapping
    occurrence, left to right) without running the regular expression engine
    on each key.
    """
    plain = _PLAIN.fullmatch(rx.pattern) if not rx.flags & ~re.UNICODE else None
    if plain is None or not isinstance(repl, str) or "\\" in repl:
        return {k: new for k in keys if (new := rx.sub(repl, k)) != k}
    text = re.sub(r"\\(.)", r"\1", plain[2], flags=re.DOTALL)
    if text == repl:
        return {}
    if plain[1]:
        return {k: repl + k[len(text) :] for k in keys if k.startswith(text)}
    return {k: k.replace(text, repl) for k in keys if text in k}
