"""The migrated adapter as PEFT reads it: the file's entries and ``adapter_config.json``.

Each base key with a delta becomes a module's ``lora_A``/``lora_B`` (a Linear's
or a Conv1D's: ``fan_in_fan_out`` says which), ``lora_embedding_A``/``_B`` or,
for a delta with an expert dim or on a key that is not a module's ``weight``,
an adapter on that parameter (``target_parameters``). The config follows:
``target_modules``, ``target_parameters`` and ``modules_to_save`` name the new
modules, and every module's rank and alpha (``r``/``lora_alpha``, plus
``rank_pattern``/``alpha_pattern`` where modules differ) give exactly the
scale its delta carries. Every name list written is checked to select
exactly the modules it should in the base model at the target, the way PEFT
matches names; the input's own values are kept where they still do.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from ..errors import CkptMigrateError
from ..plan.lowrank import EMBEDDING, LowRank, Scale, permute, reshape
from ..plan.nodes import Node, TensorSpec
from .follow import OPTIONS
from .layout import (
    PREFIX,
    AdapterConfig,
    Copy,
    Entry,
    excluded,
    matches_saved,
    matches_target,
    pattern_value,
)


@dataclass(frozen=True)
class _Module:
    """One adapted module (or parameter) of the output, and the delta it carries."""

    name: str  # what rank_pattern/alpha_pattern match: the module, or the parameter's key
    module: str
    delta: LowRank
    parameter: bool
    depth: int = 0

    @property
    def alpha(self) -> float | int:
        return _alpha(self.delta.scale, self.delta.rank)


@dataclass
class AdapterOutput:
    """What the migrated adapter's files hold, and what changed in its config."""

    entries: dict[str, Node]
    config: dict[str, Any]
    changes: list[str] = field(default_factory=list)
    # module -> fan_in_fan_out, for an adapter whose modules store their weights both ways
    storage: dict[str, bool] = field(default_factory=dict)


def build_output(
    entries: Mapping[str, Entry],
    schema: Mapping[str, TensorSpec | None],
    config: AdapterConfig,
    *,
    rslora: bool,
) -> AdapterOutput:
    """The adapter file's entries and config for ``entries`` on the base ``schema``."""
    modules: list[_Module] = []
    copies: list[tuple[str, Copy]] = []
    for key in schema:
        entry = entries.get(key)
        if isinstance(entry, Copy):
            copies.append((key, entry))
        elif entry is not None:
            modules.append(_module(key, entry))
    if not modules:
        raise CkptMigrateError(
            "after the migration the adapter adapts no module of the model (every adapted "
            "weight was dropped)",
            hint="nothing was written; the adapter has nothing left to add to the model",
        )
    modules = _nest(modules)
    out: dict[str, Node] = {}
    for m in modules:
        out.update(_tensors(m))
    for key, copy in copies:
        out[PREFIX + key] = copy.node
    names = _module_names(schema)
    new = dict(config.raw)
    saved = _saved_modules(copies, config)
    _names(new, "modules_to_save", config.modules_to_save, saved, names, _saved_exact, _leaf)
    _target_modules(new, config, modules, names)
    params = [m.name for m in modules if m.parameter]
    if params or config.target_parameters:
        keys = [k for k in schema if "." in k]
        _names(
            new, "target_parameters", config.target_parameters, params, keys, _param_exact, _owned
        )
    _ranks(new, config, modules, rslora=rslora)
    linear = {
        m.name: m.delta.transposed for m in modules if not m.parameter and m.delta.kind != EMBEDDING
    }
    storage: dict[str, bool] = {}
    if len(set(linear.values())) == 1:
        if (flag := next(iter(linear.values()))) != config.fan_in_fan_out:
            new["fan_in_fan_out"] = flag
    elif linear:  # mixed: PEFT sets it per module from its type; a square weight needs the list
        storage = linear
    changes = [
        f"{name}: {_show(config.raw.get(name))} -> {_show(new.get(name))}"
        for name in new
        if new.get(name) != config.raw.get(name)
    ]
    return AdapterOutput(out, new, changes, storage)


# --------------------------------------------------------------------------- tensors


