"""``-j N`` in forked processes: N checkpoints at once on N cores.

Threads share the interpreter's lock, and on small checkpoints most of the
work is Python (reading the pickle and zip index, writing new ones, the
bookkeeping around each file), so in threads ``-j 2`` is no faster than
``-j 1``. Workers forked after the batch's warm-up start with torch, the
lineage and the configured model already in memory: no import, no rebuild.

Forking is only safe where nothing runs beside the thread that forks, as
the copy has that thread alone: on Linux, in a process with no other Python
thread (a program embedding the API may have some), for checkpoints on local
disks. A store's client (fsspec, s3fs) keeps event loops and connection
pools in threads, so batches that touch a URL stay in threads, as does
every batch where :func:`can_fork` says no.

Each worker gets one checkpoint's index at a time over a pipe and sends its
:class:`~.fleet_report.Outcome` back. A worker that dies (killed, out of
memory) fails the checkpoint it held, whose file is still the old one
(every write is atomic), and a new worker takes its place. Ctrl-C is the
parent's to handle: workers ignore SIGINT and look at the flag the parent
shares with them (:class:`StopFlag`) between tensors, as threads do.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import mmap
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from ..formats.storage import is_url
from .fleet_report import Outcome

RunOne = Callable[[int], Outcome]
#: Checkpoints a worker holds at once: the one it runs and the next, so that it
#: never waits for this process to hand it one.
AHEAD = 2
#: The outcome of checkpoint ``i`` whose worker died, given how it died and the
#: checkpoints that worker finished last (whose old files it may not have deleted yet).
Died = Callable[[int, str, Sequence[int]], Outcome]


def can_fork(paths: Sequence[str]) -> bool:
    """Whether a batch over ``paths`` may run in forked workers."""
    return (
        sys.platform.startswith("linux")
        and threading.active_count() == 1
        and not any(is_url(p) for p in paths)
    )


class StopFlag:
    """One byte of memory shared with the workers: set once Ctrl-C asked the batch to stop."""

    def __init__(self) -> None:
        self._byte = mmap.mmap(-1, 1)  # anonymous and shared: forks see the parent's writes

    def set(self) -> None:
        self._byte[0] = 1

    def is_set(self) -> bool:
        return self._byte[0] == 1


def run_forked(
    count: int,
    jobs: int,
    run_one: RunOne,
    *,
    stopped: Callable[[], bool],
    done: Callable[[int, Outcome], None],
    died: Died,
) -> dict[int, Outcome]:
    """Run ``run_one(i)`` for ``i < count`` in ``jobs`` forked workers; ``done`` as each ends.

    No checkpoint is handed out once ``stopped()``; those never started are
    missing from the result, for the caller to report.
    """
    context = multiprocessing.get_context("fork")
    # Objects the workers inherit are left out of their collections, so that
    # collecting does not write to (and so copy) every page they share.
    gc.freeze()
    try:
        results: dict[int, Outcome] = {}
        pending = collections.deque(range(count))
        live: dict[Connection, _Worker] = {}

        def top_up(worker: _Worker) -> None:
            """Keep ``worker`` holding AHEAD checkpoints while there are any; else let it go."""
            while len(worker.held) < AHEAD and pending and not stopped():
                index = pending.popleft()
                worker.conn.send(index)
                worker.held.append(index)
            if not worker.held:
                del live[worker.conn]
                worker.close()

        def start() -> None:
            worker = _Worker(context, run_one)
            live[worker.conn] = worker
            top_up(worker)

        try:
            for _ in range(min(jobs, count)):
                start()
            while live:
                for conn in wait(list(live)):
                    assert isinstance(conn, Connection)
                    worker = live[conn]
                    try:
                        outcome: Outcome = conn.recv()
                    except (EOFError, OSError):  # it died: a new worker takes its place
                        del live[conn]
                        index = worker.held.popleft()
                        pending.extendleft(reversed(worker.held))  # never started: for the others
                        results[index] = died(index, worker.reap(), tuple(worker.finished))
                        done(index, results[index])
                        if pending and not stopped():
                            start()
                        continue
                    index = worker.held.popleft()
                    results[index] = outcome
                    worker.finished.append(index)
                    done(index, outcome)
                    top_up(worker)
        except BaseException:  # a second Ctrl-C: the workers finish (or stop at) their tensor
            for worker in live.values():
                worker.close()
            raise
        return results
    finally:
        gc.unfreeze()


class _Worker:
    """One forked process serving checkpoint indices over a pipe."""

    def __init__(self, context: Any, run_one: RunOne) -> None:
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs, run_one), daemon=True)
        self.process.start()
        theirs.close()
        self.held: collections.deque[int] = collections.deque()  # sent, not answered yet
        self.finished: collections.deque[int] = collections.deque(maxlen=4)

    def close(self) -> None:
        """No more work: the worker ends when it has sent what it holds."""
        with contextlib.suppress(OSError):  # it died already: reap() says how
            self.conn.send(None)
        self.process.join()
        self.conn.close()

    def reap(self) -> str:
        """How the worker ended, once it stopped answering."""
        self.process.join()
        self.conn.close()
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        return f"exited with status {code}"


def _serve(conn: Connection, run_one: RunOne) -> None:
    """The worker's loop: an index in, its outcome out, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; see StopFlag
    if "torch" in sys.modules:
        import torch

        # GNU OpenMP's thread pool does not survive a fork: with one thread,
        # torch never enters it (and N workers on N cores need no more).
        torch.set_num_threads(1)
    from ..formats.atomic import removals_in_background

    with removals_in_background():  # old files deleted while the next one is written
        while True:
            try:
                index = conn.recv()
            except EOFError:
                return
            if index is None:
                return
            conn.send(run_one(index))
