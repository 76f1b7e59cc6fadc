"""What a PEFT LoRA adapter holds, read from ``adapter_config.json`` and its keys.

PEFT saves, under ``base_model.model.<module>``: ``lora_A.weight`` ``[r, in]``
and ``lora_B.weight`` ``[out, r]`` (``lora_B.bias`` with ``lora_bias``,
``lora_magnitude_vector`` with DoRA), or ``lora_embedding_A`` ``[r, num]`` and
``lora_embedding_B`` ``[dim, r]`` for an ``nn.Embedding``; an adapter on a
parameter (``target_parameters``, e.g. stacked experts ``[E, out, in]``) nests
one ``base_layer.`` per further parameter of the same module. The modules in
``modules_to_save`` are saved whole, under their own keys. Each module's scale
is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), ``rank_pattern`` and
``alpha_pattern`` overriding ``r`` and ``lora_alpha`` for the modules whose
names they match.

:meth:`AdapterLayout.read` places all of it on a base model's schema: every
module's base weight, how that weight is stored (``Conv1D``'s ``[in, out]``
where PEFT says ``fan_in_fan_out``), and the delta it gets as a
:class:`~ckptmigrate.plan.lowrank.LowRank` over the file's tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import CheckpointError
from ..plan.lowrank import CONV, EMBEDDING, LINEAR, LowRank, permute, reshape, scale_of
from ..plan.nodes import Node, Source, TensorSpec

#: Where PEFT puts the base model's keys in a LoRA adapter's state dict.
PREFIX = "base_model.model."

_LORA = re.compile(
    r"^(?P<m>.+?)(?P<nest>(?:\.base_layer)*)\.(?P<t>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?)$"
)
_EMBEDDING = re.compile(r"^(?P<m>.+)\.(?P<t>lora_embedding_A|lora_embedding_B)$")

V = TypeVar("V")


def pattern_value(patterns: Mapping[str, V], name: str, default: V) -> V:
    """PEFT's lookup in ``rank_pattern``/``alpha_pattern``: the first key that ends the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def matches_target(targets: Sequence[str] | str | None, name: str) -> bool:
    """Whether PEFT's ``target_modules`` (a list of names or one regex) selects module ``name``."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def matches_saved(saved: Sequence[str] | None, name: str) -> bool:
    """Whether ``modules_to_save`` selects module ``name`` (PEFT's test, a segment match)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved or ())


def excluded(exclude: Sequence[str] | str | None, name: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return name in exclude or any(name.endswith(f".{e}") for e in exclude)


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide how the tensors are read and written."""

    raw: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        value = self.raw.get(name, default)
        return default if value is None else value

    @property
    def r(self) -> int:
        return int(self.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return float(self.get("lora_alpha", 8))

    @property
    def rslora(self) -> bool:
        return bool(self.get("use_rslora", False))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.get("fan_in_fan_out", False))

    @property
    def rank_pattern(self) -> dict[str, int]:
        return dict(self.get("rank_pattern", {}))

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return dict(self.get("alpha_pattern", {}))

    @property
    def target_modules(self) -> list[str] | str | None:
        value = self.raw.get("target_modules")
        return value if value is None or isinstance(value, str) else list(value)

    @property
    def target_parameters(self) -> list[str]:
        return list(self.get("target_parameters", []))

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.get("modules_to_save", []))

    def rank_of(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def alpha_of(self, name: str) -> float:
        return float(pattern_value(self.alpha_pattern, name, self.lora_alpha))

    def module_targeted(self, name: str) -> bool:
        return matches_target(self.target_modules, name) and not excluded(
            self.raw.get("exclude_modules"), name
        )

    def parameter_targeted(self, key: str) -> bool:
        targets = self.target_parameters
        return key in targets or any(key.endswith(f".{t}") for t in targets)


@dataclass
class AdapterModule:
    """One adapted module's tensors, by their keys in the adapter file."""

    name: str  # the module's name in the base model
    embedding: bool = False
    a: str | None = None
    b: str | None = None
    bias: str | None = None
    magnitude: str | None = None
    depth: int = 0  # parameter adapters: how many ``base_layer.`` in (0: the outermost)

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.a, self.b, self.bias, self.magnitude) if k is not None]

    @property
    def label(self) -> str:
        """The module as the adapter names it, for messages."""
        return PREFIX + self.name + ".base_layer" * self.depth


@dataclass(frozen=True)
class Copy:
    """A ``modules_to_save`` tensor: the adapter's own full copy, following the base ops."""

    node: Node
    origin: str  # its key in the input adapter, for messages


Entry = LowRank | Copy


