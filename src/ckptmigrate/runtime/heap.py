"""The command line's garbage collector: imported modules are not walked again and again.

A command imports torch (and, for DCP, ``torch.distributed``): some 250,000
objects the collector tracks, none of which ever becomes garbage. Each full
collection walks them all (0.1 to 0.2 s), and the first one after the
imports falls on the migration itself, on a bigger checkpoint sooner than on
a smaller one. So, while modules are being imported, what has survived a
collection is frozen (``gc.freeze``): later collections skip it. Once no
module is imported any more, collections are left as they are, so garbage
the migration itself makes is collected as usual. Only the command line
does this; a program that uses ckptmigrate as a library keeps its own
collector settings. What was frozen stays so when the command returns (its
process ends with it, and the collection at exit stays cheap); a program
that calls ``ckptmigrate.cli.main`` itself can ``gc.unfreeze()`` afterwards.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def imports_frozen() -> Iterator[None]:
    """Within: after a collection, freeze what survived if modules were imported since."""
    seen = len(sys.modules)

    def after_collection(phase: str, info: dict[str, Any]) -> None:
        nonlocal seen
        if phase == "stop" and len(sys.modules) != seen:
            seen = len(sys.modules)
            gc.freeze()

    gc.callbacks.append(after_collection)
    try:
        yield
    finally:
        gc.callbacks.remove(after_collection)
