"""Tensors whose view claims more than their storage holds.

A pickled tensor is a storage plus a view (offset, size, stride). PyTorch
itself refuses a view that reaches past its storage, but stride 0 or
overlapping strides can stretch a few bytes into terabytes: harmless while
the view is only copied, an out-of-memory kill once an operation or another
format makes it real (with overcommit, the allocation succeeds and the kernel
kills the process later). So before its values are read, the bytes such a
view would take are bounded by a quarter of the memory this machine has free
(an operation may hold a few copies at once).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch


def available_memory() -> int:
    """Bytes that can be allocated without swapping (physical memory where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 1 << 62


def check_view(where: str, key: str, tensor: torch.Tensor) -> None:
    """Refuse a stretched view whose values would not fit in free memory."""
    logical = tensor.numel() * tensor.element_size()
    stored = tensor.untyped_storage().nbytes()
    if logical <= stored:
        return
    free = available_memory()
    if logical <= free // 4:
        return  # small enough to materialise
    raise CheckpointError(
        f"{where}: tensor {key!r} is a view of {stored:,} bytes stretched to "
        f"{tuple(tensor.shape)} (stride {tuple(tensor.stride())}), {logical:,} bytes once "
        f"materialised, more than a quarter of the {free:,} bytes of memory free",
        hint="the file is crafted or damaged; re-save that tensor with .contiguous() "
        "from a trusted copy",
    )
