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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