@dataclass
class Reading:
    """An adapter placed on a base schema: what it holds per base key, and what does not fit."""

    entries: dict[str, Entry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class AdapterLayout:
    """The adapter's config and tensors, grouped by module."""

    config: AdapterConfig
    specs: dict[str, TensorSpec]  # the adapter file's keys
    modules: list[AdapterModule]
    copies: list[str]  # keys of modules_to_save copies, as in the file
    # module -> fan_in_fan_out, where ckptmigrate wrote an adapter of mixed storages
    storage: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def parse(
        cls,
        raw: Mapping[str, Any],
        specs: Mapping[str, TensorSpec | None],
        where: str,
        storage: Mapping[str, bool] | None = None,
    ) -> AdapterLayout:
        """Group the keys; anything that is no LoRA tensor of a known kind is refused."""
        config = AdapterConfig(dict(raw))
        kind = raw.get("peft_type")
        if kind != "LORA":
            raise CheckpointError(
                f"{where} is a PEFT {kind} adapter; ckptmigrate migrates LoRA adapters only",
                hint="merge it into the base model (merge_and_unload()) and migrate the model",
            )
        for unsupported in (
            "layer_replication",
            "trainable_token_indices",
            "alora_invocation_tokens",
        ):
            if raw.get(unsupported):
                raise CheckpointError(
                    f"{where} uses {unsupported}, which ckptmigrate cannot carry through a "
                    "migration",
                    hint="merge the adapter into the base model and migrate the merged model",
                )
        modules: dict[str, AdapterModule] = {}
        copies: list[str] = []
        tensor_specs: dict[str, TensorSpec] = {}
        for key, spec in specs.items():
            if spec is None:
                raise CheckpointError(f"{where}: {key!r} is not a tensor", hint=_FIX)
            tensor_specs[key] = spec
            if not key.startswith(PREFIX):
                raise CheckpointError(
                    f"{where}: {key!r} does not start with {PREFIX!r}, as PEFT's LoRA keys do",
                    hint=_FIX,
                )
            rest = key[len(PREFIX) :]
            found = _LORA.match(rest) or _EMBEDDING.match(rest)
            if found is None:
                if matches_saved(config.modules_to_save, rest.rpartition(".")[0]):
                    copies.append(key)
                    continue
                raise CheckpointError(
                    f"{where}: {key!r} is no LoRA tensor (lora_A, lora_B, lora_embedding_A/B, "
                    "lora_magnitude_vector) and no part of modules_to_save",
                    hint=_FIX,
                )
            depth = found.groupdict().get("nest") or ""
            name = found["m"]
            module = modules.setdefault(
                name + depth, AdapterModule(name, depth=depth.count(".base_layer"))
            )
            tensor = found["t"]
            if tensor.startswith("lora_embedding"):
                module.embedding = True
            slot = {
                "lora_A.weight": "a",
                "lora_embedding_A": "a",
                "lora_B.weight": "b",
                "lora_embedding_B": "b",
                "lora_B.bias": "bias",
            }.get(tensor, "magnitude")
            setattr(module, slot, key)
        for module in modules.values():
            if module.a is None or module.b is None:
                raise CheckpointError(
                    f"{where}: {module.label} has only one of its two LoRA factors",
                    hint=_FIX,
                )
        return cls(config, tensor_specs, list(modules.values()), copies, dict(storage or {}))

    # ------------------------------------------------------------------ on a base schema

    def read(self, schema: Mapping[str, TensorSpec | None]) -> Reading:
        """Every module and copy placed on ``schema`` (a base model's keys at some revision)."""
        out = Reading()
        for module in self.modules:
            try:
                key, delta = self._delta(module, schema)
            except _Misfit as exc:
                out.problems.append(str(exc))
                continue
            if key in out.entries:
                out.problems.append(f"two adapter modules adapt {key}")
            out.entries[key] = delta
        for key in self.copies:
            base = key[len(PREFIX) :]
            spec = schema.get(base)
            have = self.specs[key]
            if spec is None:
                out.problems.append(f"the saved module's {base} is no key of the model")
            elif spec.shape != have.shape:
                out.problems.append(
                    f"the saved module's {base} is {list(have.shape)} but the model's is "
                    f"{list(spec.shape)}"
                )
            else:
                out.entries[base] = Copy(Source(key, have), key)
        return out

    def _delta(
        self, module: AdapterModule, schema: Mapping[str, TensorSpec | None]
    ) -> tuple[str, LowRank]:
        assert module.a is not None and module.b is not None
        a_spec, b_spec = self.specs[module.a], self.specs[module.b]
        a: Node = Source(module.a, a_spec)
        b: Node = Source(module.b, b_spec)
        config = self.config
        if module.depth or (config.target_parameters and not config.module_targeted(module.name)):
            return self._parameter_delta(module, schema, a, b)
        key = module.name + ".weight"
        weight = _weight(schema, key, module)
        if len(a_spec.shape) != 2 or len(b_spec.shape) != 2:
            return key, self._conv_delta(module, weight, a, b)
        (rank, fan_in), (fan_out, rank_b) = a_spec.shape, b_spec.shape
        if rank != rank_b:
            raise _Misfit(f"{module.label}: lora_A has rank {rank} but lora_B {rank_b}")
        self._check_rank(module, module.name, rank)
        if module.embedding:
            kind, transposed = EMBEDDING, True
            if weight.shape != (fan_in, fan_out):
                raise _Misfit(_wrong(key, weight, [fan_in, fan_out], module))
        else:
            kind = LINEAR
            straight, crossed = (fan_out, fan_in), (fan_in, fan_out)
            if weight.shape == straight == crossed:  # square: only the config can tell
                transposed = self.storage.get(module.name, config.fan_in_fan_out)
            elif weight.shape == straight:
                transposed = False
            elif weight.shape == crossed:
                transposed = True
            else:
                raise _Misfit(_wrong(key, weight, list(straight), module))
        return key, self._finish(module, module.name, a, b, rank, kind, transposed)

    def _conv_delta(self, module: AdapterModule, weight: TensorSpec, a: Node, b: Node) -> LowRank:
        assert a.spec is not None and b.spec is not None
        rank = a.spec.shape[0]
        want = (b.spec.shape[0], a.spec.shape[1], *a.spec.shape[2:])
        if weight.shape != want or b.spec.shape[1] != rank:
            raise _Misfit(_wrong(module.name + ".weight", weight, list(want), module))
        self._check_rank(module, module.name, rank)
        return self._finish(module, module.name, a, b, rank, CONV, False)

    def _parameter_delta(
        self, module: AdapterModule, schema: Mapping[str, TensorSpec | None], a: Node, b: Node
    ) -> tuple[str, LowRank]:
        """An adapter on a parameter (``target_parameters``): 2-D, or experts ``[E, out, in]``."""
        own = [
            k
            for k in schema
            if k.startswith(module.name + ".")
            and "." not in k[len(module.name) + 1 :]
            and self.config.parameter_targeted(k)
        ]
        if module.depth >= len(own):
            raise _Misfit(
                f"{module.label}: the model has {len(own)} targeted parameter(s) in "
                f"{module.name}, too few for this adapter"
            )
        key = own[len(own) - 1 - module.depth]
        weight = _weight(schema, key, module)
        assert a.spec is not None and b.spec is not None
        (rows, fan_in), (fan_out, cols) = a.spec.shape, b.spec.shape
        experts = weight.shape[0] if len(weight.shape) == 3 else 1
        if len(weight.shape) not in (2, 3) or rows % experts or rows != cols:
            raise _Misfit(_wrong(key, weight, [fan_out, fan_in], module))
        rank = rows // experts
        if weight.shape[-2:] != (fan_out, fan_in):
            raise _Misfit(_wrong(key, weight, [experts, fan_out, fan_in], module))
        self._check_rank(module, key, rank)
        if len(weight.shape) == 3:
            # PEFT: A is [E*r, in] (expert-major), B is [out, r*E] (expert-minor)
            a = reshape(a, (experts, rank, fan_in))
            b = permute(reshape(b, (fan_out, rank, experts)), (2, 0, 1))
        return key, self._finish(module, key, a, b, rank, LINEAR, False)

    def _check_rank(self, module: AdapterModule, name: str, rank: int) -> None:
        want = self.config.rank_of(name)
        if want != rank:
            raise CheckpointError(
                f"adapter_config.json gives {module.label} rank {want}, but its factors "
                f"have rank {rank}",
                hint="the config does not belong to these tensors; fix r / rank_pattern",
            )

    def _finish(
        self,
        module: AdapterModule,
        name: str,
        a: Node,
        b: Node,
        rank: int,
        kind: str,
        transposed: bool,
    ) -> LowRank:
        scale = scale_of(self.config.alpha_of(name), rank, rslora=self.config.rslora)
        magnitude = (
            Source(module.magnitude, self.specs[module.magnitude]) if module.magnitude else None
        )
        bias = Source(module.bias, self.specs[module.bias]) if module.bias else None
        return LowRank(a, b, scale, transposed, kind, magnitude, bias, (module.label,))


_FIX = "is it a PEFT LoRA adapter saved with save_pretrained()?"


class _Misfit(Exception):
    """A module of the adapter does not fit the base schema."""


def _weight(schema: Mapping[str, TensorSpec | None], key: str, module: AdapterModule) -> TensorSpec:
    spec = schema.get(key)
    if spec is None:
        raise _Misfit(f"{module.label} adapts {key}, which is no tensor of the model")
    return spec


def _wrong(key: str, weight: TensorSpec, want: list[int], module: AdapterModule) -> str:
    return f"{key} is {list(weight.shape)}, but the factors of {module.label} make {want}"
