"""Shape and dtype: everything a schema knows about a tensor, and all a symbolic plan needs.

Kept apart from the plan's nodes so that initialisers and schemas can use it
without the nodes, which compute with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype: everything a schema knows about a tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_itemsize(self.dtype)

    def __str__(self) -> str:
        return f"[{', '.join(map(str, self.shape))}] {dtype_name(self.dtype)}"


#: One spec object per (shape, dtype) that readers saw: a model has few distinct ones, and
#: comparing two schemas finds each pair of entries identical without comparing fields.
_INTERNED: dict[tuple[tuple[int, ...], torch.dtype], TensorSpec] = {}
_INTERNED_MAX = 1 << 14  # then start again: a bound, not an expectation


def interned(shape: tuple[int, ...], dtype: torch.dtype) -> TensorSpec:
    """The spec of ``shape`` and ``dtype``, the same object for equal ones."""
    key = (shape, dtype)
    spec = _INTERNED.get(key)
    if spec is None:
        if len(_INTERNED) >= _INTERNED_MAX:
            _INTERNED.clear()
        spec = _INTERNED[key] = TensorSpec(shape, dtype)
    return spec


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
