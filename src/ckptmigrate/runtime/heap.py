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

The console script goes one step further (:func:`end_process`): once the
command has returned and the exit handlers have run, the process ends
without tearing down its modules. With torch imported, that teardown costs
a bare process about half a second, and a command (whose imports are
frozen) about 0.2 s, spent freeing memory the operating system takes back at
once anyway.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn


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


def end_process(code: str | int | None) -> NoReturn:
    """End the process with ``code`` (a ``SystemExit`` code), skipping the module teardown.

    Exit handlers still run (they save coverage data, join multiprocessing's
    children, close logging) and the standard streams are flushed; only what
    would merely free memory is skipped. With another thread still running,
    the usual shutdown (which waits for it) is kept.
    """
    if threading.active_count() > 1:
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # e.g. a closed pipe: Python exits 120 then
            status = status or 120
    os._exit(status)