def _module(key: str, delta: LowRank) -> _Module:
    module, _, param = key.rpartition(".")
    if delta.batch == 0 and param == "weight":
        return _Module(module, module, delta, parameter=False)
    where = f"{' + '.join(delta.origin)} would adapt the parameter {key}"
    if delta.kind == EMBEDDING:
        raise CkptMigrateError(
            f"after the migration {where}, which is not an embedding's weight", hint=OPTIONS
        )
    if delta.magnitude is not None or delta.bias is not None:
        raise CkptMigrateError(
            f"after the migration {where}; PEFT adapts parameters without DoRA and lora_bias",
            hint=OPTIONS,
        )
    if delta.batch > 1:
        raise CkptMigrateError(
            f"after the migration {where}, with {delta.batch} expert dims; PEFT's parameter "
            "adapters have one",
            hint=OPTIONS,
        )
    if delta.transposed:  # PEFT reads a parameter as [E, out, in] (or [out, in])
        delta = delta.flipped()
    return _Module(key, module, delta, parameter=True)


def _nest(modules: list[_Module]) -> list[_Module]:
    """PEFT nests one ``base_layer.`` per further adapted parameter of the same module."""
    count = Counter(m.module for m in modules if m.parameter)
    seen: Counter[str] = Counter()
    out = []
    for m in modules:
        if m.parameter:
            depth = count[m.module] - 1 - seen[m.module]
            seen[m.module] += 1
            m = _Module(m.name, m.module, m.delta, True, depth)
        out.append(m)
    return out


def _tensors(m: _Module) -> dict[str, Node]:
    delta = m.delta
    at = PREFIX + m.module + ".base_layer" * m.depth
    a, b = delta.a, delta.b
    if delta.kind == EMBEDDING:
        out = {f"{at}.lora_embedding_A": a, f"{at}.lora_embedding_B": b}
    else:
        if m.parameter and delta.batch == 1:
            assert a.spec is not None and b.spec is not None
            experts, rank, fan_in = a.spec.shape
            fan_out = b.spec.shape[1]
            a = reshape(a, (experts * rank, fan_in))
            b = reshape(permute(b, (1, 2, 0)), (fan_out, rank * experts))
        out = {f"{at}.lora_A.weight": a, f"{at}.lora_B.weight": b}
        if delta.bias is not None:
            out[f"{at}.lora_B.bias"] = delta.bias
    if delta.magnitude is not None:
        out[f"{at}.lora_magnitude_vector"] = delta.magnitude
    return out


# --------------------------------------------------------------------------- config


def _alpha(scale: Scale, rank: int) -> float | int:
    """The ``lora_alpha`` that gives ``scale`` at ``rank``: as an int where it is one."""
    if isinstance(scale, Fraction):
        alpha = scale * rank
        return int(alpha) if alpha.denominator == 1 else float(alpha)
    return scale * math.sqrt(rank)


def _ranks(
    new: dict[str, Any], config: AdapterConfig, modules: list[_Module], *, rslora: bool
) -> None:
    """``r``, ``lora_alpha`` and the patterns: the input's if they still give every module's."""
    want = {m.name: (m.delta.rank, m.alpha) for m in modules}

    def fits(r: int, alpha: float, ranks: Mapping[str, int], alphas: Mapping[str, float]) -> bool:
        return all(
            pattern_value(ranks, name, r) == rank
            and math.isclose(pattern_value(alphas, name, alpha), a, rel_tol=1e-12)
            for name, (rank, a) in want.items()
        )

    if fits(config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern):
        return
    pairs = Counter(want.values())
    old = (config.r, config.lora_alpha)
    top = max(pairs.values())
    r, alpha = old if pairs.get(old) == top else next(p for p, n in pairs.items() if n == top)
    for escape in (False, True):
        ranks = {_pattern(n, escape): k for n, (k, _) in want.items() if k != r}
        alphas = {_pattern(n, escape): a for n, (_, a) in want.items() if a != alpha}
        if fits(r, alpha, ranks, alphas):
            break
    else:  # pragma: no cover - escaped full names always match only themselves
        raise AssertionError("no rank_pattern selects the modules exactly")
    new["r"], new["lora_alpha"] = r, alpha
    new["rank_pattern"], new["alpha_pattern"] = ranks, alphas


