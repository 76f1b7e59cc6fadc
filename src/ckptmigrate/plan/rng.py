"""torch's global CPU generator, seeded for a migration's own code, restored after.

Revision scripts (``op.add_module("fc3", nn.Linear(20, 5))``) and callable
inits draw from the global generator. Seeding it makes their tensors the same
on every run; forking it leaves the caller's state alone. The generator is
one per process, and a batch runs several checkpoints at once: a lock makes
those runs take turns with it, so each gets exactly the draws its seed gives.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """The global CPU generator seeded with ``seed`` for this block, this thread only."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also (lazily) reseed
        # CUDA, whose state fork_rng(devices=[]) does not restore.
        torch.default_generator.manual_seed(seed)
        yield
