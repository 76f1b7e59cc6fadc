"""Synthetic checkpoints built from a schema: real tensors, the same for the same seed.

``squash`` proves itself on one, the pytest plugin runs every revision's
upgrade and downgrade on one, and ``fixture record`` saves one as a golden
checkpoint. Each tensor is drawn from its own generator, seeded from the seed
and its key, so a tensor's values do not depend on which other keys the
schema has (a revision's sample and its parent's agree on every key they
share), and nothing touches the global RNG.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .plan.nodes import TensorSpec, seed_for

#: The seed ``fixture record`` and the plugin use unless told otherwise.
DEFAULT_SEED = 0


class SampleObject(dict[str, str]):
    """Stands for a non-tensor entry (extra state) of a schema, which a schema cannot describe."""


def sample_tensor(key: str, spec: TensorSpec, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Values for ``key``: normal for floating dtypes, small integers, random booleans."""
    gen = torch.Generator().manual_seed(seed_for("sample", str(seed), key))
    dtype = spec.dtype
    if dtype == torch.bool:
        return torch.randint(0, 2, spec.shape, generator=gen).bool()
    if dtype.is_complex:
        return torch.randn(spec.shape, generator=gen, dtype=dtype)
    if dtype.is_floating_point:
        if dtype in (torch.float32, torch.float64):
            return torch.randn(spec.shape, generator=gen, dtype=dtype)
        return torch.randn(spec.shape, generator=gen).to(dtype)  # fp16, bf16, float8: rounded
    info = torch.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000) + 1
    return torch.randint(low, high, spec.shape, generator=gen, dtype=torch.int64).to(dtype)


def sample_reader(
    specs: Mapping[str, TensorSpec | None], seed: int = DEFAULT_SEED
) -> Callable[[str], Any]:
    """``read(key)`` for a synthetic checkpoint with these entries, each made when asked."""

    def read(key: str) -> Any:
        spec = specs[key]
        return SampleObject(sample=key) if spec is None else sample_tensor(key, spec, seed)

    return read


def sample_state_dict(
    specs: Mapping[str, TensorSpec | None], seed: int = DEFAULT_SEED
) -> OrderedDict[str, Any]:
    """The whole synthetic state dict, in the schema's order."""
    read = sample_reader(specs, seed)
    return OrderedDict((key, read(key)) for key in specs)


def same_bits(a: Any, b: Any) -> bool:
    """Bit for bit: dtype, shape and every byte (so -0.0 is not 0.0 and NaNs compare)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return bool(a == b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    flat_a = a.detach().contiguous().reshape(-1).view(torch.uint8)
    flat_b = b.detach().contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(flat_a, flat_b))