def _pattern(name: str, escape: bool) -> str:
    return re.escape(name) if escape else name


def _target_modules(
    new: dict[str, Any], config: AdapterConfig, modules: list[_Module], names: set[str]
) -> None:
    wanted = [m.name for m in modules if not m.parameter]
    if not wanted:
        if config.target_modules:
            new["target_modules"] = []
        return
    saved = new.get("modules_to_save") or []
    exclude = config.raw.get("exclude_modules")
    layers = config.raw.get("layers_to_transform") not in (None, [])

    def exact(targets: Any, exclude: Any = exclude) -> bool:
        chosen = {
            n
            for n in names
            if matches_target(targets, n)
            and not excluded(exclude, n)
            and not matches_saved(saved, n)
        }
        return chosen == set(wanted)

    candidates: list[Any] = [] if layers else [config.target_modules]
    candidates += [sorted({_leaf(n) for n in wanted}), sorted(wanted)]
    for targets in candidates:
        if targets is not None and exact(targets):
            new["target_modules"] = targets
            break
    else:
        new["target_modules"] = sorted(wanted)
        new["exclude_modules"] = None
    if layers:
        new["layers_to_transform"] = None
        new["layers_pattern"] = None


def _names(
    new: dict[str, Any],
    field_name: str,
    old: Sequence[str],
    wanted: Sequence[str],
    pool: Iterable[str],
    exact: Callable[[Sequence[str], set[str], Sequence[str]], bool],
    short: Callable[[str], str],
) -> None:
    """A list naming exactly ``wanted`` among ``pool``: the old one, short names, or full ones."""
    everything = set(pool)
    if not wanted:
        if old:  # nothing left to name: PEFT's own default
            new[field_name] = None
        return
    for names in (list(old), sorted({short(w) for w in wanted}), sorted(wanted)):
        if exact(names, everything, wanted):
            new[field_name] = names
            return
    new[field_name] = sorted(wanted)


def _leaf(name: str) -> str:
    """A module's own name (``q_proj`` of ``model.layers.0.q_proj``)."""
    return name.rpartition(".")[2]


def _owned(key: str) -> str:
    """A parameter as its module's name and its own (``experts.w1``)."""
    return ".".join(key.split(".")[-2:])


def _saved_exact(names: Sequence[str], pool: set[str], wanted: Sequence[str]) -> bool:
    """PEFT wraps every module whose name ends with an entry of ``modules_to_save``."""
    chosen = {n for n in pool if any(n.endswith(t) for t in names)}
    return chosen == set(wanted)


def _param_exact(names: Sequence[str], pool: set[str], wanted: Sequence[str]) -> bool:
    chosen = {k for k in pool if k in names or any(k.endswith(f".{t}") for t in names)}
    return chosen == set(wanted)


def _saved_modules(copies: list[tuple[str, Copy]], config: AdapterConfig) -> list[str]:
    """The modules the copies are, after the migration: each saved module where it went."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for key, copy in copies:
        old = copy.origin[len(PREFIX) :]
        parts = old.split(".")
        root = next(
            (
                ".".join(parts[:n])
                for n in range(1, len(parts))
                if any(".".join(parts[:n]).endswith(t) for t in config.modules_to_save)
            ),
            old.rpartition(".")[0],
        )
        groups.setdefault(root, []).append((old[len(root) + 1 :], key))
    out: list[str] = []
    for members in groups.values():
        roots = {key[: -len(rel) - 1] for rel, key in members if key.endswith("." + rel)}
        if len(roots) == 1 and all(key.endswith("." + rel) for rel, key in members):
            out.extend(roots)
        else:
            out.extend(key.rpartition(".")[0] for _, key in members)
    unique = sorted(set(out))
    return [m for m in unique if not any(m.startswith(o + ".") for o in unique if o != m)]


def _module_names(schema: Iterable[str]) -> set[str]:
    """Every module a model with these keys has (each dotted prefix of a key)."""
    out: set[str] = set()
    for key in schema:
        parts = key.split(".")
        out.update(".".join(parts[:n]) for n in range(1, len(parts)))
    return out


def _show(value: Any) -> str:
    """A config value as the JSON file spells it."""
    return json.dumps(value)
