"""Where the weights sit in a loaded file: training containers and wrapper prefixes.

A file may hold a bare state dict or a training container with the weights
under ``state_dict``/``model_state_dict``/``model`` (next to optimizer state,
epochs, ...), and its keys may carry the prefixes ``DataParallel`` or
``torch.compile`` added. Finding the weights, saying clearly when they
cannot be found, and putting new weights back where the old ones were is
the same for every format that can hold more than tensors.

Importing this module does not import torch.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from .unpickle import InertTensor

#: Where training containers usually keep the weights, in lookup order.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
#: Prefixes wrappers add: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = {
    "module.": "DataParallel/DistributedDataParallel",
    "_orig_mod.": "torch.compile",
}


def is_tensor(value: Any) -> bool:
    """A tensor, or a pickle's description of one (read without torch)."""
    if isinstance(value, InertTensor):
        return True
    torch = sys.modules.get("torch")  # no tensor exists before torch is imported
    return torch is not None and isinstance(value, torch.Tensor)


def is_state_dict(value: Any) -> bool:
    """A mapping of string keys to tensors (plus ``*_extra_state`` objects)."""
    if not isinstance(value, Mapping) or not value:
        return False
    saw_tensor = False
    for k, v in value.items():
        if not isinstance(k, str):
            return False
        if is_tensor(v):
            saw_tensor = True
        elif not k.endswith("_extra_state"):
            return False
    return saw_tensor


def locate_state_dict(
    obj: Any, key: str | None, where: str
) -> tuple[tuple[str, ...], Mapping[str, Any]]:
    """Find the state dict inside a loaded object; say clearly when we can't."""
    if key:
        return _at_key(obj, key, where)
    if isinstance(obj, Mapping) and (is_state_dict(obj) or not obj):
        return (), obj
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where} holds a {type(obj).__name__}, not a state dict or a dict containing one",
            hint="save model.state_dict() rather than the model object",
        )
    for candidate in CONTAINER_KEYS:
        if candidate in obj and is_state_dict(obj[candidate]):
            return (candidate,), obj[candidate]
    found = [k for k, v in obj.items() if isinstance(k, str) and is_state_dict(v)]
    if len(found) == 1:
        return (found[0],), obj[found[0]]
    keys = ", ".join(repr(k) for k in list(obj)[:12])
    if found:
        raise CheckpointError(
            f"{where} holds several state dicts ({', '.join(map(repr, found))})",
            hint="choose one with --state-dict-key KEY (or state_dict_key in the config)",
        )
    raise CheckpointError(
        f"{where} has no state dict: top-level keys are {keys}",
        hint="choose the weights' entry with --state-dict-key KEY",
    )


def _at_key(obj: Any, key: str, where: str) -> tuple[tuple[str, ...], Mapping[str, Any]]:
    """The state dict the user named (``a/b`` or ``a.b`` for a nested entry)."""
    if isinstance(obj, Mapping) and key in obj:
        path: tuple[str, ...] = (key,)
    elif "/" in key:
        path = tuple(p for p in key.split("/") if p)
    else:
        path = tuple(key.split("."))
    node = obj
    for i, part in enumerate(path):
        if not isinstance(node, Mapping) or part not in node:
            have = (
                ", ".join(map(repr, list(node)[:10]))
                if isinstance(node, Mapping)
                else type(node).__name__
            )
            raise CheckpointError(
                f"{where} has no entry {'/'.join(path[: i + 1])!r} (found: {have})",
                hint="fix --state-dict-key",
            )
        node = node[part]
    if not (isinstance(node, Mapping) and (is_state_dict(node) or not node)):
        raise CheckpointError(
            f"{where}: entry {key!r} is not a state dict (a mapping of names to tensors)",
            hint="point --state-dict-key at the weights",
        )
    return path, node


def replace_at(container: Any, path: tuple[str, ...], value: Any) -> Any:
    """A shallow copy of ``container`` with ``value`` at ``path``."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    shallow = copy.copy(container)  # keeps a dict subclass (and its attributes) as it was
    shallow[head] = replace_at(container[head], rest, value)
    return shallow


def wrapper_prefix(keys: list[str]) -> str:
    """The run of wrapper prefixes every key starts with ("" if none)."""
    prefix = ""
    if not keys:
        return prefix
    while True:
        for candidate in WRAPPER_PREFIXES:
            full = prefix + candidate
            if all(k.startswith(full) for k in keys):
                prefix = full
                break
        else:
            return prefix


def describe_wrapper(prefix: str) -> str:
    """Which wrappers a prefix run comes from, e.g. ``DataParallel/... + torch.compile``."""
    return " + ".join(
        WRAPPER_PREFIXES[p + "."]
        for p in prefix.rstrip(".").split(".")
        if p + "." in WRAPPER_PREFIXES
    )
