"""The ``op`` functions: check preconditions, then rewrite the plan.

Nothing here reads or writes tensor data. Every check failure names the
revision, the script's file and line, the key, and the nearest keys that do
exist, because the usual cause is a checkpoint that is not at the revision
the user believes, or a typo in a key.
"""

from __future__ import annotations

import difflib
import operator
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import OperationError
from ..paths import display_path
from ..plan.init import check_init
from ..plan.nodes import (
    Apply,
    Constant,
    Init,
    Node,
    ResetOptimizerState,
    TensorSpec,
    dtype_name,
    seed_for,
)
from ..plan.state import PlanState


@dataclass
class OpRecord:
    """One op as it ran, for ``--dry-run`` and reports."""

    call: str
    results: list[tuple[str, TensorSpec | None]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def parse_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        candidate = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    raise TypeError(f"not a dtype: {dtype!r} (use e.g. torch.float16 or 'float16')")


def _fmt(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return f"torch.{dtype_name(value)}"
    if isinstance(value, torch.nn.Module):
        return type(value).__name__ + "(...)"
    if callable(value):
        return getattr(value, "__name__", "fn")
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_fmt, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(map(_fmt, value)) + "]"
    return repr(value)


def _uniform_floating_dtype(state: PlanState) -> torch.dtype | None:
    """The dtype all floating tensors of ``state`` share; None when none or several."""
    found: torch.dtype | None = None
    for node in state.entries.values():
        spec = node.spec
        if spec is None or not spec.dtype.is_floating_point:
            continue
        if found is not None and spec.dtype != found:
            return None
        found = spec.dtype
    return found


class Operations:
    """The ``op`` namespace bound to one revision's run over one plan."""

    def __init__(
        self,
        state: PlanState,
        *,
        revision: str,
        direction: str = "upgrade",
        path: Path | None = None,
        records: list[OpRecord] | None = None,
    ) -> None:
        self.state = state
        self.revision = revision
        self.direction = direction
        self.path = path
        self.records = records if records is not None else []
        # New tensors for which a script names no dtype are made in the checkpoint's
        # own floating dtype (as the step finds it), so an fp16 file stays fp16.
        self.new_float = _uniform_floating_dtype(state) or torch.float32

    # ------------------------------------------------------------------ helpers

    def _location(self) -> str | None:
        if self.path is None:
            return None
        target = str(self.path)
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename == target:
                return f"{display_path(self.path)}, line {frame.f_lineno}"
            frame = frame.f_back  # type: ignore[assignment]
        return display_path(self.path)

    def _nearest(self, key: str, pool: Iterable[str] | None = None) -> list[str]:
        keys = list(self.state.entries if pool is None else pool)
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        if close:
            return close

        def common(k: str) -> int:
            n = 0
            for a, b in zip(k, key):
                if a != b:
                    break
                n += 1
            return n

        return sorted(keys, key=lambda k: (-common(k), k))[:3]

    def fail(
        self, call: str, problem: str, *, near: str | None = None, hint: str | None = None
    ) -> OperationError:
        nearest = self._nearest(near) if near is not None else []
        if near is not None and not self.state.entries:
            problem += " (the state dict has no keys left)"
        return OperationError(
            f"{call}: {problem}",
            revision=self.revision,
            location=self._location(),
            nearest=nearest,
            hint=hint,
        )

    def _call(self, name: str, *args: Any, **kwargs: Any) -> str:
        parts = [_fmt(a) for a in args] + [f"{k}={_fmt(v)}" for k, v in kwargs.items()]
        return f"{name}({', '.join(parts)})"

    def _need(self, call: str, key: Any, *, tensor: bool = True) -> Node:
        if not isinstance(key, str):
            raise self.fail(call, f"keys are strings, not {type(key).__name__}")
        node = self.state.entries.get(key)
        if node is None:
            raise self.fail(call, f"key {key!r} does not exist", near=key)
        if tensor and node.spec is None:
            raise self.fail(call, f"{key!r} is not a tensor")
        return node

    def _free(self, call: str, key: Any, *, allowed: Iterable[str] = ()) -> None:
        if not isinstance(key, str) or not key:
            raise self.fail(call, f"a key must be a non-empty string, not {key!r}")
        if key in self.state.entries and key not in set(allowed):
            raise self.fail(
                call,
                f"key {key!r} already exists",
                hint="drop or rename it first, or choose another name",
            )

    def _dims(self, call: str, shape: Any) -> list[int]:
        """Sizes as ints; a float such as 2.5 is refused rather than silently truncated."""
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        try:
            if isinstance(shape, (str, bytes)) or any(isinstance(d, bool) for d in shape):
                raise TypeError
            return [operator.index(d) for d in shape]
        except TypeError:
            raise self.fail(call, f"shape must be a tuple of ints, not {shape!r}") from None

    def _shape(self, call: str, shape: Any) -> tuple[int, ...]:
        dims = tuple(self._dims(call, shape))
        if any(d < 0 for d in dims):
            raise self.fail(call, f"shape {list(dims)} has a negative size")
        return dims

    def _dtype(self, call: str, dtype: Any) -> torch.dtype:
        try:
            return parse_dtype(dtype)
        except TypeError as exc:
            raise self.fail(call, str(exc)) from None

    def _dim(self, call: str, dim: Any, ndim: int) -> int:
        if not isinstance(dim, int) or not -ndim <= dim < max(ndim, 1):
            raise self.fail(call, f"dim {dim!r} is out of range for a {ndim}-D tensor")
        return dim % ndim if ndim else 0

    def _record(self, call: str, results: Iterable[str] = (), removed: Iterable[str] = ()) -> None:
        self.records.append(
            OpRecord(
                call,
                [(k, self.state.entries[k].spec) for k in results],
                list(removed),
            )
        )

    def _splice(self, at: str, items: Sequence[tuple[str, Node]], remove: Iterable[str]) -> None:
        """Replace ``at`` by ``items`` in place; drop ``remove`` (and ``at``)."""
        gone = set(remove) | {at}
        out: dict[str, Node] = {}
        for k, v in self.state.entries.items():
            if k == at:
                out.update(items)
            elif k not in gone:
                out[k] = v
        self.state.entries = out

    def _seed(self, key: str, purpose: str = "") -> int:
        return seed_for(self.revision, self.direction, key, purpose)

    # ------------------------------------------------------------------ renames

    def rename_key(self, old: str, new: str) -> None:
        call = self._call("rename_key", old, new)
        self._need(call, old, tensor=False)
        if new == old:
            return self._record(call, [new])
        self._free(call, new)
        self.state.replace_keys({old: new})
        self._record(call, [new], [old])

    def _rename_many(self, call: str, mapping: dict[str, str]) -> None:
        targets: dict[str, str] = {}
        for old, new in mapping.items():
            if not new:
                raise self.fail(call, f"{old!r} would be renamed to an empty key")
            if new in targets:
                raise self.fail(call, f"{targets[new]!r} and {old!r} would both become {new!r}")
            targets[new] = old
            if new in self.state.entries and new not in mapping:
                raise self.fail(
                    call,
                    f"{old!r} would become {new!r}, which already exists",
                    hint="drop or rename the existing key first",
                )
        self.state.replace_keys(mapping)

    def rename_prefix(self, old: str, new: str) -> None:
        call = self._call("rename_prefix", old, new)
        if not isinstance(old, str) or not isinstance(new, str) or not old:
            raise self.fail(call, "prefixes are non-empty strings")
        mapping = {k: new + k[len(old) :] for k in self.state.keys(old)}
        if not mapping:
            raise self.fail(call, f"no key starts with {old!r}", near=old)
        self._rename_many(call, mapping)
        self.state.rename_metadata(lambda p: new + p[len(old) :] if p.startswith(old) else p)
        self._record(call, mapping.values(), mapping.keys())

    def rename_regex(self, pattern: str, repl: str) -> None:
        call = self._call("rename_regex", pattern, repl)
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise self.fail(call, f"bad regular expression: {exc}") from None
        try:
            mapping = {k: new for k in self.state.entries if (new := rx.sub(repl, k)) != k}
        except (re.error, IndexError) as exc:
            raise self.fail(call, f"bad replacement: {exc}") from None
        if not mapping:
            raise self.fail(call, f"pattern {pattern!r} renamed no key", near=pattern)
        self._rename_many(call, mapping)
        self.state.rename_metadata(lambda p: rx.sub(repl, p))
        self._record(call, mapping.values(), mapping.keys())

    # ------------------------------------------------------------------ drops

    def _intended(self, call: str, intended: Any) -> bool:
        if not isinstance(intended, bool):
            raise self.fail(call, f"intended= is True or False, not {intended!r}")
        return intended

    def drop_key(self, key: str, *, intended: bool = False) -> None:
        call = self._call("drop_key", key, **({"intended": intended} if intended else {}))
        mark = self._intended(call, intended)
        node = self._need(call, key, tensor=False)
        del self.state.entries[key]
        if mark:
            self.state.intended.append(node)
        self._record(call, removed=[key])

    def drop_prefix(self, prefix: str, *, intended: bool = False) -> None:
        call = self._call("drop_prefix", prefix, **({"intended": intended} if intended else {}))
        mark = self._intended(call, intended)
        if not isinstance(prefix, str) or not prefix:
            raise self.fail(call, "a prefix is a non-empty string")
        gone = self.state.keys(prefix)
        if not gone:
            raise self.fail(call, f"no key starts with {prefix!r}", near=prefix)
        for key in gone:
            if mark:
                self.state.intended.append(self.state.entries[key])
            del self.state.entries[key]
        self.state.rename_metadata(lambda p: None if p.startswith(prefix) else p)
        self._record(call, removed=gone)

    # ------------------------------------------------------------------ additions

    def add_tensor(
        self,
        key: str,
        shape: Sequence[int] | int,
        *,
        dtype: Any = None,
        init: str | Callable[..., Any] = "zeros",
        **init_args: Any,
    ) -> None:
        call = self._call(
            "add_tensor",
            key,
            shape,
            **({"dtype": dtype} if dtype else {}),
            **({"init": init} if init != "zeros" else {}),
            **init_args,
        )
        self._free(call, key)
        made_in = self._dtype(call, dtype) if dtype is not None else self.new_float
        spec = TensorSpec(self._shape(call, shape), made_in)
        problem = check_init(init, init_args, spec)
        if problem:
            raise self.fail(call, problem)
        self.state.entries[key] = Init(spec, init, dict(init_args), self._seed(key))
        self._record(call, [key])

    def add_module(self, prefix: str, module: torch.nn.Module) -> None:
        call = self._call("add_module", prefix, module)
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise self.fail(call, "the prefix is a module name such as 'fc3' or 'encoder.fc3'")
        if not isinstance(module, torch.nn.Module):
            raise self.fail(call, f"expected an nn.Module, got {type(module).__name__}")
        dotted = prefix if prefix.endswith(".") else prefix + "."
        sd = module.state_dict(prefix=dotted)
        if not sd:
            raise self.fail(call, f"{type(module).__name__} has no parameters or buffers")
        for key in sd:
            self._free(call, key)
        for key, value in sd.items():
            if isinstance(value, torch.Tensor):
                # float32 is what a module is built in unless told otherwise: it follows
                # the checkpoint; a module built in another dtype keeps it
                follow = value.dtype == torch.float32 and self.new_float != torch.float32
                tensor = value.detach()
                tensor = tensor.to(self.new_float) if follow else tensor.clone()
                self.state.entries[key] = Constant(tensor)
            else:
                self.state.entries[key] = Constant(value)
        # state_dict(prefix=...) already keys the module's metadata by full prefix
        for name, meta in getattr(sd, "_metadata", {}).items():
            self.state.metadata[name] = dict(meta)
        self._record(call, list(sd))

    # ------------------------------------------------------------------ single-tensor transforms

    def _transform(self, call: str, key: str, kind: str, spec: TensorSpec, **params: Any) -> None:
        node = self._need(call, key)
        self.state.entries[key] = Apply(kind, (node,), params, spec)
        self._record(call, [key])

    def reshape(self, key: str, shape: Sequence[int] | int) -> None:
        call = self._call("reshape", key, shape)
        node = self._need(call, key)
        assert node.spec is not None
        dims = self._dims(call, shape)
        if sum(1 for d in dims if d == -1) > 1:
            raise self.fail(call, "only one dimension can be -1")
        known = 1
        for d in dims:
            if d != -1:
                known *= int(d)
        if -1 in dims:
            if known == 0 or node.spec.numel % known:
                raise self.fail(call, f"cannot infer -1: {node.spec.numel} elements, {dims}")
            dims[dims.index(-1)] = node.spec.numel // known
        target = self._shape(call, dims)
        if TensorSpec(target, node.spec.dtype).numel != node.spec.numel:
            raise self.fail(
                call,
                f"{key!r} has shape {list(node.spec.shape)} ({node.spec.numel} elements), "
                f"which cannot be reshaped to {list(target)}",
            )
        self._transform(call, key, "reshape", TensorSpec(target, node.spec.dtype), shape=target)

    def transpose(self, key: str, dim0: int, dim1: int) -> None:
        call = self._call("transpose", key, dim0, dim1)
        spec = self._need(call, key).spec
        assert spec is not None
        d0, d1 = self._dim(call, dim0, len(spec.shape)), self._dim(call, dim1, len(spec.shape))
        shape = list(spec.shape)
        shape[d0], shape[d1] = shape[d1], shape[d0]
        self._transform(
            call, key, "transpose", TensorSpec(tuple(shape), spec.dtype), dim0=d0, dim1=d1
        )

    def permute(self, key: str, dims: Sequence[int]) -> None:
        call = self._call("permute", key, dims)
        spec = self._need(call, key).spec
        assert spec is not None
        n = len(spec.shape)
        if isinstance(dims, int) or not isinstance(dims, Iterable):
            raise self.fail(call, f"dims must be a sequence of dims, not {dims!r}")
        dims = list(dims)
        norm = tuple(self._dim(call, d, n) for d in dims)
        if sorted(norm) != list(range(n)):
            raise self.fail(call, f"{list(dims)} is not a permutation of the {n} dims of {key!r}")
        shape = tuple(spec.shape[d] for d in norm)
        self._transform(call, key, "permute", TensorSpec(shape, spec.dtype), dims=norm)

    def cast(self, key: str, dtype: Any) -> None:
        call = self._call("cast", key, dtype)
        spec = self._need(call, key).spec
        assert spec is not None
        target = self._dtype(call, dtype)
        self._transform(call, key, "cast", TensorSpec(spec.shape, target), dtype=target)

    def resize(
        self,
        key: str,
        shape: Sequence[int] | int,
        *,
        init: str | Callable[..., Any] = "zeros",
        intended: bool = False,
        **init_args: Any,
    ) -> None:
        call = self._call(
            "resize",
            key,
            shape,
            **({"init": init} if init != "zeros" else {}),
            **({"intended": intended} if intended else {}),
            **init_args,
        )
        mark = self._intended(call, intended)
        spec = self._need(call, key).spec
        assert spec is not None
        target = self._shape(call, shape)
        if len(target) != len(spec.shape):
            raise self.fail(
                call,
                f"{key!r} has {len(spec.shape)} dims {list(spec.shape)}; resize keeps the "
                f"number of dims (use reshape to change it)",
            )
        new_spec = TensorSpec(target, spec.dtype)
        # checked even when only shrinking: a typo in init= should not wait for
        # the day the same script grows a tensor
        problem = check_init(init, init_args, new_spec)
        if problem:
            raise self.fail(call, problem)
        self._transform(
            call,
            key,
            "resize",
            new_spec,
            shape=target,
            init=init,
            init_args=dict(init_args),
            seed=self._seed(key, "resize"),
        )
        if mark:  # a shrink the script means: its cut is not a silent loss
            self.state.intended.append(self.state.entries[key])

    def map_tensor(
        self,
        key: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        shape: Sequence[int] | None = None,
        dtype: Any = None,
    ) -> None:
        call = self._call(
            "map_tensor",
            key,
            fn,
            **({"shape": shape} if shape is not None else {}),
            **({"dtype": dtype} if dtype is not None else {}),
        )
        spec = self._need(call, key).spec
        assert spec is not None
        if not callable(fn):
            raise self.fail(call, "fn must be a function of one tensor")
        if shape is not None or dtype is not None:
            out = TensorSpec(
                self._shape(call, shape) if shape is not None else spec.shape,
                self._dtype(call, dtype) if dtype is not None else spec.dtype,
            )
        else:
            try:
                result = fn(spec.meta())
            except Exception as exc:
                raise self.fail(
                    call,
                    f"the function could not run on a shape-only tensor "
                    f"({type(exc).__name__}: {exc})",
                    hint="pass shape= and dtype= so the plan knows the result",
                ) from None
            if not isinstance(result, torch.Tensor):
                raise self.fail(
                    call, f"the function returned {type(result).__name__}, not a tensor"
                )
            out = TensorSpec.of(result)
        # a function drawing random numbers gets its own seeded RNG, like an init
        self._transform(call, key, "map", out, fn=fn, seed=self._seed(key, "map"))

    # ------------------------------------------------------------------ fuse / unfuse

    def split(
        self,
        key: str,
        into: Sequence[str],
        *,
        dim: int = 0,
        sizes: Sequence[int] | None = None,
    ) -> None:
        into = list(into) if not isinstance(into, str) else [into]
        call = self._call(
            "split",
            key,
            into,
            **({"dim": dim} if dim else {}),
            **({"sizes": list(sizes)} if sizes is not None else {}),
        )
        node = self._need(call, key)
        spec = node.spec
        assert spec is not None
        if not spec.shape:
            raise self.fail(call, f"{key!r} is a 0-D tensor and cannot be split")
        if len(into) < 1:
            raise self.fail(call, "into= needs at least one key")
        if len(set(into)) != len(into):
            raise self.fail(call, "into= names a key twice")
        for k in into:
            self._free(call, k, allowed=[key])
        d = self._dim(call, dim, len(spec.shape))
        total = spec.shape[d]
        if sizes is None:
            if total % len(into):
                raise self.fail(
                    call,
                    f"dim {d} of {key!r} has size {total}, which does not split into "
                    f"{len(into)} equal parts; pass sizes=[...]",
                )
            parts = [total // len(into)] * len(into)
        else:
            try:
                parts = [operator.index(s) for s in sizes]
            except TypeError:
                raise self.fail(call, f"sizes must be a list of ints, not {sizes!r}") from None
            if len(parts) != len(into) or sum(parts) != total or any(p < 0 for p in parts):
                raise self.fail(
                    call,
                    f"sizes {parts} must have one entry per key in into= and add up to "
                    f"{total} (dim {d} of {key!r})",
                )
        items: list[tuple[str, Node]] = []
        start = 0
        for k, size in zip(into, parts):
            shape = list(spec.shape)
            shape[d] = size
            items.append(
                (
                    k,
                    Apply(
                        "narrow",
                        (node,),
                        {"dim": d, "start": start, "length": size},
                        TensorSpec(tuple(shape), spec.dtype),
                    ),
                )
            )
            start += size
        self._splice(key, items, remove=())
        self._record(call, into, [key] if key not in into else [])

    def concat(self, keys: Sequence[str], into: str, *, dim: int = 0) -> None:
        keys = list(keys) if not isinstance(keys, str) else [keys]
        call = self._call("concat", keys, **{"into": into}, **({"dim": dim} if dim else {}))
        if not keys:
            raise self.fail(call, "give at least one key to concatenate")
        if len(set(keys)) != len(keys):
            raise self.fail(call, "a key is listed twice")
        nodes = [self._need(call, k) for k in keys]
        self._free(call, into, allowed=keys)
        first = nodes[0].spec
        assert first is not None
        if not first.shape:
            raise self.fail(call, f"{keys[0]!r} is a 0-D tensor; reshape it to 1-D first")
        d = self._dim(call, dim, len(first.shape))
        size = 0
        for k, n in zip(keys, nodes):
            s = n.spec
            assert s is not None
            if s.dtype != first.dtype:
                raise self.fail(
                    call, f"{k!r} is {s.dtype} but {keys[0]!r} is {first.dtype}; cast first"
                )
            if len(s.shape) != len(first.shape) or any(
                a != b for i, (a, b) in enumerate(zip(s.shape, first.shape)) if i != d
            ):
                raise self.fail(
                    call,
                    f"{k!r} has shape {list(s.shape)}, which does not fit {keys[0]!r} "
                    f"{list(first.shape)} along dim {d}",
                )
            size += s.shape[d]
        shape = list(first.shape)
        shape[d] = size
        fused = Apply("concat", tuple(nodes), {"dim": d}, TensorSpec(tuple(shape), first.dtype))
        self._splice(keys[0], [(into, fused)], remove=keys[1:])
        self._record(call, [into], [k for k in keys if k != into])

    # ------------------------------------------------------------------ training state

    def reset_optimizer_state(self, key: str) -> None:
        call = self._call("reset_optimizer_state", key)
        node = self._need(call, key)
        # a mark in the plan, so it follows the tensor through later ops
        self.state.entries[key] = ResetOptimizerState((node,), node.spec)
        self._record(call, [key])

    # ------------------------------------------------------------------ introspection

    def keys(self, prefix: str = "") -> list[str]:
        return self.state.keys(prefix)

    def shape(self, key: str) -> torch.Size:
        spec = self._need(self._call("shape", key), key).spec
        assert spec is not None
        return torch.Size(spec.shape)

    def dtype(self, key: str) -> torch.dtype:
        spec = self._need(self._call("dtype", key), key).spec
        assert spec is not None
        return spec.dtype
